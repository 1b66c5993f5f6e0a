"""Likelihood bookkeeping: K-level data encoding, uniform dequantisation and the nats -> bits/dim conversion.

Conventions (shared/MATH.md section 0):
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

  The second form is the dequantisation bound log P(k) >= E_u log p(y) + D log(2 / K) (MATH.md sec. 4).
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
