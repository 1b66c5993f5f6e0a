"""The Variational Diffusion Model negative ELBO of K-level data, term by term, per example, in nats.

    -ELBO(x) = L_prior + L_recon + L_diff                                  (Kingma et al., arXiv:2107.00630)

    L_prior = KL(q(z_1 | x) || N(0, I)) = 1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1)
    L_recon = -E_eps log p(x | z_0),   p(x_i = x^(k) | z_0) = softmax_k(-1/2 (z_0 / alpha_0 - x^(k))^2 / e^gamma_0)
    L_diff  = 1/2 E_{t, eps} gamma'(t) ||eps - eps_hat(z_t, t)||^2                       (T = infinity)
    L_diff  = T/2 E_{i, eps} expm1(gamma_t - gamma_s) ||eps - eps_hat(z_t, t)||^2,  t = i/T, s = (i-1)/T

Every function here is pure and jit-able, takes data x of shape [B, ...] (already encoded to bin centres,
see `vdiff.likelihood.encode`) and returns values of shape [B]; the caller reduces over the batch.
A denoiser is any callable eps_fn(z, t) -> eps_hat with z of shape [B, ...] and t of shape [B].
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from vdiff import checks
from vdiff import likelihood
from vdiff import schedules as schedules_lib

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]


def bcast(a: Array, x: Array) -> Array:
  """Per-example values a [B] reshaped to broadcast against x [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _sum_per_example(a: Array) -> Array:
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------------------------------
# Parameterisations: eps-, x- and v-prediction are interconvertible given (alpha, sigma) and z.
# ----------------------------------------------------------------------------------------------------
def x_from_eps(z: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """x_hat = (z - sigma eps_hat) / alpha."""
  return (z - sigma * eps) / alpha


def eps_from_x(z: Array, x: Array, alpha: Array, sigma: Array) -> Array:
  """eps_hat = (z - alpha x_hat) / sigma."""
  return (z - alpha * x) / sigma


def v_from_x_eps(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """v = alpha eps - sigma x (Salimans & Ho 2022)."""
  return alpha * eps - sigma * x


def eps_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
  """eps_hat = sigma z + alpha v_hat  (uses alpha^2 + sigma^2 = 1)."""
  return sigma * z + alpha * v


def x_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
  """x_hat = alpha z - sigma v_hat  (uses alpha^2 + sigma^2 = 1)."""
  return alpha * z - sigma * v


def make_eps_fn(apply_fn: Callable[[Array, Array], Array], schedule: schedules_lib.Schedule, *,
                parameterization: str = "eps", gamma_min: float | None = None,
                gamma_max: float | None = None) -> EpsFn:
  """Turn a network apply_fn(z, g_norm) into a denoiser eps_fn(z, t).

  The network is conditioned on the normalised gamma, as in VDM (arXiv:2107.00630, appendix B):

      g_norm = (gamma_t - gamma_min) / (gamma_max - gamma_min),

  which runs over [0, 1] as t does when [gamma_min, gamma_max] are the schedule's endpoints. By default
  they are the schedule's nominal range `schedule.gamma_range` (the endpoints of `linear`, `cosine`,
  `ddpm_linear_beta`; the initial endpoints of a learned schedule bound by `from_module`, so the input
  scale stays fixed while the endpoints learn). A schedule that does not know its range (`from_function`
  without gamma_range) uses its current endpoints gamma(0), gamma(1), without gradient. Pass both
  explicitly to fix another range (the built-in families pass their config's gamma_min / gamma_max).
  The network's output is read as eps (`parameterization="eps"`) or v (`"v"`, converted to eps).

  Args:
    apply_fn: (z [B, ...], g_norm [B]) -> [B, ...], the network.
    schedule: the noise schedule gamma(t).
    parameterization: "eps" or "v".
    gamma_min: the normalisation range's lower end; None (the default, with gamma_max None) takes the
      schedule's own range.
    gamma_max: the normalisation range's upper end; None together with gamma_min, or both given.
  Returns:
    eps_fn(z [B, ...], t [B] or scalar) -> eps_hat [B, ...].
  """
  if parameterization not in ("eps", "v"):
    raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}.")
  if (gamma_min is None) != (gamma_max is None):
    raise ValueError("make_eps_fn: pass both gamma_min and gamma_max or neither (neither = the "
                     f"schedule's own range); got gamma_min={gamma_min}, gamma_max={gamma_max}.")
  if gamma_min is None:
    gamma_min, gamma_max = getattr(schedule, "gamma_range", None) or (None, None)

  def eps_fn(z, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    gamma = schedule.gamma(t)
    if gamma_min is None:
      # The schedule does not know its range: its current endpoints, as constants of the network input.
      g0, g1 = jax.lax.stop_gradient(schedule.endpoints())
    else:
      g0, g1 = gamma_min, gamma_max
    out = apply_fn(z, (gamma - g0) / (g1 - g0))
    if parameterization == "eps":
      return out
    g = bcast(gamma, z)
    return eps_from_v(z, out, schedules_lib.alpha_from_gamma(g), schedules_lib.sigma_from_gamma(g))

  return eps_fn


# ----------------------------------------------------------------------------------------------------
# Time sampling.
# ----------------------------------------------------------------------------------------------------
def sample_times(rng: Array, batch_size: int, *, antithetic: bool = True) -> Array:
  """t ~ U[0, 1) per example; antithetic (stratified): t_j = mod(u + j / n, 1) with one u ~ U[0, 1).

  Called on the GLOBAL batch (before sharding) so that stratification spans every device.
  """
  if antithetic:
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(rng, (batch_size,))


# ----------------------------------------------------------------------------------------------------
# The three terms.
# ----------------------------------------------------------------------------------------------------
def prior_loss(x: Array, gamma_1: Array) -> Array:
  """KL(q(z_1 | x) || N(0, I)) in nats, [B].

  1/2 (alpha^2 x^2 + sigma^2 - log sigma^2 - 1) is written as 1/2 (alpha^2 (x^2 - 1) - log sigma^2)
  with sigma^2 - 1 = -alpha^2, which avoids cancelling two numbers close to 1.
  """
  gamma_1 = jnp.asarray(gamma_1, jnp.float32)
  a2 = schedules_lib.alpha2_from_gamma(gamma_1)
  log_s2 = jax.nn.log_sigmoid(gamma_1)
  return _sum_per_example(0.5 * (a2 * (jnp.square(x) - 1.0) - log_s2))


def decoder_log_probs(z_over_alpha: Array, gamma_0: Array, *, num_levels: int) -> Array:
  """log p(x_i = x^(k) | z_0) for every bin centre, [..., K]: a log-softmax over the K levels of
  logits_k = -1/2 (z_0 / alpha_0 - x^(k))^2 / exp(gamma_0). The logits are O(1e5) at gamma_0 = -13.3;
  log_softmax subtracts their maximum first (log-sum-exp), so nothing overflows."""
  centres = likelihood.bin_centres(num_levels)
  logits = -0.5 * jnp.square(z_over_alpha[..., None] - centres) * jnp.exp(-gamma_0)
  return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_loss(eps: Array, x: Array, gamma_0: Array, *, num_levels: int,
                        x_mean: Array | None = None) -> Array:
  """-log p(x | z_0) for one noise draw, in nats, [B].

  z_0 = alpha_0 m + sigma_0 eps where m = x_mean (defaults to x; DiffEnc passes enc(x, gamma_0)), and the
  decoder is factorised over dimensions and softmax over the K bin centres:
    logits_k = -1/2 (z_0 / alpha_0 - x^(k))^2 / exp(gamma_0).
  z_0 / alpha_0 = m + exp(gamma_0 / 2) eps is formed directly (sigma_0 / alpha_0 = exp(gamma_0 / 2)).

  Args:
    eps: [B, ...] standard normal noise.
    x: [B, ...] data at the bin centres (the target).
    gamma_0: scalar gamma(0).
    num_levels: K.
    x_mean: optional [B, ...] mean of the encoded signal at t = 0.
  """
  gamma_0 = jnp.asarray(gamma_0, jnp.float32)
  m = x if x_mean is None else x_mean
  z_over_alpha = m + jnp.exp(0.5 * gamma_0) * eps
  logp = decoder_log_probs(z_over_alpha, gamma_0, num_levels=num_levels)
  k = likelihood.decode(x, num_levels)
  logp_x = jnp.take_along_axis(logp, k[..., None], axis=-1)[..., 0]
  return -_sum_per_example(logp_x)


def step_indices(t: Array, num_steps: int) -> Array:
  """The step i = floor(t T) + 1 in {1..T} of times t in [0, 1] (t = 1 is the last step, i = T), float32.

  float32 holds these integers exactly (T <= 2^24); `Schedule.gamma_difference(i, T)` takes them.
  """
  return jnp.clip(jnp.floor(t * num_steps) + 1.0, 1.0, float(num_steps))


def discretize_times(t: Array, num_steps: int) -> tuple[Array, Array]:
  """Map t in [0, 1] to the T-step grid: t_i = i / T with i = `step_indices(t, T)`, s = (i - 1) / T."""
  i = step_indices(t, num_steps)
  return i / num_steps, (i - 1.0) / num_steps


def diffusion_loss(x: Array, t: Array, eps: Array, *, schedule: schedules_lib.Schedule,
                   eps_fn: EpsFn, num_steps: int | None = None) -> Array:
  """The diffusion term L_diff for one (t, eps) per example, in nats, [B].

  Continuous time (num_steps None):  1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2.
  T steps: T/2 expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 on t = i/T, s = (i-1)/T; expm1 keeps the
  weight accurate when gamma_t - gamma_s is small (large T), where exp(.) - 1 would cancel.

  Args:
    x: [B, ...] data. t: [B] floating-point times in [0, 1] (t = 1 is the last step i = T); integer
      dtypes are refused, and eagerly NaN or out-of-range values too (under jit a NaN t gives NaN).
    eps: [B, ...] noise. schedule: the noise schedule. eps_fn: the denoiser.
    num_steps: T, or None for T = infinity.
  """
  checks.batch(x, "x")
  chex.assert_equal_shape([x, eps])
  checks.times(t, "t", batch_size=x.shape[0])
  if num_steps is not None:
    checks.positive_int(num_steps, "num_steps")
  if num_steps is None:
    gamma_t, dgamma = schedule.gamma_and_dgamma(t)
    weight = 0.5 * dgamma
  else:
    i = step_indices(t, num_steps)
    t = i / num_steps
    gamma_t = schedule.gamma(t)
    # gamma_t - gamma_s from (i, T): exact for the linear schedule, not a difference of two float32
    # gammas near -13 at two float32-rounded times (see Schedule.gamma_difference).
    weight = 0.5 * num_steps * jnp.expm1(schedule.gamma_difference(i, num_steps))
  g = bcast(gamma_t, x)
  z = schedules_lib.alpha_from_gamma(g) * x + schedules_lib.sigma_from_gamma(g) * eps
  eps_hat = eps_fn(z, t)
  if eps_hat.shape != x.shape:
    raise ValueError(f"eps_fn(z, t) must return the shape of z, {x.shape}; got {eps_hat.shape}.")
  return weight * _sum_per_example(jnp.square(eps - eps_hat))


def negative_elbo(rng: Array, x: Array, *, schedule: schedules_lib.Schedule, eps_fn: EpsFn,
                  num_levels: int, num_steps: int | None = None, antithetic: bool = True,
                  t: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """-ELBO(x) = L_prior + L_recon + L_diff per example in nats, one Monte-Carlo sample of (t, eps).

  Args:
    rng: PRNG key. x: [B, ...] encoded K-level data. schedule, eps_fn: the model.
    num_levels: K. num_steps: T (None = continuous time). antithetic: stratified t over the batch.
    t: optional [B] floating-point times in [0, 1] (overrides sampling; for stratification over a larger
      global batch). Integer dtypes are refused; NaN or out-of-range values eagerly (under jit a NaN t
      gives a NaN -ELBO, never a finite number).
  Returns:
    (nelbo [B], {"prior": [B], "recon": [B], "diff": [B]}).
  """
  checks.batch(x, "x")
  checks.positive_int(num_levels, "num_levels", minimum=2)
  if num_steps is not None:
    checks.positive_int(num_steps, "num_steps")
  rng_t, rng_0, rng_e = jax.random.split(rng, 3)
  if t is None:
    t = sample_times(rng_t, x.shape[0], antithetic=antithetic)
  checks.times(t, "t", batch_size=x.shape[0])
  gamma_0, gamma_1 = schedule.endpoints()
  prior = prior_loss(x, gamma_1)
  recon = reconstruction_loss(jax.random.normal(rng_0, x.shape), x, gamma_0, num_levels=num_levels)
  diff = diffusion_loss(x, t, jax.random.normal(rng_e, x.shape), schedule=schedule, eps_fn=eps_fn,
                        num_steps=num_steps)
  return prior + recon + diff, {"prior": prior, "recon": recon, "diff": diff}
