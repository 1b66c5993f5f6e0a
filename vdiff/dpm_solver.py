"""Fast ODE samplers of the probability flow: DPM-Solver, DPM-Solver++ and Heun (Karras et al.).

All three solve the probability-flow ODE of any `vdiff.schedules.Schedule` (docs/math.md sec. 5),

    dz/dt = 1/2 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z),     z_1 ~ N(0, I),

from t_start = 1 down to t_end, with any denoiser eps_fn(z [B, ...], t [B]) -> eps_hat, in ONE `lax.scan`
whose body calls eps_fn once (one trace of eps_fn whatever the number of steps and the order). They are
pure and deterministic given the key and hold no device logic (wrap them in `jax.jit`).

Half log-SNR. DPM-Solver works in lambda_t = log(alpha_t / sigma_t) = -gamma_t / 2 (docs/math.md sec. 0),
where the flow is semi-linear (Lu et al. 2022, eq. (3.4)):

    z_t = (alpha_t / alpha_s) z_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_hat(z_lambda) d lambda,

and the integral is expanded in powers of h = lambda_t - lambda_s with the phi-functions
phi_1(h) = expm1(h), phi_2(h) = (expm1(h) - h) / h, phi_3(h) = (expm1(h) - h - h^2 / 2) / h^2; DPM-Solver++
does the same for the data prediction x0_hat = (z - sigma eps_hat) / alpha with e^{-h}. The times of a
logSNR-uniform grid come from `time_from_gamma` (bisection on the increasing gamma, so any schedule works,
learned ones included); lambda, alpha and sigma of every point are then recomputed from the point's own t,
so the coefficients agree with what eps_fn sees. phi_2 and phi_3 use their Taylor series for |h| < 1/2
(the direct forms lose ~1e-4 relative in float32 at h = 0.05 through cancellation).

Return convention (this module and `vdiff.score_samplers`): a `SamplerOutput(samples, nfe, trajectory)`
named tuple. samples [B, ...]: float32 x-space estimates z_{t_end} / alpha_{t_end} (or int32 levels in
{0..K-1} with num_levels; -1 where not finite, as `vdiff.samplers`); nfe: the number of eps_fn calls, a
Python int fixed by the configuration (a jitted wrapper returns it as an int32 scalar; a
classifier-free-guided eps_fn makes two network calls per eps_fn call); trajectory: None, or with
return_trajectory=True the state after every solver step, [num_points, B, ...] (z-space for DPM-Solver,
the variance-exploding x = z / alpha for Heun), the initial state first.

Noise layout: the only randomness is the initial noise z_1 ~ N(0, I), drawn from
jax.random.split(rng)[0] exactly as `vdiff.samplers` draws z_T, so the same key gives DDIM, DPM-Solver and
Heun the same starting point. z_init= replaces it.

DiffEnc (docs/math.md sec. 3): encoder_shift=True integrates the flow of the encoded process by solving
the plain flow with the denoiser eps_tilde = eps_hat - 2 sigma_t (z - sigma_t eps_hat) (the construction
of `vdiff.samplers.probability_flow_sample`); the exponential integrator stays exact on the linear part of
the plain flow and treats the encoder's drift as part of the nonlinear term, so the order is unchanged.

References: Lu et al. 2022, DPM-Solver (arXiv:2206.00927); Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095);
the reference code LuChengTHU/dpm-solver, dpm_solver_pytorch.py (commit 52bc3fbc); Karras et al. 2022
(arXiv:2206.00364), Algorithm 1; Saharia et al. 2022 (dynamic thresholding, arXiv:2205.11487).
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import config_schema
from vdiff import samplers
from vdiff import schedules as schedules_lib

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

ALGORITHMS = config_schema.DPM_ALGORITHMS    # ("dpm_solver", "dpm_solver++")
METHODS = config_schema.DPM_METHODS          # ("multistep", "singlestep", "singlestep_fixed")
SKIP_TYPES = config_schema.DPM_SKIP_TYPES    # ("time_uniform", "logSNR", "time_quadratic")


class SamplerOutput(NamedTuple):
  """What every sampler of `vdiff.dpm_solver` and `vdiff.score_samplers` returns.

  Attributes:
    samples: [B, ...] float32 x-space samples, or int32 levels with num_levels.
    nfe: number of eps_fn calls (a Python int; an int32 scalar out of a jitted function).
    trajectory: None, or [num_points, B, ...] states (see each sampler).
  """

  samples: Array
  nfe: int
  trajectory: Array | None = None


# ----------------------------------------------------------------------------------------------------
# Argument checks shared with vdiff.score_samplers.
# ----------------------------------------------------------------------------------------------------
def check_choice(value, choices: Sequence[str], name: str) -> str:
  """value must be one of choices; the error names the argument and the nearest valid name."""
  if isinstance(value, str) and value in choices:
    return value
  close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.4)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.{hint}")


def check_positive(value, name: str) -> float:
  """value must be a finite number > 0 (Python number or concrete array)."""
  if checks.is_concrete(value):
    v = float(np.asarray(value))
    if not (math.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be finite and > 0, got {value!r}.")
  return value


def initial_noise(rng: Array | None, shape: tuple[int, ...], z_init: Array | None = None) -> Array:
  """z_1 ~ N(0, I) from split(rng)[0] (`vdiff.samplers`' layout), or z_init (then rng may be None)."""
  if z_init is None:
    return jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
  if tuple(z_init.shape) != shape:
    raise ValueError(f"z_init must have shape {shape}, got {tuple(z_init.shape)}.")
  return jnp.asarray(z_init, jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Time from gamma / lambda, time grids.
# ----------------------------------------------------------------------------------------------------
def time_from_gamma(schedule: schedules_lib.Schedule, gamma: Array, *, iterations: int = 40) -> Array:
  """t in [0, 1] with schedule.gamma(t) = gamma, by bisection (gamma is strictly increasing).

  Works for any schedule under jit, learned ones included (no inverse is needed from the schedule).
  Targets outside [gamma(0), gamma(1)] clamp to t = 0 or 1. 40 halvings of [0, 1] reach 1e-12, below
  float32 resolution of t. No gradient flows through the bisection (the comparison is piecewise constant).

  Args:
    schedule: the noise schedule.
    gamma: target log noise-to-signal ratios, any shape.
    iterations: number of halvings.
  Returns:
    float32 times, the shape of gamma.
  """
  gamma = jnp.asarray(gamma, jnp.float32)
  lo = jnp.zeros_like(gamma)
  hi = jnp.ones_like(gamma)

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    below = schedule.gamma(mid) < gamma
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
  return 0.5 * (lo + hi)


def time_steps(schedule: schedules_lib.Schedule, num_steps: int, *, skip_type: str = "time_uniform",
               t_start: float = 1.0, t_end: float = 0.0) -> Array:
  """The N + 1 times t_start = t_0 > ... > t_N = t_end of an N-step solver grid, float32 [N + 1].

  time_uniform: linspace(t_start, t_end); time_quadratic: linspace(sqrt(t_start), sqrt(t_end))^2 (DDIM's
  grid for small images); logSNR: lambda = -gamma / 2 uniform between lambda(t_start) and lambda(t_end),
  t by `time_from_gamma` (endpoints exact). As the reference's `get_time_steps`.
  """
  num_steps = samplers._check_steps(num_steps)  # pylint: disable=protected-access
  skip_type = check_choice(skip_type, SKIP_TYPES, "skip_type")
  u = jnp.linspace(0.0, 1.0, num_steps + 1)
  if skip_type == "time_uniform":
    t = t_start + (t_end - t_start) * u
  elif skip_type == "time_quadratic":
    a, b = math.sqrt(t_start), math.sqrt(t_end)
    t = jnp.square(a + (b - a) * u)
  else:
    g = schedule.gamma(jnp.array([t_start, t_end], jnp.float32))
    t = time_from_gamma(schedule, g[0] + (g[1] - g[0]) * u)
  return jnp.asarray(t, jnp.float32).at[0].set(t_start).at[-1].set(t_end)


def _check_interval(t_start: float, t_end: float) -> None:
  if not (isinstance(t_start, (int, float)) and isinstance(t_end, (int, float))):
    raise ValueError(f"t_start and t_end must be Python numbers, got {t_start!r}, {t_end!r}.")
  if not 0.0 <= t_end < t_start <= 1.0:
    raise ValueError(f"t_start and t_end must satisfy 0 <= t_end < t_start <= 1 (noise -> data), got "
                     f"t_start={t_start}, t_end={t_end}.")


# ----------------------------------------------------------------------------------------------------
# phi-functions with Taylor series near 0.
# ----------------------------------------------------------------------------------------------------
def _series(x: Array, first: int) -> Array:
  """sum_{n >= first} x^(n - first + 1) / n!  for |x| < 1/2 (Horner, to x^9: truncation < 1e-9)."""
  out = jnp.zeros_like(x)
  for n in range(first + 8, first - 1, -1):
    out = (out + 1.0 / math.factorial(n)) * x
  return out


def phi2(x: Array) -> Array:
  """(expm1(x) - x) / x = x/2 + x^2/6 + ...; DPM-Solver's phi_2(h) = phi2(h), DPM-Solver++'s = -phi2(-h)."""
  x = jnp.asarray(x, jnp.float32)
  small = jnp.abs(x) < 0.5
  xs = jnp.where(small, 1.0, x)
  return jnp.where(small, _series(x, 2), (jnp.expm1(xs) - xs) / xs)


def phi3(x: Array) -> Array:
  """(expm1(x) - x - x^2 / 2) / x^2 = x/6 + x^2/24 + ...; DPM-Solver's phi_3(h) = phi3(h), ++'s = phi3(-h)."""
  x = jnp.asarray(x, jnp.float32)
  small = jnp.abs(x) < 0.5
  xs = jnp.where(small, 1.0, x)
  return jnp.where(small, _series(x, 3), (jnp.expm1(xs) - xs - 0.5 * xs * xs) / (xs * xs))


# ----------------------------------------------------------------------------------------------------
# Step plans (static Python: which order each step has, where each evaluation sits).
# ----------------------------------------------------------------------------------------------------
def multistep_orders(num_steps: int, order: int, lower_order_final: bool = True) -> list[int]:
  """Order of each of the N multistep updates: warm-up 1, 2, .., then `order`; with lower_order_final and
  N < 10 the last updates drop to min(order, N + 1 - step) (the reference code's rule: its docstring says
  "steps < 15", its code says `steps < 10`; vdiff follows the code)."""
  orders = []
  for step in range(1, num_steps + 1):
    if step < order:
      orders.append(step)
    elif lower_order_final and num_steps < 10:
      orders.append(min(order, num_steps + 1 - step))
    else:
      orders.append(order)
  return orders


def singlestep_orders(num_steps: int, order: int, method: str) -> list[int]:
  """Orders of the singlestep updates using num_steps evaluations ("DPM-Solver-fast", Lu et al. sec. 3.4):
  "singlestep" mixes orders to use every evaluation; "singlestep_fixed" takes num_steps // order updates of
  `order` (as the reference's `get_orders_and_timesteps_for_singlestep_solver` and `sample`)."""
  if method == "singlestep_fixed":
    return [order] * (num_steps // order)
  if order == 3:
    k = num_steps // 3 + 1
    rest = {0: [2, 1], 1: [1], 2: [2]}[num_steps % 3]
    return [3] * (k - 1 - (num_steps % 3 == 0)) + rest
  if order == 2:
    return [2] * (num_steps // 2) + [1] * (num_steps % 2)
  return [1] * num_steps


def nfe(*, num_steps: int, order: int = 2, method: str = "multistep", denoise_to_zero: bool = False) -> int:
  """Number of eps_fn calls of `dpm_solver` with these options (without running it)."""
  if method == "multistep":
    n = num_steps
  else:
    n = sum(singlestep_orders(num_steps, order, method))
  return n + int(bool(denoise_to_zero))


def _singlestep_points(schedule, orders, skip_type, t_start, t_end) -> Array:
  """Times of every evaluation of a singlestep plan and the final time, float32 [sum(orders) + 1].

  Time grids (time_uniform, time_quadratic): the fine grid of sum(orders) intervals, whose every point is
  an evaluation (the reference's inner `get_time_steps` of each step lands on it). logSNR: the K = len(orders)
  outer steps are lambda-uniform and each step's intermediate points lambda-uniform inside it (r1 = 1/2,
  or r1 = 1/3, r2 = 2/3), as the reference does to reproduce the DPM-Solver paper.
  """
  total = sum(orders)
  if skip_type != "logSNR":
    return time_steps(schedule, total, skip_type=skip_type, t_start=t_start, t_end=t_end)
  g = schedule.gamma(jnp.array([t_start, t_end], jnp.float32))
  k = len(orders)
  fracs = []
  for j, o in enumerate(orders):
    fracs += [(j + i / o) / k for i in range(o)]
  fracs.append(1.0)
  u = jnp.asarray(np.asarray(fracs), jnp.float32)
  t = time_from_gamma(schedule, g[0] + (g[1] - g[0]) * u)
  return t.at[0].set(t_start).at[-1].set(t_end)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver and DPM-Solver++.
# ----------------------------------------------------------------------------------------------------
def dynamic_threshold(x0: Array, *, ratio: float = 0.995, max_val: float = 1.0) -> Array:
  """Imagen's dynamic thresholding: s = max(quantile_ratio(|x0|), max_val) per example; clip(x0, -s, s) / s.

  As the reference's `dynamic_thresholding_fn` (torch.quantile's linear interpolation = jnp.quantile's).
  Reference: Saharia et al. 2022, arXiv:2205.11487, sec. 2.3.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, ratio, axis=1), max_val)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def _point_arrays(schedule, t: Array) -> dict:
  g = schedule.gamma(t)
  return dict(t=t, lam=-0.5 * g, log_alpha=0.5 * jax.nn.log_sigmoid(-g),
              alpha=schedules_lib.alpha_from_gamma(g), sigma=schedules_lib.sigma_from_gamma(g))


def dpm_solver(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
               num_steps: int = 20, order: int = 2, algorithm: str = "dpm_solver++",
               method: str = "multistep", skip_type: str = "time_uniform", t_start: float = 1.0,
               t_end: float = 0.0, lower_order_final: bool = True, denoise_to_zero: bool = False,
               thresholding: bool = False, thresholding_ratio: float = 0.995,
               thresholding_max_val: float = 1.0, encoder_shift: bool = False,
               num_levels: int | None = None, return_trajectory: bool = False,
               z_init: Array | None = None) -> SamplerOutput:
  """DPM-Solver / DPM-Solver++ of order 1, 2 or 3, singlestep or multistep, on any schedule.

  With h = lambda_t - lambda_s, lambda = -gamma / 2, and model values m (eps_hat for "dpm_solver", the
  data prediction x0_hat = (z - sigma eps_hat) / alpha for "dpm_solver++"):

      order 1 (= DDIM):  z_t = e^{la_t - la_s} z_s - sigma_t expm1(h) m_s                     (dpm_solver)
                         z_t = (sigma_t / sigma_s) z_s - alpha_t expm1(-h) m_s                (dpm_solver++)
      multistep 2:       + 1/2 E1 (m_s - m_prev) / r0,  E1 the order-1 coefficient, r0 = h_prev / h
      multistep 3:       + E2 D1 + E3 D2 in place of it, E2 = -sigma_t phi_2(h), E3 = -sigma_t phi_3(h)
                         (dpm_solver++: -alpha_t phi2(-h), -alpha_t phi3(-h)), D1, D2 the divided
                         differences of the last three model values (Lu et al. 2022b, Algorithm 2)
      singlestep 2, 3:   intermediate evaluations at lambda_s + r1 h (and r2 h), DPM-Solver-2 / -3
                         ('dpmsolver' solver type of the reference code).

  "multistep" uses num_steps evaluations (warm-up with lower orders, and lower orders at the end when
  num_steps < 10 with lower_order_final); "singlestep" ("DPM-Solver-fast") mixes orders to use exactly
  num_steps evaluations; "singlestep_fixed" takes num_steps // order steps of the given order. The defaults
  (20 steps, order 2, multistep, dpm_solver++) are the reference's `DPM_Solver(...).sample` defaults:
  DPM-Solver++(2M). Output x = z_{t_end} / alpha_{t_end}; denoise_to_zero=True returns instead the data
  prediction at t_end (+1 evaluation), as the reference.

  Args:
    rng: PRNG key (only the initial noise).
    eps_fn: denoiser eps_fn(z [B, ...], t [B]) -> eps_hat [B, ...] (any, e.g. a guided one).
    schedule: the noise schedule (lambda = -gamma / 2).
    shape: (B, ...).
    num_steps: evaluations of eps_fn (>= order).
    order: 1, 2 or 3.
    algorithm: "dpm_solver" (noise prediction) or "dpm_solver++" (data prediction).
    method: "multistep", "singlestep" or "singlestep_fixed".
    skip_type: the step grid, "time_uniform", "logSNR" (uniform in lambda) or "time_quadratic".
    t_start: where z ~ N(0, I) is placed (1 = the schedule's end).
    t_end: where the solver stops (0 = the schedule's cleanest point; the reference's default for
      continuous-time models is 1e-3, whose gamma must be finite there; vdiff's are finite at 0).
    lower_order_final: lower orders for the last multistep updates when num_steps < 10.
    denoise_to_zero: return the data prediction at t_end (one more evaluation).
    thresholding: dynamic thresholding of x0_hat (dpm_solver++ only; pixel data in [-1, 1]).
    thresholding_ratio: the quantile of |x0_hat| per example (Imagen: 0.995).
    thresholding_max_val: the smallest threshold s (1 = the data range).
    encoder_shift: solve the flow of DiffEnc's encoded process (see the module docstring).
    num_levels: K; if given, decode to int32 levels.
    return_trajectory: also return the state after each update, [updates + 1, B, ...] (z-space).
    z_init: optional initial noise [B, ...].
  Returns:
    SamplerOutput(samples, nfe, trajectory).
  Reference: Lu et al. 2022, arXiv:2206.00927 (Algorithms 1, 2, DPM-Solver-fast) and arXiv:2211.01095
  (DPM-Solver++, Algorithms 1, 2); LuChengTHU/dpm-solver dpm_solver_pytorch.py at 52bc3fbc.
  """
  shape = samplers._check_shape(shape)  # pylint: disable=protected-access
  num_steps = samplers._check_steps(num_steps)  # pylint: disable=protected-access
  samplers._check_levels(num_levels)  # pylint: disable=protected-access
  algorithm = check_choice(algorithm, ALGORITHMS, "algorithm")
  method = check_choice(method, METHODS, "method")
  skip_type = check_choice(skip_type, SKIP_TYPES, "skip_type")
  if isinstance(order, bool) or order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}.")
  if num_steps < order:
    raise ValueError(f"num_steps must be >= order ({order}), got num_steps={num_steps}.")
  _check_interval(t_start, t_end)
  if thresholding:
    if algorithm != "dpm_solver++":
      raise ValueError("thresholding needs algorithm='dpm_solver++' (it clips the data prediction x0_hat).")
    if not 0.0 < thresholding_ratio <= 1.0:
      raise ValueError(f"thresholding_ratio must lie in (0, 1], got {thresholding_ratio}.")
    check_positive(thresholding_max_val, "thresholding_max_val")
  if encoder_shift:
    eps_fn = samplers._encoded_flow_denoiser(eps_fn, schedule)  # pylint: disable=protected-access

  plus = algorithm == "dpm_solver++"
  batch = shape[0]

  def model(z, pt):
    eps = eps_fn(z, jnp.full((batch,), pt["t"]))
    if not plus:
      return eps
    x0 = (z - pt["sigma"] * eps) * jnp.exp(-pt["log_alpha"])
    return dynamic_threshold(x0, ratio=thresholding_ratio, max_val=thresholding_max_val) if thresholding else x0

  def ratio(tgt, src):
    """Linear coefficient: alpha_t / alpha_s (dpm_solver) or sigma_t / sigma_s (dpm_solver++)."""
    if plus:
      return tgt["sigma"] / src["sigma"]
    return jnp.exp(tgt["log_alpha"] - src["log_alpha"])

  def scale(p):
    return p["alpha"] if plus else p["sigma"]

  sign = -1.0 if plus else 1.0
  z = initial_noise(rng, shape, z_init)

  if method == "multistep":
    orders = np.asarray(multistep_orders(num_steps, order, lower_order_final), np.int32)
    t_pts = time_steps(schedule, num_steps, skip_type=skip_type, t_start=t_start, t_end=t_end)
    p = _point_arrays(schedule, t_pts)
    src = {k: v[:-1] for k, v in p.items()}
    tgt = {k: v[1:] for k, v in p.items()}
    lam = p["lam"]
    h = lam[1:] - lam[:-1]
    # Previous increments h_0 = lambda_{i} - lambda_{i-1}, h_1 = lambda_{i-1} - lambda_{i-2}; unused (order
    # too low) entries get h so the ratios stay finite.
    h0 = jnp.concatenate([h[:1], h[:-1]])
    h1 = jnp.concatenate([h[:2], h[:-2]])[: num_steps]
    r0, r1 = h0 / h, h1 / h
    hh = sign * h
    sc = scale(tgt)
    coef = dict(src={k: v for k, v in src.items()}, A=ratio(tgt, src), E1=-sc * jnp.expm1(hh),
                E2=-sc * phi2(hh), E3=-sc * phi3(hh), r0=r0, r1=r1, order=jnp.asarray(orders))

    def step(carry, c):
      x, m1, m2 = carry
      m0 = model(x, c["src"])
      x1 = c["A"] * x + c["E1"] * m0
      d10 = (m0 - m1) / c["r0"]
      x2 = x1 + 0.5 * c["E1"] * d10
      d11 = (m1 - m2) / c["r1"]
      q = c["r0"] / (c["r0"] + c["r1"])
      d1 = d10 + q * (d10 - d11)
      d2 = (d10 - d11) / (c["r0"] + c["r1"])
      x3 = x1 + c["E2"] * d1 + c["E3"] * d2
      x_new = jnp.where(c["order"] == 1, x1, jnp.where(c["order"] == 2, x2, x3))
      return (x_new, m0, m1), x_new

    zeros = jnp.zeros_like(z)
    (z_end, _, _), traj = jax.lax.scan(step, (z, zeros, zeros), coef)
    n_eval = num_steps
    keep = None
  else:
    orders = singlestep_orders(num_steps, order, method)
    t_pts = _singlestep_points(schedule, orders, skip_type, t_start, t_end)
    p = _point_arrays(schedule, t_pts)
    total = sum(orders)
    # Stage j evaluates at point j and forms point j + 1 from the step's start `st` and its model values.
    st, o, k = [], [], []
    start = 0
    for oj in orders:
      for kk in range(oj):
        st.append(start)
        o.append(oj)
        k.append(kk)
      start += oj
    st, o, k = (np.asarray(a, np.int32) for a in (st, o, k))
    lam = p["lam"]
    h = lam[st + o] - lam[st]
    r1 = jnp.where(o >= 2, (lam[np.minimum(st + 1, total)] - lam[st]) / h, 1.0)
    r2 = jnp.where(o >= 3, (lam[np.minimum(st + 2, total)] - lam[st]) / h, 1.0)
    at = lambda idx: {key: v[idx] for key, v in p.items()}  # noqa: E731
    s_p, tgt_p, end_p = at(st), at(np.arange(1, total + 1)), at(st + o)
    hh = sign * h
    A = ratio(tgt_p, s_p)
    sc_t = scale(tgt_p)
    e1 = -sc_t * jnp.expm1(hh)            # at the step's end (only used where the target is the end)
    e2 = -sc_t * phi2(hh)
    # Stage formulas (reference: dpm_solver_first_update, singlestep_dpm_solver_second/third_update).
    first_inner = -sc_t * jnp.expm1(r1 * hh)                      # k = 0 of orders 2, 3: to s1
    c0 = jnp.select([o == 1, (k == 0), (o == 2) & (k == 1), (o == 3) & (k == 1), (o == 3) & (k == 2)],
                    [e1, first_inner, e1 * (1.0 - 0.5 / r1),
                     -sc_t * jnp.expm1(r2 * hh) + (r2 / r1) * sc_t * phi2(r2 * hh),
                     e1 - e2 / r2])
    c1 = jnp.select([(o == 2) & (k == 1), (o == 3) & (k == 1)],
                    [0.5 / r1 * e1, -(r2 / r1) * sc_t * phi2(r2 * hh)], 0.0)
    c2 = jnp.where((o == 3) & (k == 2), e2 / r2, 0.0)
    del end_p
    coef = dict(pt={key: v[:-1] for key, v in p.items()}, A=A, c0=c0, c1=c1, c2=c2, k=jnp.asarray(k),
                ends=jnp.asarray(k == o - 1))

    def step(carry, c):
      x_base, x_eval, m0_s, m1_s = carry
      m = model(x_eval, c["pt"])
      m0 = jnp.where(c["k"] == 0, m, m0_s)
      m1 = jnp.where(c["k"] == 1, m, m1_s)
      nxt = c["A"] * x_base + c["c0"] * m0 + c["c1"] * m1 + c["c2"] * m
      x_base = jnp.where(c["ends"], nxt, x_base)
      return (x_base, nxt, m0, m1), x_base

    zeros = jnp.zeros_like(z)
    (z_end, _, _, _), traj = jax.lax.scan(step, (z, z, zeros, zeros), coef)
    n_eval = total
    keep = np.flatnonzero(k == o - 1)

  end = {key: v[-1] for key, v in p.items()}
  if denoise_to_zero:
    eps = eps_fn(z_end, jnp.full((batch,), end["t"]))
    x = (z_end - end["sigma"] * eps) * jnp.exp(-end["log_alpha"])
    if thresholding:
      x = dynamic_threshold(x, ratio=thresholding_ratio, max_val=thresholding_max_val)
    n_eval += 1
  else:
    x = z_end * jnp.exp(-end["log_alpha"])
  trajectory = None
  if return_trajectory:
    traj = traj if keep is None else traj[keep]
    trajectory = jnp.concatenate([z[None], traj], axis=0)
  return SamplerOutput(samplers._finish(x, num_levels), n_eval, trajectory)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------------
# Heun (Karras et al. 2022) in the variance-exploding view.
# ----------------------------------------------------------------------------------------------------
def karras_sigmas(num_steps: int, *, sigma_min: Array, sigma_max: Array, rho: float = 7.0) -> Array:
  """sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, and
  sigma_N = 0: float32 [N + 1] (Karras et al. 2022, arXiv:2206.00364, eq. (5))."""
  i = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  a, b = jnp.power(sigma_max, 1.0 / rho), jnp.power(sigma_min, 1.0 / rho)
  s = jnp.power(a + i * (b - a), rho)
  return jnp.concatenate([s, jnp.zeros((1,), jnp.float32)]).astype(jnp.float32)


def heun(rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
         num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
         rho: float = 7.0, encoder_shift: bool = False, num_levels: int | None = None,
         return_trajectory: bool = False, z_init: Array | None = None) -> SamplerOutput:
  """Heun's second-order method on the probability flow in Karras et al.'s sigma parameterisation.

  Variance-exploding view of vdiff's VP process: x = z / alpha_t has noise level sigma = sigma_t / alpha_t
  = exp(gamma_t / 2); the denoiser is D(x; sigma) = x_hat = (z - sigma_t eps_hat) / alpha_t, so
  dx / dsigma = (x - D(x; sigma)) / sigma = eps_hat(z, t) with z = x / sqrt(1 + sigma^2), gamma_t = log sigma^2.
  Karras's Algorithm 1 (deterministic, S_churn = 0):

      d_i = eps_hat at (x_i, sigma_i);  x' = x_i + (sigma_{i+1} - sigma_i) d_i;
      x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2,  d' = eps_hat at (x', sigma_{i+1}),

  with the correction skipped on the last step to sigma_N = 0 (an Euler step, which returns D(x; sigma_{N-1})).
  2N - 1 evaluations. x_0 = z_1 / alpha_1 with z_1 ~ N(0, I) (vdiff's prior at t = 1; Karras draws
  N(0, sigma_max^2 I), which differs by the factor sqrt(1 + 1 / sigma_max^2)).

  Args:
    rng: PRNG key (as `dpm_solver`).
    eps_fn: the denoiser eps_fn(z, t) (as `dpm_solver`).
    schedule: the noise schedule (as `dpm_solver`).
    shape: the samples' shape [B, ...] (as `dpm_solver`).
    num_steps: N >= 2 noise levels (Karras's CIFAR-10 setting: 18, 35 evaluations).
    sigma_min: smallest level (default max(0.002, sigma at t = 0), Karras's 0.002 inside the schedule).
    sigma_max: largest level (default min(80, sigma at t = 1)).
    rho: the grid's curvature (Karras: 7; 1 = uniform in sigma).
    encoder_shift: solve the flow of DiffEnc's encoded process (module docstring).
    num_levels: K; if given, decode to int32 levels.
    return_trajectory: also return x (variance-exploding) at sigma_0..sigma_N, [N + 1, B, ...].
    z_init: optional initial noise [B, ...] at t = 1.
  Returns:
    SamplerOutput(samples, nfe = 2N - 1, trajectory).
  Reference: Karras et al. 2022, arXiv:2206.00364, Algorithm 1 and Table 1.
  """
  shape = samplers._check_shape(shape)  # pylint: disable=protected-access
  num_steps = samplers._check_steps(num_steps)  # pylint: disable=protected-access
  samplers._check_levels(num_levels)  # pylint: disable=protected-access
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2 (Heun is second order), got num_steps={num_steps}.")
  check_positive(rho, "rho")
  if encoder_shift:
    eps_fn = samplers._encoded_flow_denoiser(eps_fn, schedule)  # pylint: disable=protected-access
  g0, g1 = schedule.endpoints()
  lo, hi = jnp.exp(0.5 * g0), jnp.exp(0.5 * g1)
  for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
    if v is not None:
      check_positive(v, name)
      if checks.is_concrete(lo) and checks.is_concrete(v) and not (
          float(lo) * (1 - 1e-5) <= float(v) <= float(hi) * (1 + 1e-5)):
        raise ValueError(f"{name} must lie in the schedule's range [{float(lo):.4g}, {float(hi):.4g}] "
                         f"(sigma = exp(gamma / 2)), got {v}.")
  s_min = jnp.maximum(0.002, lo) if sigma_min is None else jnp.float32(sigma_min)
  s_max = jnp.minimum(80.0, hi) if sigma_max is None else jnp.float32(sigma_max)
  if checks.is_concrete(s_min) and checks.is_concrete(s_max) and not float(s_min) < float(s_max):
    raise ValueError(f"sigma_min must be < sigma_max, got {float(s_min)}, {float(s_max)}.")
  sig = karras_sigmas(num_steps, sigma_min=s_min, sigma_max=s_max, rho=rho)
  t_lv = time_from_gamma(schedule, 2.0 * jnp.log(sig[:-1]))
  # Stages: (Euler at i, correction at i + 1) for i < N - 1, then one Euler step to sigma_N = 0.
  lv, first, ds = [], [], []
  for i in range(num_steps - 1):
    lv += [i, i + 1]
    first += [True, False]
  lv.append(num_steps - 1)
  first.append(True)
  lv, first = np.asarray(lv), np.asarray(first)
  base = np.where(first, lv, lv - 1)                   # the step's level i
  ds = sig[base + 1] - sig[base]
  coef = dict(t=t_lv[lv], sigma=sig[lv], first=jnp.asarray(first), ds=ds,
              ends=jnp.asarray(~first | (np.arange(len(lv)) == len(lv) - 1)))
  batch = shape[0]
  z = initial_noise(rng, shape, z_init)
  x = z * jnp.sqrt(1.0 + jnp.square(sig[0]))

  def step(carry, c):
    x_base, x_eval, d0 = carry
    d = eps_fn(x_eval * jax.lax.rsqrt(1.0 + jnp.square(c["sigma"])), jnp.full((batch,), c["t"]))
    nxt = jnp.where(c["first"], x_base + c["ds"] * d, x_base + c["ds"] * 0.5 * (d0 + d))
    d0 = jnp.where(c["first"], d, d0)
    x_base = jnp.where(c["ends"], nxt, x_base)
    return (x_base, nxt, d0), x_base

  (x_end, _, _), traj = jax.lax.scan(step, (x, x, jnp.zeros_like(x)), coef)
  trajectory = None
  if return_trajectory:
    keep = np.flatnonzero(np.asarray(~first | (np.arange(len(lv)) == len(lv) - 1)))
    trajectory = jnp.concatenate([x[None], traj[keep]], axis=0)
  return SamplerOutput(samplers._finish(x_end, num_levels), 2 * num_steps - 1, trajectory)  # pylint: disable=protected-access
