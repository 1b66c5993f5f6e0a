"""The family study on scikit-learn digits (8x8, 17 levels, 1497 / 300 train / test), offline, CPU.

One config per variant, all with the same data, seed, batch size, step budget, optimiser and evaluation
batch size, so that their test bits/dim and timings are comparable (see experiments/study_families.py):

  vdm               VDM, learned scalar schedule (the quickstart model)
  diffenc_nt        DiffEnc, non-trainable encoder x_t = alpha_t^2 x (same score network and schedule)
  diffenc_tr        DiffEnc, trainable encoder x_t = alpha_t^2 x + sigma_t^2 y_phi(x, t) (+ a small U-Net)
  pinned            VDM with the pinned monotone-network schedule (endpoints learned through the ELBO,
                    the shape too, by the ordinary ELBO gradient)
  pinned_varmin     the same, its shape learned by minimising Var[L_diff] (VDM sec. 5)
  cdm               Classification Diffusion Model, one-step likelihood on dequantised data

Any variant also accepts the base argument words (`tiny`, ...), e.g.

  python -m experiments.main --config=experiments/configs/study.py:diffenc_tr --workdir=/tmp/study/de
  python -m experiments.main --config=experiments/configs/study.py:cdm,tiny --workdir=/tmp/study/cdm
"""

from __future__ import annotations

from experiments.configs import base

VARIANTS = ("vdm", "diffenc_nt", "diffenc_tr", "pinned", "pinned_varmin", "cdm")


def _split(arg: str | None) -> tuple[str, set[str]]:
  return base.split_variant(arg, VARIANTS, default="vdm", what="study variant")


def get_config(arg: str | None = None):
  variant, words = _split(arg)
  c = base.get_base_config()
  c.data.name = "digits"
  c.seed = 0

  # Score network and schedule endpoints: the quickstart's digits settings (see quickstart.py: at 17
  # levels gamma_min = -8 already makes reconstruction nearly free; Fourier features 2^2..2^5 pi).
  c.model.family = "vdm"
  c.model.parameterization = "eps"
  c.model.num_steps = 0  # continuous time
  c.model.schedule.update(kind="learned_scalar", gamma_min=-8.0, gamma_max=5.0,
                          variance_minimization=False)
  c.model.score.update(ch=32, num_blocks=2, dropout=0.0, attention=True, num_groups=8,
                       fourier_min=2, fourier_max=5)
  # DiffEnc's trainable encoder: a small U-Net (8x8 -> 4x4), zero-initialised output (= non-trainable).
  # ch = 16 gives 164k parameters beside the score network's 221k (as in DiffEnc, the encoder is the
  # smaller network); ch = 32 would be 651k, 3x the score network, and made training 2x slower here.
  c.model.encoder.update(kind="identity", ch=16, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(), num_groups=8)

  # CDM classifier of size comparable to the score network: ch 16 x (1, 2), 8x8 -> 4x4, two ResNet blocks
  # per level, attention only at 4x4 (and in the middle block), no dropout at this budget: 230k
  # parameters beside the score network's 221k (ch 32 would be 918k).
  # Classes: T = 200 noise levels (+ clean + pure noise). DDPM's betas 1e-4..0.02 are for T = 1000; with
  # 200 betas they are scaled by 1000 / 200 = 5 (5e-4..0.1) so that abar_T ~ exp(-sum beta) ~ 4e-5 as in
  # DDPM: the grid still reaches (almost) pure noise, and its cleanest level (sigma ~ 0.022) lies below
  # the dequantisation noise (uniform over a bin of width 2/17, std 0.034). beta_steps = 200 names that
  # 200-beta schedule: T = 200 classes are exactly its levels, and `tiny` (T = 50) resamples it.
  # w_ce: the paper's loss is w_ce CE + MEAN over the D dimensions of (eps - eps_hat)^2, with w_ce = 1e-3
  # tuned for CIFAR-10 (D = 3072). The CE is one number per image whatever D is, whereas the MSE is a
  # per-dimension mean; written against the SUMMED squared error (the quantity that, like the log
  # density the logits encode, grows with D) the paper's balance is w_ce * D = 1e-3 * 3072 = 3.07. Keeping
  # that balance at D = 64 gives w_ce = 3.07 / 64 = 0.048; we use 0.05. (With 1e-3 the CE -- the only
  # term that pins the t = 0 logit, i.e. the likelihood -- would be ~50x weaker here than in the paper.)
  c.model.cdm.update(num_steps=200, grid="ddpm", beta_start=5e-4, beta_end=0.1, beta_steps=200,
                     w_ce=0.05, ch=16, ch_mult=(1, 2),
                     num_res_blocks=2, attn_resolutions=(4,), dropout=0.0, num_groups=8)

  # One optimiser, batch, budget and EMA for every variant (the quickstart's).
  c.optim.update(learning_rate=2e-3, warmup_steps=200, weight_decay=0.01, b1=0.9, b2=0.99)
  c.training.update(batch_size=64, num_steps=1500, log_every=100, eval_every=0,
                    checkpoint_every=100_000, ema_decay=0.995, sample_every=0)
  # ELBO estimates with 4 Monte-Carlo time samples per test image; the CDM estimate with one
  # dequantisation draw (one network evaluation) per image. Same evaluation batch for both.
  c.eval.update(batch_size=100, num_examples=0, num_time_samples=4, estimator="elbo")
  c.sample.update(num_samples=0, num_steps=200)  # the study measures likelihoods, not samples

  if variant == "diffenc_nt":
    c.model.family = "diffenc"
    c.model.encoder.kind = "nontrainable"
  elif variant == "diffenc_tr":
    c.model.family = "diffenc"
    c.model.encoder.kind = "trainable"
  elif variant in ("pinned", "pinned_varmin"):
    c.model.schedule.kind = "learned_pinned"
    c.model.schedule.variance_minimization = variant == "pinned_varmin"
  elif variant == "cdm":
    c.model.family = "cdm"
    c.eval.estimator = "cdm"
    c.sample.update(sampler="ddim", num_steps=100)
  return base.apply_words(c, words)
