"""vdiff: likelihood-based diffusion models in JAX/Flax (VDM, DiffEnc, CDM, samplers, three NLL estimators)."""

__version__ = "0.1.0"
