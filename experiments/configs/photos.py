"""VDM, DiffEnc (trainable encoder) and CDM on the `photos` benchmark, sized for about an hour each on a
2-core CPU.

Data: 32x32x3 patches, 256 levels, of the photographs bundled with scikit-image and scikit-learn (see
vdiff/data.py `_load_photos`), split by photo; training patches on a stride-16 grid (16399 overlapping
patches from 7 photos) with random horizontal flips, the 862 non-overlapping test patches of 4 other
photos.

Networks: the CIFAR-10 paper networks scaled down (the paper's in brackets), same architecture otherwise:
  vdm      score U-Net at full 32x32 resolution: 32 [128] channels, 2 [32] ResNet blocks down, 3 up,
           attention in the middle block, no dropout [0.1]; learned scalar gamma in [-13.3, 5]
           (vdm_cifar10.py). 223,653 parameters [~32M].
  diffenc  the same score network, v-prediction, fixed linear gamma in [-13.3, 5] (diffenc_cifar10.py),
           and a trainable encoder U-Net of 16 [128] channels x (1, 2) [(1, 2, 2)], 1 [2] ResNet block
           per level, no attention [at 8x8]: 223,651 + 164,563 parameters.
  cdm      the noise-level classifier U-Net of 32 [128] channels x (1, 2, 2) [(1, 2, 2, 2)], 1 [2] ResNet
           block per level, attention at 8x8 [16x16], no dropout [0.1], T = 1000 DDPM betas, w_ce = 1e-3
           (the paper's, tuned for D = 3072 = 32 * 32 * 3, this data's D) (cdm_cifar10.py). 1,056,234
           parameters; it downsamples, so a step costs about as much as VDM's (below).
Optimiser for all: Adam(W) 1e-3 after 200 warm-up steps, batch 32, EMA 0.999 with warm-up (decay
min(0.999, (1 + n) / (10 + n)) at step n: without it, 0.999^1600 = 20% of the EMA would still be the
initial parameters at the end of a one-hour run; the first photos VDM and CDM runs, trained without it,
need `--config.training.ema_warmup=False` to resume).

Step budgets (NUM_STEPS = 1600, 900, 1250): one hour of process CPU time at the CPU seconds per step
measured with real batches on the 2-core CPU (vdm 2.20, diffenc 3.87, cdm 2.86 CPU s/step, medians over
11-17 steps after compilation). A run that gets one core's worth of time takes about an hour; an idle
2-core machine is faster (XLA runs a step on both cores), a busier one slower: the machine they were
measured on was shared (load average ~13), and there a step took 9.4 (vdm), 14.3 (diffenc) and 9.0 (cdm)
seconds of wall-clock time, and compiling took 77, 245 and 154 s.

  python -m experiments.main --config=experiments/configs/photos.py:vdm --workdir=/tmp/photos/vdm
  python -m experiments.main --config=experiments/configs/photos.py:diffenc --workdir=/tmp/photos/diffenc
  python -m experiments.main --config=experiments/configs/photos.py:cdm --workdir=/tmp/photos/cdm

Each family also accepts the base argument words, e.g. `photos.py:cdm,tiny`. Evaluate the CDM with its
other estimators with `--mode=eval --config.eval.estimator=ode` (and the VDM / DiffEnc likewise).
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
  c.data.name = "photos"
  c.data.patch_size = 32
  c.data.patch_stride = 16
  c.data.random_flip = True

  c.model.family = family
  c.model.num_steps = 0  # continuous time
  c.model.score.update(ch=32, num_blocks=2, dropout=0.0, attention=True, num_groups=8,
                       fourier_min=6, fourier_max=8)
  if family == "vdm":
    c.model.parameterization = "eps"
    c.model.schedule.update(kind="learned_scalar", gamma_min=-13.3, gamma_max=5.0)
  elif family == "diffenc":
    c.model.parameterization = "v"
    c.model.schedule.update(kind="linear", gamma_min=-13.3, gamma_max=5.0)
    # The encoder is the smaller network, as in DiffEnc: 165k parameters beside the score network's
    # 224k (ch_mult (1, 2, 2) would be 268k and made a step 1.6x slower than VDM's).
    c.model.encoder.update(kind="trainable", ch=16, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(), num_groups=8)
  else:
    c.model.cdm.update(num_steps=1000, beta_start=1e-4, beta_end=0.02, w_ce=1e-3, ch=32,
                       ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                       num_groups=8)

  c.optim.update(learning_rate=1e-3, warmup_steps=200, b1=0.9, b2=0.99, weight_decay=0.01)
  c.training.update(batch_size=32, num_steps=NUM_STEPS[family], log_every=50, eval_every=0,
                    checkpoint_every=500, ema_decay=0.999, ema_warmup=True, sample_every=0)
  c.eval.update(batch_size=128, num_examples=0, num_time_samples=1,
                estimator="cdm" if family == "cdm" else "elbo")
  c.sample.update(sampler="ddim" if family == "cdm" else "vdm_ancestral", num_steps=100, num_samples=64)
  return base.apply_words(c, words)


# Training steps per family: 3600 s / (measured CPU seconds per step), rounded down (see the docstring).
NUM_STEPS = {"vdm": 1600, "diffenc": 900, "cdm": 1250}
