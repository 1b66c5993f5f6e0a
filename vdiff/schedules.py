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
from typing import Callable

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
    difference_fn: optional (t, s) -> gamma(t) - gamma(s) computed without forming the two gammas, for
      schedules where that is possible (see `gamma_difference`); None falls back to the subtraction.
    gamma_range: the nominal (gamma_min, gamma_max) as Python floats: the endpoints of a fixed
      schedule, the initial endpoints of a learned one; None when the schedule does not know them.
      Networks normalise gamma by it (`vdm.make_eps_fn`); it never changes during training.
  """

  gamma_fn: Callable[[Array], Array]
  name: str = "custom"
  difference_fn: Callable[[Array, Array], Array] | None = None
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

  def gamma_difference(self, t: Array, s: Array) -> Array:
    """gamma(t) - gamma(s), elementwise (t and s broadcast).

    The T-step losses and the ancestral samplers weight each step by expm1(gamma(t) - gamma(s)) with
    t - s = 1/T. Subtracting two float32 gammas near gamma_min = -13.3 loses about ulp(13) ~ 1e-6 of an
    increment of size (gamma_max - gamma_min) / T ~ 0.018 at T = 1000, a relative error of ~5e-5 in
    the weight. Schedules with a closed-form difference (`linear`: (gamma_max - gamma_min)(t - s), where
    t - s is exact in float32 for s in [t/2, t] by Sterbenz's lemma) supply `difference_fn`.
    """
    t = jnp.asarray(t, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    if self.difference_fn is not None:
      return self.difference_fn(t, s)
    return self.gamma(t) - self.gamma(s)

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
  return Schedule(lambda t: g0 + (g1 - g0) * t, name="linear",
                  difference_fn=lambda t, s: (g1 - g0) * (t - s), gamma_range=(g0, g1))


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

  return Schedule(gamma_fn, name="cosine", gamma_range=(float(gamma_min), float(gamma_max)))


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
  knots_t = jnp.asarray(knots_t, jnp.float32)
  knots_g = jnp.asarray(knots_g, jnp.float32)

  def gamma_fn(t):
    return jnp.interp(t, knots_t, knots_g)

  return Schedule(gamma_fn, name=f"ddpm_linear_beta_{num_steps}",
                  gamma_range=(float(knots_g[0]), float(knots_g[-1])))


def from_function(fn: Callable[[Array], Array], name: str = "custom", *,
                  gamma_range: tuple[float, float] | None = None) -> Schedule:
  """Wrap any user function t -> gamma (elementwise, increasing, differentiable); gamma_range: its
  nominal (gamma(0), gamma(1)) if known (see `Schedule`)."""
  return Schedule(fn, name=name, gamma_range=gamma_range)


def from_module(module: nn.Module, params) -> Schedule:
  """Bind a learned schedule module (a flax module mapping t -> gamma) to its parameters."""
  difference_fn = None
  if isinstance(module, LearnedScalarGamma):
    # gamma(t) - gamma(s) = |w| (t - s): exact in t - s, differentiable in w.
    difference_fn = lambda t, s: jnp.abs(params["w"]) * (t - s)
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

  where g~ is `MonotoneNetGamma` (the "shape"; its scale and offset cancel). Parameters:
  {'gamma_0', 'gamma_1', 'shape': {...}}. The endpoints enter the ELBO; the shape leaves the continuous
  diffusion loss's expectation unchanged (VDM sec. 5) and only changes the estimator's variance.
  """

  gamma_min: float = GAMMA_MIN
  gamma_max: float = GAMMA_MAX
  n_features: int = 1024

  @nn.compact
  def __call__(self, t):
    t = jnp.asarray(t, jnp.float32)
    g0 = self.param("gamma_0", nn.initializers.constant(self.gamma_min), ())
    g1 = self.param("gamma_1", nn.initializers.constant(self.gamma_max), ())
    shape = MonotoneNetGamma(self.gamma_min, self.gamma_max, self.n_features, name="shape")
    ends = shape(jnp.array([0.0, 1.0]))
    frac = (shape(t) - ends[0]) / (ends[1] - ends[0])
    return g0 + (g1 - g0) * frac


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
