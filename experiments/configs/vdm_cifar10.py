"""VDM on CIFAR-10 (Kingma et al. 2021, arXiv:2107.00630, appendix B): 32 ResNet blocks x 128 channels at
full resolution (no downsampling), learned scalar gamma in [-13.3, 5], dropout 0.1, AdamW 2e-4, b2 0.99,
weight decay 0.01, batch 128, EMA 0.9999, 10M steps. Paper: 2.65 bits/dim (test, ELBO).

  python -m experiments.main --config=experiments/configs/vdm_cifar10.py --workdir=DIR --config.data.data_dir=TFDS_DIR
  python -m experiments.main --config=experiments/configs/vdm_cifar10.py:tiny --config.data.name=digits --workdir=/tmp/v
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "cifar10"
  c.data.random_flip = False
  c.model.family = "vdm"
  c.model.schedule.kind = "learned_scalar"
  c.model.score.update(ch=128, num_blocks=32, dropout=0.1, attention=True)
  c.optim.update(learning_rate=2e-4, b2=0.99, weight_decay=0.01, warmup_steps=100)
  c.training.update(batch_size=128, num_steps=10_000_000, ema_decay=0.9999, log_every=1000,
                    eval_every=50_000, checkpoint_every=10_000)
  c.eval.update(batch_size=128, num_time_samples=1)
  return base.apply_words(c, base.parse_words(arg))
