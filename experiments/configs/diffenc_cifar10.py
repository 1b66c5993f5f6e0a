"""DiffEnc on CIFAR-10 (Nielsen et al., ICLR 2024, arXiv:2310.19789): the VDM score network (32 ResNet
blocks x 128 channels, v-prediction), an encoder U-Net ("mult_res": channel multipliers per resolution),
fixed linear gamma in [-13.3, 5], AdamW 2e-4, batch 128, EMA 0.9999.
Argument words: `trainable` (x_t = alpha^2 x + sigma^2 y_phi(x, t)), `nontrainable` (x_t = alpha^2 x,
the default), `tiny`.

  python -m experiments.main --config=experiments/configs/diffenc_cifar10.py:tiny,trainable --config.data.name=digits --workdir=/tmp/de
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "cifar10"
  c.model.family = "diffenc"
  c.model.parameterization = "v"
  c.model.schedule.kind = "linear"
  c.model.schedule.update(gamma_min=-13.3, gamma_max=5.0)
  c.model.score.update(ch=128, num_blocks=32, dropout=0.1, attention=True)
  c.model.encoder.update(kind="nontrainable", ch=128, ch_mult=(1, 2, 2), num_res_blocks=2,
                         attn_resolutions=(8,), num_groups=32)
  c.optim.update(learning_rate=2e-4, b2=0.99, weight_decay=0.01, warmup_steps=100)
  c.training.update(batch_size=128, num_steps=8_000_000, ema_decay=0.9999, log_every=1000,
                    eval_every=50_000, checkpoint_every=10_000)
  c.eval.update(batch_size=128, num_time_samples=1)
  return base.apply_words(c, base.parse_words(arg))
