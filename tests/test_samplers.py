"""Samplers against closed forms for Gaussian data x ~ N(mu, s^2 I) and its exact denoiser (docs/math.md sec. 7)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import samplers
from vdiff import schedules

MU, S = 0.5, 0.6
B, D = 16384, 2          # N = B D = 32768 scalar draws per moment estimate
N = B * D
SE_MEAN = S / np.sqrt(N)                # standard error of the sample mean, 0.0033
SE_VAR = S**2 * np.sqrt(2.0 / N)        # standard error of the sample variance (Gaussian), 0.0028
LINEAR = schedules.linear()             # VDM's gamma in [-13.3, 5]
DDPM_BETA = schedules.ddpm_linear_beta()


def gaussian_eps_fn(schedule, mu=MU, s=S, power=1):
  """E[eps | z_t] = sigma (z - a mu) / (a^2 s^2 + sigma^2) for z_t = a x + sigma eps (docs/math.md sec. 7).

  power=1: a = alpha_t (plain diffusion). power=3: a = alpha_t^3, the DiffEnc non-trainable encoder
  x_t = alpha_t^2 x diffused as z_t = alpha_t x_t + sigma_t eps (docs/math.md sec. 3).
  """

  def eps_fn(z, t):
    g = schedule.gamma(t).reshape((-1,) + (1,) * (z.ndim - 1))
    a = schedules.alpha_from_gamma(g) ** power
    sg = schedules.sigma_from_gamma(g)
    return sg * (z - a * mu) / (a**2 * s**2 + sg**2)

  return eps_fn


def limit_moments(name, schedule):
  """Exact T -> infinity mean and variance of each sampler started from N(0, I) (not from p_1).

  With v_1 = alpha_1^2 s^2 + sigma_1^2 the true marginal variance at t = 1:
  * probability flow (DDIM eta = 0): the affine flow x = mu + (s / sqrt(v_1)) (z_1 - alpha_1 mu), so
    z_1 ~ N(0, 1) gives mean mu (1 - s alpha_1 / sqrt(v_1)), variance s^2 / v_1.
  * reverse SDE (DDPM, DDIM eta = 1, VDM): x | z_1 has mean mu + A (z_1 - alpha_1 mu) with
    A = Cov(x, z_1) / v_1 = alpha_1 s^2 / v_1 and variance s^2 - A^2 v_1, so mean mu - A alpha_1 mu and
    variance s^2 + A^2 (1 - v_1).
  For the linear schedule (gamma_1 = 5) these differ from (mu, s^2) by up to 0.025: stated, not hidden.
  """
  g1 = float(schedule.gamma(1.0))
  a1 = float(schedules.alpha_from_gamma(g1))
  v1 = a1**2 * S**2 + float(schedules.sigma2_from_gamma(g1))
  if name == "ddim_eta0":
    return MU * (1 - S * a1 / np.sqrt(v1)), S**2 / v1
  a = a1 * S**2 / v1
  return MU - a * a1 * MU, S**2 + a**2 * (1 - v1)


SAMPLERS = {
    "ddpm_small": functools.partial(samplers.ddpm, variance="small"),
    "ddpm_large": functools.partial(samplers.ddpm, variance="large"),
    "ddim_eta0": functools.partial(samplers.ddim, eta=0.0),
    "ddim_eta1": functools.partial(samplers.ddim, eta=1.0),
    "vdm": samplers.vdm_ancestral,
}
STEPS = (10, 100, 1000)


@functools.lru_cache(maxsize=None)
def _moments(num_steps):
  """Sample means and variances of all five samplers at one step count (one compile per step count)."""
  eps_fn = gaussian_eps_fn(LINEAR)

  @jax.jit
  def run(rng):
    out = {}
    for name, fn in SAMPLERS.items():
      x = fn(rng, eps_fn, LINEAR, (B, D), num_steps=num_steps)
      out[name] = (jnp.mean(x), jnp.var(x))
    return out

  return {k: tuple(float(a) for a in v) for k, v in run(jax.random.PRNGKey(0)).items()}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_moments_match_gaussian_and_error_shrinks(name):
  ref_mean, ref_var = limit_moments(name, LINEAR)
  # The limits are within 0.025 of the data's (mu, s^2) (see limit_moments); the stochastic ones within 2e-3.
  assert abs(ref_mean - MU) < 0.025 and abs(ref_var - S**2) < 0.005
  errors = []
  for num_steps in STEPS:
    mean, var = _moments(num_steps)[name]
    errors.append(abs(mean - ref_mean) + abs(var - ref_var))
  mean, var = _moments(1000)[name]
  # 1000 steps: within 4 standard errors of Monte Carlo (+ 0.005 for DDPM "large"'s known excess
  # variance beta_t vs beta_tilde_t and the O(1/T) discretisation error).
  assert abs(mean - ref_mean) < 4 * SE_MEAN, (mean, ref_mean)
  assert abs(var - ref_var) < 4 * SE_VAR + 0.005, (var, ref_var)
  # Measured errors (key 0): 10 steps 0.12-0.20, 100 steps 0.01-0.04, 1000 steps < 0.01.
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[0] > 0.05, errors


def test_ddim_eta0_is_a_deterministic_map_of_the_initial_noise():
  eps_fn = gaussian_eps_fn(DDPM_BETA)
  shape = (64, 3)
  z = jax.random.normal(jax.random.PRNGKey(7), shape)
  run = jax.jit(lambda rng, z, eta: samplers.ddim(rng, eps_fn, DDPM_BETA, shape, num_steps=1000, eta=eta,
                                                  z_init=z))
  a = run(jax.random.PRNGKey(1), z, 0.0)
  b = run(jax.random.PRNGKey(2), z, 0.0)    # different keys for eps': same output, bit for bit
  np.testing.assert_array_equal(a, b)
  c = run(jax.random.PRNGKey(2), z, 1.0)    # eta = 1 does use eps'
  assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-2
  # Per sample, 1000 DDIM steps approach the exact flow map x = mu + (s / sqrt(v_1)) (z_1 - alpha_1 mu)
  # (DDIM eta = 0 discretises the probability-flow ODE; abar_0 = 1 on the DDIM grid). First order in 1/T:
  # measured max errors 0.051 (100 steps), 0.0053 (1000), 0.0006 (10000 of a 10000-step grid).
  g1 = DDPM_BETA.gamma(1.0)
  a1, v1 = schedules.alpha_from_gamma(g1), schedules.alpha2_from_gamma(g1) * S**2 + schedules.sigma2_from_gamma(g1)
  np.testing.assert_allclose(a, MU + S / jnp.sqrt(v1) * (z - a1 * MU), atol=1e-2)


def test_vdm_ancestral_equals_ddpm_small_variance_step():
  # docs/math.md sec. 5: c = -expm1(gamma_s - gamma_t); alpha_s/alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) eps'
  # is DDPM's posterior mean and beta_tilde. Same key -> same z_T and eps' (shared noise layout).
  eps_fn = gaussian_eps_fn(DDPM_BETA)
  shape, steps = (256, 3), 50

  @jax.jit
  def run(rng):
    _, traj_ddpm = samplers.ddpm(rng, eps_fn, DDPM_BETA, shape, num_steps=steps, return_trajectory=True)
    x_vdm, traj_vdm = samplers.vdm_ancestral(rng, eps_fn, DDPM_BETA, shape, num_steps=steps,
                                             return_trajectory=True)
    a = samplers.ddim(rng, eps_fn, DDPM_BETA, shape, num_steps=10, eta=1.0, grid_steps=1000)
    b = samplers.ddpm(rng, eps_fn, DDPM_BETA, shape, num_steps=10)
    return traj_ddpm, x_vdm, traj_vdm, a, b

  traj_ddpm, x_vdm, traj_vdm, a, b = run(jax.random.PRNGKey(4))
  assert traj_ddpm.shape == traj_vdm.shape == (steps + 1,) + shape
  # Every step but the last: DDPM's last step goes to abar_0 = 1, VDM's to gamma(0) (sigma_0 = 0.0033 here).
  np.testing.assert_allclose(traj_vdm[:-1], traj_ddpm[:-1], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(x_vdm, traj_ddpm[-1], atol=0.03)
  # DDIM with eta = 1 on the sub-grid {100, 200, ..., 1000} of 1000 is DDPM "small" on 10 steps.
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_diffenc_shift_one_step_and_consistency():
  sched = LINEAR
  eps_fn = gaussian_eps_fn(sched, power=3)
  shape, steps, big = (4, 3), 4, (8192, 2)

  @jax.jit
  def run(rng):
    kw = dict(return_trajectory=True, num_steps=steps)
    t_shift = samplers.vdm_ancestral(rng, eps_fn, sched, shape, encoder_shift=True, **kw)[1]
    t_plain = samplers.vdm_ancestral(rng, eps_fn, sched, shape, **kw)[1]
    x_shift = samplers.vdm_ancestral(rng, eps_fn, sched, big, num_steps=1000, encoder_shift=True)
    x_plain = samplers.vdm_ancestral(rng, eps_fn, sched, big, num_steps=1000)
    return t_shift, t_plain, x_shift, x_plain

  t_shift, t_plain, x_shift, x_plain = run(jax.random.PRNGKey(5))
  # First step, t = 1 -> s = 3/4, same noise: the difference is the modelled shift
  # -alpha_s (gamma_s - gamma_t) sigma_t^2 x_hat, x_hat = (z_t - sigma_t eps_hat) / alpha_t (docs/math.md sec. 3).
  z1 = t_shift[0]
  g_t, g_s = sched.gamma(1.0), sched.gamma(0.75)
  a_t, s_t = schedules.alpha_from_gamma(g_t), schedules.sigma_from_gamma(g_t)
  x_hat = (z1 - s_t * eps_fn(z1, jnp.ones(shape[:1]))) / a_t
  shift = -schedules.alpha_from_gamma(g_s) * (g_s - g_t) * s_t**2 * x_hat
  np.testing.assert_allclose(t_shift[1] - t_plain[1], shift, atol=1e-5, rtol=1e-4)
  # Direction: gamma_s < gamma_t, so the shift adds +alpha_s |dgamma| sigma_t^2 x_hat.
  assert np.all(np.sign(np.asarray(shift)) == np.sign(np.asarray(x_hat)))

  # With the exact denoiser of the encoded process (z_t = alpha_t^3 x + sigma_t eps), the shifted sampler
  # returns z_0 / alpha_0 ~ x_0 = alpha_0^2 x ~ N(mu, s^2) (alpha_0^2 = 1 - 1.7e-6); without the shift it
  # misses the summed O(1) drift of the encoder (measured mean error -0.15 at 1000 steps, +0.007 with it
  # at 100 steps and -0.0015 at 1000).
  se_mean, se_var = S / np.sqrt(x_shift.size), S**2 * np.sqrt(2.0 / x_shift.size)
  assert abs(float(jnp.mean(x_shift)) - MU) < 4 * se_mean + 2e-3
  assert abs(float(jnp.var(x_shift)) - S**2) < 4 * se_var + 2e-3
  assert abs(float(jnp.mean(x_plain)) - MU) > 0.1


def test_num_levels_decodes_to_int_levels():
  eps_fn = gaussian_eps_fn(LINEAR, mu=0.0, s=0.5)
  k = 16
  fns = (samplers.ddpm, samplers.ddim, samplers.vdm_ancestral)
  outs = jax.jit(lambda rng: [(fn(rng, eps_fn, LINEAR, (128, 2), num_steps=20),
                               fn(rng, eps_fn, LINEAR, (128, 2), num_steps=20, num_levels=k))
                              for fn in fns])(jax.random.PRNGKey(0))
  for x, lv in outs:
    assert lv.dtype == jnp.int32 and lv.shape == (128, 2)
    assert int(lv.min()) >= 0 and int(lv.max()) <= k - 1
    # Nearest bin centre 2 (k + 1/2) / K - 1 to x (clipped to the range).
    centres = (2 * (np.arange(k) + 0.5) / k - 1)
    nearest = np.argmin(np.abs(np.asarray(x)[..., None] - centres), axis=-1)
    np.testing.assert_array_equal(lv, nearest)


def test_guidance_weight_zero_is_the_conditional_model():
  def eps_cond_fn(z, t, labels):
    return jnp.sin(z + labels[:, None].astype(jnp.float32)) * (1.0 + t[:, None])

  z = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  t = jnp.linspace(0.1, 0.9, 8)
  labels = jnp.arange(8) % 3
  direct = eps_cond_fn(z, t, labels)
  np.testing.assert_array_equal(
      samplers.classifier_free_guidance(eps_cond_fn, labels, guidance_weight=0, null_label=3)(z, t), direct)
  # A traced w = 0 also gives 1 * eps_c - 0 * eps_null = eps_c exactly.
  guided = jax.jit(lambda w: samplers.classifier_free_guidance(
      eps_cond_fn, labels, guidance_weight=w, null_label=3)(z, t))
  np.testing.assert_array_equal(guided(0.0), direct)
  null = eps_cond_fn(z, t, jnp.full_like(labels, 3))
  np.testing.assert_allclose(guided(2.0), 3.0 * direct - 2.0 * null, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "vdm_ancestral"])
def test_compiles_once_and_traces_denoiser_once(name):
  traces = []

  def eps_fn(z, t):
    traces.append(1)   # runs at trace time only
    return gaussian_eps_fn(LINEAR)(z, t)

  fn = getattr(samplers, name)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(rng):
    return fn(rng, eps_fn, LINEAR, (4, 2), num_steps=50)

  for seed in range(3):
    run(jax.random.PRNGKey(seed)).block_until_ready()
  # One trace of the sampler, one trace of eps_fn for 50 steps: the loop is a lax.scan, not Python.
  assert len(traces) == 1


def test_probability_flow_sample_is_the_exact_flow_map():
  # x = z_0 / alpha_0 with z_0 = alpha_0 mu + sqrt(v_0 / v_1) (z_1 - alpha_1 mu), v_t = alpha_t^2 s^2 + sigma_t^2.
  shape = (8, 2)
  z1 = jax.random.normal(jax.random.PRNGKey(1), shape)
  x, traj, nfe = jax.jit(lambda z: samplers.probability_flow_sample(
      None, gaussian_eps_fn(LINEAR), LINEAR, shape, z_init=z, return_trajectory=True,
      trajectory_points=5, return_nfe=True))(z1)
  g0, g1 = LINEAR.gamma(0.0), LINEAR.gamma(1.0)
  a0, a1 = schedules.alpha_from_gamma(g0), schedules.alpha_from_gamma(g1)
  v0 = a0**2 * S**2 + schedules.sigma2_from_gamma(g0)
  v1 = a1**2 * S**2 + schedules.sigma2_from_gamma(g1)
  np.testing.assert_allclose(x, (a0 * MU + jnp.sqrt(v0 / v1) * (z1 - a1 * MU)) / a0, atol=1e-4)
  assert traj.shape == (5,) + shape
  np.testing.assert_array_equal(traj[0], z1)
  assert nfe.shape == (8,) and np.all(np.asarray(nfe) > 6)


def test_argument_validation():
  eps_fn = gaussian_eps_fn(LINEAR)
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.ddpm(rng, eps_fn, LINEAR, (4, 2), num_steps=0)
  with pytest.raises(ValueError, match="variance"):
    samplers.ddpm(rng, eps_fn, LINEAR, (4, 2), num_steps=5, variance="medium")
  with pytest.raises(ValueError, match="shape"):
    samplers.vdm_ancestral(rng, eps_fn, LINEAR, (4,), num_steps=5)
  with pytest.raises(ValueError, match="eta"):
    samplers.ddim(rng, eps_fn, LINEAR, (4, 2), num_steps=5, eta=-0.1)
  with pytest.raises(ValueError, match="spacing"):
    samplers.ddim(rng, eps_fn, LINEAR, (4, 2), num_steps=5, spacing="log")
  with pytest.raises(ValueError, match="num_steps must be <= grid_steps"):
    samplers.ddim(rng, eps_fn, LINEAR, (4, 2), num_steps=50, grid_steps=10)
  with pytest.raises(ValueError, match="num_levels"):
    samplers.vdm_ancestral(rng, eps_fn, LINEAR, (4, 2), num_steps=5, num_levels=1)
  with pytest.raises(ValueError, match="z_init"):
    samplers.ddpm(rng, eps_fn, LINEAR, (4, 2), num_steps=5, z_init=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="t_start"):
    samplers.probability_flow_sample(rng, eps_fn, LINEAR, (4, 2), t_start=0.0, t_end=1.0)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("num_steps,grid_steps", [(10, 1000), (100, 1000), (7, 50), (1, 10), (50, 50)])
def test_ddim_timesteps(spacing, num_steps, grid_steps):
  tau = samplers.ddim_timesteps(num_steps, grid_steps, spacing)
  assert tau.shape == (num_steps,) and tau[-1] == grid_steps and tau[0] >= 1 and np.all(np.diff(tau) > 0)
  if spacing == "uniform" and grid_steps % num_steps == 0:
    np.testing.assert_array_equal(tau, np.arange(1, num_steps + 1) * (grid_steps // num_steps))
