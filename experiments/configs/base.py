"""The default config every experiment starts from, and the argument words (`path:word1,word2`).

Every hyperparameter lives here; networks and losses receive explicit values unpacked from it.
Argument words: `tiny` shrinks any config to run in under a minute on a CPU; `trainable` / `nontrainable`
choose the DiffEnc encoder; `conditional` trains a class-conditional model with label dropout.
"""

from __future__ import annotations

import difflib

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.name = "digits"          # digits | mnist | cifar10 | downsampled_imagenet/32x32 | npz | gaussian_mixture | uniform
  d.data_dir = ""            # tfds data_dir (tfds.data_source reads it without TensorFlow)
  d.path = ""                # the .npz file for name=npz
  d.random_flip = False

  c.model = m = ml_collections.ConfigDict()
  m.family = "vdm"           # vdm | diffenc | cdm | a registered name | "package.module:ClassName"
  m.parameterization = "eps" # eps | v
  m.num_steps = 0            # T of the diffusion loss; 0 = continuous time
  m.antithetic = True        # stratified time sampling over the global batch
  m.conditional = False      # condition on the class label (classifier-free guidance)
  m.p_uncond = 0.1           # label dropout probability when conditional
  m.schedule = s = ml_collections.ConfigDict()
  s.kind = "learned_scalar"  # linear | cosine | learned_scalar | learned_net | learned_pinned
  s.gamma_min = -13.3
  s.gamma_max = 5.0
  s.variance_minimization = False  # learned_pinned only: learn the shape by minimising Var[L_diff]
  m.score = sc = ml_collections.ConfigDict()
  sc.ch = 128
  sc.num_blocks = 32
  sc.dropout = 0.1
  sc.attention = True
  sc.fourier_min = 6
  sc.fourier_max = 8
  sc.fourier_damping = False  # damp the Fourier features by exp(-w^2 sigma_t^2 / 2) (nets/layers.py)
  sc.num_groups = 32
  sc.remat = False           # rematerialise the ResNet blocks in the backward pass (less memory, ~1 more forward)
  m.encoder = e = ml_collections.ConfigDict()  # DiffEnc
  e.kind = "identity"        # identity | nontrainable | trainable
  e.ch = 64
  e.ch_mult = (1, 2)
  e.num_res_blocks = 2
  e.attn_resolutions = ()
  e.num_groups = 32
  # A user family's own hyperparameters (model.family = "package.module:ClassName", see
  # vdiff.models.FamilyProtocol): declare them here in the family's config file; the command line can
  # then override them (--config.model.options.KEY=VALUE) but, the config being locked, not add new ones.
  m.options = ml_collections.ConfigDict()
  m.cdm = cd = ml_collections.ConfigDict()     # Classification Diffusion Models
  cd.num_steps = 1000        # T: classes 0..T+1
  cd.grid = "ddpm"           # ddpm | uniform | schedule: the class grid abar_0..abar_{T+1} (vdiff.cdm.class_grid)
  cd.beta_start = 1e-4       # ddpm grid: DDPM's linear betas beta_start..beta_end over beta_steps steps,
  cd.beta_end = 0.02         #   resampled at the T levels t = i / T, so that any T (the `tiny` T = 50
  cd.beta_steps = 1000       #   too) ends where that schedule ends (abar = 4.0e-5 for these values)
                             # schedule grid: model.schedule (kind linear | cosine, gamma_min, gamma_max)
                             #   sampled at t = i / T; uniform grid: sqrt(1 - abar_t) = t / (T + 1)
  cd.w_ce = 1e-3
  cd.ch = 128
  cd.ch_mult = (1, 2, 2, 2)
  cd.num_res_blocks = 2
  cd.attn_resolutions = (16,)
  cd.dropout = 0.1
  cd.num_groups = 32

  c.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 2e-4
  o.warmup_steps = 100
  o.b1 = 0.9
  o.b2 = 0.99
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.grad_clip = 0.0
  o.lr_schedule = "constant"  # constant | cosine

  c.training = t = ml_collections.ConfigDict()
  t.batch_size = 128
  t.num_steps = 10_000_000
  t.steps_per_dispatch = 1
  t.ema_decay = 0.9999
  t.ema_warmup = False      # decay min(ema_decay, (1 + n) / (10 + n)) at step n (train.ema_decay_at)
  t.log_every = 100
  t.eval_every = 10_000
  t.checkpoint_every = 10_000
  t.sample_every = 0
  t.max_checkpoints_to_keep = 3
  t.async_checkpointing = True
  t.nan_policy = "skip"      # skip | stop
  # float32 | bfloat16: the score network's activations and matmuls/convs in the training loss (vdm,
  # diffenc); parameters, optimiser state, loss terms and schedule stay float32; evaluation and sampling
  # always run in float32.
  t.compute_dtype = "float32"
  t.inject_nan_at_step = -1  # testing switch: replace that step's loss by NaN
  t.allow_config_change = False  # resume even if a guarded key changed (vdiff/workdir.py HARMLESS_KEYS)

  c.eval = ev = ml_collections.ConfigDict()
  ev.split = "test"
  ev.batch_size = 128
  ev.num_examples = 0        # 0 = the whole split
  ev.estimator = "elbo"      # elbo | cdm | ode
  ev.num_time_samples = 1    # ELBO: Monte-Carlo time samples per image
  ev.params = "ema"          # ema | raw: the parameters every evaluation uses (train.eval_params)
  # cdm / ode: uniform = a density on uniformly dequantised data (+ log2(K/2) bits/dim; CDM class 0);
  # forward = a discrete bound with the forward process q(z_t0 | k) and the K-level decoder, comparable
  # with the ELBO (ODE from ode_t0 to 1; CDM class 1). See vdiff/evaluate.py.
  ev.dequantization = "uniform"     # uniform | forward
  ev.num_dequantization_samples = 1  # cdm / ode: importance samples per image (log-mean-exp); with
                             # ode_divergence=hutchinson and > 1 the probe noise biases the bound down
  ev.ode_t0 = 0.0            # forward dequantisation of the ODE: time of z (0 = the schedule's gamma_min)
  ev.ode_rtol = 1e-5
  ev.ode_atol = 1e-5
  ev.ode_divergence = "hutchinson"  # hutchinson | exact
  ev.precision = "highest"   # matmul/conv precision of the evaluation: default | high | highest
  ev.condition = "label"     # conditional models: label (-log p(x | c)) | none (-log p(x), null label)

  c.sample = sm = ml_collections.ConfigDict()
  # vdm_ancestral | ddpm | ddim | ode | dpm_solver | dpm_solver++ | heun | pc | langevin (vdiff.sampling)
  sm.sampler = "vdm_ancestral"
  sm.num_steps = 256
  sm.eta = 0.0
  # ddpm / ddim: clip x0_hat to [-1, 1]; None = the sampler's own default (ddpm clips, ddim does not).
  sm.clip_x0 = ml_collections.FieldReference(None, field_type=bool)
  sm.guidance_weight = 0.0
  sm.label = -1              # class to sample when conditional; -1 = unconditional
  sm.num_samples = 64
  sm.params = "ema"          # ema | raw: the parameters --mode=sample uses
  # Sampler-specific settings (vdiff.sampling.DEFAULT_OPTIONS; each sampler ignores the others').
  sm.order = 2               # dpm_solver / dpm_solver++: 1 | 2 | 3
  sm.method = "multistep"    # dpm_solver / dpm_solver++: multistep | singlestep | singlestep_fixed
  sm.skip_type = "logSNR"    # dpm_solver / dpm_solver++: time_uniform | logSNR | time_quadratic
  sm.thresholding = False    # dpm_solver++: dynamic thresholding of x0_hat
  sm.predictor = "reverse_diffusion"  # pc: reverse_diffusion | euler_maruyama | ancestral | none
  sm.corrector = "langevin"  # pc: langevin | none
  sm.snr = 0.16              # pc: the Langevin corrector's signal-to-noise ratio
  sm.corrector_steps = 1     # pc: corrector steps per noise level
  sm.steps_per_level = 5     # langevin: steps per noise level (num_steps = the number of levels)
  sm.step_size = 2e-5        # langevin: the step at the smallest level
  sm.sigma_min = 0.01        # langevin: the smallest level (raised to the schedule's smallest)
  return c


WORDS = ("tiny", "trainable", "nontrainable", "conditional")


def parse_words(arg: str | None) -> set[str]:
  words = {w.strip() for w in (arg or "").split(",") if w.strip()}
  unknown = words - set(WORDS)
  if unknown:
    near = {w: difflib.get_close_matches(w, WORDS, n=1) for w in sorted(unknown)}
    hint = "; ".join(f"did you mean {n[0]!r} for {w!r}?" for w, n in near.items() if n)
    raise ValueError(f"unknown config argument word(s) {sorted(unknown)}; expected some of {WORDS}"
                     + (f" ({hint})" if hint else "") + ".")
  return words


def split_variant(arg: str | None, variants: tuple[str, ...], *, default: str,
                  what: str) -> tuple[str, set[str]]:
  """(the one word of `variants` in arg, or default; the remaining words checked by parse_words).

  For configs that take one variant word (a family, a study variant) besides the base words; `what`
  names the choice in the error for two variant words ("choose one {what}, got [...]")."""
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  chosen = [w for w in words if w in variants]
  if len(chosen) > 1:
    raise ValueError(f"choose one {what}, got {chosen}.")
  return (chosen[0] if chosen else default), parse_words(
      ",".join(w for w in words if w not in variants))


def apply_words(c: ml_collections.ConfigDict, words: set[str]) -> ml_collections.ConfigDict:
  """Apply argument words in a fixed order (tiny last, so it shrinks whatever the others chose)."""
  if "trainable" in words and "nontrainable" in words:
    raise ValueError("choose one of 'trainable' and 'nontrainable'.")
  if "trainable" in words:
    c.model.encoder.kind = "trainable"
  if "nontrainable" in words:
    c.model.encoder.kind = "nontrainable"
  if "conditional" in words:
    c.model.conditional = True
  if "tiny" in words:
    shrink_tiny(c)
  return c


def shrink_tiny(c: ml_collections.ConfigDict) -> None:
  """Under a minute on a CPU: a few tiny networks, a few steps, a small evaluation."""
  c.model.score.update(ch=16, num_blocks=1, dropout=0.0, num_groups=8)
  c.model.encoder.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
  c.model.cdm.update(num_steps=50, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0, num_groups=8)
  c.training.update(batch_size=16, num_steps=20, log_every=5, eval_every=0, checkpoint_every=10,
                    ema_decay=0.9, sample_every=0)
  c.optim.warmup_steps = 5
  c.eval.update(batch_size=64, num_examples=128)
  c.sample.update(num_steps=20, num_samples=16)
