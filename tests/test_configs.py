"""Every experiment config, with every combination of its argument words, builds a sound model.

The CDM class grid must end near pure noise whatever T a config (or its `tiny` variant) chooses: the
DDIM sampler starts from N(0, I) at class T, so abar_T must be small. Reference: DDPM's own grid ends at
abar_1000 = 4.0e-5 (Ho et al. 2020); a grid sampled from a vdiff schedule ends at
abar_T = sigmoid(-gamma_max), the config's stated end point.
"""

import importlib
import itertools
import math
import pathlib

import pytest

from experiments.configs import base
from vdiff import models

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def _word_args(module):
  """Every argument string a config accepts: its own words (study variants, known_density families)
  times every compatible subset of the base words."""
  own = [None] + list(getattr(module, "VARIANTS", ())) + list(getattr(module, "FAMILIES", ()))
  subsets = [set(s) for r in range(len(base.WORDS) + 1) for s in itertools.combinations(base.WORDS, r)
             if not {"trainable", "nontrainable"} <= set(s)]
  args = []
  for word, subset in itertools.product(own, subsets):
    parts = sorted(subset) + ([word] if word else [])
    args.append(",".join(parts) or None)
  return args


def _cdm_family(config):
  config.model.family = "cdm"
  return models.from_config(config.model, data_shape=(8, 8, 1), num_levels=256, num_labels=10)


def test_configs_are_found():
  assert {"cdm_cifar10", "study", "known_density", "quickstart"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_cdm_grid_of_every_config_and_word_reaches_noise(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  failures = []
  for arg in _word_args(module):
    fam = _cdm_family(module.get_config(arg))
    abar_t = float(fam.abar[-2])
    if not abar_t < 1e-3:
      failures.append(f"{name}:{arg} T={fam.num_steps} abar_T={abar_t:.4g}")
  assert not failures, failures


@pytest.mark.parametrize("name", ["cdm_cifar10", "study", "known_density"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_cdm_schedule_grid_ends_at_the_configs_gamma_max(name, kind):
  module = importlib.import_module(f"experiments.configs.{name}")
  for arg in (None, "tiny"):
    config = module.get_config(arg)
    config.model.cdm.grid = "schedule"
    config.model.schedule.kind = kind
    fam = _cdm_family(config)
    expect = 1.0 / (1.0 + math.exp(config.model.schedule.gamma_max))  # sigmoid(-gamma_max)
    assert float(fam.abar[-2]) == pytest.approx(expect, rel=1e-5)


def test_cdm_grid_config_errors():
  config = base.get_base_config()
  config.model.family = "cdm"
  config.model.cdm.grid = "schedule"  # the base schedule kind is learned_scalar
  with pytest.raises(ValueError, match="model.schedule.kind"):
    models.from_config(config.model, data_shape=(8, 8, 1), num_levels=256, num_labels=0)
  config.model.cdm.grid = "linear"
  with pytest.raises(ValueError, match="model.cdm.grid"):
    models.from_config(config.model, data_shape=(8, 8, 1), num_levels=256, num_labels=0)
