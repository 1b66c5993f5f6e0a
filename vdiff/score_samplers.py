"""Score-based samplers: annealed Langevin dynamics (NCSNv2) and predictor-corrector samplers (score SDE).

Every sampler takes any eps-prediction denoiser eps_fn(z [B, ...], t [B]) -> eps_hat and any
`vdiff.schedules.Schedule`, runs ONE `lax.scan` whose body calls eps_fn once (one trace of eps_fn however
many levels, steps or corrector iterations), is pure and deterministic given the key, and returns a
`vdiff.dpm_solver.SamplerOutput(samples, nfe, trajectory)` (nfe: eps_fn calls, a Python int).

Score. For z_t = alpha_t x_t + sigma_t eps with ANY x_t given x (plain, or DiffEnc's encoded signal),
p_t(z) = E_x N(z; alpha_t x_t, sigma_t^2 I) and grad log p_t(z) = -E[eps | z] / sigma_t, so

    score(z, t) = -eps_hat(z, t) / sigma_t                          (docs/math.md sec. 7)

is the model's score of its own marginal whatever the encoder: Langevin steps need no DiffEnc shift.

Variance-exploding view (NCSN's noise levels). The VE process x_ve = x + sigma eps is the VP process
rescaled: z_vp = alpha x + sigma_vp eps = alpha x_ve with sigma = sigma_vp / alpha, i.e.

    gamma = log sigma^2,   alpha = 1 / sqrt(1 + sigma^2),   z_vp = x_ve / sqrt(1 + sigma^2),
    score_ve(x_ve, sigma) = alpha score_vp(z_vp, t) = -eps_hat(z_vp, t) / sigma,   t = gamma^{-1}(log sigma^2).

A VE noise level sigma is reachable when log sigma^2 lies in [gamma(0), gamma(1)] (VDM's linear schedule:
sigma in [0.0013, 12.2]); t comes from `vdiff.dpm_solver.time_from_gamma`.

VP SDE of a vdiff schedule. dz = -1/2 beta(t) z dt + sqrt(beta(t)) dW has alpha_t^2 = exp(-int_0^t beta);
with alpha^2 = sigmoid(-gamma), d log alpha^2 / dt = -sigmoid(gamma) gamma' = -sigma_t^2 gamma'(t), so

    beta(t) = gamma'(t) sigma_t^2,   reverse SDE  dz = [-1/2 beta z - beta score] dt + sqrt(beta) dW_bar,

and the discrete betas of the N-step grid are DDPM's beta_k = 1 - abar_k / abar_{k-1} of
`schedule.discrete_grid(N)` (t = k / N, abar_0 := 1), whose score-SDE limit is beta(t) / N.

References: Song & Ermon 2020, "Improved techniques for training score-based generative models",
arXiv:2006.09011 (NCSNv2; reference code ermongroup/ncsnv2 models/__init__.py at 1bcea03b);
Song & Ermon 2019, arXiv:1907.05600 (annealed Langevin dynamics); Song et al. 2021, arXiv:2011.13456
(score SDE; reference code yang-song/score_sde sampling.py and sde_lib.py at 0acb9e0e).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import config_schema
from vdiff import samplers
from vdiff import schedules as schedules_lib
from vdiff.dpm_solver import SamplerOutput, check_choice, check_positive, time_from_gamma

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

PREDICTORS = config_schema.PC_PREDICTORS   # ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = config_schema.PC_CORRECTORS   # ("langevin", "none")
LANGEVIN_INITS = ("uniform", "gaussian")


def _bcast(v: Array, x: Array) -> Array:
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v)))


# ----------------------------------------------------------------------------------------------------
# The variance-exploding view.
# ----------------------------------------------------------------------------------------------------
def ve_score_fn(eps_fn: EpsFn, schedule: schedules_lib.Schedule) -> Callable[[Array, Array], Array]:
  """score_ve(x_ve [B, ...], sigma [B]) = -eps_hat(x_ve / sqrt(1 + sigma^2), t) / sigma, gamma_t = log sigma^2.

  The score of the VE marginal at noise level sigma of the model's VP process (module docstring).
  """

  def score(x, sigma):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    t = time_from_gamma(schedule, 2.0 * jnp.log(sigma))
    s = _bcast(sigma, x)
    return -eps_fn(x * jax.lax.rsqrt(1.0 + s * s), t) / s

  return score


def geometric_sigmas(*, sigma_max: float | Array, sigma_min: float | Array, num: int) -> Array:
  """NCSN's geometric noise levels sigma_1 = sigma_max > ... > sigma_L = sigma_min, float32 [L]
  (ncsnv2 `get_sigmas` with sigma_dist='geometric': exp(linspace(log sigma_begin, log sigma_end, L)))."""
  num = checks.positive_int(num, "num_noise_levels")
  return jnp.exp(jnp.linspace(jnp.log(jnp.float32(sigma_max)), jnp.log(jnp.float32(sigma_min)), num))


def _check_sigmas(sigmas, schedule) -> None:
  """Positive, strictly decreasing, inside the schedule's range (checked where the values are concrete)."""
  if not (checks.is_concrete(sigmas)):
    return
  s = np.asarray(sigmas, np.float64)
  if s.ndim != 1 or s.shape[0] < 1:
    raise ValueError(f"sigmas must be a 1-D array of noise levels [L], got shape {s.shape}.")
  if not np.all(np.isfinite(s) & (s > 0)):
    raise ValueError("sigmas must be finite and > 0.")
  if np.any(np.diff(s) >= 0):
    raise ValueError(f"sigmas must be strictly decreasing (largest noise first), got {s[:4]}...")
  g0, g1 = schedule.endpoints()
  if checks.is_concrete(g0):
    lo, hi = np.exp(0.5 * float(g0)), np.exp(0.5 * float(g1))
    if s[-1] < lo * (1 - 1e-5) or s[0] > hi * (1 + 1e-5):
      raise ValueError(f"sigmas must lie in the schedule's range [{lo:.4g}, {hi:.4g}] (sigma = exp(gamma/2)),"
                       f" got [{s[-1]:.4g}, {s[0]:.4g}].")


# ----------------------------------------------------------------------------------------------------
# Annealed Langevin dynamics.
# ----------------------------------------------------------------------------------------------------
def annealed_langevin(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
                      sigmas: Array | None = None, sigma_max: float | None = None, sigma_min: float = 0.01,
                      num_noise_levels: int = 232, steps_per_level: int = 5, step_size: float = 6.2e-6,
                      denoise: bool = True, init: str = "uniform", encoder_shift: bool = False,
                      num_levels: int | None = None, return_trajectory: bool = False,
                      z_init: Array | None = None) -> SamplerOutput:
  """Annealed Langevin dynamics over VE noise levels sigma_1 > ... > sigma_L (NCSNv2, Algorithm 1):

      for i = 1..L:  alpha_i = step_size sigma_i^2 / sigma_L^2
        repeat steps_per_level times:  x <- x + alpha_i score_ve(x, sigma_i) + sqrt(2 alpha_i) w,  w ~ N(0, I)
      denoise:  x <- x + sigma_L^2 score_ve(x, sigma_L)   (= x_hat = E[x | x_ve], Tweedie; "improved
                techniques" sec. 3.4, ncsnv2's `denoise=True`)

  with score_ve(x, sigma) = -eps_hat(x / sqrt(1 + sigma^2), t(sigma)) / sigma (module docstring). The
  defaults are ncsnv2's CIFAR-10 configuration (configs/cifar10.yml: sigma_end = 0.01, 232 geometric
  levels, n_steps_each = 5, step_lr = 6.2e-6, denoise), except sigma_1: the paper's technique 1 sets it to
  the largest pairwise distance of the training data (50 for CIFAR-10), while a vdiff schedule reaches
  only sigma(t = 1) = exp(gamma(1) / 2), which is the default here.

  init: "uniform" draws x ~ U[-1, 1]^D (ncsnv2 starts from torch.rand, U[0, 1], in its [0, 1] data range;
  vdiff data lives in [-1, 1]); "gaussian" draws N(0, sigma_1^2 I). z_init= gives x directly (VE space).

  With encoder_shift=True (DiffEnc) the Langevin steps are unchanged (the score of the marginal does not
  involve the encoder) and the final denoising step returns x_hat / alpha_L^2 = x_hat (1 + sigma_L^2), the
  non-trainable encoder x_t = alpha_t^2 x undone to clean data (as `vdiff.samplers`); denoise must be True.

  Noise layout: rng -> (rng_init, rng_steps); the initial x from rng_init; Langevin step k (k = 0 first,
  level-major: k = (i - 1) steps_per_level + j) draws w from split(rng_steps, L steps_per_level + denoise)[k].

  Args:
    rng: PRNG key. eps_fn: denoiser. schedule: noise schedule. shape: (B, ...).
    sigmas: explicit VE noise levels [L], strictly decreasing, inside the schedule's range; overrides the
      geometric ones.
    sigma_max: sigma_1 of the geometric levels (default the schedule's largest, exp(gamma(1) / 2)).
    sigma_min: sigma_L (ncsnv2: 0.01).
    num_noise_levels: L (ncsnv2 CIFAR-10: 232).
    steps_per_level: Langevin steps per level (ncsnv2: 5).
    step_size: eps > 0, the step at the smallest level (ncsnv2 CIFAR-10: 6.2e-6).
    denoise: the final denoising step (one more evaluation).
    init: "uniform" or "gaussian" (see above).
    encoder_shift: DiffEnc models (see above).
    num_levels: K; if given, decode to int32 levels.
    return_trajectory: also return x after every step, [L steps_per_level + denoise + 1, B, ...].
    z_init: optional initial x [B, ...] (VE space).
  Returns:
    SamplerOutput(samples, nfe = L steps_per_level + denoise, trajectory).
  Reference: Song & Ermon 2020, arXiv:2006.09011, Algorithm 1 and sec. 3; ermongroup/ncsnv2
  models/__init__.py `anneal_Langevin_dynamics` (commit 1bcea03b).
  """
  shape = samplers._check_shape(shape)  # pylint: disable=protected-access
  samplers._check_levels(num_levels)  # pylint: disable=protected-access
  steps_per_level = samplers._check_steps(steps_per_level, "steps_per_level")  # pylint: disable=protected-access
  check_positive(step_size, "step_size")
  init = check_choice(init, LANGEVIN_INITS, "init")
  if encoder_shift and not denoise:
    raise ValueError("encoder_shift=True needs denoise=True (the shift acts in the final denoising step).")
  if sigmas is None:
    check_positive(sigma_min, "sigma_min")
    if sigma_max is not None:
      check_positive(sigma_max, "sigma_max")
    smax = jnp.exp(0.5 * schedule.gamma(jnp.float32(1.0))) if sigma_max is None else sigma_max
    if checks.is_concrete(smax) and not float(smax) > float(sigma_min):
      raise ValueError(f"sigma_max must be > sigma_min, got sigma_max={float(smax)}, sigma_min={sigma_min}.")
    sigmas = geometric_sigmas(sigma_max=smax, sigma_min=sigma_min, num=num_noise_levels)
  _check_sigmas(sigmas, schedule)
  sigmas = jnp.asarray(sigmas, jnp.float32)
  num_lv = sigmas.shape[0]
  n_lang = num_lv * steps_per_level
  n_iter = n_lang + int(bool(denoise))

  lv = np.concatenate([np.repeat(np.arange(num_lv), steps_per_level), [num_lv - 1] * int(bool(denoise))])
  is_den = np.arange(n_iter) >= n_lang
  sig = sigmas[lv]
  alpha = step_size * jnp.square(sig / sigmas[-1])
  coef = dict(
      sigma=sig, t=time_from_gamma(schedule, 2.0 * jnp.log(sig)),
      a=jnp.where(is_den, jnp.square(sig), alpha),                 # coefficient of the score
      b=jnp.where(is_den, 0.0, jnp.sqrt(2.0 * alpha)),            # of the noise
      c=jnp.where(is_den & encoder_shift, 1.0 + jnp.square(sig), 1.0))   # 1 / alpha^2 undoes the encoder

  rng_init, rng_steps = jax.random.split(rng)
  if z_init is None:
    if init == "uniform":
      x = jax.random.uniform(rng_init, shape, jnp.float32, -1.0, 1.0)
    else:
      x = sigmas[0] * jax.random.normal(rng_init, shape, jnp.float32)
  else:
    if tuple(z_init.shape) != shape:
      raise ValueError(f"z_init must have shape {shape}, got {tuple(z_init.shape)}.")
    x = jnp.asarray(z_init, jnp.float32)
  keys = jax.random.split(rng_steps, n_iter)
  batch = shape[0]

  def step(x, xs):
    c, key = xs
    eps = eps_fn(x * jax.lax.rsqrt(1.0 + jnp.square(c["sigma"])), jnp.full((batch,), c["t"]))
    score = -eps / c["sigma"]
    x = c["c"] * (x + c["a"] * score) + c["b"] * jax.random.normal(key, shape, jnp.float32)
    return x, x

  x_init = x
  x, traj = jax.lax.scan(step, x, (coef, keys))
  trajectory = jnp.concatenate([x_init[None], traj], axis=0) if return_trajectory else None
  return SamplerOutput(samplers._finish(x, num_levels), n_iter, trajectory)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------------
# Predictor-corrector samplers.
# ----------------------------------------------------------------------------------------------------
def pc_sampler(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
               num_steps: int = 1000, predictor: str = "euler_maruyama", corrector: str = "none",
               snr: float = 0.16, corrector_steps: int = 1, denoise: bool = True,
               encoder_shift: bool = False, num_levels: int | None = None,
               return_trajectory: bool = False, z_init: Array | None = None) -> SamplerOutput:
  """Predictor-corrector sampling of the reverse VP SDE of `schedule` (score SDE, Algorithms 2 and 4).

  N steps k = N..1 at t_k = k / N, from z ~ N(0, I); at each, corrector_steps corrector iterations, then one
  predictor step (score_sde's `pc_sampler` order). With score = -eps_hat(z, t_k) / sigma_{t_k}, the DDPM
  betas beta_k = 1 - abar_k / abar_{k-1} of `schedule.discrete_grid(N)` and beta(t) = gamma'(t) sigma_t^2:

    predictors (z_mean, then z = z_mean + c w, w ~ N(0, I)):
      reverse_diffusion: z_mean = (2 - sqrt(1 - beta_k)) z + beta_k score,   c = sqrt(beta_k)
      ancestral:         z_mean = (z + beta_k score) / sqrt(1 - beta_k),      c = sqrt(beta_k)   (DDPM)
      euler_maruyama:    z_mean = z + (1/2 beta(t_k) z + beta(t_k) score) / N, c = sqrt(beta(t_k) / N)
      none:              no predictor (a corrector-only sampler)
    correctors:
      langevin: eps_L = 2 (1 - beta_k) (snr ||w|| / ||score||)^2 with the norms averaged over the batch,
                z <- z + eps_L score + sqrt(2 eps_L) w   (score_sde's LangevinCorrector, VP case)
      none

  The step is score_sde's with vdiff's grid t = k / N fed to eps_fn (score_sde feeds
  linspace(1, 1e-3, N), whose discrete index int(t (N - 1)) is the same k - 1; for a discrete-time model
  the chains are identical). The last step goes to abar_0 = 1 (discrete predictors) or t = 0
  (euler_maruyama, then divided by alpha(0)); denoise=True returns the last predictor's z_mean (no noise in
  the last step), score_sde's "noise removal". Because the Langevin step size uses batch means of norms
  (as the reference; under a sharded jit the mean is over the global batch, score_sde's pmean), a
  sample depends on its batch.

  encoder_shift=True (DiffEnc) adds the reverse SDE's encoder drift E[alpha_t dx_t / dt | z] reversed,
  +alpha_s (gamma_t - gamma_s) sigma_t^2 x_hat for the discrete predictors (as `vdiff.samplers.ddpm`, to
  x_hat / abar_1 at the last step) and +alpha_t beta(t) x_hat / N for euler_maruyama, with
  x_hat = (z - sigma_t eps_hat) / alpha_t; the corrector needs no shift (module docstring).

  Noise layout: rng -> (rng_init, rng_steps); z ~ N(0, I) from rng_init (as `vdiff.samplers`); step i
  (i = 0 the noisiest) has key_i = split(rng_steps, N)[i], and its corrector iteration j draws w from
  split(key_i, corrector_steps + 1)[j], the predictor from split(key_i, corrector_steps + 1)[-1].

  Args:
    rng: PRNG key. eps_fn: denoiser. schedule: noise schedule. shape: (B, ...).
    num_steps: N >= 1 (score_sde: 1000).
    predictor: "reverse_diffusion", "euler_maruyama", "ancestral" or "none" (score_sde's VP configs:
      euler_maruyama; its DDPM configs: ancestral_sampling; its VE configs: reverse_diffusion).
    corrector: "langevin" or "none" (score_sde's VP configs: none; VE configs: langevin).
    snr: the corrector's signal-to-noise ratio r > 0 (score_sde: 0.16).
    corrector_steps: Langevin iterations per step (score_sde's n_steps_each: 1).
    denoise: return the last predictor's mean (score_sde's noise_removal: True).
    encoder_shift: DiffEnc's encoder drift (see above).
    num_levels: K; if given, decode to int32 levels.
    return_trajectory: also return z after every step, [N + 1, B, ...].
    z_init: optional initial noise [B, ...].
  Returns:
    SamplerOutput(samples, nfe, trajectory); nfe = N (predictor != none) + N corrector_steps
    (corrector != none). (score_sde reports N (n_steps + 1) whatever the pairing, which overcounts
    predictor-only sampling by N.)
  Reference: Song et al. 2021, arXiv:2011.13456, Algorithms 2-5 and appendix G; yang-song/score_sde
  sampling.py (EulerMaruyamaPredictor, ReverseDiffusionPredictor, AncestralSamplingPredictor,
  LangevinCorrector, get_pc_sampler) and sde_lib.py (VPSDE.discretize) at commit 0acb9e0e.
  """
  shape = samplers._check_shape(shape)  # pylint: disable=protected-access
  num_steps = samplers._check_steps(num_steps)  # pylint: disable=protected-access
  samplers._check_levels(num_levels)  # pylint: disable=protected-access
  predictor = check_choice(predictor, PREDICTORS, "predictor")
  corrector = check_choice(corrector, CORRECTORS, "corrector")
  if predictor == "none" and corrector == "none":
    raise ValueError("predictor and corrector cannot both be 'none' (nothing would sample).")
  if corrector != "none":
    corrector_steps = samplers._check_steps(corrector_steps, "corrector_steps")  # pylint: disable=protected-access
    check_positive(snr, "snr")
  n_corr = corrector_steps if corrector != "none" else 0
  n_pred = int(predictor != "none")
  per_step = n_corr + n_pred

  grid = schedule.discrete_grid(num_steps)
  k = np.arange(num_steps, 0, -1)                          # N, ..., 1
  t_k = jnp.asarray(k, jnp.float32) / num_steps
  g_k, dg_k = schedule.gamma_and_dgamma(t_k)
  sig2 = schedules_lib.sigma2_from_gamma(g_k)
  beta_c = dg_k * sig2                                     # beta(t) = gamma'(t) sigma_t^2
  beta = grid.beta[k]
  one_m_beta = jnp.exp(grid.log_one_minus_beta[k])          # 1 - beta_k = abar_k / abar_{k-1}
  h = 1.0 / num_steps
  if predictor == "reverse_diffusion":
    pa, pb, pc = 2.0 - jnp.sqrt(one_m_beta), beta, jnp.sqrt(beta)
  elif predictor == "ancestral":
    pa, pb, pc = jax.lax.rsqrt(one_m_beta), beta * jax.lax.rsqrt(one_m_beta), jnp.sqrt(beta)
  else:  # euler_maruyama (and none: unused)
    pa, pb, pc = 1.0 + 0.5 * beta_c * h, beta_c * h, jnp.sqrt(beta_c * h)
  if predictor == "euler_maruyama":
    shift = schedules_lib.alpha_from_gamma(g_k) * beta_c * h
  else:
    m = samplers._shift_factor(schedule.gamma_difference(k, num_steps), grid.one_minus_abar[k],  # pylint: disable=protected-access
                               grid.log_abar[k], jnp.asarray(k == 1))
    shift = jnp.exp(0.5 * grid.log_abar[k - 1]) * m
  per = dict(t=t_k, sigma=jnp.sqrt(sig2), alpha=schedules_lib.alpha_from_gamma(g_k),
             pa=jnp.broadcast_to(pa, t_k.shape), pb=jnp.broadcast_to(pb, t_k.shape),
             pc=jnp.broadcast_to(pc, t_k.shape), shift=shift, la=one_m_beta)
  # Stages: corrector iterations then the predictor, per step (static layout).
  stage_step = np.repeat(np.arange(num_steps), per_step)
  stage_is_pred = np.tile(np.arange(per_step) >= n_corr, num_steps)
  stage_sub = np.tile(np.arange(per_step), num_steps)
  coef = {name: v[stage_step] for name, v in per.items()}
  coef["pred"] = jnp.asarray(stage_is_pred)

  z, step_keys = samplers._noise(rng, shape, num_steps, z_init)  # pylint: disable=protected-access
  sub_keys = jax.vmap(lambda key: jax.random.split(key, corrector_steps + 1 if n_corr else 1))(step_keys)
  # Predictor noise: the last sub-key of its step; corrector iteration j: sub-key j.
  key_index = np.where(stage_is_pred, sub_keys.shape[1] - 1, stage_sub)
  keys = sub_keys[stage_step, key_index]
  batch = shape[0]

  def step(carry, xs):
    z, _ = carry
    c, key = xs
    eps = eps_fn(z, jnp.full((batch,), c["t"]))
    score = -eps / c["sigma"]
    w = jax.random.normal(key, shape, jnp.float32)
    # Langevin corrector (score_sde LangevinCorrector: norms averaged over the batch).
    grad_norm = jnp.mean(jnp.linalg.norm(score.reshape(batch, -1), axis=-1))
    noise_norm = jnp.mean(jnp.linalg.norm(w.reshape(batch, -1), axis=-1))
    eps_l = 2.0 * c["la"] * jnp.square(snr * noise_norm / grad_norm)
    zc_mean = z + eps_l * score
    zc = zc_mean + jnp.sqrt(2.0 * eps_l) * w
    # Predictor.
    zp_mean = c["pa"] * z + c["pb"] * score
    if encoder_shift:
      zp_mean = zp_mean + c["shift"] * (z - c["sigma"] * eps) / c["alpha"]
    zp = zp_mean + c["pc"] * w
    z_new = jnp.where(c["pred"], zp, zc)
    z_mean = jnp.where(c["pred"], zp_mean, zc_mean)
    return (z_new, z_mean), z_new

  (z_fin, z_mean), traj = jax.lax.scan(step, (z, z), (coef, keys))
  out = z_mean if denoise else z_fin
  if predictor == "euler_maruyama":
    out = out * jnp.exp(-0.5 * jax.nn.log_sigmoid(-schedule.gamma(jnp.float32(0.0))))
  trajectory = None
  if return_trajectory:
    ends = np.flatnonzero(stage_sub == per_step - 1)
    trajectory = jnp.concatenate([z[None], traj[ends]], axis=0)
  return SamplerOutput(samplers._finish(out, num_levels), num_steps * per_step, trajectory)  # pylint: disable=protected-access
