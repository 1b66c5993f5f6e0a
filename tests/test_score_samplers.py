"""Annealed Langevin dynamics and predictor-corrector samplers against float64 transcriptions of the reference
code (identical inputs, identical noise under the documented layouts) and Gaussian closed forms.

References, transcribed below to numpy float64 (torch / TensorFlow are not needed):
* ermongroup/ncsnv2, models/__init__.py `anneal_Langevin_dynamics` and `get_sigmas`, commit
  1bcea03bd97d76a8357b9d674fa0bae5ff0f1093.
* yang-song/score_sde, sampling.py (EulerMaruyamaPredictor, ReverseDiffusionPredictor,
  AncestralSamplingPredictor.vpsde_update_fn, LangevinCorrector, get_pc_sampler) and sde_lib.py
  (VPSDE.sde, VPSDE.discretize, SDE.reverse), commit 0acb9e0ea3b8cccd935068cd9c657318fbc6ce4c.
  (score_sde is JAX but imports TensorFlow and its model zoo, so it is transcribed too.)
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import samplers
from vdiff import schedules
from vdiff import score_samplers as ss

from _gaussian import MU, S, gaussian_eps_fn  # pylint: disable=g-bad-import-order
LINEAR = schedules.linear()
B0, B1 = 0.1, 20.0




# ----------------------------------------------------------------------------------------------------
# ncsnv2 anneal_Langevin_dynamics, transcribed.
# ----------------------------------------------------------------------------------------------------
def ref_anneal_langevin(x, score, sigmas, n_steps_each, step_lr, noises, denoise=True):
  """ncsnv2 models/__init__.py: for each level c, step_size = step_lr (sigma / sigmas[-1])^2; n_steps_each
  times x = x + step_size grad + noise sqrt(2 step_size); then x = x + sigmas[-1]^2 score(x, last)."""
  k = 0
  for sigma in sigmas:
    step_size = step_lr * (sigma / sigmas[-1]) ** 2
    for _ in range(n_steps_each):
      grad = score(x, sigma)
      x = x + step_size * grad + noises[k] * np.sqrt(step_size * 2)
      k += 1
  if denoise:
    x = x + sigmas[-1] ** 2 * score(x, sigmas[-1])
  return x


def ve_gaussian_score(x, sigma):
  """grad log N(x; mu, s^2 + sigma^2): the VE score of Gaussian data."""
  return -(x - MU) / (S**2 + sigma**2)


def langevin_noises(rng, shape, n):
  """The documented layout: rng -> (rng_init, rng_steps); step k draws from split(rng_steps, n)[k]."""
  _, rng_steps = jax.random.split(rng)
  keys = jax.random.split(rng_steps, n)
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys), np.float64)


def test_get_sigmas_is_ncsnv2_geometric():
  ref = np.exp(np.linspace(np.log(50.0), np.log(0.01), 232))    # get_sigmas, sigma_dist='geometric'
  np.testing.assert_allclose(ss.geometric_sigmas(sigma_max=50.0, sigma_min=0.01, num=232), ref, rtol=2e-6)


def test_annealed_langevin_matches_ncsnv2_chain():
  shape, rng = (128, 3), jax.random.PRNGKey(1)
  sigmas = np.exp(np.linspace(np.log(10.0), np.log(0.01), 20))
  steps, lr = 3, 2e-5
  x0 = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), shape, minval=-1, maxval=1), np.float64)
  out = jax.jit(lambda x: ss.annealed_langevin(rng, gaussian_eps_fn(LINEAR), LINEAR, shape, sigmas=sigmas,
                                               steps_per_level=steps, step_size=lr, z_init=x,
                                               return_trajectory=True))(jnp.asarray(x0, jnp.float32))
  noises = langevin_noises(rng, shape, 20 * steps + 1)
  ref = ref_anneal_langevin(x0, ve_gaussian_score, sigmas, steps, lr, noises)
  assert out.nfe == 61 and out.trajectory.shape == (62,) + shape
  # The VE score reached through vdiff's VP denoiser (z = x / sqrt(1 + sigma^2), t by bisection) equals
  # -(x - mu) / (s^2 + sigma^2): chains agree to float32 (measured max difference 3e-6).
  np.testing.assert_allclose(out.samples, ref, atol=2e-5, rtol=2e-5)
  # One step, the first: x + a grad + sqrt(2 a) w with a = lr (10 / 0.01)^2.
  a = lr * (sigmas[0] / sigmas[-1]) ** 2
  one = x0 + a * ve_gaussian_score(x0, sigmas[0]) + np.sqrt(2 * a) * noises[0]
  np.testing.assert_allclose(out.trajectory[1], one, atol=2e-5, rtol=2e-5)
  # The chain is not the identity on its input: the reference and vdiff moved the samples a lot.
  assert np.max(np.abs(ref - x0)) > 0.5


def test_ve_score_is_the_vp_score_rescaled():
  # score_ve(x, sigma) = -eps_hat(x / sqrt(1 + sigma^2), t) / sigma with gamma_t = log sigma^2
  # equals the closed-form VE score of N(mu, s^2) at several sigmas across the schedule's range.
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 2)) * 3
  sig = jnp.array([0.002, 0.01, 0.3, 1.0, 5.0, 12.0])
  got = ss.ve_score_fn(gaussian_eps_fn(LINEAR), LINEAR)(x, sig)
  np.testing.assert_allclose(got, ve_gaussian_score(np.asarray(x, np.float64), np.asarray(sig)[:, None]),
                             rtol=1e-4, atol=1e-5)


def test_annealed_langevin_moments_converge_with_steps():
  # Gaussian data: after annealing to sigma_L = 0.01 and denoising, x has mean mu and variance
  # s^4 / (s^2 + sigma_L^2) ~ s^2 in the limit of many small steps; more steps per level, smaller error.
  shape = (8192, 2)
  gaps = []
  for steps in (1, 4, 64):
    x = jax.jit(lambda rng: ss.annealed_langevin(rng, gaussian_eps_fn(LINEAR), LINEAR, shape,
                                                 num_noise_levels=50, steps_per_level=steps,
                                                 step_size=2e-5).samples)(jax.random.PRNGKey(0))
    x = np.asarray(x)
    gaps.append(abs(x.mean() - MU) + abs(x.var() - S**4 / (S**2 + 1e-4)))
  # Measured (key 0): 1 step 0.77, 4 steps 0.092, 64 steps 0.022 (mean -0.013, variance +0.009);
  # 4 standard errors of the mean and the variance of 16384 draws are 0.019 and 0.011.
  assert gaps[0] > gaps[1] > gaps[2], gaps
  assert gaps[2] < 0.035, gaps


# ----------------------------------------------------------------------------------------------------
# score_sde's predictors and corrector, transcribed (VPSDE, discrete and continuous).
# ----------------------------------------------------------------------------------------------------
def ref_vp_discrete_betas(n):
  return np.linspace(B0 / n, B1 / n, n)      # VPSDE.discrete_betas


def ref_reverse_diffusion(x, score, beta, w):
  """ReverseDiffusionPredictor with VPSDE.discretize: f = sqrt(alpha) x - x, G = sqrt(beta);
  rev_f = f - G^2 score; x_mean = x - rev_f; x = x_mean + G w."""
  f = np.sqrt(1 - beta) * x - x
  rev_f = f - beta * score
  x_mean = x - rev_f
  return x_mean + np.sqrt(beta) * w, x_mean


def ref_ancestral(x, score, beta, w):
  """AncestralSamplingPredictor.vpsde_update_fn."""
  x_mean = (x + beta * score) / np.sqrt(1.0 - beta)
  return x_mean + np.sqrt(beta) * w, x_mean


def ref_euler_maruyama(x, score, t, n, w):
  """EulerMaruyamaPredictor: dt = -1 / N; rsde drift = -1/2 beta x - beta score, diffusion sqrt(beta)."""
  beta_t = B0 + t * (B1 - B0)
  drift = -0.5 * beta_t * x - beta_t * score
  x_mean = x + drift * (-1.0 / n)
  return x_mean + np.sqrt(beta_t) * np.sqrt(1.0 / n) * w, x_mean


def ref_langevin(x, score_fn, alpha, snr, ws):
  """LangevinCorrector (VPSDE): step = (snr ||w|| / ||grad||)^2 2 alpha with batch-mean norms."""
  x_mean = x
  for w in ws:
    grad = score_fn(x)
    grad_norm = np.linalg.norm(grad.reshape(grad.shape[0], -1), axis=-1).mean()
    noise_norm = np.linalg.norm(w.reshape(w.shape[0], -1), axis=-1).mean()
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step * grad
    x = x_mean + w * np.sqrt(step * 2)
  return x, x_mean


def pc_noises(rng, shape, num_steps, corrector_steps):
  """The documented PC layout: [N, corrector_steps + 1, B, ...], predictor noise last in each step."""
  _, rng_steps = jax.random.split(rng)
  keys = jax.random.split(rng_steps, num_steps)
  sub = jax.vmap(lambda k: jax.random.split(k, corrector_steps + 1))(keys)
  return np.asarray(jax.vmap(jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32)))(sub), np.float64)


def discrete_vp_schedule(n):
  """vdiff's schedule through score_sde's discrete VP chain: abar_k = prod_{j <= k} (1 - beta_j) at t = k / N."""
  return schedules.from_alpha2_grid(np.cumprod(1.0 - ref_vp_discrete_betas(n)), name="vp_discrete")


def ref_gauss_eps(x, abar):
  a, sg = np.sqrt(abar), np.sqrt(1 - abar)
  return sg * (x - a * MU) / (a * a * S * S + sg * sg)


@pytest.mark.parametrize("predictor,corrector", [("reverse_diffusion", "langevin"), ("ancestral", "none"),
                                                 ("reverse_diffusion", "none"), ("ancestral", "langevin"),
                                                 ("none", "langevin")])
def test_pc_chain_matches_score_sde(predictor, corrector):
  n, shape, rng, snr, c_steps = 40, (64, 3), jax.random.PRNGKey(3), 0.16, 2
  sched = discrete_vp_schedule(n)
  betas = ref_vp_discrete_betas(n)
  abar = np.cumprod(1.0 - betas)
  z0 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), shape), np.float64)
  out = jax.jit(lambda z: ss.pc_sampler(rng, gaussian_eps_fn(sched), sched, shape, num_steps=n,
                                        predictor=predictor, corrector=corrector, snr=snr,
                                        corrector_steps=c_steps, z_init=z))(jnp.asarray(z0, jnp.float32))
  w = pc_noises(rng, shape, n, c_steps if corrector != "none" else 0)
  # score_sde's loop over timesteps = linspace(1, 1e-3, N): step i reads index int(t_i (N - 1)) = N - 1 - i
  # of its discrete betas, alphas and sqrt(1 - alphas_cumprod) (a discrete-time model: the same level k = N - i
  # as vdiff's t = k / N, so the chains are identical).
  x, x_mean = z0, z0
  ts = np.linspace(1.0, 1e-3, n)
  for i in range(n):
    idx = int(ts[i] * (n - 1))
    assert idx == n - 1 - i
    score = lambda y, idx=idx: -ref_gauss_eps(y, abar[idx]) / np.sqrt(1 - abar[idx])  # noqa: E731
    if corrector == "langevin":
      x, x_mean = ref_langevin(x, score, 1 - betas[idx], snr, w[i, :c_steps])
    if predictor == "reverse_diffusion":
      x, x_mean = ref_reverse_diffusion(x, score(x), betas[idx], w[i, -1])
    elif predictor == "ancestral":
      x, x_mean = ref_ancestral(x, score(x), betas[idx], w[i, -1])
  per = (predictor != "none") + (c_steps if corrector != "none" else 0)
  assert out.nfe == n * per
  # Measured max differences 1e-6 .. 2e-5 (float32 against float64); the chains' own step-to-step moves
  # are O(1), and the denoised output (x_mean) differs from the noisy x by > 1e-2.
  np.testing.assert_allclose(out.samples, x_mean, atol=5e-5, rtol=5e-5)
  assert np.max(np.abs(x - x_mean)) > 1e-3


def test_euler_maruyama_chain_matches_score_sde():
  # The continuous VPSDE as a vdiff schedule: gamma = log expm1(t^2 (b1 - b0) / 2 + t b0), so that
  # beta(t) = gamma'(t) sigma_t^2 = b0 + t (b1 - b0) (sde_lib.VPSDE.sde). The reference's step is fed
  # vdiff's grid t = k / N (score_sde's linspace(1, 1e-3, N) is a different grid; the step is the same).
  n, shape, rng = 50, (64, 3), jax.random.PRNGKey(5)
  sched = schedules.from_function(lambda t: jnp.log(jnp.expm1(0.5 * t * t * (B1 - B0) + t * B0)))
  z0 = np.asarray(jax.random.normal(jax.random.PRNGKey(6), shape), np.float64)
  out = jax.jit(lambda z: ss.pc_sampler(rng, gaussian_eps_fn(sched), sched, shape, num_steps=n,
                                        predictor="euler_maruyama", z_init=z, return_trajectory=True)
                )(jnp.asarray(z0, jnp.float32))
  w = pc_noises(rng, shape, n, 0)
  x, x_mean = z0, z0
  for i in range(n):
    t = (n - i) / n
    lmc = -0.25 * t**2 * (B1 - B0) - 0.5 * t * B0              # VPSDE.marginal_prob
    abar = np.exp(2 * lmc)
    score = -ref_gauss_eps(x, abar) / np.sqrt(1 - abar)
    x, x_mean = ref_euler_maruyama(x, score, t, n, w[i, -1])
    if i == 0:
      np.testing.assert_allclose(out.trajectory[1], x, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out.samples, x_mean, atol=5e-5, rtol=5e-5)
  assert out.nfe == n


def limit_moments(schedule):
  """Reverse-SDE limit from N(0, I) at t = 1 (test_samplers.limit_moments): A = alpha_1 s^2 / v_1."""
  g1 = float(schedule.gamma(1.0))
  a1 = float(schedules.alpha_from_gamma(g1))
  v1 = a1**2 * S**2 + float(schedules.sigma2_from_gamma(g1))
  a = a1 * S**2 / v1
  return MU - a * a1 * MU, S**2 + a**2 * (1 - v1)


@functools.lru_cache(maxsize=None)
def _pc_moments(predictor, corrector, n):
  shape = (8192, 2)
  x = jax.jit(lambda rng: ss.pc_sampler(rng, gaussian_eps_fn(LINEAR), LINEAR, shape, num_steps=n,
                                        predictor=predictor, corrector=corrector).samples)(jax.random.PRNGKey(7))
  x = np.asarray(x)
  return float(x.mean()), float(x.var())


@pytest.mark.parametrize("predictor,corrector", [("euler_maruyama", "none"), ("reverse_diffusion", "none"),
                                                 ("ancestral", "none"), ("reverse_diffusion", "langevin")])
def test_pc_moments_approach_the_gaussian(predictor, corrector):
  ref_mean, ref_var = limit_moments(LINEAR)
  se_mean, se_var = S / np.sqrt(16384), S**2 * np.sqrt(2 / 16384)
  gaps = []
  for n in (10, 300):
    mean, var = _pc_moments(predictor, corrector, n)
    gaps.append(abs(mean - ref_mean) + abs(var - ref_var))
  mean, var = _pc_moments(predictor, corrector, 300)
  # The Langevin corrector also pulls z_1 towards p_1 (not N(0, I)), so its limit lies between the
  # reverse-SDE limit and the data's (mu, s^2), which differ by < 0.01 here: a 0.01 allowance.
  extra = 0.01 if corrector == "langevin" else 0.0
  assert abs(mean - ref_mean) < 4 * se_mean + 0.004 + extra, (mean, ref_mean)
  assert abs(var - ref_var) < 4 * se_var + 0.006 + extra, (var, ref_var)
  assert gaps[1] < gaps[0], gaps


def test_pc_encoder_shift():
  # Exact denoiser of DiffEnc's non-trainable encoder: with the shift the sampler returns ~ N(mu, s^2)
  # (the encoded x_0 = alpha_0^2 x); without it the mean misses the encoder's drift.
  shape = (4096, 2)
  eps_fn = gaussian_eps_fn(LINEAR, power=3)
  run = jax.jit(lambda rng, sh: [ss.pc_sampler(rng, eps_fn, LINEAR, shape, num_steps=200, predictor=p,
                                               encoder_shift=sh).samples.mean()
                                 for p in ("ancestral", "euler_maruyama")], static_argnums=1)
  shifted = [float(v) for v in run(jax.random.PRNGKey(0), True)]
  plain = [float(v) for v in run(jax.random.PRNGKey(0), False)]
  assert all(abs(m - MU) < 0.03 for m in shifted), shifted
  assert all(abs(m - MU) > 0.1 for m in plain), plain


def test_ancestral_predictor_is_ddpm():
  # score_sde's ancestral step (x + beta score) / sqrt(1 - beta) + sqrt(beta) w is DDPM with the "large"
  # variance beta; its mean is DDPM's posterior mean with x0_hat (no clipping). Same initial noise.
  shape = (64, 2)
  eps_fn = gaussian_eps_fn(LINEAR)
  rng = jax.random.PRNGKey(8)
  _, traj = ss.pc_sampler(rng, eps_fn, LINEAR, shape, num_steps=30, predictor="ancestral",
                          return_trajectory=True)[0:3:2]
  z0 = samplers._noise(rng, shape, 30)[0]  # pylint: disable=protected-access
  np.testing.assert_array_equal(traj[0], z0)
  # One step by hand from the DDPM formulas at i = T: mean = c_x0 x0_hat + c_z z.
  grid = LINEAR.discrete_grid(30)
  beta, abar_t, abar_s = grid.beta[30], jnp.exp(grid.log_abar[30]), jnp.exp(grid.log_abar[29])
  eps = eps_fn(z0, jnp.ones((64,)))
  x0 = (z0 - jnp.sqrt(1 - abar_t) * eps) / jnp.sqrt(abar_t)
  mean = beta * jnp.sqrt(abar_s) / (1 - abar_t) * x0 + (1 - abar_s) * jnp.sqrt(1 - beta) / (1 - abar_t) * z0
  w = jax.random.normal(jax.random.split(jax.random.split(jax.random.split(rng)[1], 30)[0], 1)[0], shape)
  np.testing.assert_allclose(traj[1], mean + jnp.sqrt(beta) * w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("which", ["langevin", "pc"])
def test_compiles_once_and_traces_denoiser_once(which):
  traces = []

  def eps_fn(z, t):
    traces.append(1)
    return gaussian_eps_fn(LINEAR)(z, t)

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(rng):
    if which == "langevin":
      return ss.annealed_langevin(rng, eps_fn, LINEAR, (4, 2), num_noise_levels=10, steps_per_level=3)
    return ss.pc_sampler(rng, eps_fn, LINEAR, (4, 2), num_steps=20, predictor="reverse_diffusion",
                         corrector="langevin", corrector_steps=2)

  for seed in range(3):
    out = run(jax.random.PRNGKey(seed))
  assert len(traces) == 1
  assert int(out.nfe) == (31 if which == "langevin" else 60)


def test_guidance_and_levels():
  def eps_cond_fn(z, t, labels):
    return gaussian_eps_fn(LINEAR, mu=0.3 * labels[:, None].astype(jnp.float32))(z, t)

  labels = jnp.arange(8) % 2
  guided = samplers.classifier_free_guidance(eps_cond_fn, labels, guidance_weight=1.5, null_label=2)
  out = ss.pc_sampler(jax.random.PRNGKey(0), guided, LINEAR, (8, 3), num_steps=20, num_levels=16)
  assert out.samples.dtype == jnp.int32 and int(out.samples.min()) >= 0 and int(out.samples.max()) <= 15
  lv = ss.annealed_langevin(jax.random.PRNGKey(0), guided, LINEAR, (8, 3), num_noise_levels=5,
                            steps_per_level=2, num_levels=16).samples
  assert lv.dtype == jnp.int32


@pytest.mark.parametrize("fn,kwargs,match", [
    ("pc", dict(corrector="langevin", snr=0.0), "snr must be finite and > 0"),
    ("pc", dict(corrector="langevin", snr=-1.0), "snr must be finite and > 0"),
    ("pc", dict(predictor="euler_maruyma"), "predictor must be one of .* Did you mean 'euler_maruyama'"),
    ("pc", dict(corrector="langevn"), "corrector must be one of .* Did you mean 'langevin'"),
    ("pc", dict(predictor="none", corrector="none"), "cannot both be 'none'"),
    ("pc", dict(num_steps=0), "num_steps must be >= 1"),
    ("langevin", dict(sigmas=np.array([1.0, 2.0, 0.5])), "sigmas must be strictly decreasing"),
    ("langevin", dict(sigmas=np.array([50.0, 1.0])), "sigmas must lie in the schedule's range"),
    ("langevin", dict(step_size=0.0), "step_size must be finite and > 0"),
    ("langevin", dict(init="normal"), "init must be one of .* Did you mean"),
    ("langevin", dict(steps_per_level=0), "steps_per_level must be >= 1"),
])
def test_bad_input_is_refused_before_compute(fn, kwargs, match):
  calls = []

  def eps_fn(z, t):
    calls.append(1)
    return z

  f = ss.pc_sampler if fn == "pc" else ss.annealed_langevin
  with pytest.raises(ValueError, match=match):
    f(jax.random.PRNGKey(0), eps_fn, LINEAR, (2, 2), **kwargs)
  assert not calls
