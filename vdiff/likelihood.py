"""Likelihood bookkeeping: K-level data encoding, uniform dequantisation and the nats -> bits/dim conversion.

Conventions (docs/math.md section 0):
  * K-level integers k in {0..K-1} are encoded to bin centres x = 2 (k + 1/2) / K - 1 in (-1, 1); the bin
    width is Delta = 2 / K.
  * A discrete model (the VDM ELBO with its K-way decoder) bounds -log P(k) directly: no offset.
  * A continuous density p(y) on dequantised data y = x + Delta (u - 1/2), u ~ U[0, 1)^D, gives
    log P(k) >= E_u[log p(y)] + D log Delta, so its bits/dim are -E_u[log p(y)] / (D ln 2) + log2(K / 2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vdiff import checks

Array = jax.Array


def encode(k: Array, num_levels: int) -> Array:
  """Integer levels k in {0..K-1} -> float32 bin centres x = 2 (k + 1/2) / K - 1."""
  return (2.0 * (jnp.asarray(k, jnp.float32) + 0.5) / num_levels - 1.0).astype(jnp.float32)


def bin_centres(num_levels: int) -> Array:
  """The K bin centres x^(k), shape [K]."""
  return encode(jnp.arange(num_levels), num_levels)


def decode(x: Array, num_levels: int) -> Array:
  """Continuous x in [-1, 1] -> nearest level in {0..K-1} (int32)."""
  k = jnp.floor((jnp.asarray(x) + 1.0) * num_levels / 2.0)
  return jnp.clip(k, 0, num_levels - 1).astype(jnp.int32)


def dequantize(rng: Array, k: Array, num_levels: int) -> Array:
  """Uniform dequantisation y = x + Delta (u - 1/2), u ~ U[0, 1): y is uniform over k's bin in [-1, 1]."""
  checks.levels(k, "k", num_levels)
  x = encode(k, num_levels)
  u = jax.random.uniform(rng, x.shape, jnp.float32)
  return x + (2.0 / num_levels) * (u - 0.5)


def dequantization_offset_bpd(num_levels: int) -> float:
  """log2(K / 2): bits/dim added to -E log p(y) / (D ln 2) of a density on [-1, 1]^D (+7 for K = 256)."""
  return math.log2(num_levels / 2.0)


def nats_to_bpd(nats: Array, num_dims: int, *, num_levels: int | None = None) -> Array:
  """The one conversion of a negative log-likelihood in nats per example to bits per dimension.

      bpd = nats / (D ln 2)                      (num_levels=None: nats already bound -log P(k))
      bpd = nats / (D ln 2) + log2(K / 2)        (num_levels=K: nats = -log p(y) of a density on
                                                  uniformly dequantised data in [-1, 1]^D)

  The second form is the dequantisation bound log P(k) >= E_u log p(y) + D log(2 / K) (docs/math.md sec. 4).
  It is the convention of the CDM one-step and ODE estimators. Conventions elsewhere differ: score_sde
  scales data to [0, 1] with 256 bins (same offset, log2 256 with x in [0,1]), while others use
  [0, 255/256] and get log2(256/255) bits/dim less.

  Args:
    nats: negative log-likelihood per example, any shape.
    num_dims: D, the number of dimensions of one example.
    num_levels: K for a continuous density on dequantised K-level data; None for a discrete bound.
  Returns:
    bits/dim, same shape as nats.
  """
  if num_dims <= 0:
    raise ValueError(f"num_dims must be positive, got {num_dims}.")
  bpd = jnp.asarray(nats) / (num_dims * math.log(2.0))
  if num_levels is not None:
    if num_levels < 2:
      raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    bpd = bpd + dequantization_offset_bpd(num_levels)
  return bpd


# ----------------------------------------------------------------------------------------------------
# Exact likelihood through the probability-flow ODE (docs/math.md sections 5 and 6).
# These imports live with the section that needs them (appended to this module); schedules does not
# import this module, so there is no cycle. vdm does import it, hence no `from vdiff import vdm` here.
# ----------------------------------------------------------------------------------------------------
import diffrax  # noqa: E402
import numpy as np  # noqa: E402

from vdiff import schedules as _schedules  # noqa: E402

# Both are 7-stage first-same-as-last Runge-Kutta pairs: each attempted step (accepted or rejected)
# costs 6 new vector-field evaluations. Measured with diffrax 0.7.2 (dt0=None, PID controller), a solve
# makes 6 num_steps + 1 evaluations in all; tests/test_ode_likelihood.py checks this against a
# host-side counter, so a diffrax change that breaks it fails loudly.
ODE_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}
_NEW_EVALS_PER_STEP = 6
DIVERGENCES = ("hutchinson", "exact")


def probability_flow_drift(eps_fn, schedule):
  """The probability-flow ODE in gamma form, as f(t, z) -> dz/dt for ONE example z [...] and scalar t:

      dz/dt = 1/2 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z).

  (From the VP SDE dz = -1/2 beta z dt + sqrt(beta) dW with beta(t) = gamma'(t) sigma_t^2 and the score
  -eps_hat / sigma_t: dz/dt = -1/2 beta z + 1/2 beta eps_hat / sigma_t.) eps_fn is called on a batch of
  one, eps_fn(z[None], t[None]); vmap the result over examples.
  Reference: Song et al. 2021, arXiv:2011.13456, eq. (13).
  """

  def drift(t, z):
    t = jnp.asarray(t, jnp.float32)
    gamma, dgamma = schedule.gamma_and_dgamma(t)
    sigma = _schedules.sigma_from_gamma(gamma)
    eps_hat = eps_fn(z[None], t[None])[0]
    return 0.5 * dgamma * sigma * (eps_hat - sigma * z)

  return drift


def _check_solver(solver, rtol, atol, max_steps):
  if solver not in ODE_SOLVERS:
    raise ValueError(f"solver must be one of {tuple(ODE_SOLVERS)}, got {solver!r}.")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")
  if max_steps is None or max_steps < 1:
    raise ValueError(f"max_steps must be a positive int, got {max_steps}.")


def _solve(vector_field, y0, *, t0, t1, rtol, atol, solver, max_steps, save_ts=None):
  """One adaptive diffrax solve of dy/dt = vector_field(t, y) from t0 to t1 (either direction).

  Returns (y at t1, or at save_ts stacked on a leading axis; nfe as int32).
  """
  saveat = diffrax.SaveAt(t1=True) if save_ts is None else diffrax.SaveAt(ts=jnp.asarray(save_ts))
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), ODE_SOLVERS[solver](),
      t0=float(t0), t1=float(t1), dt0=None, y0=y0, saveat=saveat,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
  ys = sol.ys if save_ts is not None else jax.tree_util.tree_map(lambda a: a[0], sol.ys)
  nfe = _NEW_EVALS_PER_STEP * sol.stats["num_steps"] + 1
  return ys, jnp.asarray(nfe, jnp.int32)


def probability_flow(eps_fn, schedule, z, *, t0: float, t1: float, rtol: float = 1e-5,
                     atol: float = 1e-5, solver: str = "dopri5", max_steps: int = 4096, save_ts=None):
  """Transport z [B, ...] from time t0 to time t1 along the probability-flow ODE (either direction).

  Each example is solved with its own adaptive steps (a vmapped diffeqsolve; the error norm is per
  example, not over the batch).

  Args:
    eps_fn, schedule: the model. z: [B, ...] states at t0.
    t0, t1: start and end times. rtol, atol, solver, max_steps: solver settings.
    save_ts: optional increasing/decreasing times (numpy, from t0 towards t1) at which to save.
  Returns:
    (z at t1 [B, ...], or at save_ts [P, B, ...]; nfe int32 [B], denoiser evaluations per example).
  """
  _check_solver(solver, rtol, atol, max_steps)
  drift = probability_flow_drift(eps_fn, schedule)

  def one(z_i):
    return _solve(drift, z_i, t0=t0, t1=t1, rtol=rtol, atol=atol, solver=solver, max_steps=max_steps,
                  save_ts=save_ts)

  zs, nfe = jax.vmap(one)(z)
  if save_ts is not None:
    zs = jnp.moveaxis(zs, 1, 0)
  return zs, nfe


def ode_log_likelihood(rng, eps_fn, schedule, x, *, divergence: str = "hutchinson", rtol: float = 1e-5,
                       atol: float = 1e-5, t0: float = 0.0, t1: float = 1.0, solver: str = "dopri5",
                       max_steps: int = 4096):
  """log p_0(x) of the probability-flow ODE model, in nats per example (a continuous density):

      log p_0(z_0) = log N(z_1; 0, I) + int_0^1 div_z f(t, z_t) dt,   z_0 = x,  dz/dt = f(t, z),

  with z and the integral solved jointly from t0 to t1. Sign: along the flow d log p_t(z_t)/dt =
  -div f, so log p_0(z_0) = log p_1(z_1) + int div f dt. The prior at t1 is N(0, I) (the model's prior),
  not the true marginal of z_1; the two differ by O(alpha_1) for data not N(0, I).

  divergence="hutchinson": div f ~= v^T (df/dz) v with one Rademacher probe v per example, fixed over the
  whole trajectory (so the integral is an unbiased estimate of the exact one), one vjp per evaluation.
  divergence="exact": the trace of the Jacobian by jax.linearize + D jvps (use for small D only).

  Args:
    rng: PRNG key (the probe). eps_fn, schedule: the model.
    x: [B, ...] points (float32; for K-level data dequantise first, see `ode_nll_bpd`).
    divergence: "hutchinson" or "exact".
    rtol, atol: PID controller tolerances (1e-5 as in score SDE).
    t0, t1: integration interval (t0 < t1); p is the density at t0.
    solver: "dopri5" (Dormand-Prince) or "tsit5". max_steps: per example.
  Returns:
    (log p [B] in nats, nfe int32 [B]: vector-field evaluations per example, each one denoiser
    evaluation plus one vjp (Hutchinson) or D jvps (exact)).
  Reference: Song et al. 2021, arXiv:2011.13456, appendix D.2; Grathwohl et al. 2019 (FFJORD),
  arXiv:1810.01367 (Hutchinson estimator); Chen et al. 2018, arXiv:1806.07366 (instantaneous change
  of variables).
  """
  _check_solver(solver, rtol, atol, max_steps)
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
  if not t0 < t1:
    raise ValueError(f"t0 must be < t1 (integrate data -> noise), got t0={t0}, t1={t1}.")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 2:
    raise ValueError(f"x must have shape [B, ...] with rank >= 2, got {x.shape}.")
  drift = probability_flow_drift(eps_fn, schedule)
  event_shape = x.shape[1:]
  num_dims = int(np.prod(event_shape))
  probes = jax.random.rademacher(rng, x.shape, jnp.float32)

  def one(x_i, v_i):
    def vector_field(t, y):
      z, _ = y
      if divergence == "hutchinson":
        dz, vjp_fn = jax.vjp(lambda z_: drift(t, z_), z)
        div = jnp.sum(vjp_fn(v_i)[0] * v_i)
      else:
        dz, jvp_fn = jax.linearize(lambda zf: drift(t, zf.reshape(event_shape)).reshape(-1), z.reshape(-1))
        div = jnp.trace(jax.vmap(jvp_fn)(jnp.eye(num_dims, dtype=jnp.float32)))
        dz = dz.reshape(event_shape)
      return dz, div

    (z_1, delta), nfe = _solve(vector_field, (x_i, jnp.zeros((), jnp.float32)), t0=t0, t1=t1,
                               rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
    log_prior = -0.5 * jnp.sum(jnp.square(z_1)) - 0.5 * num_dims * math.log(2.0 * math.pi)
    return log_prior + delta, nfe

  return jax.vmap(one)(x, probes)


def ode_nll_bpd(rng, eps_fn, schedule, k, *, num_levels: int, **kwargs):
  """Bits/dim of K-level data under the probability-flow ODE density, one dequantisation sample:

      bpd = -log p_0(y) / (D ln 2) + log2(K / 2),   y = x + Delta (u - 1/2), u ~ U[0, 1)^D,

  the dequantisation bound log P(k) >= E_u log p(y) + D log Delta with Delta = 2 / K on [-1, 1]
  (docs/math.md sec. 4 and 6; `nats_to_bpd(..., num_levels=K)`). Average over examples (and over u draws)
  at the call site; the average bounds the discrete bits/dim from above in expectation.

  Args:
    rng: PRNG key (split into the dequantisation noise and the Hutchinson probe).
    eps_fn, schedule: the model. k: [B, ...] integer levels in {0..K-1}. num_levels: K.
    **kwargs: passed to `ode_log_likelihood` (divergence, rtol, atol, t0, t1, solver, max_steps).
  Returns:
    (bpd [B], nfe int32 [B]).
  """
  rng_u, rng_probe = jax.random.split(rng)
  y = dequantize(rng_u, k, num_levels)
  logp, nfe = ode_log_likelihood(rng_probe, eps_fn, schedule, y, **kwargs)
  num_dims = int(np.prod(y.shape[1:]))
  return nats_to_bpd(-logp, num_dims, num_levels=num_levels), nfe
