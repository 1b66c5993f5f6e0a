"""VDM on downsampled ImageNet 32x32 (Kingma et al. 2021, appendix B): as CIFAR-10 but 32 blocks x 256
channels, no dropout, batch 512 (paper: 3.72 bits/dim).

  python -m experiments.main --config=experiments/configs/vdm_imagenet32.py --workdir=DIR --config.data.data_dir=TFDS_DIR
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "downsampled_imagenet/32x32"
  c.eval.split = "validation"
  c.model.family = "vdm"
  c.model.schedule.kind = "learned_scalar"
  c.model.score.update(ch=256, num_blocks=32, dropout=0.0, attention=True)
  c.optim.update(learning_rate=2e-4, b2=0.99, weight_decay=0.01, warmup_steps=100)
  c.training.update(batch_size=512, num_steps=2_000_000, ema_decay=0.9999, log_every=1000,
                    eval_every=50_000, checkpoint_every=10_000)
  c.eval.update(batch_size=512, num_time_samples=1)
  words = base.parse_words(arg)
  if "tiny" in words:
    c.eval.split = "test"  # offline data (digits, npz) has train/test splits only
  return base.apply_words(c, words)
