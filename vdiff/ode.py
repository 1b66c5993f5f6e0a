"""The probability-flow ODE: drift, adaptive solver, transport and the ODE log-likelihood (docs/math.md
sections 5 and 6), and `ode_nll`, the negative log-likelihood of K-level data with the two ways to
turn the ODE's density into a bound on the discrete -log P(k):

  * uniform dequantisation: the density on [-1, 1]^D of uniformly dequantised data, with the
    D log(K / 2) of the dequantisation bound folded into the nats (`likelihood.uniform_dequantization_bound`);
  * forward-process dequantisation: a discrete bound with the K-level decoder at t0, comparable with the
    VDM ELBO (`likelihood.forward_dequantization_bound`).

`ode_nll` follows the return convention of `vdiff.likelihood` (module docstring): rng first,
(nats [B], {"nfe": [B]}), bits/dim = `likelihood.nats_to_bpd(nats, D)`. `ode_nll_bpd`,
`ode_forward_bound` and `ode_uniform_bound` are deprecated aliases with their old return values.

Every function is pure and jit-able and takes any denoiser eps_fn(z, t) and `Schedule`.
Reference: Song et al. 2021, arXiv:2011.13456 (probability flow, eq. (13), appendix D.2).
"""

from __future__ import annotations

import math
import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import likelihood
from vdiff import schedules as schedules_lib

Array = jax.Array

# Both are 7-stage first-same-as-last Runge-Kutta pairs: each attempted step (accepted or rejected)
# costs 6 new vector-field evaluations. Measured with diffrax 0.7.2 (dt0=None, PID controller), a solve
# makes 6 num_steps + 1 evaluations in all; tests/test_ode_likelihood.py checks this against a
# host-side counter, so a diffrax change that breaks it fails loudly.
ODE_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}
_NEW_EVALS_PER_STEP = 6
DIVERGENCES = ("hutchinson", "exact")
DEQUANTIZATIONS = ("uniform", "forward")


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
    sigma = schedules_lib.sigma_from_gamma(gamma)
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

  Returns (y at t1, or at save_ts stacked on a leading axis; nfe as int32). A solve that fails (a
  non-finite state, or max_steps reached) returns NaN for y instead of raising from inside the compiled
  program: under vmap only the failing example is NaN, and a NaN never passes for a valid value.
  """
  saveat = diffrax.SaveAt(t1=True) if save_ts is None else diffrax.SaveAt(ts=jnp.asarray(save_ts))
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), ODE_SOLVERS[solver](),
      t0=float(t0), t1=float(t1), dt0=None, y0=y0, saveat=saveat,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
      throw=False)
  ok = sol.result == diffrax.RESULTS.successful
  ys = jax.tree_util.tree_map(lambda a: jnp.where(ok, a, jnp.nan), sol.ys)
  ys = ys if save_ts is not None else jax.tree_util.tree_map(lambda a: a[0], ys)
  nfe = _NEW_EVALS_PER_STEP * sol.stats["num_steps"] + 1
  return ys, jnp.asarray(nfe, jnp.int32)


def probability_flow(eps_fn, schedule, z, *, t0: float, t1: float, rtol: float = 1e-5,
                     atol: float = 1e-5, solver: str = "dopri5", max_steps: int = 4096, save_ts=None):
  """Transport z [B, ...] from time t0 to time t1 along the probability-flow ODE (either direction).

  Each example is solved with its own adaptive steps (a vmapped diffeqsolve; the error norm is per
  example, not over the batch).

  Args:
    eps_fn: the model's denoiser.
    schedule: the model's noise schedule.
    z: [B, ...] states at t0.
    t0: start time.
    t1: end time.
    rtol: relative tolerance of the step-size controller.
    atol: absolute tolerance of the step-size controller.
    solver: "dopri5" or "tsit5".
    max_steps: solver steps per example at most.
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
    rng: PRNG key (the probe).
    eps_fn: the model's denoiser.
    schedule: the model's noise schedule.
    x: [B, ...] points (float32; for K-level data dequantise first, see `ode_nll`).
    divergence: "hutchinson" or "exact".
    rtol: relative tolerance of the PID controller (1e-5 as in score SDE).
    atol: absolute tolerance of the PID controller (1e-5 as in score SDE).
    t0: start of the integration interval; p is the density at t0.
    t1: end of the integration interval (t0 < t1), where the prior N(0, I) sits.
    solver: "dopri5" (Dormand-Prince) or "tsit5".
    max_steps: solver steps per example at most.
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
  if not 0.0 <= t0 < t1 <= 1.0:
    raise ValueError(f"need 0 <= t0 < t1 <= 1 (integrate data -> noise within the schedule), got "
                     f"t0={t0}, t1={t1}.")
  # Rank, a non-empty batch, and (eagerly) finite values: a NaN input would otherwise surface as the
  # adaptive solver's step-size failure deep inside diffrax. Under jit NaN propagates to log p.
  x = checks.batch(jnp.asarray(x, jnp.float32), "x")
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


def _check_t0(t0: float) -> float:
  t0 = float(t0)
  if not 0.0 <= t0 < 1.0:
    raise ValueError(f"t0 (eval.ode_t0) must be in [0, 1), got {t0}.")
  return t0


def _log_bound(rng, eps_fn, schedule, k, *, num_levels: int, dequantization: str, t0: float,
               num_samples: int, caller: str, **kwargs):
  """The ODE's dequantisation bound in log space: (log value [B], nfe int32 [B]) of
  `likelihood.forward_dequantization_bound` (forward) or `likelihood.uniform_dequantization_bound`
  (uniform), with the probability flow from t0 to 1 as the density."""
  if dequantization not in DEQUANTIZATIONS:
    raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}.")
  t0 = _check_t0(t0)
  for key in ("t0", "t1"):
    if key in kwargs:
      raise ValueError(f"{caller} integrates from t0 to 1; pass t0 as its own argument, not {key} "
                       "among the ode_log_likelihood keywords.")
  if dequantization == "uniform":
    if t0 != 0.0:
      raise ValueError(f"{caller}: t0 = {t0} applies to dequantization='forward' only (uniform "
                       "dequantisation evaluates the density of the data, at t0 = 0).")

    def log_density_fn(r, y):
      return ode_log_likelihood(r, eps_fn, schedule, y, **kwargs)

    return likelihood.uniform_dequantization_bound(rng, log_density_fn, k, num_levels=num_levels,
                                                   num_samples=num_samples)
  gamma_t0 = schedule.gamma(jnp.float32(t0))

  def log_density_fn(r, z):  # pylint: disable=function-redefined
    return ode_log_likelihood(r, eps_fn, schedule, z, t0=t0, t1=1.0, **kwargs)

  return likelihood.forward_dequantization_bound(rng, log_density_fn, k, num_levels=num_levels,
                                                 gamma=gamma_t0, num_samples=num_samples)


def ode_nll(rng, eps_fn, schedule, k, *, num_levels: int, dequantization: str = "uniform",
            t0: float = 0.0, num_samples: int = 1, **ode_kwargs):
  """Probability-flow ODE negative log-likelihood of K-level data: an upper bound on -log P(k) in nats.

  Return convention of `vdiff.likelihood` (module docstring): (nats [B], {"nfe": [B]}), nats bounding
  the discrete -log P(k) in expectation, bits/dim = `likelihood.nats_to_bpd(nats, D)`. With m =
  num_samples draws per example (importance-weighted, log-mean-exp; tighter as m grows):

    dequantization="uniform" (t0 = 0): y_j = x + Delta (u_j - 1/2), u_j ~ U[0, 1)^D, Delta = 2 / K,
        nats = -log (1/m) sum_j p_ODE,0(y_j) + D log(K / 2)
      the dequantisation bound log P(k) >= E_u log p(y) + D log Delta (docs/math.md sec. 4 and 6).
    dequantization="forward": z_j ~ q(z_t0 | k) = N(alpha_t0 x, sigma_t0^2 I),
        nats = -log (1/m) sum_j p_ODE,t0(z_j) p(k | z_j) / q(z_j | k),
      p(k | z) the K-level decoder at gamma(t0) and p_ODE,t0 the density of z_t0 under the flow from t0
      to 1 with the prior N(0, I) at t = 1 (derivation in `likelihood.forward_dequantization_bound`).
      t0 = 0 is the schedule's gamma_min end, where the decoder and q are those of the VDM ELBO.

  A Hutchinson divergence (the default) is unbiased in log p, so the m = 1 bound holds in
  expectation; use divergence="exact" where a strict bound with m > 1 matters.

  Args:
    rng: PRNG key (draw j uses fold_in(rng, j), split into the dequantisation noise and the probe).
    eps_fn: the model's denoiser.
    schedule: the model's noise schedule.
    k: [B, ...] integer levels in {0..K-1}.
    num_levels: K.
    dequantization: "uniform" or "forward".
    t0: the time of z for "forward" (in [0, 1)); must be 0 for "uniform".
    num_samples: m >= 1.
    **ode_kwargs: passed to `ode_log_likelihood` (divergence, rtol, atol, solver, max_steps).
  Returns:
    (nats [B], {"nfe": int32 [B], vector-field evaluations per example summed over the m draws}).
  Reference: Song et al. 2021, arXiv:2011.13456 (appendix D.2); Song et al. 2021, arXiv:2101.09258 and
  Zheng et al. 2023, arXiv:2305.03935 (dequantisation of the ODE).
  """
  value, nfe = _log_bound(rng, eps_fn, schedule, k, num_levels=num_levels, dequantization=dequantization,
                          t0=t0, num_samples=num_samples, caller="ode_nll", **ode_kwargs)
  if dequantization == "forward":
    return -value, {"nfe": nfe}
  num_dims = int(np.prod(k.shape[1:]))
  return likelihood.uniform_dequantization_nats(value, num_dims, num_levels), {"nfe": nfe}


def _deprecated(old: str, new: str) -> None:
  warnings.warn(f"ode.{old} is deprecated; use {new}, which returns (nats [B], {{'nfe': [B]}}) with "
                "bits/dim = likelihood.nats_to_bpd(nats, D).", DeprecationWarning, stacklevel=3)


def ode_nll_bpd(rng, eps_fn, schedule, k, *, num_levels: int, **kwargs):
  """Deprecated: use `ode_nll(rng, eps_fn, schedule, k, num_levels=K)`.

  The old return values, unchanged: one uniform dequantisation with (rng_u, rng_probe) = split(rng)
  (`ode_nll` draws from split(fold_in(rng, 0)), so `ode_nll(rng, ...)` equals this at
  fold_in(rng, 0)) and

      bpd = -log p_0(y) / (D ln 2) + log2(K / 2),   y = x + Delta (u - 1/2), u ~ U[0, 1)^D.

  Args:
    **kwargs: passed to `ode_log_likelihood` (divergence, rtol, atol, t0, t1, solver, max_steps).
  Returns:
    (bpd [B], nfe int32 [B]).
  """
  _deprecated("ode_nll_bpd", "ode.ode_nll(rng, eps_fn, schedule, k, num_levels=K)")
  rng_u, rng_probe = jax.random.split(rng)
  y = likelihood.dequantize(rng_u, k, num_levels)
  logp, nfe = ode_log_likelihood(rng_probe, eps_fn, schedule, y, **kwargs)
  num_dims = int(np.prod(y.shape[1:]))
  return likelihood.nats_to_bpd(-logp, num_dims, num_levels=num_levels), nfe


def ode_forward_bound(rng, eps_fn, schedule, k, *, num_levels: int, t0: float = 0.0,
                      num_samples: int = 1, **kwargs):
  """Deprecated: use `ode_nll(..., dequantization="forward")`, whose nats are minus this bound.

  Returns:
    (lower bound on log P(k) [B] in nats, nfe int32 [B] summed over the m draws).
  """
  _deprecated("ode_forward_bound", "ode.ode_nll(..., dequantization='forward')")
  return _log_bound(rng, eps_fn, schedule, k, num_levels=num_levels, dequantization="forward", t0=t0,
                    num_samples=num_samples, caller="ode_forward_bound", **kwargs)


def ode_uniform_bound(rng, eps_fn, schedule, k, *, num_levels: int, num_samples: int = 1, **kwargs):
  """Deprecated: use `ode_nll(..., dequantization="uniform")`, whose nats are -this + D log(K / 2).

  Returns:
    (log (1/m) sum_j p_ODE,0(y_j) [B], a log-density on [-1, 1]^D in nats; nfe int32 [B] summed over
    the m draws).
  """
  _deprecated("ode_uniform_bound", "ode.ode_nll(..., dequantization='uniform')")

  def log_density_fn(r, y):
    return ode_log_likelihood(r, eps_fn, schedule, y, **kwargs)

  return likelihood.uniform_dequantization_bound(rng, log_density_fn, k, num_levels=num_levels,
                                                 num_samples=num_samples)
