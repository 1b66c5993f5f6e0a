"""Likelihood bookkeeping: K-level data encoding, dequantisation bounds and the nats -> bits/dim conversion.

The probability-flow ODE (solver, transport, ODE log-likelihood) lives in `vdiff.ode`; its names are
still reachable here (`likelihood.ode_log_likelihood` etc.) for code written before the split.

Conventions (docs/math.md section 0):
  * K-level integers k in {0..K-1} are encoded to bin centres x = 2 (k + 1/2) / K - 1 in (-1, 1); the bin
    width is Delta = 2 / K.
  * A discrete model (the VDM ELBO with its K-way decoder) bounds -log P(k) directly: no offset.
  * A continuous density p(y) on dequantised data y = x + Delta (u - 1/2), u ~ U[0, 1)^D, gives
    log P(k) >= E_u[log p(y)] + D log Delta, so its bits/dim are -E_u[log p(y)] / (D ln 2) + log2(K / 2).
  * Forward-process dequantisation (`forward_dequantization_bound`) turns any density p_t0 of z_t0 into a
    discrete bound with the K-level decoder, comparable with the VDM ELBO: no offset.

Return convention of the public likelihood functions (`vdm.negative_elbo`, `diffenc.negative_elbo`,
`cdm.one_step_nll`, `ode.ode_nll`, and the families' `nll` in `vdiff.models`):

    fn(rng, <model: eps_fn / logits_fn, schedule, ...>, <data>, *, num_levels=K, <keyword-only
       hyperparameters>) -> (nats [B], extras: dict)

  * rng first, then the model, then the data k (K-level integers); every hyperparameter keyword-only.
    (The ELBOs take the encoding x = encode(k) second and their model, schedule and eps_fn, by keyword.)
  * nats: per example, an upper bound (in expectation over the function's random draws) on the
    DISCRETE negative log-likelihood -log P(k), in nats:
      - ELBO: the negative ELBO;
      - forward dequantisation: minus `forward_dequantization_bound`;
      - uniform dequantisation: -log p(y) + D log(K / 2), i.e. the density's -log p(y) with the
        -D log Delta of the dequantisation bound folded in (`uniform_dequantization_nats`).
    So bits/dim are always `nats_to_bpd(nats, D)`, with no num_levels offset.
  * extras: a dict of per-example values; at least {"nfe": int32 [B]}, the network evaluations per
    example (summed over the dequantisation draws) for the one-step and ODE estimators; the ELBO's
    extras are its terms {"prior", "recon", "diff"} (one network evaluation per call).

`forward_dequantization_bound` and `uniform_dequantization_bound` are the low-level building blocks in
log space (a lower bound on log P(k), and a log-density on [-1, 1]^D) from which these are built.
`cdm.one_step_nll_bpd`, `ode.ode_nll_bpd`, `ode.ode_forward_bound` and `ode.ode_uniform_bound` are
deprecated aliases (a DeprecationWarning names the replacement) that keep their old return values.
"""

from __future__ import annotations

import math

from typing import Callable

import jax
import jax.numpy as jnp

from vdiff import checks
from vdiff import schedules as schedules_lib

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


def uniform_dequantization_nats(log_p: Array, num_dims: int, num_levels: int) -> Array:
  """-log p(y) + D log(K / 2): a log-density on uniformly dequantised data in [-1, 1]^D as nats of the
  discrete bound log P(k) >= E_u log p(y) + D log Delta, Delta = 2 / K (docs/math.md sec. 4).

  Args:
    log_p: log p(y) [B] in nats. num_dims: D. num_levels: K.
  Returns:
    nats [B] whose `nats_to_bpd(nats, D)` is -log p(y) / (D ln 2) + log2(K / 2).
  """
  if num_levels < 2:
    raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
  return -jnp.asarray(log_p, jnp.float32) + num_dims * math.log(num_levels / 2.0)


def nats_to_bpd(nats: Array, num_dims: int, *, num_levels: int | None = None) -> Array:
  """The one conversion of a negative log-likelihood in nats per example to bits per dimension.

      bpd = nats / (D ln 2)                      (num_levels=None: nats already bound -log P(k))
      bpd = nats / (D ln 2) + log2(K / 2)        (num_levels=K: nats = -log p(y) of a density on
                                                  uniformly dequantised data in [-1, 1]^D)

  The second form is the dequantisation bound log P(k) >= E_u log p(y) + D log(2 / K) (docs/math.md sec. 4)
  for nats = -log p(y) of a density. The public likelihood functions (`cdm.one_step_nll`, `ode.ode_nll`,
  the ELBOs; see the module docstring) already fold D log(K / 2) into their nats and use the first form.
  Conventions elsewhere differ: score_sde scales data to [0, 1] with 256 bins (same offset, log2 256
  with x in [0,1]), while others use [0, 255/256] and get log2(256/255) bits/dim less.

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
# Dequantisation bounds: a continuous density p of z -> a lower bound on the discrete log P(k).
# ----------------------------------------------------------------------------------------------------
# log_density_fn(rng, z [B, ...]) -> (log p(z) [B] in nats, nfe [B]): the density being dequantised
# (the probability-flow ODE at t0, the CDM one-step density at a class t, ...).
LogDensityFn = Callable[[Array, Array], tuple[Array, Array]]


def _sum_per_example(a: Array) -> Array:
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def log_mean_exp(log_w: Array, axis: int = 0) -> Array:
  """log (1/m) sum_j exp(log_w_j) along `axis` (m = its length), through a stable log-sum-exp."""
  log_w = jnp.asarray(log_w)
  return jax.nn.logsumexp(log_w, axis=axis) - math.log(log_w.shape[axis])


def forward_dequantize(rng: Array, k: Array, num_levels: int, *, gamma: Array):
  """One draw z ~ q(z | k) = N(alpha x, sigma^2 I) of the forward process at gamma, and log q(z | k).

      z = alpha x + sigma eps,   log q(z | k) = -1/2 ||eps||^2 - D/2 log(2 pi) - D log sigma,

  with x = encode(k), alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma). log q is formed from eps
  (not from z - alpha x, which cancels catastrophically when sigma ~ 1e-3) and log sigma from
  log_sigmoid (accurate at gamma = -13.3). z / alpha = x + exp(gamma / 2) eps is returned as well, formed
  directly as in `vdm.reconstruction_loss`, for the decoder.

  Args:
    rng: PRNG key. k: int [B, ...] levels in {0..K-1}. num_levels: K. gamma: scalar gamma of q.
  Returns:
    (z [B, ...], z / alpha [B, ...], log q(z | k) [B]).
  """
  checks.levels(k, "k", num_levels)
  x = encode(k, num_levels)
  gamma = jnp.asarray(gamma, jnp.float32)
  eps = jax.random.normal(rng, x.shape, jnp.float32)
  z = schedules_lib.alpha_from_gamma(gamma) * x + schedules_lib.sigma_from_gamma(gamma) * eps
  z_over_alpha = x + jnp.exp(0.5 * gamma) * eps
  num_dims = math.prod(x.shape[1:])
  log_q = (-0.5 * _sum_per_example(jnp.square(eps)) - 0.5 * num_dims * math.log(2.0 * math.pi)
           - 0.5 * num_dims * jax.nn.log_sigmoid(gamma))
  return z, z_over_alpha, log_q


def decoder_log_prob(z_over_alpha: Array, k: Array, *, gamma: Array, num_levels: int) -> Array:
  """log p(k | z) [B] of the K-level decoder at gamma (the VDM reconstruction decoder,
  `vdm.decoder_log_probs`): factorised over dimensions, softmax over the K bin centres of
  logits_j = -1/2 (z / alpha - x^(j))^2 / exp(gamma)."""
  from vdiff import vdm  # pylint: disable=g-import-not-at-top  (vdm imports this module)
  logp = vdm.decoder_log_probs(z_over_alpha, jnp.asarray(gamma, jnp.float32), num_levels=num_levels)
  logp_k = jnp.take_along_axis(logp, jnp.asarray(k, jnp.int32)[..., None], axis=-1)[..., 0]
  return _sum_per_example(logp_k)


def _check_num_samples(num_samples: int) -> int:
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples (eval.num_dequantization_samples) must be an int >= 1, "
                     f"got {num_samples!r}.")
  return int(num_samples)


def forward_dequantization_bound(rng: Array, log_density_fn: LogDensityFn, k: Array, *,
                                 num_levels: int, gamma: Array, num_samples: int = 1):
  """A lower bound on the discrete log P(k) from a density p of z_t0, dequantising with the forward process.

  The model. A density p(z) of z = z_t0 (the probability-flow ODE from t0 to 1, or the CDM one-step
  density of class t) and the K-level decoder at gamma = gamma(t0),
      p(k | z) = prod_i softmax_j(-1/2 (z_i / alpha - x^(j))^2 / exp(gamma))[k_i]
  (the decoder of the VDM reconstruction term, docs/math.md sec. 2) define a discrete model
      P(k) = int p(z) p(k | z) dz.
  The bound. For the forward marginal q(z | k) = N(alpha x, sigma^2 I) (x = encode(k)), which is
  positive everywhere,
      P(k) = E_{z ~ q(z|k)} [ p(z) p(k | z) / q(z | k) ]
  and Jensen's inequality (log is concave) gives
      log P(k) >= E_q [ log p(z) + log p(k | z) - log q(z | k) ],
  with the gap KL(q(z | k) || p(z | k)): zero when the model's posterior over z given k is the forward
  marginal, which is what a diffusion model trained on K-level data learns at small sigma (its p(z) is
  a mixture of narrow bumps at the bin centres). Uniform dequantisation of such a model instead puts
  points between the bumps, where it has no mass.
  Importance weighting (Burda et al. 2016, arXiv:1509.00519). With z_1..z_m iid from q and
  w_j = p(z_j) p(k | z_j) / q(z_j | k),
      L_m = E log (1/m) sum_j w_j   satisfies   L_1 <= L_m <= L_{m'} <= log P(k)  for m <= m',
  and L_m -> log P(k) as m grows; this function returns one sample of log (1/m) sum_j w_j
  (a log-mean-exp). m = 1 is the plain bound.
  Comparison with the ELBO: at gamma = gamma_0 the decoder and q(z_0 | x) are exactly those of the VDM
  ELBO (docs/math.md sec. 2); the ELBO bounds log p(z_0) by the diffusion path, this bound evaluates
  it (through the ODE). Both are discrete bounds on -log P(k): bits/dim carry no dequantisation offset.
  A stochastic log p (Hutchinson's trace estimate in the ODE) is unbiased in log p, so the m = 1 bound
  holds in expectation; for m > 1 its noise biases exp(log p) upwards (use divergence='exact' where a
  strict bound matters).

  Args:
    rng: PRNG key (draw j uses fold_in(rng, j), split into the q noise and log_density_fn's key).
    log_density_fn: (rng, z [B, ...]) -> (log p(z) [B] in nats, nfe [B]).
    k: int [B, ...] levels in {0..K-1}. num_levels: K.
    gamma: scalar gamma of q and of the decoder (gamma(t0) for the ODE).
    num_samples: m >= 1, draws per example (sequential, so memory does not grow with m).
  Returns:
    (lower bound on log P(k) [B] in nats, nfe [B] summed over the m draws); `cdm.one_step_nll` and
    `ode.ode_nll` return minus it as nats (the return convention of the module docstring).
  Reference: Kingma et al. 2021, arXiv:2107.00630 (the decoder); Song et al. 2021, arXiv:2101.09258
  and Zheng et al. 2023, arXiv:2305.03935 (variational / truncated-normal dequantisation of the ODE).
  """
  m = _check_num_samples(num_samples)
  checks.levels(k, "k", num_levels)

  def draw(j):
    r_q, r_p = jax.random.split(jax.random.fold_in(rng, j))
    z, z_over_alpha, log_q = forward_dequantize(r_q, k, num_levels, gamma=gamma)
    log_p, nfe = log_density_fn(r_p, z)
    log_dec = decoder_log_prob(z_over_alpha, k, gamma=gamma, num_levels=num_levels)
    return log_p + log_dec - log_q, jnp.asarray(nfe, jnp.int32)

  log_w, nfe = jax.lax.map(draw, jnp.arange(m))
  return log_mean_exp(log_w, axis=0), jnp.sum(nfe, axis=0)


def uniform_dequantization_bound(rng: Array, log_density_fn: LogDensityFn, k: Array, *,
                                 num_levels: int, num_samples: int = 1):
  """log-mean-exp over m uniform dequantisations, log (1/m) sum_j p(y_j), y_j = dequantize(k) [B].

  Uniform dequantisation is the same bound with q(y | k) uniform on k's bin (q = Delta^-D) and the
  decoder the bin indicator: log P(k) >= E log (1/m) sum_j p(y_j) + D log Delta, tighter as m grows
  (m = 1: the plain E_u log p(y)). The returned value is a log-density on [-1, 1]^D:
  `uniform_dequantization_nats(value, D, K)` turns it into nats of the discrete bound (the return
  convention of the module docstring), equivalently `nats_to_bpd(-value, D, num_levels=K)` bits/dim.

  Args:
    rng: PRNG key (draw j uses fold_in(rng, j), split into u and log_density_fn's key).
    log_density_fn: (rng, y [B, ...]) -> (log p(y) [B] in nats, nfe [B]).
    k: int [B, ...] levels. num_levels: K. num_samples: m >= 1.
  Returns:
    (log (1/m) sum_j p(y_j) [B] in nats, nfe [B] summed over the m draws).
  """
  m = _check_num_samples(num_samples)

  def draw(j):
    r_u, r_p = jax.random.split(jax.random.fold_in(rng, j))
    log_p, nfe = log_density_fn(r_p, dequantize(r_u, k, num_levels))
    return log_p, jnp.asarray(nfe, jnp.int32)

  log_p, nfe = jax.lax.map(draw, jnp.arange(m))
  return log_mean_exp(log_p, axis=0), jnp.sum(nfe, axis=0)


# The probability flow moved to `vdiff.ode`; these names resolve there on first use (ode imports this
# module, so a top-level import would be circular).
_MOVED_TO_ODE = ("ODE_SOLVERS", "DIVERGENCES", "probability_flow_drift", "probability_flow",
                 "ode_log_likelihood", "ode_nll_bpd")


def __getattr__(name):
  if name in _MOVED_TO_ODE:
    from vdiff import ode  # pylint: disable=g-import-not-at-top
    return getattr(ode, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
