"""Malformed input at the public entry points: a clear exception that names the argument, never a silent NaN.

Property-based (hypothesis): random ranks, dtypes, level ranges and non-finite entries are thrown at the
losses, samplers, likelihood helpers and data validation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdiff import data as data_lib
from vdiff import likelihood
from vdiff import samplers
from vdiff import schedules as S
from vdiff import vdm

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHED = S.linear()
ZERO_EPS = lambda z, t: jnp.zeros_like(z)


@SETTINGS
@given(rank=st.integers(0, 1), n=st.integers(1, 4))
def test_elbo_rejects_low_rank(rank, n):
  x = jnp.zeros((n,) * rank, jnp.float32)
  with pytest.raises(ValueError, match="x must have rank >= 2"):
    vdm.negative_elbo(jax.random.PRNGKey(0), x, schedule=SCHED, eps_fn=ZERO_EPS, num_levels=4)


@SETTINGS
@given(pos=st.integers(0, 11), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_elbo_rejects_nonfinite(pos, bad):
  x = np.zeros((3, 4), np.float32)
  x.flat[pos] = bad
  with pytest.raises(ValueError, match="x holds NaN or Inf"):
    vdm.negative_elbo(jax.random.PRNGKey(0), jnp.asarray(x), schedule=SCHED, eps_fn=ZERO_EPS,
                      num_levels=4)


@SETTINGS
@given(levels=st.integers(-3, 1))
def test_elbo_rejects_bad_num_levels(levels):
  with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
    vdm.negative_elbo(jax.random.PRNGKey(0), jnp.zeros((2, 3)), schedule=SCHED, eps_fn=ZERO_EPS,
                      num_levels=levels)


def test_elbo_rejects_integer_data_and_bad_denoiser():
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    vdm.negative_elbo(jax.random.PRNGKey(0), jnp.zeros((2, 3), jnp.int32), schedule=SCHED,
                      eps_fn=ZERO_EPS, num_levels=4)
  with pytest.raises(ValueError, match="eps_fn"):
    vdm.negative_elbo(jax.random.PRNGKey(0), jnp.zeros((2, 3)), schedule=SCHED,
                      eps_fn=lambda z, t: jnp.zeros((2, 5)), num_levels=4)


@SETTINGS
@given(k=st.lists(st.integers(-300, 300), min_size=1, max_size=8), num_levels=st.integers(2, 256))
def test_dequantize_checks_level_range(k, num_levels):
  k = np.asarray(k, np.int32)[None]
  if k.min() < 0 or k.max() >= num_levels:
    with pytest.raises(ValueError, match=r"k must hold levels in"):
      likelihood.dequantize(jax.random.PRNGKey(0), k, num_levels)
  else:
    y = np.asarray(likelihood.dequantize(jax.random.PRNGKey(0), k, num_levels))
    # y lies in its own bin: |y - centre| <= Delta / 2 (float32 slack).
    centre = np.asarray(likelihood.encode(k, num_levels))
    assert np.all(np.abs(y - centre) <= 1.0 / num_levels + 1e-6)


def test_dequantize_rejects_float_levels():
  with pytest.raises(TypeError, match="k must hold integer levels"):
    likelihood.dequantize(jax.random.PRNGKey(0), jnp.zeros((2, 2)), 4)


@SETTINGS
@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=1), steps=st.integers(-2, 0))
def test_samplers_reject_bad_shape_and_steps(shape, steps):
  with pytest.raises(ValueError, match="shape"):
    samplers.ddim(jax.random.PRNGKey(0), ZERO_EPS, SCHED, tuple(shape), num_steps=4)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.vdm_ancestral(jax.random.PRNGKey(0), ZERO_EPS, SCHED, (2, 3), num_steps=steps)


@SETTINGS
@given(g0=st.floats(-20, 20), width=st.floats(-5, 0))
def test_schedule_rejects_non_increasing_endpoints(g0, width):
  with pytest.raises(ValueError, match="gamma_min must be smaller than gamma_max"):
    S.linear(gamma_min=g0, gamma_max=g0 + width)


@SETTINGS
@given(dims=st.integers(-3, 0))
def test_nats_to_bpd_rejects_bad_dims(dims):
  with pytest.raises(ValueError, match="num_dims must be positive"):
    likelihood.nats_to_bpd(jnp.ones(2), dims)


@SETTINGS
@given(g=st.floats(-13.3, 5.0), level=st.integers(0, 255))
def test_elbo_terms_finite_over_the_schedule_range(g, level):
  # Valid extremes (any gamma endpoint in VDM's range, any level) never give a NaN.
  x = likelihood.encode(jnp.full((1, 4), level, jnp.int32), 256)
  eps = jnp.ones_like(x)
  terms = [vdm.prior_loss(x, g), vdm.reconstruction_loss(eps, x, g, num_levels=256)]
  assert all(np.all(np.isfinite(np.asarray(v))) for v in terms)


@SETTINGS
@given(rank=st.integers(1, 5), kind=st.sampled_from(["float", "neg", "big", "nan"]))
def test_dataset_validation_names_the_problem(rank, kind):
  shape = (2, 3, 3, 1)[:rank] if rank <= 4 else (2, 3, 3, 1, 1)
  images = np.zeros(shape, np.int32)
  if rank != 4:
    with pytest.raises(ValueError, match="rank|shape"):
      data_lib.validate_images(images, 17)
    return
  if kind == "float":
    images = images.astype(np.float32) + 0.5
  elif kind == "neg":
    images[0, 0, 0, 0] = -1
  elif kind == "big":
    images[0, 0, 0, 0] = 17
  else:
    images = images.astype(np.float32)
    images[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError):
    data_lib.validate_images(images, 17)
