"""Samplers against closed forms for Gaussian data x ~ N(mu, s^2 I) and its exact denoiser (docs/math.md sec. 7)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import samplers
from vdiff import schedules

from _gaussian import MU, S, gaussian_eps_fn  # pylint: disable=g-bad-import-order
B, D = 16384, 2          # N = B D = 32768 scalar draws per moment estimate
N = B * D
SE_MEAN = S / np.sqrt(N)                # standard error of the sample mean, 0.0033
SE_VAR = S**2 * np.sqrt(2.0 / N)        # standard error of the sample variance (Gaussian), 0.0028
LINEAR = schedules.linear()             # VDM's gamma in [-13.3, 5]
DDPM_BETA = schedules.ddpm_linear_beta()




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
    # Gaussian data leave [-1, 1]: DDPM's default clipping of x0_hat is switched off for these closed forms.
    "ddpm_small": functools.partial(samplers.ddpm, variance="small", clip_x0=False),
    "ddpm_large": functools.partial(samplers.ddpm, variance="large", clip_x0=False),
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
    _, traj_ddpm = samplers.ddpm(rng, eps_fn, DDPM_BETA, shape, num_steps=steps, return_trajectory=True,
                                 clip_x0=False)
    x_vdm, traj_vdm = samplers.vdm_ancestral(rng, eps_fn, DDPM_BETA, shape, num_steps=steps,
                                             return_trajectory=True)
    a = samplers.ddim(rng, eps_fn, DDPM_BETA, shape, num_steps=10, eta=1.0, grid_steps=1000)
    b = samplers.ddpm(rng, eps_fn, DDPM_BETA, shape, num_steps=10, clip_x0=False)
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


# ----------------------------------------------------------------------------------------------------
# Step-by-step against float64 reference samplers (DDPM's and DDIM's reference code, re-written in numpy).
# ----------------------------------------------------------------------------------------------------
def _step_noise(rng, shape, num_steps):
  """The eps' of each step in the samplers' shared noise layout (module docstring), float64."""
  _, rng_steps = jax.random.split(rng)
  keys = jax.random.split(rng_steps, num_steps)
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys), np.float64)


def _ddpm_abar64(T=1000):
  """Ho et al. 2020: betas linspace(1e-4, 0.02, T), abar_i = prod (1 - beta), abar_0 = 1; float64."""
  beta = np.concatenate([[0.0], np.linspace(1e-4, 0.02, T)])
  return beta, np.cumprod(1.0 - beta)


def _toy_eps(z):
  # A denoiser whose x0_hat leaves [-1, 1] at most steps, so that clipping matters.
  return 0.5 * z


def _rel_err(got, ref):
  return float(np.max(np.abs(np.asarray(got, np.float64) - ref) / (1.0 + np.abs(ref))))


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_steps_match_float64_reference(variance):
  # Reference: DDPM's sampler (Ho et al. 2020, Algorithm 2; official code p_sample with
  # clip_denoised=True: x0_hat clipped to [-1, 1] before the posterior mean) in float64 from the betas,
  # applied to each state of vdiff's trajectory with the same eps'. Default clip_x0 must clip (an
  # unclipped sampler is off by up to 2.3 relatively here); clip_x0=False must be the unclipped chain.
  # Both to float32 round-off (measured 1.9e-7): the grid comes from the betas (a grid from float32
  # gamma knots has beta off by 1.2e-4 and step errors of 1.7e-5 relatively).
  T, shape = 1000, (64, 3)
  rng = jax.random.PRNGKey(11)
  beta, abar = _ddpm_abar64(T)
  noise = _step_noise(rng, shape, T)
  eps_fn = lambda z, t: _toy_eps(z)

  def reference(traj, clip):
    out = []
    for k in range(T):
      i, z = T - k, traj[k]
      x0 = (z - np.sqrt(1 - abar[i]) * _toy_eps(z)) / np.sqrt(abar[i])
      if clip:
        x0 = np.clip(x0, -1.0, 1.0)
      if i == 1:
        out.append(x0)
        continue
      mean = (beta[i] * np.sqrt(abar[i - 1]) * x0
              + (1 - abar[i - 1]) * np.sqrt(1 - beta[i]) * z) / (1 - abar[i])
      var = beta[i] * (1 - abar[i - 1]) / (1 - abar[i]) if variance == "small" else beta[i]
      out.append(mean + np.sqrt(var) * noise[k])
    return np.stack(out)

  for kw, clip in (({}, True), ({"clip_x0": False}, False)):
    _, traj = jax.jit(lambda r: samplers.ddpm(r, eps_fn, DDPM_BETA, shape, num_steps=T, variance=variance,
                                              return_trajectory=True, **kw))(rng)
    traj = np.asarray(traj, np.float64)
    err = _rel_err(traj[1:], reference(traj[:-1], clip))
    assert err < 1e-6, (kw, err)
    if clip:
      assert np.max(np.abs(traj[-1])) <= 1.0


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_steps_match_float64_reference(eta):
  # Reference: ermongroup/ddim functions/denoising.py generalized_steps in float64 (no clipping there),
  # x0_t = (x - sqrt(1 - a_t) e) / sqrt(a_t), c1 = eta sqrt((1 - a_t / a_next)(1 - a_next) / (1 - a_t)),
  # c2 = sqrt(1 - a_next - c1^2), x_next = sqrt(a_next) x0_t + c1 eps' + c2 e, on vdiff's sub-grid tau.
  # clip_x0=True clips x0_t and keeps e (diffusers' DDIMScheduler default, use_clipped_model_output=False).
  S, T, shape = 50, 1000, (64, 3)
  rng = jax.random.PRNGKey(12)
  _, abar = _ddpm_abar64(T)
  noise = _step_noise(rng, shape, S)
  tau = samplers.ddim_timesteps(S, T)
  eps_fn = lambda z, t: _toy_eps(z)

  def reference(traj, clip):
    out = []
    for k in range(S):
      i, j, z = tau[S - 1 - k], (tau[S - 2 - k] if k < S - 1 else 0), traj[k]
      e = _toy_eps(z)
      x0 = (z - np.sqrt(1 - abar[i]) * e) / np.sqrt(abar[i])
      if clip:
        x0 = np.clip(x0, -1.0, 1.0)
      c1 = eta * np.sqrt((1 - abar[i] / abar[j]) * (1 - abar[j]) / (1 - abar[i]))
      c2 = np.sqrt(max(1 - abar[j] - c1**2, 0.0))
      out.append(np.sqrt(abar[j]) * x0 + c1 * noise[k] + c2 * e)
    return np.stack(out)

  for kw, clip in (({}, False), ({"clip_x0": True}, True)):
    _, traj = jax.jit(lambda r: samplers.ddim(r, eps_fn, DDPM_BETA, shape, num_steps=S, eta=eta,
                                              grid_steps=T, return_trajectory=True, **kw))(rng)
    traj = np.asarray(traj, np.float64)
    err = _rel_err(traj[1:], reference(traj[:-1], clip))
    assert err < 1e-6, (kw, err)
  assert np.max(np.abs(traj[-1])) <= 1.0


def test_vdm_ancestral_steps_match_float64_reference():
  # Reference: the VDM step z_s = (alpha_s / alpha_t) z_t + sigma_s sqrt(c) eps', c = -expm1(gamma_s -
  # gamma_t) (docs/math.md sec. 5), in float64 on the exact linear gammas, applied to each state of the
  # trajectory with the same eps' (eps_hat = 0 isolates the coefficients). T = 1000: a c from float32
  # t and s is off by ~3e-5 relatively (max step error 5.3e-6); from (i, T), float32 round-off (3e-7).
  T, shape = 1000, (256, 2)
  rng = jax.random.PRNGKey(3)
  _, traj = jax.jit(lambda r: samplers.vdm_ancestral(r, lambda z, t: jnp.zeros_like(z), LINEAR, shape,
                                                     num_steps=T, return_trajectory=True))(rng)
  traj = np.asarray(traj, np.float64)
  noise = _step_noise(rng, shape, T)
  i = np.arange(T, 0, -1)[:, None, None]
  g_t, g_s = -13.3 + 18.3 * i / T, -13.3 + 18.3 * (i - 1) / T
  log_alpha2 = lambda g: -np.logaddexp(0.0, g)
  ratio = np.exp(0.5 * (log_alpha2(g_s) - log_alpha2(g_t)))
  sigma_s = np.exp(0.5 * log_alpha2(-g_s))
  ref = ratio * traj[:-1] + sigma_s * np.sqrt(-np.expm1(g_s - g_t)) * noise
  err = _rel_err(traj[1:], ref)
  assert err < 1e-6, err


# ----------------------------------------------------------------------------------------------------
# DiffEnc: every sampler models the encoder's mean shift.
# ----------------------------------------------------------------------------------------------------
DIFFENC_MU, DIFFENC_S = 0.5, 0.2
DIFFENC_SAMPLERS = {
    "vdm_ancestral": samplers.vdm_ancestral,
    "ddpm_small": functools.partial(samplers.ddpm, variance="small", clip_x0=False),
    "ddpm_large": functools.partial(samplers.ddpm, variance="large", clip_x0=False),
    "ddim_eta0": functools.partial(samplers.ddim, eta=0.0, grid_steps=1000),
    "ddim_eta1": functools.partial(samplers.ddim, eta=1.0, grid_steps=1000),
}


@functools.lru_cache(maxsize=None)
def _diffenc_moments(encoder_shift):
  # The exact denoiser of the non-trainable encoder's process: x_t = alpha_t^2 x, z_t = alpha_t x_t +
  # sigma_t eps = alpha_t^3 x + sigma_t eps, so E[eps | z_t] is docs/math.md sec. 7's with alpha -> alpha^3.
  eps_fn = gaussian_eps_fn(LINEAR, mu=DIFFENC_MU, s=DIFFENC_S, power=3)
  shape = (8192, 2)

  @jax.jit
  def run(rng):
    out = {}
    for name, fn in DIFFENC_SAMPLERS.items():
      x = fn(rng, eps_fn, LINEAR, shape, num_steps=500, encoder_shift=encoder_shift)
      out[name] = (jnp.mean(x), jnp.std(x))
    x = samplers.probability_flow_sample(rng, eps_fn, LINEAR, (1024, 1), encoder_shift=encoder_shift)
    out["ode"] = (jnp.mean(x), jnp.std(x))
    return out

  return {k: tuple(float(a) for a in v) for k, v in run(jax.random.PRNGKey(0)).items()}


@pytest.mark.parametrize("name", list(DIFFENC_SAMPLERS) + ["ode"])
def test_diffenc_shift_every_sampler_matches_data_moments(name):
  # Data N(0.5, 0.2^2), 500 steps (the ODE adaptive). Each sampler returns an estimate of x_0 =
  # enc(x, gamma_0) = alpha_0^2 x (alpha_0^2 = 1 - 1.7e-6) or of x itself, so mean and std must be
  # 0.5 / 0.2 within 4 Monte-Carlo standard errors + 2e-3 (the O(1/T) discretisation and the start
  # from N(0, I); DDPM "large" has its known excess variance, + 5e-3). Without the shift, measured on
  # the same draws: ddpm 0.456 / 0.193, ddim (eta = 0) 0.377 / 0.185, ode 0.380 / 0.181.
  n = 1024 if name == "ode" else 16384
  se_mean, se_std = DIFFENC_S / np.sqrt(n), DIFFENC_S / np.sqrt(2 * n)
  mean, std = _diffenc_moments(True)[name]
  assert abs(mean - DIFFENC_MU) < 4 * se_mean + 2e-3, (mean, std)
  assert abs(std - DIFFENC_S) < 4 * se_std + (7e-3 if name == "ddpm_large" else 2e-3), (mean, std)
  # The shift is what makes it right: without it every sampler is off by far more than the bound.
  plain_mean, _ = _diffenc_moments(False)[name]
  assert DIFFENC_MU - plain_mean > 0.03, plain_mean


def test_diffenc_ddim_eta1_is_ddpm_with_the_shift():
  # DDIM with eta = 1 on the full grid is DDPM "small" (also with the encoder shift: x_prev_hat replaces
  # x0_hat in both), and DDPM with the shift is VDM ancestral with the shift on every step but the last
  # (DDPM's last goes to abar_0 = 1, VDM's to gamma(0)). Same key -> same noise.
  eps_fn = gaussian_eps_fn(LINEAR, mu=DIFFENC_MU, s=DIFFENC_S, power=3)
  shape, T = (128, 2), 50
  kw = dict(num_steps=T, encoder_shift=True, return_trajectory=True)

  @jax.jit
  def run(rng):
    return (samplers.ddim(rng, eps_fn, LINEAR, shape, eta=1.0, grid_steps=T, **kw)[1],
            samplers.ddpm(rng, eps_fn, LINEAR, shape, clip_x0=False, **kw)[1],
            samplers.vdm_ancestral(rng, eps_fn, LINEAR, shape, **kw)[1])

  t_ddim, t_ddpm, t_vdm = run(jax.random.PRNGKey(9))
  np.testing.assert_allclose(t_ddim, t_ddpm, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(t_vdm[:-1], t_ddpm[:-1], atol=2e-5, rtol=1e-5)


def test_nan_denoiser_never_decodes_to_valid_levels():
  # A diverged (NaN) denoiser: the float samples are NaN, and decoded levels are -1 (outside {0..K-1}),
  # eagerly and under jit. Casting NaN to int32 would give level 0: an all-black, valid-looking image.
  nan_fn = lambda z, t: jnp.full_like(z, jnp.nan)
  rng, shape = jax.random.PRNGKey(0), (4, 3)
  for fn in (samplers.ddim, samplers.ddpm, samplers.vdm_ancestral):
    assert np.all(np.isnan(fn(rng, nan_fn, LINEAR, shape, num_steps=5)))
    levels = fn(rng, nan_fn, LINEAR, shape, num_steps=5, num_levels=17)
    assert levels.dtype == jnp.int32 and np.all(np.asarray(levels) == -1), levels
    jitted = jax.jit(lambda r: fn(r, nan_fn, LINEAR, shape, num_steps=5, num_levels=17))(rng)
    assert np.all(np.asarray(jitted) == -1), jitted
  # A finite sample still decodes to a level in {0..K-1} (one NaN entry does not spoil the others).
  part = lambda z, t: jnp.where(jnp.arange(3) == 1, jnp.nan, 0.5 * z)
  levels = np.asarray(samplers.ddim(rng, part, LINEAR, shape, num_steps=5, num_levels=17))
  assert np.all(levels[:, 1] == -1) and np.all((levels[:, [0, 2]] >= 0) & (levels[:, [0, 2]] < 17))


@pytest.mark.parametrize("num_levels", [17.5, 1, True, "17"])
def test_num_levels_must_be_an_integer(num_levels):
  # A check of num_levels < 2 alone would accept 17.5 (and decode with a fractional K).
  for fn in (samplers.ddim, samplers.ddpm, samplers.vdm_ancestral):
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
      fn(jax.random.PRNGKey(0), gaussian_eps_fn(LINEAR), LINEAR, (4, 2), num_steps=5, num_levels=num_levels)
