"""The probability-flow ODE likelihood (vdiff/ode.py) against closed forms for Gaussian data (docs/math.md
sec. 6 and 7)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import likelihood
from vdiff import ode
from vdiff import schedules

# A wide schedule: alpha_1 = exp(-8) = 3.4e-4 and sigma_0^2 = 1.7e-6, so the model's prior N(0, I) at t = 1
# and the data at t = 0 are within ~2e-4 nats/dim of the true marginals (see test 1).
WIDE = schedules.linear(gamma_min=-13.3, gamma_max=16.0)
LINEAR = schedules.linear()


def gaussian_denoiser(schedule, mu, cov):
  """E[eps | z_t] = sigma C_t^{-1} (z - alpha mu), C_t = alpha^2 Sigma + sigma^2 I (docs/math.md sec. 7 with a full
  covariance; for Sigma = s^2 I it is sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2)). Sigma = U diag(lam) U^T.
  """
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  lam, u, mu = (jnp.asarray(a, jnp.float32) for a in (lam, u, mu))

  def eps_fn(z, t):
    g = schedule.gamma(t)[:, None]
    a, s2 = schedules.alpha2_from_gamma(g), schedules.sigma2_from_gamma(g)
    y = (z - jnp.sqrt(a) * mu) @ u
    return jnp.sqrt(s2) * (y / (a * lam + s2)) @ u.T

  return eps_fn


def model_log_density(schedule, mu, cov, x, t0=0.0, t1=1.0):
  """The exact log-density of the ODE model: N(0, I) at t1 pushed back along the exact Gaussian flow.

  In the eigenbasis of Sigma the flow is affine, y_t1 = sqrt(c_t1 / c_t0) y_t0 with y = U^T (z - alpha mu) and
  c_t = alpha_t^2 lam + sigma_t^2 (it maps the Gaussian marginal at t0 onto the one at t1), so
  log p(x) = log N(z_1; 0, I) + 1/2 sum log(c_t1 / c_t0).
  """
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  def ac(t):
    g = float(schedule.gamma(t))
    a2 = 1.0 / (1.0 + math.exp(g))
    return math.sqrt(a2), a2 * lam + (1.0 - a2)
  a0, c0 = ac(t0)
  a1, c1 = ac(t1)
  y1 = ((np.asarray(x, np.float64) - a0 * mu) @ u) * np.sqrt(c1 / c0)
  z1 = a1 * mu + y1 @ u.T
  d = x.shape[-1]
  return -0.5 * np.sum(z1**2, -1) - 0.5 * d * math.log(2 * math.pi) + 0.5 * np.sum(np.log(c1 / c0))


def gaussian_log_density(mu, cov, x):
  d = x.shape[-1]
  diff = np.asarray(x, np.float64) - mu
  prec = np.linalg.inv(cov)
  _, logdet = np.linalg.slogdet(cov)
  return -0.5 * np.einsum("bi,ij,bj->b", diff, prec, diff) - 0.5 * d * math.log(2 * math.pi) - 0.5 * logdet


def full_covariance(d, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d)) * 0.4
  return a @ a.T + 0.1 * np.eye(d)


def test_exact_divergence_isotropic_gaussian_equals_data_log_density():
  d, mu, s = 4, np.full(4, 0.5), 0.6
  cov = s**2 * np.eye(d)
  x = mu + s * np.random.default_rng(1).normal(size=(6, d)).astype(np.float32)
  eps_fn = gaussian_denoiser(WIDE, mu, cov)
  logp, nfe = jax.jit(lambda x: ode.ode_log_likelihood(
      jax.random.PRNGKey(0), eps_fn, WIDE, x, divergence="exact"))(jnp.asarray(x, jnp.float32))
  # docs/math.md sec. 6 requirement: log N(x; mu, s^2 I) within 1e-3 nats/dim. The model's own density (prior
  # N(0, I) instead of the true p_1, p_0 instead of the data) differs from it by < 2e-4 nats/dim here.
  np.testing.assert_allclose(logp / d, gaussian_log_density(mu, cov, x) / d, atol=1e-3)
  np.testing.assert_allclose(logp / d, model_log_density(WIDE, mu, cov, x) / d, atol=1e-4)
  assert nfe.shape == (6,) and nfe.dtype == jnp.int32 and np.all(np.asarray(nfe) > 6)


def test_exact_and_hutchinson_divergence_full_covariance():
  d = 3
  mu, cov = np.array([0.3, -0.2, 0.1]), full_covariance(d)
  x = np.random.default_rng(2).multivariate_normal(mu, cov, size=4).astype(np.float32)
  eps_fn = gaussian_denoiser(LINEAR, mu, cov)
  reps = 64
  x_rep = jnp.asarray(np.repeat(x, reps, axis=0))    # each example with `reps` independent probes

  @jax.jit
  def run(x, x_rep):
    exact, _ = ode.ode_log_likelihood(jax.random.PRNGKey(0), eps_fn, LINEAR, x, divergence="exact")
    hutch, nfe = ode.ode_log_likelihood(jax.random.PRNGKey(1), eps_fn, LINEAR, x_rep,
                                               divergence="hutchinson", solver="tsit5")
    return exact, hutch, nfe

  exact, hutch, nfe = run(jnp.asarray(x), x_rep)
  ref = model_log_density(LINEAR, mu, cov, x)
  # Reference: the affine Gaussian flow (model_log_density); gamma_1 = 5 makes it differ from log N(x; mu, Sigma).
  np.testing.assert_allclose(exact / d, ref / d, atol=1e-3)
  # Hutchinson with a probe fixed over the path is unbiased for the exact integral; the Jacobian is not
  # diagonal here, so the Rademacher estimate has variance: test within 3 standard errors per example.
  hutch = np.asarray(hutch).reshape(len(x), reps)
  se = hutch.std(axis=1, ddof=1) / np.sqrt(reps)
  assert np.all(se > 1e-4), se                     # the estimator really is random here
  assert np.all(np.abs(hutch.mean(axis=1) - ref) < 3 * se + 1e-3 * d), (hutch.mean(1), ref, se)
  assert np.all(np.asarray(nfe) > 6)


def test_hutchinson_is_exact_for_isotropic_gaussian():
  # For Sigma = s^2 I the Jacobian of the drift is c(t) I, and v^T (c I) v = c D for every Rademacher v:
  # zero variance, equal to the exact divergence up to solver tolerance.
  d, mu, s = 5, np.linspace(-0.5, 0.5, 5), 0.4
  cov = s**2 * np.eye(d)
  x = jnp.asarray(mu + s * np.random.default_rng(3).normal(size=(3, d)), jnp.float32)
  eps_fn = gaussian_denoiser(LINEAR, mu, cov)
  logp, _ = jax.jit(lambda x: ode.ode_log_likelihood(jax.random.PRNGKey(5), eps_fn, LINEAR, x))(x)
  np.testing.assert_allclose(logp / d, model_log_density(LINEAR, mu, cov, np.asarray(x)) / d, atol=1e-4)


def test_nfe_matches_counted_denoiser_calls():
  # nfe = 6 num_steps + 1 (7-stage FSAL pairs) against a host-side counter of eps_fn evaluations.
  calls = []
  base = gaussian_denoiser(LINEAR, np.zeros(2), np.diag([0.3, 0.5]))

  def eps_fn(z, t):
    jax.debug.callback(lambda: calls.append(1))
    return base(z, t)

  for solver in ("dopri5", "tsit5"):
    calls.clear()
    _, nfe = jax.jit(lambda x: ode.ode_log_likelihood(
        jax.random.PRNGKey(0), eps_fn, LINEAR, x, solver=solver))(jnp.array([[0.2, -0.4]]))
    jax.effects_barrier()
    assert int(nfe[0]) == len(calls), (solver, int(nfe[0]), len(calls))


def test_ode_nll_convention():
  # nats = -log p(y) + D log(K / 2) on y = dequantize(k), so bpd = nats_to_bpd(nats, D) =
  # -log p(y) / (D ln 2) + log2(K / 2) (docs/math.md sec. 4, 6), with the same keys (draw 0 uses
  # split(fold_in(rng, 0))).
  k_levels, d = 16, 3
  eps_fn = gaussian_denoiser(LINEAR, np.zeros(d), 0.3 * np.eye(d))
  k = jax.random.randint(jax.random.PRNGKey(0), (2, d), 0, k_levels)
  rng = jax.random.PRNGKey(9)

  @jax.jit
  def run(k):
    nats, extras = ode.ode_nll(rng, eps_fn, LINEAR, k, num_levels=k_levels)
    rng_u, rng_p = jax.random.split(jax.random.fold_in(rng, 0))
    y = likelihood.dequantize(rng_u, k, k_levels)
    logp, nfe = ode.ode_log_likelihood(rng_p, eps_fn, LINEAR, y)
    return likelihood.nats_to_bpd(nats, d), extras["nfe"], logp, y, nfe

  bpd, nfe, logp, y, direct_nfe = run(k)
  np.testing.assert_array_equal(nfe, direct_nfe)
  np.testing.assert_allclose(bpd, -logp / (d * math.log(2)) + math.log2(k_levels / 2), rtol=1e-6)
  # y lies in k's bin: |y - x| <= Delta / 2.
  assert np.all(np.abs(np.asarray(y - likelihood.encode(k, k_levels))) <= 1.0 / k_levels + 1e-6)
  assert bpd.shape == nfe.shape == (2,)


def test_validation():
  eps_fn = gaussian_denoiser(LINEAR, np.zeros(2), np.eye(2))
  x = jnp.zeros((2, 2))
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="divergence"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, x, divergence="skilling")
  with pytest.raises(ValueError, match="solver"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, x, solver="euler")
  with pytest.raises(ValueError, match="t0"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, x, t0=1.0, t1=0.0)
  with pytest.raises(ValueError, match="rank"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, jnp.zeros((2,)))


def test_bad_times_and_nan_input_are_named_errors_and_nan_propagates_under_jit():
  # t0 = -0.5 lies outside the schedule's [0, 1]; a NaN input used to surface as diffrax's step-size
  # failure (a 43-line traceback). Both are now one ValueError naming the argument. Under jit the values
  # are unknown: NaN propagates to log p (never a finite, valid-looking number).
  eps_fn = gaussian_denoiser(LINEAR, np.zeros(2), np.eye(2))
  rng = jax.random.PRNGKey(0)
  x = jnp.zeros((2, 2))
  for t0, t1 in ((-0.5, 1.0), (0.0, 1.5)):
    with pytest.raises(ValueError, match=r"need 0 <= t0 < t1 <= 1"):
      ode.ode_log_likelihood(rng, eps_fn, LINEAR, x, t0=t0, t1=t1)
  bad = x.at[1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="x holds NaN"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, bad)
  with pytest.raises(ValueError, match="at least one example"):
    ode.ode_log_likelihood(rng, eps_fn, LINEAR, jnp.zeros((0, 2)))
  logp, _ = jax.jit(lambda y: ode.ode_log_likelihood(rng, eps_fn, LINEAR, y, max_steps=64))(bad)
  assert np.isnan(np.asarray(logp)[1]), logp
