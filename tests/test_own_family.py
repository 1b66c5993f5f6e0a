"""A user's own family through the trainer: the protocol, naming it in the config, the example on the CLI,
and the default gamma normalisation of `vdm.make_eps_fn`."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import base
from vdiff import models
from vdiff import schedules
from vdiff import train
from vdiff import vdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = "examples.own_network:OwnNetworkVDM"


# --------------------------------------------------------------------------------------------------
# make_eps_fn: gamma normalised by the schedule's own range.
# --------------------------------------------------------------------------------------------------
def _g_norm(schedule, t, **kw):
  """The g_norm that make_eps_fn hands the network at times t."""
  seen = {}

  def apply(z, g_norm):
    seen["g"] = g_norm
    return z

  vdm.make_eps_fn(apply, schedule, **kw)(jnp.zeros((t.shape[0], 2)), t)
  return np.asarray(seen["g"])


T = jnp.array([0.0, 0.25, 0.5, 1.0])


def test_make_eps_fn_default_uses_the_schedule_range():
  # linear on [-8, 5]: gamma = -8 + 13 t, so g_norm = (gamma + 8) / 13 = t exactly (closed form). The
  # fixed VDM constants would give (gamma + 13.3) / 18.3 = 0.2896 at t = 0.
  np.testing.assert_allclose(_g_norm(schedules.linear(gamma_min=-8.0, gamma_max=5.0), T), T, atol=1e-6)
  # cosine on [-8, 5]: g_norm runs from 0 to 1 (its endpoints are gamma_min, gamma_max; float32 log/tan).
  g = _g_norm(schedules.cosine(gamma_min=-8.0, gamma_max=5.0), T)
  np.testing.assert_allclose(g[[0, -1]], [0.0, 1.0], atol=1e-5)
  assert np.all(np.diff(g) > 0)
  # A learned schedule bound by from_module: normalised by its initial endpoints, which a learned
  # scalar schedule starts at (gamma = gamma_min + (gamma_max - gamma_min) t, so g_norm = t).
  module = schedules.LearnedScalarGamma(gamma_min=-8.0, gamma_max=5.0)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))["params"]
  np.testing.assert_allclose(_g_norm(schedules.from_module(module, params), T), T, atol=1e-6)
  # ...and it stays that range when the endpoints have learned (w: 13 -> 10, so gamma(1) = 2): the
  # network's input scale does not move, g_norm(t) = 10 t / 13.
  moved = dict(params, w=jnp.float32(10.0))
  np.testing.assert_allclose(_g_norm(schedules.from_module(module, moved), T), 10.0 * T / 13.0,
                             atol=1e-6)
  # DDPM's discrete schedule knows its endpoints too.
  np.testing.assert_allclose(_g_norm(schedules.ddpm_linear_beta(num_steps=100), T)[[0, -1]], [0, 1],
                             atol=1e-6)
  # A from_function schedule without a range: its current endpoints gamma(0), gamma(1).
  fn = schedules.from_function(lambda t: -6.0 + 10.0 * t ** 2)
  np.testing.assert_allclose(_g_norm(fn, T), T ** 2, atol=1e-6)


def test_make_eps_fn_explicit_range_is_kept():
  # The built-in families pass their config's range explicitly: (gamma - gamma_min) / (gamma_max -
  # gamma_min) with those numbers, whatever the schedule's own range.
  sched = schedules.linear(gamma_min=-8.0, gamma_max=5.0)
  gamma = -8.0 + 13.0 * np.asarray(T)
  np.testing.assert_allclose(_g_norm(sched, T, gamma_min=-13.3, gamma_max=5.0), (gamma + 13.3) / 18.3,
                             atol=1e-6)
  with pytest.raises(ValueError, match="both gamma_min and gamma_max"):
    vdm.make_eps_fn(lambda z, g: z, sched, gamma_min=-8.0)


def test_builtin_vdm_family_keeps_its_config_range(monkeypatch):
  # VDMFamily still passes model.schedule.gamma_min / gamma_max to make_eps_fn explicitly (so a learned
  # schedule's network input keeps the config's scale): its behaviour is unchanged.
  c = base.get_base_config()
  base.shrink_tiny(c)
  c.model.schedule.update(kind="learned_scalar", gamma_min=-8.0, gamma_max=5.0)
  fam = models.from_config(c.model, data_shape=(8, 8, 1), num_levels=17, num_labels=0)
  seen = {}
  orig = vdm.make_eps_fn

  def spy(apply_fn, schedule, **kw):
    seen.update(kw)
    return orig(apply_fn, schedule, **kw)

  monkeypatch.setattr(vdm, "make_eps_fn", spy)
  fam.eps_fn(fam.init(jax.random.PRNGKey(0)))
  assert seen["gamma_min"] == -8.0 and seen["gamma_max"] == 5.0


# --------------------------------------------------------------------------------------------------
# Naming a family in the config.
# --------------------------------------------------------------------------------------------------
def _model_cfg(family, **options):
  c = base.get_base_config()
  c.model.family = family
  for k, v in options.items():
    c.model.options[k] = v
  return c


@pytest.mark.parametrize("family,message", [
    ("no_such_package.models:MyFamily", r"model.family 'no_such_package.models:MyFamily'.*cannot import "
                                        r"module 'no_such_package.models'"),
    ("examples.own_network:NoSuchClass", r"model.family 'examples.own_network:NoSuchClass'.*no attribute "
                                         r"'NoSuchClass'"),
    ("examples.own_network:", r"model.family 'examples.own_network:' is not an import path"),
    ("my_family", r"unknown model.family 'my_family'.*import path 'package.module:ClassName'"),
])
def test_bad_family_path_names_the_key_and_the_path(family, message):
  with pytest.raises(ValueError, match=message):
    models.resolve_family(family)
  with pytest.raises(ValueError, match=message):
    models.from_config(_model_cfg(family).model, data_shape=(8, 8, 1), num_levels=17, num_labels=0)
  # The trainer refuses it before any compute, naming the key.
  with pytest.raises(ValueError, match="invalid config: .*" + message):
    train.validate_config(_model_cfg(family))


def test_import_path_and_registered_name_build_the_family():
  from examples import own_network  # pylint: disable=g-import-not-at-top
  c = _model_cfg(EXAMPLE, ch=8, num_blocks=1, fourier_min=2, fourier_max=4)
  c.model.schedule.update(kind="linear", gamma_min=-8.0, gamma_max=5.0)
  fam = models.from_config(c.model, data_shape=(8, 8, 1), num_levels=17, num_labels=10)
  assert isinstance(fam, own_network.OwnNetworkVDM) and isinstance(fam, models.FamilyProtocol)
  assert fam.num_labels == 0  # model.conditional is False
  assert fam.net.ch == 8 and fam.net.num_blocks == 1  # model.options reached the constructor
  assert fam.schedule_spec == models.ScheduleSpec("linear", -8.0, 5.0)
  # Every estimator that applies: its native ELBO and the probability-flow ODE, not the CDM's.
  assert train.make_nll_fn(fam, "elbo", c.eval)[1] is False  # discrete bound, no dequantisation
  assert train.make_nll_fn(fam, "ode", c.eval)[1] is True
  with pytest.raises(ValueError, match="does not apply to model family 'OwnNetworkVDM'"):
    train.make_nll_fn(fam, "cdm", c.eval)
  # register_family: the same class under a short name; a second class under that name is refused.
  models.register_family("own_network_test", own_network.OwnNetworkVDM)
  try:
    c.model.family = "own_network_test"
    c.model.conditional = True
    fam = models.from_config(c.model, data_shape=(8, 8, 1), num_levels=17, num_labels=10)
    assert type(fam) is own_network.OwnNetworkVDM and fam.num_labels == 10
    with pytest.raises(ValueError, match="'own_network_test' is already"):
      models.register_family("own_network_test", models.VDMFamily)
    with pytest.raises(ValueError, match="without ':'"):
      models.register_family("a:b", own_network.OwnNetworkVDM)
  finally:
    del models.FAMILIES["own_network_test"]


def test_family_without_from_config_gets_options_as_keywords():
  """A class that does not subclass DenoiserFamily is built as cls(data_shape=..., num_levels=...,
  num_labels=..., **model.options), and one missing protocol members is refused by name."""

  class Partial:
    def __init__(self, *, data_shape, num_levels, num_labels, width):
      self.data_shape, self.num_levels, self.num_labels = data_shape, num_levels, num_labels
      self.width = width

  models.register_family("partial_test", Partial)
  try:
    with pytest.raises(ValueError, match=r"model.family 'partial_test' built a Partial without "
                                         r"\['family_name', .*'sample'\]"):
      models.from_config(_model_cfg("partial_test", width=3).model, data_shape=(8, 8, 1),
                         num_levels=17, num_labels=0)
  finally:
    del models.FAMILIES["partial_test"]


# --------------------------------------------------------------------------------------------------
# The example through the command line.
# --------------------------------------------------------------------------------------------------
def test_example_trains_through_the_cli(tmp_path):
  workdir = str(tmp_path / "own")
  cmd = [sys.executable, "-m", "experiments.main", "--config=examples/own_network_config.py:tiny",
         f"--workdir={workdir}", f"--config.model.family={EXAMPLE}", "--config.model.options.ch=16",
         "--config.training.num_steps=40", "--config.training.log_every=1",
         "--config.training.checkpoint_every=20"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.load(open(os.path.join(workdir, "eval.json")))
  assert ev["estimator"] == "elbo" and ev["step"] == 40 and ev["num_examples"] == 128
  assert math.isfinite(ev["bpd"]) and f"{ev['bpd']:.4f}" in proc.stdout
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["family"] == EXAMPLE and cfg["model"]["options"]["ch"] == 16
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 40
  # Training reduced the loss: at initialisation eps_hat = z, whose negative ELBO (about 330 nats here)
  # is far above the uniform code's 64 log 17 = 181 nats. The run is deterministic; measured: first five
  # batches 333 nats on average, last five 228 (ratio 0.68).
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "40"
  assert any(f.endswith(".png") for f in os.listdir(workdir))  # sampled with the family's eps_fn


def test_denoiser_family_without_its_three_methods_is_refused_at_construction():
  """A subclass that omits init, eps_fn or loss fails when built, naming the missing methods."""

  class Incomplete(models.DenoiserFamily):

    def init(self, rng):
      return {}

  with pytest.raises(TypeError, match="eps_fn.*loss|loss.*eps_fn"):
    Incomplete(data_shape=(8, 8, 1), num_levels=17)
