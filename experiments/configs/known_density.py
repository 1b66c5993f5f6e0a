"""Likelihood on data of known density: a quantised Gaussian mixture, 4x4x1, K = 256, CPU-sized networks.

`data.name = gaussian_mixture` (vdiff/data.py): 4 diagonal Gaussians in D = 16 dimensions, quantised to
256 levels, 10k / 2k train / test, with its exact discrete entropy `true_bpd` (a Monte-Carlo mean of the
exact -log2 P(k), with its standard error): the bits/dim a perfect model reaches, so every estimator's
gap to the truth can be read off (experiments/bench_likelihood.py).

Argument words: one family, `vdm` (default), `diffenc` (non-trainable encoder x_t = alpha_t^2 x; with
`trainable`, x_t = alpha_t^2 x + sigma_t^2 y_phi(x, t)) or `cdm`, plus the base words (`tiny`, ...):

  python -m experiments.main --config=experiments/configs/known_density.py:vdm --workdir=/tmp/kd/vdm
  python -m experiments.main --config=experiments/configs/known_density.py:cdm --workdir=/tmp/kd/cdm
  python -m experiments.main --config=experiments/configs/known_density.py:diffenc,trainable --workdir=/tmp/kd/de
  python -m experiments.main --config=experiments/configs/known_density.py:cdm,tiny --workdir=/tmp/kd/t
"""

from __future__ import annotations

from experiments.configs import base

FAMILIES = ("vdm", "diffenc", "cdm")


def _split(arg: str | None) -> tuple[str, set[str]]:
  return base.split_variant(arg, FAMILIES, default="vdm", what=f"family of {FAMILIES}")


def get_config(arg: str | None = None):
  family, words = _split(arg)
  c = base.get_base_config()
  c.seed = 0
  c.data.name = "gaussian_mixture"  # loader defaults: shape (4, 4, 1), K = 256, 4 components, 10k / 2k

  # Score network: 32 channels, 2 blocks (attention at 4x4 is cheap). K = 256 levels: the bin half-width
  # 1/256 is resolved at gamma ~ -11, so keep VDM's gamma_min = -13.3 and its input Fourier features at
  # angular frequencies 2^n 2 pi, n = 6, 7 (fourier_min=6, fourier_max=8; periods 1/64 and 1/128 against
  # the bin width 1/128), which resolve that bin spacing. The features are damped by the noise level
  # (fourier_damping, nets/layers.py): undamped, their derivatives (up to 804 per unit of z) left the
  # network's input Jacobian oscillating at high noise, and the probability-flow ODE, which integrates
  # its divergence, gave 0.4 to 0.8 bits/dim more than the ELBO (README, "Known density").
  c.model.family = "vdm"
  c.model.parameterization = "eps"
  c.model.num_steps = 0  # continuous time
  c.model.schedule.update(kind="learned_scalar", gamma_min=-13.3, gamma_max=5.0)
  c.model.score.update(ch=32, num_blocks=2, dropout=0.0, attention=True, num_groups=8,
                       fourier_min=6, fourier_max=8, fourier_damping=True)
  # DiffEnc's trainable encoder (word `trainable`), sized for 4x4 data. One resolution level
  # (ch_mult=(1,)): halving 4x4 leaves 2x2 maps on which a 3x3 conv sees mostly padding. 16 channels and
  # one ResNet block (41k parameters beside the score network's 220k) so that the encoder adds to the
  # train step what DiffEnc's CIFAR-10 encoder adds to its step: the encoder runs four times per step
  # (x_t and its jvp in gamma, x_0 and x_1 for the endpoint terms) and is differentiated, and here it
  # makes the step 2.8 GFLOP against VDM's 1.6 (1.7x; 569 against 312 GFLOP, 1.8x, at the paper size,
  # README "Train-step throughput"). The base default (ch 64, ch_mult (1, 2), 2 blocks: 3.66M
  # parameters, 17x the score network) made it 42 GFLOP (26x) and 90x slower than VDM's step on a CPU.
  c.model.encoder.update(kind="nontrainable" if family == "diffenc" else "identity",
                         ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=8)

  # CDM: T = 150 noise levels (152 classes). DDPM's betas 1e-4..0.02 are for T = 1000; scaled by
  # 1000 / 150 so that abar_T ~ exp(-sum beta) ~ 5e-5 as in DDPM (the grid still reaches pure noise).
  # beta_steps = 150 names that 150-beta schedule: T = 150 classes are exactly its levels, and `tiny`
  # (T = 50) resamples it.
  # Classifier 4x4 -> 2x2, 32 channels, attention at 2x2 and in the middle.
  # w_ce: the paper's 1e-3 balances its CE against a per-dimension MEAN squared error at D = 3072, i.e.
  # w_ce * D = 3.07 against the summed error; keeping that balance at D = 16 gives 3.07 / 16 ~ 0.2
  # (the same argument as experiments/configs/study.py, which uses 0.05 at D = 64).
  c.model.cdm.update(num_steps=150, grid="ddpm", beta_start=1e-4 * 1000 / 150,
                     beta_end=0.02 * 1000 / 150, beta_steps=150, w_ce=0.2,
                     ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(2,), dropout=0.0,
                     num_groups=8)

  c.optim.update(learning_rate=2e-3, warmup_steps=200, weight_decay=0.01, b1=0.9, b2=0.99)
  c.training.update(batch_size=128, num_steps=3000, log_every=100, eval_every=500,
                    checkpoint_every=100_000, ema_decay=0.995, sample_every=0)
  # Every test image once (2000); ELBO with one time sample per image during training (the benchmark
  # takes more), CDM with one dequantisation draw.
  c.eval.update(batch_size=500, num_examples=0, num_time_samples=1, estimator="elbo")
  c.sample.update(num_samples=0, num_steps=200)  # likelihood experiments: no samples

  if family == "diffenc":
    c.model.family = "diffenc"
  elif family == "cdm":
    c.model.family = "cdm"
    c.eval.estimator = "cdm"
    c.sample.update(sampler="ddim", num_steps=100)
  c = base.apply_words(c, words)
  if "tiny" in words:
    c.data.name = "gaussian_mixture"
    c.eval.update(batch_size=64, num_examples=128)
  return c
