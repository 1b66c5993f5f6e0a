"""Noise schedules: the only home of the noise maths in vdiff.

A schedule is described by gamma(t) = -log SNR(t) = log(sigma_t^2 / alpha_t^2), strictly increasing on
t in [0, 1], of a variance-preserving process z_t = alpha_t x + sigma_t eps (alpha_t^2 + sigma_t^2 = 1):

    alpha_t^2 = sigmoid(-gamma_t),   sigma_t^2 = sigmoid(gamma_t),   SNR_t = exp(-gamma_t).

Every consumer (losses, samplers, likelihoods) takes a `Schedule` and calls its methods; nothing branches
on the kind of schedule. Fixed schedules are made by factories (`linear`, `cosine`, `ddpm_linear_beta`,
`from_function`). Learned schedules are flax modules whose `__call__(t)` returns gamma; bind their
parameters with `from_module(module, params)` to obtain the same `Schedule` object (inside a traced loss
this keeps gradients flowing to the schedule's parameters).

Numerics: alpha^2 and sigma^2 are computed as sigmoid(-gamma) and sigmoid(gamma), and their logarithms
with log_sigmoid, never as 1 - sigmoid(.): at gamma = -13.3, sigma^2 = 1.7e-6 and 1 - sigmoid(-13.3) in
float32 keeps only about one significant digit of it.

Reference: Kingma et al., "Variational Diffusion Models", arXiv:2107.00630, sections 3 and 5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# VDM's fixed endpoints (Kingma et al. 2021, appendix).
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


# ----------------------------------------------------------------------------------------------------
# Functions of gamma. These are the formulas; the Schedule methods below only evaluate gamma first.
# ----------------------------------------------------------------------------------------------------
def alpha2_from_gamma(gamma: Array) -> Array:
  """alpha^2 = sigmoid(-gamma)."""
  return jax.nn.sigmoid(-gamma)


def sigma2_from_gamma(gamma: Array) -> Array:
  """sigma^2 = sigmoid(gamma); accurate for very negative gamma, unlike 1 - sigmoid(-gamma)."""
  return jax.nn.sigmoid(gamma)


def alpha_from_gamma(gamma: Array) -> Array:
  """alpha = exp(log_sigmoid(-gamma) / 2)."""
  return jnp.exp(0.5 * jax.nn.log_sigmoid(-gamma))


def sigma_from_gamma(gamma: Array) -> Array:
  """sigma = exp(log_sigmoid(gamma) / 2)."""
  return jnp.exp(0.5 * jax.nn.log_sigmoid(gamma))


def snr_from_gamma(gamma: Array) -> Array:
  """SNR = alpha^2 / sigma^2 = exp(-gamma)."""
  return jnp.exp(-gamma)


def gamma_from_alpha2(alpha2: Array) -> Array:
  """gamma = log((1 - alpha^2) / alpha^2); inverse of `alpha2_from_gamma` (use for discrete abar grids)."""
  alpha2 = jnp.asarray(alpha2)
  return jnp.log1p(-alpha2) - jnp.log(alpha2)


# ----------------------------------------------------------------------------------------------------
# The schedule object.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule t -> gamma(t) with every derived quantity from one interface.

  Attributes:
    gamma_fn: pure, differentiable map from t (any shape, values in [0, 1]) to gamma(t), same shape.
    name: a label for logs.
    difference_fn: optional (i, num_steps) -> gamma(i / T) - gamma((i - 1) / T) computed from the step
      index and T without forming the two gammas, for schedules where that is possible (see
      `gamma_difference`); None falls back to the subtraction.
    grid_fn: optional num_steps -> `DiscreteGrid` (or None) for schedules that are defined by a discrete
      grid (DDPM's betas): the grid computed in float64 from its own parameters (see `discrete_grid`).
    gamma_range: the nominal (gamma_min, gamma_max) as Python floats: the endpoints of a fixed
      schedule, the initial endpoints of a learned one; None when the schedule does not know them.
      Networks normalise gamma by it (`vdm.make_eps_fn`); it never changes during training.
  """

  gamma_fn: Callable[[Array], Array]
  name: str = "custom"
  difference_fn: Callable[[Array, int], Array] | None = None
  grid_fn: Callable[[int], "DiscreteGrid | None"] | None = None
  gamma_range: tuple[float, float] | None = None

  def gamma(self, t: Array) -> Array:
    """gamma(t) = -log SNR(t), same shape as t."""
    return self.gamma_fn(jnp.asarray(t, jnp.float32))

  __call__ = gamma

  def alpha2(self, t: Array) -> Array:
    return alpha2_from_gamma(self.gamma(t))

  def sigma2(self, t: Array) -> Array:
    return sigma2_from_gamma(self.gamma(t))

  def alpha(self, t: Array) -> Array:
    return alpha_from_gamma(self.gamma(t))

  def sigma(self, t: Array) -> Array:
    return sigma_from_gamma(self.gamma(t))

  def snr(self, t: Array) -> Array:
    return snr_from_gamma(self.gamma(t))

  def gamma_and_dgamma(self, t: Array) -> tuple[Array, Array]:
    """(gamma(t), gamma'(t)) by forward-mode differentiation (one jvp; differentiable in parameters).

    gamma is applied elementwise in t, so a jvp with a tangent of ones gives the derivative at every t.
    """
    t = jnp.asarray(t, jnp.float32)
    return jax.jvp(self.gamma, (t,), (jnp.ones_like(t),))

  def dgamma(self, t: Array) -> Array:
    """gamma'(t) = d gamma / dt."""
    return self.gamma_and_dgamma(t)[1]

  def gamma_difference(self, i: Array, num_steps: int) -> Array:
    """gamma(i / T) - gamma((i - 1) / T) for step indices i in {1..T} of the T-step grid (any shape).

    The T-step losses and the ancestral samplers weight each step by expm1(gamma_t - gamma_s) with
    t = i / T, s = (i - 1) / T. Forming t and s in float32 first already rounds each by ~6e-8, an
    error of ~6e-8 T relative to the increment t - s = 1 / T (6e-5 at T = 1000, 6e-4 at T = 10^4),
    and subtracting two float32 gammas near gamma_min = -13.3 adds ~ulp(13) / increment. So the
    difference is computed from the integers (i, T): schedules with a closed form supply
    `difference_fn` (`linear`: exactly (gamma_max - gamma_min) / T; `cosine`: 4 atanh of a ratio of
    sines, with 1 - ratio formed analytically at the first steps; DDPM's betas: the float64 grid), the others fall back to the float32 subtraction.

    Args:
      i: step indices in {1..T}, integer or float32 holding integers (exact up to 2^24), any shape.
      num_steps: T, a Python int.
    Returns:
      float32 array of the shape of i.
    """
    num_steps = int(num_steps)
    i = jnp.asarray(i, jnp.float32)
    if self.difference_fn is not None:
      return jnp.asarray(self.difference_fn(i, num_steps), jnp.float32)
    return self.gamma(i / num_steps) - self.gamma((i - 1.0) / num_steps)

  def endpoints(self) -> tuple[Array, Array]:
    """(gamma(0), gamma(1))."""
    g = self.gamma(jnp.array([0.0, 1.0]))
    return g[0], g[1]

  def discrete_alpha2(self, num_steps: int) -> Array:
    """abar_i = alpha^2(i / T) for i = 0..T, with abar_0 := 1 (clean data), as a [T + 1] array.

    The discrete DDPM view of the same schedule: step i of T sits at t = i / T.
    """
    t = jnp.arange(1, num_steps + 1, dtype=jnp.float32) / num_steps
    return jnp.concatenate([jnp.ones((1,), jnp.float32), self.alpha2(t)])

  def discrete_grid(self, num_steps: int) -> "DiscreteGrid":
    """The T-step DDPM grid of this schedule (t = i / T, abar_0 := 1), to float32 round-off.

    Schedules defined by a discrete grid (`ddpm_linear_beta` at its own T) return their float64 grid
    rounded once to float32. Otherwise, from gamma_i = gamma(i / T) and the cancellation-free
    increments Delta_i = `gamma_difference(i, T)`:

        1 - abar_i = sigmoid(gamma_i),   log abar_i = log_sigmoid(-gamma_i),
        abar_i / abar_{i-1} = (1 + e^gamma_{i-1}) / (1 + e^gamma_i) = 1 / (1 + sigma_{i-1}^2 expm1(Delta_i)),
        beta_i = 1 - abar_i / abar_{i-1} = sigma_{i-1}^2 expm1(Delta_i) / (1 + sigma_{i-1}^2 expm1(Delta_i)),

    for i >= 2 and beta_1 = 1 - abar_1. Forming beta_i instead from log abar_i - log abar_{i-1} (two
    float32 numbers near -10 whose difference is -0.02 at the end of DDPM's grid) loses ~1e-4 relatively.
    """
    num_steps = int(num_steps)
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if self.grid_fn is not None:
      grid = self.grid_fn(num_steps)
      if grid is not None:
        return grid
    i = jnp.arange(1, num_steps + 1, dtype=jnp.float32)
    gamma = self.gamma(i / num_steps)
    delta = self.gamma_difference(i[1:], num_steps)
    e = sigma2_from_gamma(gamma[:-1]) * jnp.expm1(delta)    # abar_{i-1} / abar_i - 1 >= 0
    log_ratio = jnp.concatenate([jax.nn.log_sigmoid(-gamma[:1]), -jnp.log1p(e)])
    beta = jnp.concatenate([sigma2_from_gamma(gamma[:1]), e / (1.0 + e)])
    return _grid_with_origin(log_abar=jax.nn.log_sigmoid(-gamma), one_minus_abar=sigma2_from_gamma(gamma),
                             gamma=gamma, beta=beta, log_one_minus_beta=log_ratio)


class DiscreteGrid(NamedTuple):
  """A T-step DDPM grid, every field a float32 array [T + 1] indexed by the step i = 0..T (t = i / T).

  Index 0 is clean data, abar_0 := 1: log_abar = 0, one_minus_abar = 0, gamma = -inf; beta and
  log_one_minus_beta are 0 there (they belong to the steps i = 1..T, beta_i = 1 - abar_i / abar_{i-1}).
  """

  log_abar: Array
  one_minus_abar: Array
  gamma: Array
  beta: Array
  log_one_minus_beta: Array


def _grid_with_origin(**fields) -> DiscreteGrid:
  """DiscreteGrid from the steps i = 1..T ([T] arrays), prepending the clean-data entry i = 0."""
  origin = {"log_abar": 0.0, "one_minus_abar": 0.0, "gamma": -np.inf, "beta": 0.0,
            "log_one_minus_beta": 0.0}
  return DiscreteGrid(**{k: jnp.concatenate([jnp.full((1,), origin[k], jnp.float32),
                                             jnp.asarray(v, jnp.float32)]) for k, v in fields.items()})


# ----------------------------------------------------------------------------------------------------
# Fixed schedules.
# ----------------------------------------------------------------------------------------------------
def _check_endpoints(gamma_min: float, gamma_max: float) -> None:
  if not (math.isfinite(gamma_min) and math.isfinite(gamma_max)):
    raise ValueError(f"gamma_min and gamma_max must be finite, got {gamma_min}, {gamma_max}.")
  if not gamma_min < gamma_max:
    raise ValueError(
        f"gamma_min must be smaller than gamma_max (gamma is increasing in t), got gamma_min={gamma_min},"
        f" gamma_max={gamma_max}.")


def linear(*, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> Schedule:
  """gamma(t) = gamma_min + (gamma_max - gamma_min) t  (VDM's fixed schedule, arXiv:2107.00630)."""
  _check_endpoints(gamma_min, gamma_max)
  g0, g1 = float(gamma_min), float(gamma_max)
  # gamma(i / T) - gamma((i - 1) / T) = (g1 - g0) / T exactly: one float64 division, rounded once.
  return Schedule(lambda t: g0 + (g1 - g0) * t, name="linear",
                  difference_fn=lambda i, num_steps: jnp.full(jnp.shape(i), (g1 - g0) / num_steps,
                                                              jnp.float32),
                  gamma_range=(g0, g1))


def cosine(*, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX) -> Schedule:
  """Cosine schedule (Nichol & Dhariwal 2021) truncated to the endpoints [gamma_min, gamma_max].

  With abar(u) = cos^2(pi u / 2) (offset s = 0), gamma(u) = 2 log tan(pi u / 2). The time u is mapped
  linearly from [0, 1] onto [u0, u1] with gamma(u0) = gamma_min and gamma(u1) = gamma_max:
  u_k = (2 / pi) atan(exp(gamma_k / 2)).
  """
  _check_endpoints(gamma_min, gamma_max)
  u0 = 2.0 / math.pi * math.atan(math.exp(gamma_min / 2))
  u1 = 2.0 / math.pi * math.atan(math.exp(gamma_max / 2))

  def gamma_fn(t):
    u = u0 + (u1 - u0) * t
    return 2.0 * jnp.log(jnp.tan(0.5 * math.pi * u))

  def difference_fn(i, num_steps):
    # With a = pi u_t / 2, b = pi u_s / 2: gamma_t - gamma_s = 2 log(tan a / tan b)
    #   = 2 log((sin(a + b) + sin(a - b)) / (sin(a + b) - sin(a - b))) = 4 atanh(sin(a - b) / sin(a + b)).
    # a - b = pi (u1 - u0) / (2T) is a float64 constant; a + b = (pi / 2) w with
    # w = u_t + u_s = 2 u0 + (u1 - u0)(2i - 1) / T in (0, 2). Where w > 1, sin((pi / 2) w) is evaluated
    # as sin((pi / 2)(2 - w)) with 2 - w = 2 (1 - u1) + (u1 - u0)(2 (T - i) + 1) / T, so neither branch
    # rounds a number near pi before taking a small sine.
    #
    # Where b is small (the first steps) r = sin(a - b) / sin(a + b) is close to 1, and atanh(r) =
    # 1/2 log((1 + r) / (1 - r)) would take 1 - r from the rounded r (1.3e-6 relative error at T = 10,
    # 1.3e-5 in the T = 10 loss through expm1). There 1 - r is formed analytically instead:
    #   1 - r = (sin(a + b) - sin(a - b)) / sin(a + b) = 2 cos(a) sin(b) / sin(a + b),
    # with cos(a) = sin((pi / 2)(1 - u_t)), 1 - u_t = (1 - u1) + (u1 - u0)(T - i) / T, and
    # sin(b) = sin((pi / 2) u_s), u_s = u0 + (u1 - u0)(i - 1) / T; then atanh(r) = (log1p(r) - log(1 - r)) / 2.
    # Where r <= 1/2 atanh(r) itself is accurate (and log(1 - r) of a number near 1 would not be).
    du = (u1 - u0) / num_steps
    num = math.sin(0.5 * math.pi * du)
    w_lo = 2.0 * u0 + du * (2.0 * i - 1.0)
    w_hi = 2.0 * (1.0 - u1) + du * (2.0 * (num_steps - i) + 1.0)
    den = jnp.sin(0.5 * math.pi * jnp.where(w_lo <= 1.0, w_lo, w_hi))
    r = num / den
    cos_a = jnp.sin(0.5 * math.pi * ((1.0 - u1) + du * (num_steps - i)))
    sin_b = jnp.sin(0.5 * math.pi * (u0 + du * (i - 1.0)))
    near_one = r > 0.5
    one_minus_r = jnp.where(near_one, 2.0 * cos_a * sin_b / den, 1.0)
    return jnp.where(near_one, 2.0 * (jnp.log1p(r) - jnp.log(one_minus_r)),
                     4.0 * jnp.arctanh(jnp.where(near_one, 0.0, r)))

  return Schedule(gamma_fn, name="cosine", difference_fn=difference_fn,
                  gamma_range=(float(gamma_min), float(gamma_max)))


def ddpm_linear_beta(*, beta_start: float = 1e-4, beta_end: float = 0.02,
                     num_steps: int = 1000) -> Schedule:
  """The DDPM schedule (Ho et al. 2020): betas linear in [beta_start, beta_end] over T steps.

  abar_i = prod_{j <= i} (1 - beta_j) and gamma_i = log((1 - abar_i) / abar_i) for i = 1..T, placed at
  t = i / T, so that `discrete_alpha2(T)` returns DDPM's abar exactly. Between grid points gamma is
  linear in t; below t = 1/T it is extrapolated linearly from the first two points (gamma stays
  strictly increasing, and t = 0 is slightly cleaner than DDPM's first step).
  Computed in float64 with log1p / expm1: 1 - abar_1 = 1e-4 is not representable to full precision
  from abar_1 in float32.
  """
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2, got {num_steps}.")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
  betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  log_abar = np.cumsum(np.log1p(-betas))
  gammas = np.log(-np.expm1(log_abar)) - log_abar  # log((1 - abar) / abar)
  g_first = 2 * gammas[0] - gammas[1]
  knots_t = np.arange(0, num_steps + 1, dtype=np.float64) / num_steps
  knots_g = np.concatenate([[g_first], gammas])
  # The grid and its increments in float64, rounded once to float32 (the samplers' betas and the T-step
  # weights then carry float32 round-off only, not the cancellation of two float32 gammas).
  grid64 = dict(log_abar=log_abar, one_minus_abar=-np.expm1(log_abar), gamma=gammas, beta=betas,
                log_one_minus_beta=np.log1p(-betas))
  increments = np.diff(knots_g)            # gamma_i - gamma_{i-1}, i = 1..T (i = 1 against g_first)
  knots_t = jnp.asarray(knots_t, jnp.float32)
  knots_g = jnp.asarray(knots_g, jnp.float32)
  increments32 = jnp.asarray(np.concatenate([[0.0], increments]), jnp.float32)

  def gamma_fn(t):
    return jnp.interp(t, knots_t, knots_g)

  def difference_fn(i, grid_steps):
    if grid_steps == num_steps:
      return increments32[jnp.clip(i, 1, num_steps).astype(jnp.int32)]
    return gamma_fn(i / grid_steps) - gamma_fn((i - 1.0) / grid_steps)

  def grid_fn(grid_steps):
    return _grid_with_origin(**grid64) if grid_steps == num_steps else None

  return Schedule(gamma_fn, name=f"ddpm_linear_beta_{num_steps}", difference_fn=difference_fn,
                  grid_fn=grid_fn, gamma_range=(float(knots_g[0]), float(knots_g[-1])))


# ----------------------------------------------------------------------------------------------------
# Discrete grids of alpha^2 (abar) for any number of steps, and the schedule through a given grid.
# Computed in float64 on the host: 1 - abar_1 ~ 1e-4 is not representable to full precision from abar_1
# in float32, and a product of 1000 factors (1 - beta) accumulates float32 round-off.
# ----------------------------------------------------------------------------------------------------
def ddpm_linear_beta_alpha2(t, *, beta_start: float = 1e-4, beta_end: float = 0.02,
                            num_betas: int = 1000) -> np.ndarray:
  """abar(t) of DDPM's linear-beta schedule read as a function of t in (0, 1], float64 [len(t)].

  The num_betas betas beta_j = beta_start + (beta_end - beta_start)(j - 1)/(num_betas - 1) give DDPM's
  abar_j = prod_{k <= j} (1 - beta_k), placed at t_j = j / num_betas (Ho et al. 2020, arXiv:2006.11239).
  Between the knots gamma = log((1 - abar) / abar) is linear in t; below t_1 it is extrapolated
  linearly from the first two knots (as in `ddpm_linear_beta`). So

      abar(j / num_betas) = DDPM's abar_j   (float64 round-off),   abar(1) = DDPM's abar_{num_betas},

  and sampling t = i / T for i = 1..T gives a T-step grid over the SAME gamma range for any T: the
  num_betas-step schedule resampled (for T = num_betas exactly DDPM's grid; for T = 50 its last level is
  still DDPM's abar_1000 = 4.0e-5, where T = 50 linear betas 1e-4..0.02 would stop at abar_50 = 0.60).

  Args:
    t: times in (0, 1], any shape (float64 on the host). beta_start, beta_end: the first and last beta.
    num_betas: how many betas (DDPM: 1000).
  Returns:
    abar(t), float64, the shape of t.
  """
  if isinstance(num_betas, bool) or not isinstance(num_betas, (int, np.integer)) or num_betas < 2:
    raise ValueError(f"num_betas must be an integer >= 2, got {num_betas!r}.")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
  t = np.asarray(t, np.float64)
  if not np.all((t > 0) & (t <= 1)):
    raise ValueError(f"t must lie in (0, 1], got values in [{t.min()}, {t.max()}].")
  betas = np.linspace(beta_start, beta_end, num_betas, dtype=np.float64)
  log_abar = np.cumsum(np.log1p(-betas))
  gammas = np.log(-np.expm1(log_abar)) - log_abar  # log((1 - abar) / abar)
  knots_t = np.arange(1, num_betas + 1, dtype=np.float64) / num_betas
  g = np.interp(t, knots_t, gammas)
  below = t < knots_t[0]  # np.interp clamps; extrapolate linearly instead
  slope = (gammas[1] - gammas[0]) * num_betas
  g = np.where(below, gammas[0] + slope * (t - knots_t[0]), g)
  return _alpha2_from_gamma_f64(g)


def uniform_sigma_alpha2(num_steps: int) -> np.ndarray:
  """The CDM paper's "uniform" grid, sqrt(1 - abar_i) = i / (T + 1) for i = 0..T + 1, float64 [T + 2].

  abar_i = 1 - (i / (T + 1))^2, formed as (1 - u)(1 + u) with u = i / (T + 1) (no cancellation near
  u = 1). abar_0 = 1 (clean) and abar_{T+1} = 0 (pure noise); abar_T = (2T + 1) / (T + 1)^2 ~ 2 / T
  is NOT noise (Yadin et al., arXiv:2402.10095, the likelihood experiments).
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
  u = np.arange(num_steps + 2, dtype=np.float64) / (num_steps + 1)
  return (1.0 - u) * (1.0 + u)


def _alpha2_from_gamma_f64(gamma: np.ndarray) -> np.ndarray:
  """sigmoid(-gamma) in float64, stable for either sign of gamma."""
  e = np.exp(-np.abs(gamma))
  return np.where(gamma >= 0, e / (1.0 + e), 1.0 / (1.0 + e))


def from_alpha2_grid(alpha2, name: str = "grid") -> Schedule:
  """The schedule through a discrete grid: gamma(i / T) = log((1 - abar_i) / abar_i) for i = 1..T.

  Between the knots gamma is linear in t; below t = 1 / T it is extrapolated linearly from the first two
  knots (t = 0 is then slightly cleaner than the first level).

  Numerics: a float32 time i / T formed by different arithmetic (XLA turns x / T into x * (1 / T)) can
  miss the float32 knot by an ulp, and where the grid is steep (the uniform grid near t = 1 changes gamma
  by 0.7 per step at T = 1000) linear interpolation turns that ulp into a relative error of 4e-5 in
  alpha^2. So a time within a few float32 ulps of a knot, |t T - i| <= 4 eps T, takes the knot's gamma
  exactly (the derivative stays that of the interpolant, through a stop_gradient). `discrete_alpha2(T)`
  and every sampler on the t = i / T grid then see the grid to float32 round-off of gamma.

  Args:
    alpha2: abar_1..abar_T, [T] with T >= 2, strictly decreasing in (0, 1) (no clean / pure-noise ends).
    name: a label for logs.
  """
  a = np.asarray(alpha2, np.float64)
  if a.ndim != 1 or a.shape[0] < 2:
    raise ValueError(f"alpha2 must have shape [T] with T >= 2, got {a.shape}.")
  if not (np.all((a > 0) & (a < 1)) and np.all(np.diff(a) < 0)):
    raise ValueError("alpha2 must be strictly decreasing inside (0, 1) (abar_1 > ... > abar_T).")
  num_steps = a.shape[0]
  gammas = np.log1p(-a) - np.log(a)
  knots_t = np.arange(0, num_steps + 1, dtype=np.float64) / num_steps
  knots_g = np.concatenate([[2 * gammas[0] - gammas[1]], gammas])
  knots_t = jnp.asarray(knots_t, jnp.float32)
  knots_g = jnp.asarray(knots_g, jnp.float32)
  snap = 4.0 * float(np.finfo(np.float32).eps) * num_steps

  def gamma_fn(t):
    g = jnp.interp(t, knots_t, knots_g)
    u = t * num_steps
    k = jnp.round(u)
    at_knot = (jnp.abs(u - k) <= snap) & (k >= 0) & (k <= num_steps)
    g_knot = knots_g[jnp.clip(k, 0, num_steps).astype(jnp.int32)]
    return g + jax.lax.stop_gradient(jnp.where(at_knot, g_knot - g, 0.0))

  return Schedule(gamma_fn, name=name)


def from_function(fn: Callable[[Array], Array], name: str = "custom", *,
                  gamma_range: tuple[float, float] | None = None) -> Schedule:
  """Wrap any user function t -> gamma (elementwise, increasing, differentiable); gamma_range: its
  nominal (gamma(0), gamma(1)) if known (see `Schedule`)."""
  return Schedule(fn, name=name, gamma_range=gamma_range)


def from_module(module: nn.Module, params) -> Schedule:
  """Bind a learned schedule module (a flax module mapping t -> gamma) to its parameters."""
  difference_fn = None
  if isinstance(module, LearnedScalarGamma):
    # gamma(i / T) - gamma((i - 1) / T) = |w| / T: no rounding of t and s, differentiable in w.
    difference_fn = lambda i, num_steps: jnp.abs(params["w"]) / num_steps * jnp.ones_like(i)
  # The module's gamma_min / gamma_max fields are its initial endpoints: a fixed nominal range, so a
  # network normalising gamma by it keeps its input scale while the endpoints learn.
  gamma_range = None
  if hasattr(module, "gamma_min") and hasattr(module, "gamma_max"):
    gamma_range = (float(module.gamma_min), float(module.gamma_max))
  return Schedule(lambda t: module.apply({"params": params}, t), name=type(module).__name__,
                  difference_fn=difference_fn, gamma_range=gamma_range)


# ----------------------------------------------------------------------------------------------------
# Learned schedules (flax modules; t of any shape -> gamma of the same shape).
# ----------------------------------------------------------------------------------------------------
class DenseMonotone(nn.Dense):
  """A dense layer with non-negative weights (|kernel|): monotone non-decreasing in its input."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), jnp.float32)
    y = jnp.dot(inputs, jnp.abs(kernel))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias
    return y


class LearnedScalarGamma(nn.Module):
  """gamma(t) = b + |w| t, initialised at the fixed linear schedule (VDM)."""

  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX

  @nn.compact
  def __call__(self, t):
    w = self.param("w", nn.initializers.constant(self.gamma_max - self.gamma_min), ())
    b = self.param("b", nn.initializers.constant(self.gamma_min), ())
    return b + jnp.abs(w) * t


class MonotoneNetGamma(nn.Module):
  """VDM's monotone network: gamma(t) = l1(t) + l3(2 (sigmoid(l2(2 (t - 1/2))) - 1/2)) / n.

  l1 is initialised to the linear schedule; all kernels are used through |.| so gamma is increasing.
  """

  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX
  n_features: int = 1024

  @nn.compact
  def __call__(self, t):
    t = jnp.asarray(t, jnp.float32)
    x = t[..., None]
    l1 = DenseMonotone(1, kernel_init=nn.initializers.constant(self.gamma_max - self.gamma_min),
                       bias_init=nn.initializers.constant(self.gamma_min), name="l1")
    l2 = DenseMonotone(self.n_features, kernel_init=nn.initializers.normal(), name="l2")
    l3 = DenseMonotone(1, kernel_init=nn.initializers.normal(), use_bias=False, name="l3")
    h = l1(x)
    g = l3(2.0 * (jax.nn.sigmoid(l2(2.0 * (x - 0.5))) - 0.5)) / self.n_features
    return (h + g)[..., 0]


class PinnedMonotoneGamma(nn.Module):
  """Monotone network with its endpoints pinned and learned separately:

      gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g~(t) - g~(0)) / (g~(1) - g~(0)),
      gamma_1  = gamma_0 + softplus(gap),

  where g~ is `MonotoneNetGamma` (the "shape"; its scale and offset cancel). Parameters:
  {'gamma_0', 'gap', 'shape': {...}}. gamma is increasing for every parameter value: the shape is
  monotone by |kernel| and gamma_1 - gamma_0 = softplus(gap) > 0 (as |w| keeps `LearnedScalarGamma`
  increasing; softplus rather than |.| so that the gap never reaches 0 and its gradient has no kink).
  At initialisation gap = softplus^-1(gamma_max - gamma_min), so gamma_1 = gamma_max to float32
  round-off. The endpoints enter the ELBO; the shape leaves the continuous diffusion loss's expectation
  unchanged (VDM sec. 5) and only changes the estimator's variance.
  """

  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX
  n_features: int = 1024

  @nn.compact
  def __call__(self, t):
    t = jnp.asarray(t, jnp.float32)
    g0 = self.param("gamma_0", nn.initializers.constant(self.gamma_min), ())
    gap = self.param("gap", nn.initializers.constant(_softplus_inverse(self.gamma_max - self.gamma_min)),
                     ())
    shape = MonotoneNetGamma(self.gamma_min, self.gamma_max, self.n_features, name="shape")
    ends = shape(jnp.array([0.0, 1.0]))
    frac = (shape(t) - ends[0]) / (ends[1] - ends[0])
    return g0 + jax.nn.softplus(gap) * frac


def _softplus_inverse(y: float) -> float:
  """x with softplus(x) = log(1 + e^x) = y > 0, in float64: x = y + log(-expm1(-y))."""
  if not y > 0:
    raise ValueError(f"gamma_max - gamma_min must be > 0, got {y}.")
  return y + math.log(-math.expm1(-y))


# One visible map from config names to fixed schedule factories and learned modules.
FIXED = {
    "linear": linear,
    "cosine": cosine,
}
LEARNED = {
    "learned_scalar": LearnedScalarGamma,
    "learned_net": MonotoneNetGamma,
    "learned_pinned": PinnedMonotoneGamma,
}
