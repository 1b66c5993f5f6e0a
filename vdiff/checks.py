"""Argument checks shared by the public entry points: each error names the argument and what was expected.

Shape and dtype checks run at trace time (free under jit). Value checks (finiteness, level range) run only
on concrete arrays, i.e. when the function is called eagerly; under jit the values are not known.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def batch(x, name: str, *, min_rank: int = 2, floating: bool = True):
  """x must be an array [B, ...] of rank >= min_rank (floating point unless floating=False), finite."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array of shape [B, ...], got {type(x).__name__}.")
  if x.ndim < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank} ([B, ...]), got shape {tuple(x.shape)}.")
  if x.shape[0] == 0:
    raise ValueError(f"{name} must hold at least one example, got shape {tuple(x.shape)}.")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array (encoded data), got dtype {x.dtype}.")
  if floating and is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
    raise ValueError(f"{name} holds NaN or Inf values.")
  return x


def levels(k, name: str, num_levels: int):
  """k must be integer levels in {0..K-1}."""
  num_levels = positive_int(num_levels, "num_levels", minimum=2)
  if not jnp.issubdtype(jnp.asarray(k).dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer levels in {{0..{num_levels - 1}}}, got dtype "
                    f"{jnp.asarray(k).dtype}.")
  if is_concrete(k):
    a = np.asarray(k)
    if a.size and (a.min() < 0 or a.max() >= num_levels):
      raise ValueError(f"{name} must hold levels in {{0..{num_levels - 1}}}, got values in "
                       f"[{a.min()}, {a.max()}].")
  return k


def positive_int(value, name: str, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _dtype_of(value):
  """The dtype of an array or Python scalar (bool, int, float), as jnp would make it."""
  return jnp.asarray(value).dtype


def class_indices(t, name: str, *, num_classes: int, batch: int):
  """t must be integer class indices in {0..num_classes - 1}, a scalar or shape [batch]; int32 [batch].

  A float class (0.7) or a bool is refused rather than converted. The range is checked only on concrete
  values; under jit the caller decides what an out-of-range class gives (vdiff.cdm: NaN).
  """
  dtype = _dtype_of(t)
  if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer class indices in {{0..{num_classes - 1}}}, got dtype "
                    f"{dtype}.")
  t = jnp.asarray(t)
  if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != batch):
    raise ValueError(f"{name} must be a scalar or have shape [B] = ({batch},), got {t.shape}.")
  if is_concrete(t):
    a = np.asarray(t)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"{name} must hold class indices in {{0..{num_classes - 1}}}, got values in "
                       f"[{a.min()}, {a.max()}].")
  return jnp.broadcast_to(t.astype(jnp.int32), (batch,))


def times(t, name: str, *, batch_size: int, scalar_ok: bool = False):
  """t must be floating-point times in [0, 1] of shape [batch_size] (or a scalar, if scalar_ok);
  returns them as float32 [batch_size].

  An integer t is refused (a class index is not a time, and integer times would only select the ends of
  the interval). The dtype and shape are checked always (trace time); the values (finite, within
  [0, 1]) only when t is concrete, i.e. eagerly. Under jit the caller decides what such a time gives
  (vdiff.vdm: a NaN time gives a NaN loss; vdiff.cdm: NaN).
  """
  dtype = _dtype_of(t)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must hold floating-point times in [0, 1], got dtype {dtype}.")
  t = jnp.asarray(t, jnp.float32)
  if not ((scalar_ok and t.ndim == 0) or tuple(t.shape) == (batch_size,)):
    raise ValueError(f"{name} must have shape [B] = ({batch_size},), one time per example"
                     f"{' (or be a scalar)' if scalar_ok else ''}, got shape {tuple(t.shape)}.")
  if is_concrete(t):
    a = np.asarray(t)
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} holds NaN or Inf values; {name} must hold times in [0, 1].")
    if a.size and (a.min() < 0 or a.max() > 1):
      raise ValueError(f"{name} must hold times in [0, 1], got values in [{a.min()}, {a.max()}].")
  return jnp.broadcast_to(t, (batch_size,))
