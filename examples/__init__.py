"""Examples of vdiff used as a library: `own_network` trains a user's denoiser through the trainer."""
