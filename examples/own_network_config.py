"""Config of examples/own_network.py: a user's denoiser on scikit-learn's digits (8x8, 17 levels).

  python -m experiments.main --config=examples/own_network_config.py --workdir=/tmp/own_network

Argument words as in experiments/configs/base.py (e.g. `:tiny`, `:conditional`).
"""

import ml_collections

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.data.name = "digits"
  c.model.family = "examples.own_network:OwnNetworkVDM"
  # 17 levels: gamma_min = -8 (noise std exp(-4) = 0.018, well inside the bin half-width 1/17).
  c.model.schedule.update(kind="learned_scalar", gamma_min=-8.0, gamma_max=5.0)
  # The family's own hyperparameters, passed to OwnNetworkVDM(...) by DenoiserFamily.from_config.
  c.model.options = ml_collections.ConfigDict(dict(ch=32, num_blocks=2, fourier_min=2, fourier_max=5))
  c.optim.update(learning_rate=2e-3, warmup_steps=200)
  c.training.update(batch_size=64, num_steps=2000, log_every=100, eval_every=0, checkpoint_every=1000,
                    ema_decay=0.995, sample_every=0)
  c.eval.update(batch_size=100, num_time_samples=4)
  c.sample.update(num_steps=200, num_samples=64)
  return base.apply_words(c, base.parse_words(arg))
