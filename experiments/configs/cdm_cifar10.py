"""Classification Diffusion Model on CIFAR-10 (Yadin, Elata, Michaeli, NeurIPS 2024, arXiv:2402.10095):
the DDPM U-Net trunk (128 channels, multipliers 1,2,2,2, 2 ResNet blocks per level, attention at 16x16,
dropout 0.1) with no time input and a T + 2 = 1002-way cumulative-sum head; DDPM linear betas (the
class grid `model.cdm.grid = ddpm`; `uniform` is the paper's likelihood grid); Adam 2e-4
with 5k warm-up steps, batch 128, EMA 0.9999, w_ce = 1e-3. Trained and evaluated on uniformly
dequantised data; bits/dim = -log p(y) / (D ln 2) + log2(K/2) (eval.json states the convention).
Argument words: `tiny`, `conditional` (label dropout p_uncond for classifier-free guidance).

  python -m experiments.main --config=experiments/configs/cdm_cifar10.py:tiny --config.data.name=digits --workdir=/tmp/cdm
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "cifar10"
  c.data.random_flip = True
  c.model.family = "cdm"
  c.model.cdm.update(num_steps=1000, grid="ddpm", beta_start=1e-4, beta_end=0.02, beta_steps=1000,
                     w_ce=1e-3, ch=128,
                     ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                     num_groups=32)
  c.optim.update(learning_rate=2e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=5000)
  c.training.update(batch_size=128, num_steps=800_000, ema_decay=0.9999, log_every=1000,
                    eval_every=50_000, checkpoint_every=10_000)
  c.eval.update(estimator="cdm", batch_size=128)
  c.sample.update(sampler="ddim", num_steps=100, eta=0.0)
  words = base.parse_words(arg)
  c = base.apply_words(c, words)
  if "tiny" in words:
    c.sample.num_steps = 10
  return c
