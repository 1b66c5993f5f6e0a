"""Samplers: DDPM, DDIM, VDM ancestral (with the DiffEnc shift), classifier-free guidance, probability flow.

Every sampler takes any eps-prediction denoiser eps_fn(z, t) -> eps_hat (z [B, ...], t [B] in [0, 1]) and
any `vdiff.schedules.Schedule`, and draws from N(0, I) at t = 1 down to t = 0 in ONE `lax.scan` (one trace
of eps_fn whatever the number of steps). All are pure and deterministic given the key; they hold no
device logic (wrap them in `jax.jit`, shard the key and the batch at the call site).

Discrete grids (docs/math.md sec. 0, 5): step i of T sits at t = i / T, abar_i = alpha^2(i / T) for i >= 1 and
abar_0 := 1 (clean data): `schedule.discrete_grid(T)`, which gives log abar, 1 - abar, gamma and the betas
to float32 round-off (from DDPM's betas in float64 where the schedule has them; otherwise from gamma and
the cancellation-free increments `schedule.gamma_difference(i, T)`, never from 1 - abar: at
gamma = -13.3, 1 - abar = 1.7e-6 keeps about one significant digit when formed from abar in float32).

Clipping: `ddpm` and `ddim` take `clip_x0` (keyword-only): clip x0_hat to [-1, 1], the data range, before
it enters the update. The defaults follow each sampler's reference code: DDPM clips (Ho et al.'s
`clip_denoised=True`), DDIM does not (Song et al.'s `generalized_steps`). `vdm_ancestral` and the
probability flow never clip (they are the model's own generative process). Likelihoods (vdiff.vdm,
vdiff.diffenc, vdiff.likelihood) never clip anything.

DiffEnc (docs/math.md sec. 3): with `encoder_shift=True` every sampler models the encoder's mean shift, for
models whose diffusion runs on x_t = enc(x, gamma_t) and whose x_hat = (z_t - sigma_t eps_hat) / alpha_t
estimates x_t, with the encoder-derivative estimate d_hat = -sigma_t^2 x_hat (exact for the
non-trainable encoder x_t = alpha_t^2 x). The estimate of x_s for s < t is
    x_s_hat = x_hat + (gamma_t - gamma_s) sigma_t^2 x_hat           (DiffEnc's first-order shift),
and to clean data (abar_s = 1, gamma_s = -infinity, where enc is the identity) the exact integral of
dx/dgamma = -sigma^2 x, x_hat / alpha_t^2. `vdm_ancestral` and `ddpm` add alpha_s (x_s_hat - x_hat) to
the posterior mean (DiffEnc's p(z_s | z_t)); `ddim` puts x_s_hat where plain DDIM puts x0_hat (DDIM's
non-Markovian q(z_s | z_t, x) of the encoded process has mean alpha_s x_s + sqrt(sigma_s^2 - sig^2)
(z_t - alpha_t x_t) / sigma_t, so eta = 1 is `ddpm` with the shift); the probability flow adds the
encoder's drift alpha_t dx_t/dt = -gamma' alpha_t sigma_t^2 x_hat. Without the shift a DiffEnc model
misses an O(1) drift summed over the steps.

Noise layout (shared by `ddpm`, `ddim` and `vdm_ancestral`, so the same key gives the same noise):
rng -> (rng_init, rng_steps); z_T = N(0, I) from rng_init; step k (k = 0 is the first, noisiest step)
draws its eps' from split(rng_steps, num_steps)[k].

Return values: samples [B, ...] (float32 x-space estimates, or int32 levels in {0..K-1} when num_levels
is given; a sample that is not finite, e.g. from a diverged denoiser, decodes to -1, never to a valid
level), and with return_trajectory=True also the trajectory [num_steps + 1, B, ...]: the initial
noise followed by the state after each step. `z_init=` replaces the initial noise (rng then only
draws the per-step noise).

References: Ho et al. 2020 (DDPM, arXiv:2006.11239); Song et al. 2021 (DDIM, arXiv:2010.02502);
Kingma et al. 2021 (VDM, arXiv:2107.00630); Nielsen et al. 2024 (DiffEnc, arXiv:2310.19789);
Ho & Salimans 2022 (classifier-free guidance, arXiv:2207.12598); Song et al. 2021 (score SDE,
arXiv:2011.13456).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import likelihood
from vdiff import schedules as schedules_lib
from vdiff import vdm

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

DDPM_VARIANCES = ("small", "large")
DDIM_SPACINGS = ("uniform", "quadratic")


# ----------------------------------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
  try:
    shape = tuple(int(d) for d in shape)
  except TypeError as e:
    raise ValueError(f"shape must be a sequence of ints [B, ...], got {shape!r}.") from e
  if len(shape) < 2:
    raise ValueError(f"shape must have rank >= 2 (batch first, then at least one data axis), got {shape}.")
  if any(d < 1 for d in shape):
    raise ValueError(f"shape must have positive entries, got {shape}.")
  return shape


def _check_steps(num_steps: int, name: str = "num_steps") -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int (it fixes the loop length), got {num_steps!r}.")
  if num_steps < 1:
    raise ValueError(f"{name} must be >= 1, got {num_steps}.")
  return int(num_steps)


def _check_levels(num_levels: int | None) -> None:
  if num_levels is not None:
    checks.positive_int(num_levels, "num_levels", minimum=2)


def _check_clip(clip_x0) -> bool:
  if not isinstance(clip_x0, (bool, np.bool_)):
    raise ValueError(f"clip_x0 must be True or False, got {clip_x0!r}.")
  return bool(clip_x0)


def _finish(x: Array, num_levels: int | None) -> Array:
  """x-space estimate -> returned sample: itself, or the nearest of K bin centres as int32 levels.

  A non-finite x (a diverged denoiser) decodes to level -1, outside {0..K-1}: casting NaN to an integer
  would silently give a valid-looking level (0), so NaN stays detectable after decoding.
  """
  if num_levels is None:
    return x
  return jnp.where(jnp.isfinite(x), likelihood.decode(x, num_levels), -1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Shared pieces of the steps.
# ----------------------------------------------------------------------------------------------------
def _x0(z: Array, eps_hat: Array, sqrt_abar: Array, sqrt_om: Array, clip_x0: bool) -> Array:
  """x0_hat = (z - sqrt(1 - abar) eps_hat) / sqrt(abar), clipped to the data range [-1, 1] if asked."""
  x0 = vdm.x_from_eps(z, eps_hat, sqrt_abar, sqrt_om)
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _shift_factor(dgamma: Array, one_minus_abar_t: Array, log_abar_t: Array, to_clean: Array) -> Array:
  """m with x_s_hat = (1 + m) x_hat: (gamma_t - gamma_s) sigma_t^2, or 1 / abar_t - 1 to clean data."""
  return jnp.where(to_clean, jnp.expm1(-log_abar_t), dgamma * one_minus_abar_t)


def _noise(rng: Array, shape: tuple[int, ...], num_steps: int,
           z_init: Array | None = None) -> tuple[Array, Array]:
  """Initial noise z_T ~ N(0, I) (or the given z_init) and one key per step (the shared layout)."""
  rng_init, rng_steps = jax.random.split(rng)
  if z_init is None:
    z_init = jax.random.normal(rng_init, shape, jnp.float32)
  elif tuple(z_init.shape) != shape:
    raise ValueError(f"z_init must have shape {shape}, got {tuple(z_init.shape)}.")
  return jnp.asarray(z_init, jnp.float32), jax.random.split(rng_steps, num_steps)


def _run(step: Callable, z_init: Array, xs, return_trajectory: bool):
  """lax.scan the step over xs; returns (final carry, trajectory [T + 1, B, ...] or None)."""
  if return_trajectory:
    def body(z, x):
      z_new = step(z, x)
      return z_new, z_new
    z_final, traj = jax.lax.scan(body, z_init, xs)
    return z_final, jnp.concatenate([z_init[None], traj], axis=0)
  z_final, _ = jax.lax.scan(lambda z, x: (step(z, x), None), z_init, xs)
  return z_final, None


def _output(x: Array, traj: Array | None, num_levels: int | None):
  out = _finish(x, num_levels)
  return out if traj is None else (out, traj)


# ----------------------------------------------------------------------------------------------------
# DDPM.
# ----------------------------------------------------------------------------------------------------
def ddpm(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
         num_steps: int, variance: str = "small", clip_x0: bool = True, encoder_shift: bool = False,
         num_levels: int | None = None, return_trajectory: bool = False, z_init: Array | None = None):
  """DDPM ancestral sampling on the T-step grid of `schedule` (T = num_steps).

  For i = T..1 (t = i / T, previous index i - 1), with beta_i = 1 - abar_i / abar_{i-1}:

      x0_hat = (z_i - sqrt(1 - abar_i) eps_hat(z_i, t)) / sqrt(abar_i),   clipped to [-1, 1] if clip_x0
      mean   = beta_i sqrt(abar_{i-1}) / (1 - abar_i) x0_hat + (1 - abar_{i-1}) sqrt(1 - beta_i) / (1 - abar_i) z_i
      z_{i-1} = mean + sqrt(v_i) eps',   v_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)  ("small", beta_tilde)
                                         v_i = beta_i                                   ("large")

  The last step (i = 1, abar_0 = 1) adds no noise and returns x0_hat (its mean, exactly), as in DDPM.
  The grid (abar, beta) is `schedule.discrete_grid(T)`: DDPM's own betas in float64 for
  `schedules.ddpm_linear_beta` at its T.

  With encoder_shift=True (DiffEnc, see the module docstring) the mean gains
  sqrt(abar_{i-1}) (gamma_i - gamma_{i-1}) (1 - abar_i) x0_hat, the same chain as
  `vdm_ancestral(..., encoder_shift=True)` on this grid ("small" variance), and the last step returns
  x0_hat / abar_1 (the modelled encoder undone to clean data).

  Args:
    rng: PRNG key.
    eps_fn: denoiser eps_fn(z [B, ...], t [B]) -> eps_hat [B, ...].
    schedule: the noise schedule; abar = schedule.discrete_grid(num_steps).
    shape: (B, ...) of the samples.
    num_steps: T >= 1.
    variance: "small" (beta_tilde, the posterior variance) or "large" (beta).
    clip_x0: clip x0_hat to [-1, 1] at every step (default True, as DDPM's reference sampler,
      `clip_denoised=True`). Sampling only: no likelihood in vdiff clips.
    encoder_shift: add DiffEnc's modelled mean shift (for a model with an encoder).
    num_levels: K; if given, x0_hat is decoded to the nearest bin centre and int32 levels are returned
      (-1 where the sample is not finite).
    return_trajectory: also return [T + 1, B, ...]: z_T, then z after each step (x0_hat last).
    z_init: optional initial noise [B, ...] (default N(0, I) from rng); rng then only draws eps'.
  Returns:
    samples [B, ...] (float32, or int32 levels), and the trajectory if asked.
  Reference: Ho et al. 2020, arXiv:2006.11239, Algorithm 2 and eq. (7); Nielsen et al. 2024,
  arXiv:2310.19789, section 3 (the shift).
  """
  shape = _check_shape(shape)
  num_steps = _check_steps(num_steps)
  _check_levels(num_levels)
  clip_x0 = _check_clip(clip_x0)
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}.")

  grid = schedule.discrete_grid(num_steps)
  i = jnp.arange(num_steps, 0, -1)                       # T, T-1, ..., 1
  la_t, la_s = grid.log_abar[i], grid.log_abar[i - 1]
  om_t, om_s = grid.one_minus_abar[i], grid.one_minus_abar[i - 1]
  log_alpha = grid.log_one_minus_beta[i]                 # log(1 - beta_i) = log(abar_i / abar_{i-1})
  beta = grid.beta[i]                                    # to float32 round-off (no cancellation)
  last = (i == 1)
  coef = dict(
      t=i.astype(jnp.float32) / num_steps,
      sqrt_abar=jnp.exp(0.5 * la_t),
      sqrt_om=jnp.sqrt(om_t),
      c_x0=beta * jnp.exp(0.5 * la_s) / om_t,
      c_z=om_s * jnp.exp(0.5 * log_alpha) / om_t,
      std=jnp.sqrt(beta * om_s / om_t if variance == "small" else beta),
      last=last,
      # DiffEnc: x_s_hat = (1 + m) x0_hat; the mean gains sqrt(abar_s) m x0_hat (0 at the last step,
      # whose output x0_hat (1 + m) is formed below). gamma_t - gamma_s as in `vdm_ancestral`.
      m=_shift_factor(schedule.gamma_difference(i, num_steps), om_t, la_t, last),
  )
  z_init, keys = _noise(rng, shape, num_steps, z_init)

  def step(z, xs):
    c, key = xs
    eps_hat = eps_fn(z, jnp.full((shape[0],), c["t"]))
    x0 = _x0(z, eps_hat, c["sqrt_abar"], c["sqrt_om"], clip_x0)
    z_prev = c["c_x0"] * x0 + c["c_z"] * z + c["std"] * jax.random.normal(key, shape, jnp.float32)
    if encoder_shift:
      z_prev = z_prev + jnp.exp(0.5 * c["la_s"]) * c["m"] * x0
      x0 = x0 + c["m"] * x0
    return jnp.where(c["last"], x0, z_prev)

  coef["la_s"] = la_s
  z_final, traj = _run(step, z_init, (coef, keys), return_trajectory)
  return _output(z_final, traj, num_levels)


# ----------------------------------------------------------------------------------------------------
# DDIM.
# ----------------------------------------------------------------------------------------------------
def ddim_timesteps(num_steps: int, grid_steps: int, spacing: str = "uniform") -> np.ndarray:
  """The sub-grid tau_1 < ... < tau_S = N of {1..N} (S = num_steps, N = grid_steps), as numpy int32.

  DDIM paper, appendix D.2: tau_i = floor(c i) ("uniform") or floor(c i^2) ("quadratic"), with c chosen so
  that tau_S = N (c = N / S or N / S^2), so the first step starts at t = 1 where z_1 ~ N(0, I) holds.
  (The released DDIM code instead uses range(0, N, N // S) and a quadratic grid ending near 0.8 N; both
  start below t = 1.) For small i the quadratic floor(c i^2) repeats; tau_i = max(floor(c i^2), i)
  keeps the grid strictly increasing (once c i^2 > i, consecutive values differ by c (2i + 1) > 2).
  """
  i = np.arange(1, num_steps + 1, dtype=np.float64)
  if spacing == "uniform":
    tau = np.floor(grid_steps * i / num_steps + 1e-9)
  elif spacing == "quadratic":
    tau = np.maximum(np.floor(grid_steps * i**2 / num_steps**2 + 1e-9), i)
  else:
    raise ValueError(f"spacing must be one of {DDIM_SPACINGS}, got {spacing!r}.")
  tau = tau.astype(np.int32)
  assert tau[-1] == grid_steps and np.all(np.diff(tau) > 0) and tau[0] >= 1, tau
  return tau


def ddim(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
         num_steps: int, eta: float = 0.0, grid_steps: int = 1000, spacing: str = "uniform",
         clip_x0: bool = False, encoder_shift: bool = False, num_levels: int | None = None,
         return_trajectory: bool = False, z_init: Array | None = None):
  """DDIM sampling over a sub-grid tau of the N-step grid (N = grid_steps, S = num_steps steps).

  For k = S..1, t = tau_k, prev = tau_{k-1} (tau_0 = 0, abar_0 = 1):

      x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),   clipped to [-1, 1] if clip_x0
      sig    = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
      z_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sig^2) eps_hat + sig eps'

  eta = 0 is the deterministic DDIM map (eps' is unused: the output depends on the initial noise only);
  eta = 1 is DDPM's "small" variance on the sub-grid. The last step (abar_prev = 1) returns x0_hat.
  1 - abar_prev - sig^2 is written as (1 - abar_prev) (1 - eta^2 (1 - abar_t/abar_prev) / (1 - abar_t)),
  whose bracket is >= 1 - eta^2 and clipped at 0, so the square root never sees a rounding negative.
  With clip_x0 the direction term keeps the model's eps_hat (as the DDIM and diffusers code do).

  With encoder_shift=True (DiffEnc, see the module docstring) x0_hat in the update is replaced by the
  estimate of the encoded signal at prev, x_prev_hat = x0_hat + (gamma_t - gamma_prev) (1 - abar_t) x0_hat
  (x0_hat / abar_t at the last step); eta = 0 then discretises the probability flow of the encoded
  process, and eta = 1 on the full grid is `ddpm(..., encoder_shift=True)`.

  Args:
    rng: PRNG key. eps_fn: denoiser. schedule: noise schedule. shape: (B, ...).
    num_steps: S, 1 <= S <= grid_steps.
    eta: >= 0, the stochasticity (0 deterministic, 1 DDPM-like).
    grid_steps: N, the fine grid t = n / N on which tau lives.
    spacing: "uniform" or "quadratic" (see `ddim_timesteps`).
    clip_x0: clip x0_hat to [-1, 1] (default False, as DDIM's reference code, which clamps only the
      final images). Sampling only: no likelihood in vdiff clips.
    encoder_shift: model DiffEnc's encoder shift (for a model with an encoder).
    num_levels: K; if given, decode x0_hat to int32 levels (-1 where the sample is not finite).
    return_trajectory: also return [S + 1, B, ...].
    z_init: optional initial noise [B, ...]; with eta = 0 the output is a function of z_init alone
      (DDIM's deterministic encoding/decoding map, e.g. for interpolation).
  Returns:
    samples [B, ...], and the trajectory if asked.
  Reference: Song, Meng & Ermon 2021, arXiv:2010.02502, eq. (12) and (16), appendix D.2; the reference
  code is ermongroup/ddim, functions/denoising.py (`generalized_steps`).
  """
  shape = _check_shape(shape)
  num_steps = _check_steps(num_steps)
  grid_steps = _check_steps(grid_steps, "grid_steps")
  _check_levels(num_levels)
  clip_x0 = _check_clip(clip_x0)
  if num_steps > grid_steps:
    raise ValueError(f"num_steps must be <= grid_steps, got num_steps={num_steps}, grid_steps={grid_steps}.")
  if spacing not in DDIM_SPACINGS:
    raise ValueError(f"spacing must be one of {DDIM_SPACINGS}, got {spacing!r}.")
  if isinstance(eta, (int, float)) and not (math.isfinite(eta) and eta >= 0):
    raise ValueError(f"eta must be finite and >= 0, got {eta}.")

  tau = ddim_timesteps(num_steps, grid_steps, spacing)
  i = jnp.asarray(tau[::-1])                                      # noisiest first
  i_prev = jnp.asarray(np.concatenate([[0], tau[:-1]])[::-1])
  grid = schedule.discrete_grid(grid_steps)
  la_t, la_p = grid.log_abar[i], grid.log_abar[i_prev]
  om_t, om_p = grid.one_minus_abar[i], grid.one_minus_abar[i_prev]
  ratio = -jnp.expm1(la_t - la_p)                                 # 1 - abar_t / abar_prev
  sig2_over_om_p = jnp.square(eta) * ratio / om_t
  to_clean = (i_prev == 0)
  # gamma_t - gamma_prev (only used where prev >= 1; gamma_0 = -inf is masked by to_clean).
  dgamma = grid.gamma[i] - jnp.where(to_clean, 0.0, grid.gamma[i_prev])
  coef = dict(
      t=i.astype(jnp.float32) / grid_steps,
      sqrt_abar=jnp.exp(0.5 * la_t),
      sqrt_om=jnp.sqrt(om_t),
      c_x0=jnp.exp(0.5 * la_p),
      c_eps=jnp.sqrt(om_p * jnp.maximum(1.0 - sig2_over_om_p, 0.0)),
      sig=jnp.sqrt(om_p * sig2_over_om_p),
      m=_shift_factor(dgamma, om_t, la_t, to_clean),
  )
  z_init, keys = _noise(rng, shape, num_steps, z_init)

  def step(z, xs):
    c, key = xs
    eps_hat = eps_fn(z, jnp.full((shape[0],), c["t"]))
    x0 = _x0(z, eps_hat, c["sqrt_abar"], c["sqrt_om"], clip_x0)
    if encoder_shift:
      x0 = x0 + c["m"] * x0
    # At the last step c_x0 = 1 and c_eps = sig = 0, so z_prev = x0_hat exactly.
    return c["c_x0"] * x0 + c["c_eps"] * eps_hat + c["sig"] * jax.random.normal(key, shape, jnp.float32)

  z_final, traj = _run(step, z_init, (coef, keys), return_trajectory)
  return _output(z_final, traj, num_levels)


# ----------------------------------------------------------------------------------------------------
# VDM ancestral sampling (and the DiffEnc shift).
# ----------------------------------------------------------------------------------------------------
def vdm_ancestral(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
                  num_steps: int, num_levels: int | None = None, encoder_shift: bool = False,
                  return_trajectory: bool = False, z_init: Array | None = None):
  """VDM ancestral sampling from t = 1 to t = 0 in T steps (t = i / T -> s = (i - 1) / T):

      c   = -expm1(gamma_s - gamma_t)         (= 1 - SNR_t / SNR_s, accurate when gamma_t - gamma_s is small)
      z_s = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat(z_t, t)) + sigma_s sqrt(c) eps'

  which is the mean and variance of q(z_s | z_t, x = x_hat), the DDPM "small"-variance step on the same
  grid with gamma(0) in place of abar_0 = 1. Unlike DDPM, every step (the last included, to
  s = 0 with sigma_0 > 0) adds noise, as in the VDM code; then x = z_0 / alpha_0 is returned, or with
  num_levels its nearest bin centre (the argmax of VDM's K-way decoder, whose logits are
  -(z_0/alpha_0 - x^(k))^2 / (2 e^gamma_0)).

  encoder_shift=True adds DiffEnc's modelled mean shift (docs/math.md sec. 3), for models whose diffusion runs
  on an encoded signal x_t = enc(x, gamma_t) and whose eps_hat implies x_hat = (z_t - sigma_t eps_hat) /
  alpha_t, an estimate of x_t:

      mu_P = [VDM mean above] - alpha_s (gamma_s - gamma_t) sigma_t^2 x_hat,

  the first-order estimate of alpha_s (x_s - x_t) with d x_t / d gamma ~= -sigma_t^2 x_hat (exact for the
  non-trainable encoder x_t = alpha_t^2 x). Since gamma_s < gamma_t the shift is +alpha_s |dgamma|
  sigma_t^2 x_hat: it carries the encoded mean from x_t back up to x_s. Without it, a DiffEnc model
  sampled with the plain VDM step misses an O(1) drift summed over the T steps.

  Args:
    rng: PRNG key. eps_fn: denoiser. schedule: noise schedule. shape: (B, ...).
    num_steps: T >= 1.
    num_levels: K; if given, return int32 levels in {0..K-1}.
    encoder_shift: add the DiffEnc mean shift.
    return_trajectory: also return [T + 1, B, ...] of z (z_1 first, z_0 last).
    z_init: optional initial noise [B, ...] (default N(0, I) from rng).
  Returns:
    samples [B, ...] (z_0 / alpha_0, or int32 levels), and the trajectory if asked.
  Reference: Kingma et al. 2021, arXiv:2107.00630 (p(z_s | z_t) = q(z_s | z_t, x = x_hat), appendix A);
  Nielsen et al. 2024, arXiv:2310.19789, section 3.
  """
  shape = _check_shape(shape)
  num_steps = _check_steps(num_steps)
  _check_levels(num_levels)

  t_grid = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  gamma = schedule.gamma(t_grid)
  i = jnp.arange(num_steps, 0, -1)
  g_t, g_s = gamma[i], gamma[i - 1]
  # gamma_t - gamma_s from the step index (exact for linear), not from two float32 gammas near -13.
  dg = schedule.gamma_difference(i, num_steps)
  coef = dict(
      t=t_grid[i],
      c=-jnp.expm1(-dg),
      # alpha_s / alpha_t = exp((log_sigmoid(-g_s) - log_sigmoid(-g_t)) / 2), no division of tiny alphas.
      alpha_ratio=jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t))),
      alpha_t=schedules_lib.alpha_from_gamma(g_t),
      sigma_t=schedules_lib.sigma_from_gamma(g_t),
      sigma_s=schedules_lib.sigma_from_gamma(g_s),
      # DiffEnc: alpha_s (gamma_t - gamma_s) sigma_t^2, multiplying x_hat.
      shift=schedules_lib.alpha_from_gamma(g_s) * dg * schedules_lib.sigma2_from_gamma(g_t),
  )
  z_init, keys = _noise(rng, shape, num_steps, z_init)

  def step(z, xs):
    c, key = xs
    eps_hat = eps_fn(z, jnp.full((shape[0],), c["t"]))
    mean = c["alpha_ratio"] * (z - c["sigma_t"] * c["c"] * eps_hat)
    if encoder_shift:
      mean = mean + c["shift"] * vdm.x_from_eps(z, eps_hat, c["alpha_t"], c["sigma_t"])
    return mean + c["sigma_s"] * jnp.sqrt(c["c"]) * jax.random.normal(key, shape, jnp.float32)

  z_0, traj = _run(step, z_init, (coef, keys), return_trajectory)
  # z_0 / alpha_0 = z_0 exp(-log_sigmoid(-gamma_0) / 2).
  x = z_0 * jnp.exp(-0.5 * jax.nn.log_sigmoid(-gamma[0]))
  return _output(x, traj, num_levels)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ----------------------------------------------------------------------------------------------------
def classifier_free_guidance(eps_cond_fn: Callable[[Array, Array, Array], Array], labels: Array, *,
                             guidance_weight: float | Array, null_label: int) -> EpsFn:
  """Guided denoiser eps_tilde(z, t) = (1 + w) eps(z, t, c) - w eps(z, t, null).

  w = 0 is the plain conditional model: a Python 0 skips the null branch; a traced 0 gives
  1 * eps_c - 0 * eps_null, also exactly eps_c (for finite eps_null). The two branches are two calls
  (not one concatenated batch), so eps_c is bit-identical to a direct conditional call.

  Args:
    eps_cond_fn: conditional denoiser eps_cond_fn(z [B, ...], t [B], labels [B]) -> eps_hat [B, ...].
    labels: [B] integer class labels c.
    guidance_weight: w (scalar, Python number or array).
    null_label: the label the model was trained with for "no condition".
  Returns:
    eps_fn(z, t) -> eps_tilde, a denoiser for any sampler here.
  Reference: Ho & Salimans 2022, arXiv:2207.12598, eq. (6).
  """
  labels = jnp.asarray(labels)
  if isinstance(guidance_weight, (int, float)) and not math.isfinite(guidance_weight):
    raise ValueError(f"guidance_weight must be finite, got {guidance_weight}.")
  skip_null = isinstance(guidance_weight, (int, float)) and guidance_weight == 0

  def eps_fn(z, t):
    eps_c = eps_cond_fn(z, t, labels)
    if skip_null:
      return eps_c
    eps_u = eps_cond_fn(z, t, jnp.full_like(labels, null_label))
    w = jnp.asarray(guidance_weight, eps_c.dtype)
    return (1.0 + w) * eps_c - w * eps_u

  return eps_fn


# ----------------------------------------------------------------------------------------------------
# Probability-flow ODE.
# ----------------------------------------------------------------------------------------------------
def probability_flow_sample(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule,
                            shape: Sequence[int], *, rtol: float = 1e-5, atol: float = 1e-5,
                            solver: str = "dopri5", max_steps: int = 4096, t_start: float = 1.0,
                            t_end: float = 0.0, num_levels: int | None = None,
                            return_trajectory: bool = False, trajectory_points: int = 11,
                            return_nfe: bool = False, z_init: Array | None = None,
                            encoder_shift: bool = False):
  """Sample by integrating the probability-flow ODE from t_start = 1 down to t_end = 0:

      dz/dt = 1/2 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z),   z_1 ~ N(0, I),

  with an adaptive diffrax solver (per example: each example has its own step sizes), then
  x = z_0 / alpha_0 (or its nearest bin centre with num_levels). Deterministic given the initial noise.

  encoder_shift=True gives the flow of DiffEnc's encoded process z_t = alpha_t x_t + sigma_t eps
  (x_t = enc(x, gamma_t)): the velocity E[d z_t / dt | z_t] gains alpha_t gamma'(t) d_hat with
  d_hat = -sigma_t^2 x_hat (docs/math.md sec. 3), i.e.

      dz/dt = 1/2 gamma'(t) sigma_t (eps_hat - sigma_t z) - gamma'(t) sigma_t^2 alpha_t x_hat
            = 1/2 gamma'(t) sigma_t (eps_tilde - sigma_t z),   eps_tilde = eps_hat - 2 sigma_t alpha_t x_hat,

  so the plain flow is integrated with the denoiser eps_tilde (alpha_t x_hat = z - sigma_t eps_hat).
  It is the exact flow for the non-trainable encoder; x = z_0 / alpha_0 then estimates x_0 = enc(x, gamma_0).

  Args:
    rng: PRNG key (only the initial noise). eps_fn, schedule: the model. shape: (B, ...).
    rtol: relative tolerance of the PID step-size controller.
    atol: absolute tolerance of the PID step-size controller. solver: "dopri5" or "tsit5".
    max_steps: maximum solver steps per example.
    t_start: start of the integration interval.
    t_end: end of the integration interval (t_start > t_end).
    num_levels: K; if given, return int32 levels.
    return_trajectory: also return z at `trajectory_points` evenly spaced times, [P, B, ...].
    return_nfe: also return the number of denoiser evaluations per example, int32 [B].
    z_init: optional initial noise [B, ...] (then rng is unused).
    encoder_shift: integrate the flow of DiffEnc's encoded process (see above).
  Returns:
    samples [B, ...], then the trajectory and nfe if asked (in that order).
  Reference: Song et al. 2021, arXiv:2011.13456, eq. (13); docs/math.md sec. 5 for the gamma form.
  """
  shape = _check_shape(shape)
  _check_levels(num_levels)
  if not t_start > t_end:
    raise ValueError(f"t_start must be > t_end (integrate noise -> data), got {t_start}, {t_end}.")
  if return_trajectory and trajectory_points < 2:
    raise ValueError(f"trajectory_points must be >= 2, got {trajectory_points}.")
  if z_init is None:
    z_init = jax.random.normal(rng, shape, jnp.float32)
  elif tuple(z_init.shape) != shape:
    raise ValueError(f"z_init must have shape {shape}, got {tuple(z_init.shape)}.")
  save_ts = (np.linspace(t_start, t_end, trajectory_points, dtype=np.float32)
             if return_trajectory else None)
  if encoder_shift:
    eps_fn = _encoded_flow_denoiser(eps_fn, schedule)
  zs, nfe = likelihood.probability_flow(eps_fn, schedule, z_init, t0=t_start, t1=t_end, rtol=rtol,
                                        atol=atol, solver=solver, max_steps=max_steps, save_ts=save_ts)
  z_0 = zs[-1] if return_trajectory else zs
  x = z_0 * jnp.exp(-0.5 * jax.nn.log_sigmoid(-schedule.gamma(jnp.float32(t_end))))
  out = (_finish(x, num_levels),)
  if return_trajectory:
    out += (zs,)
  if return_nfe:
    out += (nfe,)
  return out[0] if len(out) == 1 else out


def _encoded_flow_denoiser(eps_fn: EpsFn, schedule: schedules_lib.Schedule) -> EpsFn:
  """eps_tilde(z, t) = eps_hat - 2 sigma_t (z - sigma_t eps_hat): the plain probability flow of eps_tilde
  is the flow of DiffEnc's encoded process (see `probability_flow_sample`)."""

  def eps_tilde(z, t):
    eps_hat = eps_fn(z, t)
    sigma = vdm.bcast(schedule.sigma(jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])), z)
    return eps_hat - 2.0 * sigma * (z - sigma * eps_hat)

  return eps_tilde
