"""One return convention across the public likelihood functions (the `vdiff.likelihood` module docstring):
rng first, then the model, then the data, hyperparameters keyword-only; (nats [B], extras) with nats an
upper bound on the discrete -log P(k) and extras["nfe"]; bits/dim always `likelihood.nats_to_bpd(nats, D)`.

References: the deprecated functions (`cdm.one_step_nll_bpd`, `ode.ode_nll_bpd`, `ode.ode_forward_bound`,
`ode.ode_uniform_bound`) keep their old return values, so the new functions are checked against them on
the same inputs and keys (the draws of the new functions are those of `likelihood.*_dequantization_bound`,
draw 0 from fold_in(rng, 0); the two single-draw aliases used the key directly, hence the mapped key), and
against the low-level log-space bounds composed by hand.
"""

import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import base
from vdiff import cdm
from vdiff import data as data_lib
from vdiff import diffenc
from vdiff import likelihood
from vdiff import models
from vdiff import ode
from vdiff import parallel
from vdiff import schedules
from vdiff import train
from vdiff import vdm

LINEAR = schedules.linear()
NUM_LEVELS, D = 16, 3


def _gaussian_eps_fn(schedule, s2):
  """E[eps | z_t] for data N(0, s2 I): sigma z / (alpha^2 s2 + sigma^2) (docs/math.md sec. 7)."""

  def eps_fn(z, t):
    g = schedule.gamma(jnp.broadcast_to(t, z.shape[:1]))[:, None]
    a2, sig2 = schedules.alpha2_from_gamma(g), schedules.sigma2_from_gamma(g)
    return jnp.sqrt(sig2) * z / (a2 * s2 + sig2)

  return eps_fn


def _gaussian_logits_fn(abar, s2):
  """Exact log p(t | x) for data N(0, s2 I): x_t ~ N(0, v_t I), v_t = abar_t s2 + 1 - abar_t."""
  v = abar * s2 + (1.0 - abar)

  def fn(x):
    x = x.reshape(x.shape[0], -1)
    r2 = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return -0.5 * r2 / v - 0.5 * x.shape[1] * jnp.log(2.0 * math.pi * v)

  return fn


def _data():
  k = jax.random.randint(jax.random.PRNGKey(0), (4, D), 0, NUM_LEVELS)
  return k, jax.random.PRNGKey(11)


@pytest.mark.parametrize("fn,model_args", [
    (cdm.one_step_nll, ("logits_fn",)), (ode.ode_nll, ("eps_fn", "schedule")),
    (vdm.negative_elbo, None), (diffenc.negative_elbo, None)])
def test_signatures_put_rng_first_and_hyperparameters_keyword_only(fn, model_args):
  params = list(inspect.signature(fn).parameters.values())
  assert params[0].name == "rng", [p.name for p in params]
  if model_args is not None:  # rng, the model, then the data k; the rest keyword-only
    assert tuple(p.name for p in params[1:1 + len(model_args)]) == model_args
    assert params[1 + len(model_args)].name == "k"
    rest = params[2 + len(model_args):]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in rest), rest
  names = [p.name for p in params]
  assert params[names.index("num_levels")].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("num_samples", [1, 3])
def test_cdm_one_step_nll_uniform_matches_the_old_bits_per_dim(num_samples):
  abar = cdm.abar_grid(LINEAR, 10)
  logits_fn = _gaussian_logits_fn(abar, 0.3)
  k, rng = _data()
  nats, extras = jax.jit(lambda r, k: cdm.one_step_nll(r, logits_fn, k, num_levels=NUM_LEVELS,
                                                       num_samples=num_samples))(rng, k)
  assert nats.shape == (4,) and nats.dtype == jnp.float32
  assert extras["nfe"].dtype == jnp.int32
  np.testing.assert_array_equal(extras["nfe"], np.full(4, num_samples))
  # The low-level log-space bound with the same key, converted the old way (density + log2(K/2)).
  logp, _ = likelihood.uniform_dequantization_bound(
      rng, lambda r, y: (cdm.one_step_log_density(logits_fn, y), jnp.ones(4, jnp.int32)), k,
      num_levels=NUM_LEVELS, num_samples=num_samples)
  old_bpd = likelihood.nats_to_bpd(-logp, D, num_levels=NUM_LEVELS)
  np.testing.assert_allclose(likelihood.nats_to_bpd(nats, D), old_bpd, rtol=1e-6)
  if num_samples == 1:  # the deprecated single-draw function at the key of draw 0
    with pytest.warns(DeprecationWarning, match="cdm.one_step_nll"):
      old_nats, old_bpd = cdm.one_step_nll_bpd(
          logits_fn, k, num_levels=NUM_LEVELS,
          rng=jax.random.split(jax.random.fold_in(rng, 0))[0])
    np.testing.assert_allclose(likelihood.nats_to_bpd(nats, D), old_bpd, rtol=1e-6)
    # nats = density nats + D log(K / 2) (D log(8) = 6.24 nats here).
    np.testing.assert_allclose(nats, old_nats + D * math.log(NUM_LEVELS / 2), rtol=1e-6)


def test_cdm_one_step_nll_forward_is_minus_the_forward_bound_at_abar_1():
  abar = cdm.abar_grid(LINEAR, 10)
  logits_fn = _gaussian_logits_fn(abar, 0.3)
  k, rng = _data()
  # t=1: this test pins the class-1 bound (the automatic class, cdm.forward_class, is tested in test_cdm).
  nats, extras = cdm.one_step_nll(rng, logits_fn, k, num_levels=NUM_LEVELS, dequantization="forward",
                                  num_samples=2, abar=abar, t=1)
  bound, nfe = likelihood.forward_dequantization_bound(
      rng, lambda r, z: (cdm.log_density(logits_fn(z), z, 1), jnp.ones(4, jnp.int32)), k,
      num_levels=NUM_LEVELS, gamma=schedules.gamma_from_alpha2(abar[1]), num_samples=2)
  np.testing.assert_allclose(nats, -bound, rtol=1e-6)
  np.testing.assert_array_equal(extras["nfe"], nfe)
  np.testing.assert_array_equal(extras["nfe"], np.full(4, 2))
  with pytest.raises(ValueError, match="needs abar"):
    cdm.one_step_nll(rng, logits_fn, k, num_levels=NUM_LEVELS, dequantization="forward")
  with pytest.raises(ValueError, match="dequantization must be one of"):
    cdm.one_step_nll(rng, logits_fn, k, num_levels=NUM_LEVELS, dequantization="gaussian")


def test_ode_nll_matches_the_old_functions():
  eps_fn = _gaussian_eps_fn(LINEAR, 0.3)
  k, rng = _data()

  @jax.jit
  def new(rng, k):
    uni = ode.ode_nll(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS)
    fwd = ode.ode_nll(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS, dequantization="forward",
                      t0=0.05, num_samples=2)
    return uni, fwd

  (uni, uni_extras), (fwd, fwd_extras) = new(rng, k)
  with pytest.warns(DeprecationWarning, match="ode.ode_nll"):
    old_bpd, old_nfe = ode.ode_nll_bpd(jax.random.fold_in(rng, 0), eps_fn, LINEAR, k,
                                       num_levels=NUM_LEVELS)
  with pytest.warns(DeprecationWarning, match="ode.ode_nll"):
    old_uni, old_uni_nfe = ode.ode_uniform_bound(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS)
  with pytest.warns(DeprecationWarning, match="ode.ode_nll"):
    old_fwd, old_fwd_nfe = ode.ode_forward_bound(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS,
                                                 t0=0.05, num_samples=2)
  # One solve per draw: the nfe of the old functions, int32 [B].
  for extras, nfe in ((uni_extras, old_nfe), (uni_extras, old_uni_nfe), (fwd_extras, old_fwd_nfe)):
    assert extras["nfe"].dtype == jnp.int32 and extras["nfe"].shape == (4,)
    np.testing.assert_array_equal(extras["nfe"], nfe)
  np.testing.assert_allclose(likelihood.nats_to_bpd(uni, D), old_bpd, rtol=1e-6)
  np.testing.assert_allclose(likelihood.nats_to_bpd(uni, D),
                             likelihood.nats_to_bpd(-old_uni, D, num_levels=NUM_LEVELS), rtol=1e-6)
  np.testing.assert_allclose(fwd, -old_fwd, rtol=1e-6)
  with pytest.raises(ValueError, match="dequantization='forward' only"):
    ode.ode_nll(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS, t0=0.1)
  with pytest.raises(ValueError, match="pass t0 as its own argument"):
    ode.ode_nll(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS, t1=0.5)


def test_forwarded_old_name_still_warns():
  # likelihood.ode_nll_bpd resolves to the deprecated ode.ode_nll_bpd (module __getattr__).
  eps_fn = _gaussian_eps_fn(LINEAR, 0.3)
  k, rng = _data()
  with pytest.warns(DeprecationWarning, match="ode.ode_nll_bpd is deprecated"):
    likelihood.ode_nll_bpd(rng, eps_fn, LINEAR, k, num_levels=NUM_LEVELS)


def test_uniform_dequantization_nats_is_the_bits_per_dim_offset():
  log_p = jnp.array([-3.0, 1.5], jnp.float32)
  nats = likelihood.uniform_dequantization_nats(log_p, 12, 256)
  np.testing.assert_allclose(nats, -np.asarray(log_p) + 12 * math.log(128.0), rtol=1e-7)
  np.testing.assert_allclose(likelihood.nats_to_bpd(nats, 12),
                             likelihood.nats_to_bpd(-log_p, 12, num_levels=256), rtol=1e-6)
  with pytest.raises(ValueError, match="num_levels"):
    likelihood.uniform_dequantization_nats(log_p, 12, 1)


class _TinyClassifier(nn.Module):
  """A small noise-level classifier (no time input): logits [B, T + 2]."""
  num_classes_out: int

  @nn.compact
  def __call__(self, x, label=None, train=False):
    h = jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes_out, kernel_init=nn.initializers.normal(0.5))(h)


def test_cdm_evaluation_bits_per_dim_are_unchanged():
  """eval.json's bits/dim of the CDM one-step estimator (uniform, m = 2) are those of the log-space
  bound converted with the offset, nats_to_bpd(-log p, D, num_levels=K), batch i drawing from
  fold_in(rng, i): what the evaluator reported before its nats folded in D log(K / 2)."""
  num_levels, steps = 17, 10
  model = models.CDMFamily(data_shape=(8, 8, 1), num_levels=num_levels, num_steps=steps, beta_steps=steps)
  model.net = _TinyClassifier(num_classes_out=steps + 2)
  params = model.init(jax.random.PRNGKey(0))
  ds = data_lib.load("digits", split="test", seed=0)
  cfg = base.get_base_config().eval
  cfg.update(batch_size=2, num_examples=4, estimator="cdm", num_dequantization_samples=2)
  rng = jax.random.PRNGKey(7)
  r = train.evaluate(model, params, ds, estimator="cdm", eval_cfg=cfg, mesh=parallel.make_mesh(),
                     rng=rng, split="test", step=0, progress=False)
  logits_fn = model.logits_fn(params)
  expected = []
  for i in range(2):
    k = jnp.asarray(ds.images[2 * i:2 * i + 2])
    logp, _ = likelihood.uniform_dequantization_bound(
        jax.random.fold_in(rng, i), lambda r_, y: (cdm.one_step_log_density(logits_fn, y),
                                                   jnp.ones(2, jnp.int32)),
        k, num_levels=num_levels, num_samples=2)
    expected.append(np.asarray(likelihood.nats_to_bpd(-logp, 64, num_levels=num_levels)))
  np.testing.assert_allclose(r["bpd"], np.concatenate(expected).mean(), rtol=1e-6)
  assert r["discrete_bound"] is False and r["nfe"] == 2.0 and r["num_examples"] == 4
