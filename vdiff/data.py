"""Datasets of K-level integer images, deterministic batching, and synthetic data of known density.

Everything here is numpy on the host. Images stay integers in {0..K-1} (uint8 when K <= 256, else int32)
until the model encodes them with `vdiff.likelihood.encode` (docs/math.md section 0).

Sources (one visible dict, `LOADERS`; any other name is tried as a TFDS name):
  * `digits`: scikit-learn's bundled 8x8 digits, 17 levels (0..16), a fixed 1497 / 300 train / test split.
  * `mnist`, `cifar10`, `downsampled_imagenet/32x32`, any TFDS name: `tfds.data_source` (array_record,
    no TensorFlow needed), K = 256, never downloads unless asked (`download=True`).
  * `photos`: 32x32 RGB patches (K = 256) of the 11 photographs bundled inside the scikit-image and
    scikit-learn wheels, split by photo, 4235 / 862 train / test patches at stride 32 (`_load_photos`).
  * `npz`: the user's own file, written by `make_npz`.
  * `gaussian_mixture`, `uniform`: quantised samples of a known distribution with its exact (uniform) or
    Monte-Carlo (mixture) discrete entropy in bits/dim, the NLL a perfect model would reach.

Batching is a pure function of (seed, step), so a resumed run sees exactly the data an uninterrupted run
would, and each process reads only its own slice of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import types
import zipfile
import zlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from scipy import special

from vdiff import likelihood

# --------------------------------------------------------------------------------------------------------
# The dataset container and its validation.


# The most levels a dataset may have: 16-bit data. The model sees level k as the float32 bin centre
# -1 + (2k + 1) / K; near +-1 float32 values are 2^-23 apart, so K <= 2^16 keeps 2^7 float32 steps within
# each half-bin, while K near 2^23 would merge neighbouring bins (and int32 levels overflow past 2^31).
MAX_NUM_LEVELS = 2**16


def _check_num_levels(num_levels: Any) -> int:
  if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or num_levels < 2:
    raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}.")
  if num_levels > MAX_NUM_LEVELS:
    raise ValueError(f"num_levels must be <= {MAX_NUM_LEVELS} (16-bit data; float32 cannot tell more "
                     f"levels in [-1, 1] apart), got {num_levels!r}.")
  return int(num_levels)


def validate_images(images: Any, num_levels: int) -> None:
  """Raises ValueError unless `images` is an integer array [N, H, W, C] of levels in {0..num_levels-1}.

  Args:
    images: the array to check.
    num_levels: K, the number of levels (>= 2).
  Raises:
    ValueError: naming the problem (num_levels, dtype, NaN/Inf, rank, empty, out-of-range values).
  """
  _check_num_levels(num_levels)
  images = np.asarray(images)
  if np.issubdtype(images.dtype, np.inexact):
    if not np.all(np.isfinite(images)):
      raise ValueError("images contain NaN or Inf; images must be integer levels in {0..K-1}.")
  if not np.issubdtype(images.dtype, np.integer):
    raise ValueError(
        f"images must have an integer dtype (K-level data stays integer), got dtype {images.dtype}.")
  if images.ndim != 4:
    raise ValueError(f"images must have rank 4 [N, H, W, C], got shape {images.shape}.")
  if images.size == 0:
    raise ValueError(f"images must not be empty, got shape {images.shape}.")
  lo, hi = int(images.min()), int(images.max())
  if lo < 0:
    raise ValueError(f"images have values < 0 (min {lo}); levels must lie in {{0..{num_levels - 1}}}.")
  if hi >= num_levels:
    raise ValueError(
        f"images have values >= num_levels={num_levels} (max {hi}); levels must lie in "
        f"{{0..{num_levels - 1}}}.")


def _level_dtype(num_levels: int) -> np.dtype:
  """uint8 when the levels fit, else int32."""
  return np.dtype(np.uint8) if num_levels <= 256 else np.dtype(np.int32)


@dataclasses.dataclass(eq=False)
class Dataset:
  """One split of K-level integer images, held in host memory.

  Attributes:
    images: integer levels in {0..K-1}, [N, H, W, C], uint8 (K <= 256) or int32.
    labels: int32 [N]; zeros when the data has no labels.
    num_levels: K.
    name: the source name (e.g. "digits", "mnist", "gaussian_mixture").
    num_labels: number of classes; 0 if the data has no labels.
    true_bpd: for data of known density, its exact discrete entropy -E log2 P(k) / D in bits/dim: the
      negative log-likelihood a perfect model reaches, directly comparable with a discrete bound (VDM) and
      with a dequantised continuous bound (CDM, ODE) converted by `likelihood.nats_to_bpd`. None otherwise.
    true_bpd_stderr: Monte-Carlo standard error of true_bpd (0.0 when exact); None when true_bpd is None.
    metadata: what the source records about where the examples came from (`photos`: the photos, the
      patch stride, the counts, each patch's photo and position; `gaussian_mixture`: its means, stds and
      weights); empty for the other sources.
  """
  images: np.ndarray = dataclasses.field(repr=False)
  labels: np.ndarray = dataclasses.field(repr=False)
  num_levels: int
  name: str
  num_labels: int = 0
  true_bpd: float | None = None
  true_bpd_stderr: float | None = None
  metadata: dict = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    validate_images(self.images, self.num_levels)
    self.labels = np.asarray(self.labels)
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
          f"labels must have shape [N] = ({self.images.shape[0]},), got {self.labels.shape}.")
    if not np.issubdtype(self.labels.dtype, np.integer):
      raise ValueError(f"labels must have an integer dtype, got {self.labels.dtype}.")
    self.labels = self.labels.astype(np.int32, copy=False)
    if self.num_labels < 0:
      raise ValueError(f"num_labels must be >= 0, got {self.num_labels}.")
    if self.num_labels and self.labels.size:
      # A conditional model indexes its label embedding with these: a label outside {0..num_labels-1}
      # (the value num_labels is the null label of guidance) is a wrong class or a NaN, never an error.
      lo, hi = int(self.labels.min()), int(self.labels.max())
      if lo < 0 or hi >= self.num_labels:
        raise ValueError(
            f"labels of {self.name!r} must lie in {{0..num_labels-1}} = {{0..{self.num_labels - 1}}}, "
            f"got values in [{lo}, {hi}].")

  @property
  def shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one example."""
    return tuple(self.images.shape[1:])

  @property
  def num_dims(self) -> int:
    """D = H * W * C."""
    return int(np.prod(self.shape))

  def __len__(self) -> int:
    return self.images.shape[0]


# --------------------------------------------------------------------------------------------------------
# Deterministic random streams.
#
# numpy's legacy RandomState seeded with an array of uint32 words is frozen by NEP 19: the same words give
# the same permutation on every numpy version, so the digits split and the data order of a resumed run do
# not depend on the installed numpy.

_TAG_PERMUTATION, _TAG_FLIP, _TAG_SAMPLES, _TAG_ENTROPY, _TAG_MIXTURE = 1, 2, 3, 4, 5
_SPLIT_CODES = {"train": 0, "test": 1}


def _check_nonneg_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
  return int(value)


def _random_state(tag: int, *values: int) -> np.random.RandomState:
  """A RandomState keyed by non-negative integers (each split into 32-bit words, up to 64 bits)."""
  words = [tag]
  for v in values:
    if v >= 2**64:
      raise ValueError(f"seed and step must be < 2**64, got {v}.")
    words += [v & 0xFFFFFFFF, v >> 32]
  return np.random.RandomState(np.asarray(words, dtype=np.uint32))


# --------------------------------------------------------------------------------------------------------
# Training batches: a pure function of (seed, step).


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  # Cached: consecutive steps share the epoch's permutation (computing it is O(N) per call).
  perm = _random_state(_TAG_PERMUTATION, seed, epoch).permutation(num_examples).astype(np.int64)
  perm.setflags(write=False)
  return perm


def train_batch_indices(num_examples: int, global_batch_size: int, *, seed: int, step: int) -> np.ndarray:
  """Example indices of the global training batch at `step`: a pure function of (seed, step).

  Epoch e = step // (N // B) uses its own permutation, drawn from (seed, e); batch j of the epoch is
  perm[j B : (j + 1) B]. The last N mod B examples of each permutation are dropped, so within an epoch no
  example repeats, and when B divides N every example is seen exactly once per epoch.

  Args:
    num_examples: N, the size of the training split.
    global_batch_size: B, the batch summed over all processes; 1 <= B <= N.
    seed: non-negative integer.
    step: non-negative integer, the optimisation step.
  Returns:
    int64 array [B] of indices in {0..N-1}.
  """
  num_examples = _check_nonneg_int(num_examples, "num_examples")
  global_batch_size = _check_nonneg_int(global_batch_size, "global_batch_size")
  seed = _check_nonneg_int(seed, "seed")
  step = _check_nonneg_int(step, "step")
  if global_batch_size < 1 or global_batch_size > num_examples:
    raise ValueError(
        f"global_batch_size must be in [1, num_examples={num_examples}], got {global_batch_size}.")
  batches_per_epoch = num_examples // global_batch_size
  epoch, j = divmod(step, batches_per_epoch)
  perm = _epoch_permutation(num_examples, seed, epoch)
  return perm[j * global_batch_size:(j + 1) * global_batch_size].copy()


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The contiguous slice of a global batch that process `process_index` of `process_count` reads.

  Process p reads rows [p B / P, (p + 1) B / P); the slices of all processes partition the batch in order,
  matching `jax.make_array_from_process_local_data` with the batch axis sharded over processes.
  """
  global_batch_size = _check_nonneg_int(global_batch_size, "global_batch_size")
  process_count = _check_nonneg_int(process_count, "process_count")
  process_index = _check_nonneg_int(process_index, "process_index")
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}.")
  if process_index >= process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}.")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_batch(ds: Dataset, global_batch_size: int, *, seed: int, step: int, process_index: int = 0,
                process_count: int = 1, random_flip: bool = False) -> dict[str, np.ndarray]:
  """This process's share of the global training batch at `step`.

  The global batch, and the flips, are pure functions of (seed, step), drawn for the whole global batch
  before slicing: the same (seed, step) gives the same global batch on any number of processes.

  Args:
    ds: the training split.
    global_batch_size: B, summed over processes; divisible by process_count.
    seed: non-negative integer.
    step: non-negative integer.
    process_index: this process (jax.process_index()).
    process_count: the number of processes (jax.process_count()).
    random_flip: flip each image horizontally with probability 1/2.
  Returns:
    dict(image=integer levels [B / P, H, W, C] (ds.images.dtype), label=int32 [B / P]).
  """
  idx = train_batch_indices(len(ds), global_batch_size, seed=seed, step=step)
  sl = process_slice(global_batch_size, process_index, process_count)
  local = idx[sl]
  images = ds.images[local]
  if random_flip:
    flip = _random_state(_TAG_FLIP, seed, step).random_sample(global_batch_size)[sl] < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
  return dict(image=images, label=ds.labels[local])


# --------------------------------------------------------------------------------------------------------
# Evaluation batches: every example exactly once, fixed shapes, masked padding.


def eval_batches(ds: Dataset, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Iterates over this process's share of every example of `ds`, exactly once, in index order.

  Global batch b holds examples [b B, (b + 1) B); each process reads its `process_slice` of it. Rows past
  the end are padding (image and label 0, mask 0), so every batch of every process has the same shape (no
  recompilation) and all processes yield the same number, ceil(N / B), of batches. A masked mean
  sum(mask * value) / sum(mask) over all batches is the exact mean over the split.

  Args:
    ds: the split to evaluate.
    batch_size: B, the global batch size, summed over processes; divisible by process_count.
    process_index: this process.
    process_count: the number of processes.
  Returns:
    an iterator of dict(image=[B / P, H, W, C] levels, label=int32 [B / P], mask=float32 [B / P] in {0, 1}).
  """
  sl = process_slice(batch_size, process_index, process_count)  # Validates eagerly, not on first next().
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  n = len(ds)
  num_batches = -(-n // batch_size)

  def generate():
    for b in range(num_batches):
      idx = np.arange(b * batch_size, (b + 1) * batch_size)[sl]
      valid = idx < n
      safe = np.where(valid, idx, 0)
      images = ds.images[safe]
      images[~valid] = 0
      labels = np.where(valid, ds.labels[safe], 0).astype(np.int32)
      yield dict(image=images, label=labels, mask=valid.astype(np.float32))

  return generate()


# --------------------------------------------------------------------------------------------------------
# Exact probabilities of quantised Gaussian mixtures.


def _bin_edges(k: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
  """Lower and upper edges of level k's bin, float64; the edge bins extend to -inf and +inf.

  Bin k is [-1 + 2k/K, -1 + 2(k+1)/K) (centre `likelihood.encode(k)`, width 2/K); values outside [-1, 1] are
  clipped into the edge bins, so the edge bins integrate the density out to -inf / +inf.
  """
  k = np.asarray(k, np.float64)
  lower = np.where(k <= 0, -np.inf, -1.0 + 2.0 * k / num_levels)
  upper = np.where(k >= num_levels - 1, np.inf, -1.0 + 2.0 * (k + 1.0) / num_levels)
  return lower, upper


def _quantize(x: np.ndarray, num_levels: int) -> np.ndarray:
  """Continuous x -> level, clipping into the edge bins.

  The same rule as `likelihood.decode`, floor((x + 1) K / 2) clipped to {0..K-1}, but in float64 numpy so
  that the bin of every sample agrees with the float64 edges of `_bin_edges`.
  """
  k = np.floor((np.asarray(x, np.float64) + 1.0) * num_levels / 2.0)
  return np.clip(k, 0, num_levels - 1).astype(_level_dtype(num_levels))


def _log_ndtr_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """log(Phi(b) - Phi(a)) for a < b, stable in both tails.

  Phi(b) - Phi(a) = Phi(-a) - Phi(-b): reflecting bins with a > 0 keeps both arguments in the lower tail,
  where log_ndtr is accurate, and then log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - exp(log Phi(lo) -
  log Phi(hi))) avoids subtracting two probabilities close to 1.
  """
  flip = a > 0
  lo = np.where(flip, -b, a)
  hi = np.where(flip, -a, b)
  log_hi = special.log_ndtr(hi)
  d = special.log_ndtr(lo) - log_hi  # <= 0; -inf when lo = -inf.
  with np.errstate(divide="ignore", invalid="ignore"):
    # log1mexp(d): log(-expm1(d)) near 0, log1p(-exp(d)) further out (Maechler 2012).
    log1mexp = np.where(d > -math.log(2.0), np.log(-np.expm1(d)),
                        np.log1p(-np.exp(d)))
  return log_hi + log1mexp


def _check_mixture(means: Any, stds: Any, weights: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Means [M, D], stds [M, D] (> 0) and normalised weights [M], all float64."""
  means = np.asarray(means, np.float64)
  if means.ndim < 2:
    raise ValueError(f"means must have shape [M, D] or [M, H, W, C], got {means.shape}.")
  m = means.shape[0]
  means = means.reshape(m, -1)
  stds = np.asarray(stds, np.float64)
  if stds.ndim > 1:
    stds = stds.reshape(stds.shape[0], -1)
  try:
    stds = np.broadcast_to(stds, means.shape)
  except ValueError:
    raise ValueError(f"stds must broadcast to the means' shape {means.shape}, got {stds.shape}.") from None
  if not np.all(np.isfinite(means)):
    raise ValueError("means must be finite.")
  if not np.all((stds > 0) & np.isfinite(stds)):
    raise ValueError("stds must be positive and finite.")
  weights = np.ones(m) if weights is None else np.asarray(weights, np.float64)
  if weights.shape != (m,) or not np.all((weights > 0) & np.isfinite(weights)):
    raise ValueError(f"weights must be {m} positive numbers (one per component), got {weights!r}.")
  return means, stds, weights / weights.sum()


def gaussian_mixture_log_prob(k: Any, *, means: Any, stds: Any, weights: Any = None, num_levels: int,
                              chunk_size: int = 8192) -> np.ndarray:
  """Exact log-probability (nats) of quantised levels under a clipped mixture of diagonal Gaussians.

      P(k) = sum_m w_m prod_i [Phi((b+_i - mu_mi) / s_mi) - Phi((b-_i - mu_mi) / s_mi)],

  with b-_i, b+_i the edges of bin k_i (edge bins reach -inf / +inf: data outside [-1, 1] is clipped into
  them). Computed in log space: log_ndtr differences, then a logsumexp over components.

  Args:
    k: integer levels [N, D] or [N, H, W, C].
    means: [M, D] or [M, H, W, C], in the data's [-1, 1] units.
    stds: positive, broadcastable to the means (per component and dimension).
    weights: [M] positive (normalised here); None for equal weights.
    num_levels: K.
    chunk_size: rows per block (memory is O(chunk_size M D)).
  Returns:
    float64 [N], log P(k) in nats.
  """
  means, stds, weights = _check_mixture(means, stds, weights)
  k = np.asarray(k)
  k = k.reshape(k.shape[0], -1)
  if k.shape[1] != means.shape[1]:
    raise ValueError(f"k has {k.shape[1]} dimensions per example but the means have {means.shape[1]}.")
  log_w = np.log(weights)
  out = np.empty(k.shape[0], np.float64)
  for start in range(0, k.shape[0], chunk_size):
    lower, upper = _bin_edges(k[start:start + chunk_size], num_levels)  # [n, D]
    a = (lower[:, None, :] - means) / stds  # [n, M, D]
    b = (upper[:, None, :] - means) / stds
    per_component = _log_ndtr_diff(a, b).sum(-1) + log_w  # [n, M]
    out[start:start + chunk_size] = special.logsumexp(per_component, axis=-1)
  return out


def _sample_mixture(rng: np.random.RandomState, n: int, means: np.ndarray, stds: np.ndarray,
                    weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """n continuous samples [n, D] of the mixture and their component indices [n]."""
  comp = rng.choice(len(weights), size=n, p=weights)
  x = means[comp] + stds[comp] * rng.standard_normal((n, means.shape[1]))
  return x, comp


def gaussian_mixture_entropy_bpd(*, means: Any, stds: Any, weights: Any = None, num_levels: int,
                                 num_samples: int = 100_000, seed: int = 0) -> tuple[float, float]:
  """Discrete entropy H = -E log2 P(k) / D (bits/dim) of a quantised, clipped Gaussian mixture.

  A mixture's P(k) does not factorise over dimensions, so H is a Monte-Carlo mean over num_samples draws
  k ~ P of the exact -log2 P(k) (`gaussian_mixture_log_prob`). For K -> infinity, H -> h + log2(K / 2),
  with h the differential entropy (bits/dim) of the density on [-1, 1]^D (docs/math.md section 4).

  Returns:
    (H in bits/dim, its Monte-Carlo standard error).
  """
  means, stds, weights = _check_mixture(means, stds, weights)
  num_samples = _check_nonneg_int(num_samples, "num_samples")
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2, got {num_samples}.")
  rng = _random_state(_TAG_ENTROPY, _check_nonneg_int(seed, "seed"))
  x, _ = _sample_mixture(rng, num_samples, means, stds, weights)
  k = _quantize(x, num_levels)
  nats = -gaussian_mixture_log_prob(k, means=means, stds=stds, weights=weights, num_levels=num_levels)
  # The one nats -> bits/dim conversion; num_levels=None: -log P(k) is already a discrete NLL (no offset).
  # (float32 there: its rounding, ~1e-7 bits/dim, is far below the Monte-Carlo error.)
  bits = np.asarray(likelihood.nats_to_bpd(nats, means.shape[1]), np.float64)
  return float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(num_samples))


# --------------------------------------------------------------------------------------------------------
# Loaders. Each takes (name, *, split, seed, ...) and returns a Dataset.

# The digits split: a RandomState(0) permutation of the 1797 images (frozen across numpy versions by NEP
# 19); its last 300 are the test split, the first 1497 the training split. Independent of `seed`.
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TEST = 300


def _check_split(split: str, name: str) -> int:
  if split not in _SPLIT_CODES:
    raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)} for {name!r}, got {split!r}.")
  return _SPLIT_CODES[split]


def _load_digits(name: str, *, split: str, seed: int) -> Dataset:
  """scikit-learn's bundled 8x8 digits: 1797 images of 17 levels (0..16), 10 classes; fixed split."""
  del seed  # The split is fixed in the code, not by the run's seed.
  _check_split(split, name)
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # float64 0..16 -> [1797, 8, 8, 1] integers.
  perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
  idx = perm[:-DIGITS_NUM_TEST] if split == "train" else perm[-DIGITS_NUM_TEST:]
  return Dataset(images=images[idx], labels=digits.target[idx].astype(np.int32), num_levels=17,
                 name=name, num_labels=10)


def _load_tfds(name: str, *, split: str, seed: int, data_dir: str | None = None,
               download: bool = False) -> Dataset:
  """A TFDS dataset through `tfds.data_source` (array_record random access; TensorFlow not needed).

  Records are read in index order and materialised as one numpy array (3.9 GB of uint8 for the 1.28M
  images of downsampled_imagenet/32x32; 47 MB for MNIST). Datasets without a 'label' feature get zero
  labels and num_labels = 0. Nothing is downloaded unless download=True.
  """
  del seed  # TFDS splits are fixed by TFDS.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_tfds_not_prepared(name, split=split, data_dir=data_dir, download=download, error=e)
    raise
  features = source.dataset_info.features
  has_label = "label" in features
  num_labels = int(features["label"].num_classes) if has_label else 0
  n = len(source)
  if n == 0:
    raise ValueError(f"TFDS split {name}:{split} is empty.")
  first = np.asarray(source[0]["image"])
  if first.ndim == 2:
    first = first[..., None]
  images = np.empty((n,) + first.shape, first.dtype)
  labels = np.zeros(n, np.int32)
  for i in range(n):
    record = source[i]
    image = np.asarray(record["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape != first.shape:
      raise ValueError(f"TFDS {name}:{split} record {i} has image shape {image.shape}, but record 0 has "
                       f"{first.shape}; vdiff needs images of one shape.")
    images[i] = image
    if has_label:
      labels[i] = record["label"]
  return Dataset(images=images, labels=labels, num_levels=256, name=name, num_labels=num_labels)


def _raise_if_tfds_not_prepared(name: str, *, split: str, data_dir: str | None, download: bool,
                                error: Exception) -> None:
  """After tfds.data_source failed: a ValueError naming data.data_dir or eval.split when the dataset is
  not prepared there (tfds lists every dataset it knows, or reports a format) or lacks the split."""
  if download:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
  base, _, version = name.partition(":")
  infos = sorted(glob.glob(os.path.join(root, base, version or "*", "dataset_info.json")))
  how = (f"prepare it offline from arrays with `python -m experiments.make_tfds --npz=FILE --name={base} "
         f"--data_dir={root}` (vdiff.data.write_tfds), or download it with tfds.data_source(..., "
         "download=True)")
  if not infos:
    raise ValueError(f"TFDS dataset {name!r} is not prepared in data.data_dir={root!r} (no "
                     f"{os.path.join(root, base, '<version>', 'dataset_info.json')}); {how}.") from error
  with open(infos[-1]) as f:
    info = json.load(f)
  file_format = info.get("fileFormat", "tfrecord")
  if file_format not in ("array_record", "parquet"):
    raise ValueError(f"TFDS dataset {name!r} in data.data_dir={root!r} is stored as {file_format}, which "
                     f"tfds.data_source cannot read without TensorFlow; {how}.") from error
  splits = [sp["name"] for sp in info.get("splits", [])]
  # A split string may select a part ("train[:10%]") or join splits ("train+test").
  wanted = [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]
  missing = [w for w in wanted if w not in splits]
  if missing:
    raise ValueError(f"TFDS dataset {name!r} in data.data_dir={root!r} has no split {missing[0]!r} "
                     f"(split={split!r}; eval.split names the evaluation split); it has {splits}.") from error


def write_tfds(name: str, images: dict[str, Any], *, data_dir: str, labels: dict[str, Any] | None = None,
               num_labels: int | None = None, version: str = "1.0.0") -> str:
  """Writes arrays as a TFDS dataset in array_record format, without TensorFlow.

  The result is read by `tfds.data_source(name, split=..., data_dir=data_dir)` and so by vdiff's
  `--config.data.name=NAME --config.data.data_dir=DATA_DIR`. Features: "image", a uint8 tensor
  [H, W, C] stored raw (tfds's Image feature would need TensorFlow to encode PNG), and "label", a
  ClassLabel, when labels are given. Records keep the order of the arrays.

  Args:
    name: the dataset name, snake_case (lower-case letters, digits, "_", starting with a letter).
    images: split name -> uint8 images [N, H, W] or [N, H, W, C] (256 levels, as vdiff reads every TFDS
      dataset), one example shape across splits.
    data_dir: the TFDS data directory; the dataset goes to data_dir/name/version/.
    labels: split name -> integer labels [N] in [0, num_labels), for every split or none.
    num_labels: the number of classes (default: 1 + the largest label).
    version: the dataset version "X.Y.Z".
  Returns:
    the directory written, data_dir/name/version.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"name must be snake_case (e.g. 'my_data'), got {name!r}.")
  if not images:
    raise ValueError("images must map at least one split name to an array.")
  arrays = {}
  for split, x in images.items():
    x = np.asarray(x)
    x = x[..., None] if x.ndim == 3 else x
    if x.dtype != np.uint8:
      raise ValueError(f"images[{split!r}] must be uint8 (vdiff reads TFDS images as 256 levels), got "
                       f"{x.dtype}; for other numbers of levels use data.name='npz' (make_npz).")
    validate_images(x, 256)
    arrays[split] = x
  shapes = {split: x.shape[1:] for split, x in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"images must have one example shape [H, W, C] across splits, got {shapes}.")
  if labels is not None:
    if set(labels) != set(arrays):
      raise ValueError(f"labels must have the splits of images, {sorted(arrays)}, got {sorted(labels)}.")
    labels = {split: np.asarray(y) for split, y in labels.items()}
    for split, y in labels.items():
      if y.shape != (len(arrays[split]),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels[{split!r}] must be integers of shape [{len(arrays[split])}], got "
                         f"{y.dtype} {y.shape}.")
    if num_labels is None:
      num_labels = 1 + max(int(y.max()) for y in labels.values() if y.size)
    for split, y in labels.items():
      if y.size and (y.min() < 0 or y.max() >= num_labels):
        raise ValueError(f"labels[{split!r}] must lie in [0, num_labels={num_labels}), got "
                         f"[{y.min()}, {y.max()}].")
  shape = next(iter(shapes.values()))
  feature_dict = {"image": tfds.features.Tensor(shape=shape, dtype=np.uint8)}
  if labels is not None:
    feature_dict["label"] = tfds.features.ClassLabel(num_classes=int(num_labels))

  def generate(split):
    for i in range(len(arrays[split])):
      record = {"image": arrays[split][i]}
      if labels is not None:
        record["label"] = int(labels[split][i])
      yield i, record

  def body(ns):
    ns["VERSION"] = tfds.core.Version(version)
    # disable_shuffling: records in the order given (tfds otherwise orders them by a hash of their keys).
    ns["_info"] = lambda self: tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(feature_dict), disable_shuffling=True,
        description="Arrays written by vdiff.data.write_tfds.")
    ns["_split_generators"] = lambda self, dl_manager: {split: generate(split) for split in arrays}
    ns["_generate_examples"] = lambda self: generate(next(iter(arrays)))

  # A class made per call, kept out of tfds's registry (two calls may write the same name).
  class_name = "".join(part.capitalize() for part in name.split("_"))
  builder_cls = types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,),
                                {"skip_registration": True}, body)
  builder_cls.name = name
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


_NPZ_RESERVED = ("num_levels", "num_labels")


def make_npz(path: str, train: Any, test: Any, *, train_labels: Any = None, test_labels: Any = None,
             num_levels: int | None = None, num_labels: int | None = None) -> str:
  """Writes the user data format read by `load("npz", path=..., split=...)`.

  Keys: `train`, `test` (integer images [N, H, W] or [N, H, W, C]), optional `train_labels`, `test_labels`
  (integer [N]), `num_levels`, `num_labels` (scalars). `num_levels` is required unless the images are
  uint8 (then K = 256); the number of levels is never guessed from the values that happen to occur.

  Returns:
    path.
  """
  arrays = {"train": np.asarray(train), "test": np.asarray(test)}
  for split, labels in (("train", train_labels), ("test", test_labels)):
    if labels is not None:
      arrays[f"{split}_labels"] = np.asarray(labels)
  if num_levels is None and not all(arrays[k].dtype == np.uint8 for k in ("train", "test")):
    raise ValueError(
        f"num_levels is required for images of dtype {arrays['train'].dtype} / {arrays['test'].dtype}; "
        "only uint8 images imply K = 256.")
  shapes = {}
  for split in ("train", "test"):
    images = arrays[split]
    images = images[..., None] if images.ndim == 3 else images
    validate_images(images, num_levels if num_levels is not None else 256)
    shapes[split] = images.shape[1:]
  if shapes["train"] != shapes["test"]:
    raise ValueError(f"train and test images must have one example shape [H, W, C], got "
                     f"{shapes['train']} and {shapes['test']}.")
  if num_levels is not None:
    arrays["num_levels"] = np.asarray(num_levels, np.int64)
  if num_labels is not None:
    arrays["num_labels"] = np.asarray(num_labels, np.int64)
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)
  return path


def _npz_scalar(data: dict, key: str, path: str) -> int:
  """The integer scalar stored under `key` of the .npz at `path`."""
  value = data[key]
  if value.shape != () or not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"key {key!r} of {path} must be an integer scalar, got dtype {value.dtype} and "
                     f"shape {value.shape}.")
  return int(value)


def _load_npz(name: str, *, split: str, seed: int, path: str | None = None) -> Dataset:
  """The user's own .npz (see `make_npz`).

  K is the file's `num_levels`; without it, K = 256 when every image array is uint8 (8-bit data) and any
  other dtype is refused (K = max + 1 would depend on which levels happen to occur in the file, and
  log2 K enters every bits/dim). Every image array must have the same example shape [H, W, C] (bits/dim
  divides by D = H W C, so a test split of another shape would be measured with the wrong D).
  num_labels is the file's `num_labels` if present, else max + 1 over the label arrays, or 0 with no
  labels; every label must lie in {0..num_labels-1}. Rank-3 images [N, H, W] get a channel axis.
  """
  del seed
  if path is None:
    raise ValueError("load('npz', ...) needs path=<file.npz>.")
  if not os.path.isfile(path):
    raise ValueError(f"data.path={path!r} does not exist" + (" (it is a directory)" if os.path.isdir(path)
                                                             else "") + "; write one with make_npz.")
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {key: f[key] for key in f.files}  # reads (and CRC-checks) every array now
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f"data.path={path!r} cannot be read as an .npz ({type(e).__name__}: "
                     f"{' '.join(str(e).split())}); is it truncated or damaged?") from None
  if not isinstance(data, dict):
    raise ValueError(f"data.path={path!r} is a single .npy array, not an .npz of named splits.")
  image_keys = [k for k in data if k not in _NPZ_RESERVED and not k.endswith("_labels")]
  if split not in image_keys:
    raise ValueError(f"split {split!r} is not in {path}; it has image arrays {sorted(image_keys)}.")
  example_shapes = {k: data[k].shape[1:] + ((1,) if data[k].ndim == 3 else ()) for k in image_keys}
  for k in image_keys:
    if example_shapes[k] != example_shapes[split]:
      raise ValueError(
          f"the image arrays of {path} differ in shape: {split!r} has examples of shape "
          f"{example_shapes[split]} but {k!r} has {example_shapes[k]}; every split must have one "
          "shape [H, W, C] (bits/dim divides by D = H * W * C).")
  images = data[split]
  if images.ndim == 3:
    images = images[..., None]
  if "num_levels" in data:
    num_levels = _npz_scalar(data, "num_levels", path)
    try:
      _check_num_levels(num_levels)
    except ValueError as e:
      raise ValueError(f"key 'num_levels' of {path}: {e}") from None
  elif all(data[k].dtype == np.uint8 for k in image_keys):
    num_levels = 256
  else:
    dtypes = sorted({str(data[k].dtype) for k in image_keys})
    raise ValueError(
        f"{path} has no 'num_levels' and its images are {'/'.join(dtypes)}, not uint8: set the number "
        "of levels K explicitly (key 'num_levels', e.g. make_npz(..., num_levels=K)); only uint8 "
        "images imply K = 256.")
  validate_images(images, num_levels)
  label_keys = [k for k in data if k.endswith("_labels") and k not in _NPZ_RESERVED]
  labels = data.get(f"{split}_labels", np.zeros(len(images), np.int32))
  for k in label_keys:
    y, images_of = data[k], data.get(k[:-len("_labels")])
    if y.ndim != 1 or (images_of is not None and y.shape[0] != images_of.shape[0]):
      raise ValueError(f"key {k!r} of {path} must be labels of shape [N] matching its images, got shape "
                       f"{y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"key {k!r} of {path} must hold integer labels, got dtype {y.dtype}.")
    if y.size and int(np.min(y)) < 0:
      raise ValueError(f"key {k!r} of {path} has negative labels, in [{int(np.min(y))}, "
                       f"{int(np.max(y))}]; labels are classes 0..num_labels-1.")
  if "num_labels" in data:
    num_labels = _npz_scalar(data, "num_labels", path)
    if num_labels < 0:
      raise ValueError(f"key 'num_labels' of {path} must be >= 0, got {num_labels}.")
  else:
    num_labels = max((int(np.max(data[k])) + 1 for k in label_keys if data[k].size), default=0)
  if f"{split}_labels" in data and num_labels and labels.size and np.issubdtype(labels.dtype, np.integer):
    lo, hi = int(np.min(labels)), int(np.max(labels))
    if lo < 0 or hi >= num_labels:
      raise ValueError(
          f"key '{split}_labels' of {path} has labels in [{lo}, {hi}], outside {{0..num_labels-1}} = "
          f"{{0..{num_labels - 1}}} (num_labels = {num_labels}, "
          f"{'its key' if 'num_labels' in data else 'max + 1 of the label arrays'} 'num_labels').")
  return Dataset(images=images.astype(_level_dtype(num_levels), copy=False), labels=labels,
                 num_levels=num_levels, name=name, num_labels=num_labels)


_SYNTHETIC_SIZES = {"train": 10_000, "test": 2_000}


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be (H, W, C) of positive integers, got {shape}.")
  return shape


def _load_gaussian_mixture(name: str, *, split: str, seed: int, num_levels: int = 256,
                           shape: Sequence[int] = (4, 4, 1), num_components: int = 4, means: Any = None,
                           stds: Any = None, weights: Any = None, mixture_seed: int = 0,
                           num_examples: int | None = None, entropy_samples: int = 100_000) -> Dataset:
  """K-level quantised samples of a clipped mixture of diagonal Gaussians, with its true bits/dim.

  The distribution is fixed by means / stds / weights, or when they are None by defaults drawn from
  RandomState(mixture_seed): means ~ U[-0.5, 0.5]^D, stds ~ U[0.1, 0.3]^D per component, equal weights.
  `seed` and `split` only pick the samples (train and test are independent draws of the same
  distribution). Labels are the component each sample came from (num_labels = M). true_bpd is the
  Monte-Carlo discrete entropy of `gaussian_mixture_entropy_bpd` (entropy_samples draws, keyed by `seed`),
  with its standard error.
  """
  split_code = _check_split(split, name)
  shape = _check_shape(shape)
  num_levels = _check_num_levels(num_levels)
  d = int(np.prod(shape))
  if means is None or stds is None:
    num_components = _check_nonneg_int(num_components, "num_components")
    if num_components < 1:
      raise ValueError(f"num_components must be >= 1, got {num_components}.")
    rng = _random_state(_TAG_MIXTURE, _check_nonneg_int(mixture_seed, "mixture_seed"))
    default_means = rng.uniform(-0.5, 0.5, (num_components, d))
    default_stds = rng.uniform(0.1, 0.3, (num_components, d))
    means = default_means if means is None else means
    stds = default_stds if stds is None else stds
  means, stds, weights = _check_mixture(means, stds, weights)
  if means.shape[1] != d:
    raise ValueError(f"means have {means.shape[1]} dimensions but shape={shape} has {d}.")
  n = _SYNTHETIC_SIZES[split] if num_examples is None else _check_nonneg_int(num_examples, "num_examples")
  rng = _random_state(_TAG_SAMPLES, _check_nonneg_int(seed, "seed"), split_code)
  x, comp = _sample_mixture(rng, n, means, stds, weights)
  bpd, stderr = gaussian_mixture_entropy_bpd(means=means, stds=stds, weights=weights,
                                             num_levels=num_levels, num_samples=entropy_samples, seed=seed)
  return Dataset(images=_quantize(x, num_levels).reshape((n,) + shape), labels=comp.astype(np.int32),
                 num_levels=num_levels, name=name, num_labels=len(weights), true_bpd=bpd,
                 true_bpd_stderr=stderr,
                 # The distribution itself ([M, D] float64 arrays and [M]), for exact computations such
                 # as `gaussian_mixture_log_prob` or the exact denoiser (experiments/diagnose_ode.py).
                 metadata={"means": means, "stds": stds, "weights": weights})


def _load_uniform(name: str, *, split: str, seed: int, num_levels: int = 256,
                  shape: Sequence[int] = (4, 4, 1), num_active_levels: int | None = None,
                  first_level: int | None = None, num_examples: int | None = None) -> Dataset:
  """IID uniform levels on {first_level .. first_level + g - 1}: exactly log2(g) bits/dim.

  g = num_active_levels (default K, entropy log2 K); first_level defaults to (K - g) // 2 (centred).
  """
  split_code = _check_split(split, name)
  shape = _check_shape(shape)
  num_levels = _check_num_levels(num_levels)
  g = num_levels if num_active_levels is None else num_active_levels
  if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 1 <= g <= num_levels:
    raise ValueError(f"num_active_levels must be in [1, num_levels={num_levels}], got {g!r}.")
  first = (num_levels - g) // 2 if first_level is None else first_level
  if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or not 0 <= first <= num_levels - g:
    raise ValueError(
        f"first_level must be in [0, num_levels - num_active_levels = {num_levels - g}], got {first!r}.")
  n = _SYNTHETIC_SIZES[split] if num_examples is None else _check_nonneg_int(num_examples, "num_examples")
  rng = _random_state(_TAG_SAMPLES, _check_nonneg_int(seed, "seed"), split_code)
  images = (first + rng.randint(0, g, size=(n,) + shape)).astype(_level_dtype(num_levels))
  return Dataset(images=images, labels=np.zeros(n, np.int32), num_levels=num_levels, name=name,
                 num_labels=0, true_bpd=math.log2(g), true_bpd_stderr=0.0)


# The `photos` source: patches of the photographs bundled inside the scikit-image and scikit-learn wheels.
#
# (name, package, file): every RGB photograph shipped as a file inside the scikit-image wheel (skimage/data/)
# and the scikit-learn wheel (sklearn/datasets/images/, what `load_sample_images` reads). The files are read
# from the installed package's directory, never through skimage.data's fetchers: nothing is downloaded
# (skimage.data's other images, e.g. eagle, lily, cells3d, kidney, are fetched with pooch from the network).
# Left out: the grey photographs (camera, moon, brick, grass, gravel, coins, cell, page, text, clock, ...),
# so that every example has the same three channels, and the synthetic images (colour wheel, chessboard,
# logo, phantom).
PHOTOS = (
    ("astronaut", "skimage", "astronaut.png"),  # 512x512
    ("chelsea", "skimage", "chelsea.png"),  # 300x451, a cat
    ("coffee", "skimage", "coffee.png"),  # 400x600
    ("hubble_deep_field", "skimage", "hubble_deep_field.jpg"),  # 872x1000, mostly dark sky
    ("immunohistochemistry", "skimage", "ihc.png"),  # 512x512, stained tissue (a photomicrograph)
    ("motorcycle_left", "skimage", "motorcycle_left.png"),  # 500x741, left view of a stereo pair
    ("motorcycle_right", "skimage", "motorcycle_right.png"),  # 500x741, right view of the same scene
    ("retina", "skimage", "retina.jpg"),  # 1411x1411, a fundus photograph on a black background
    ("rocket", "skimage", "rocket.jpg"),  # 427x640
    ("china", "sklearn", "china.jpg"),  # 427x640
    ("flower", "sklearn", "flower.jpg"),  # 427x640
)
# The test photos; they never contribute a training patch. Four everyday scenes of different content (an
# animal, a still life, a building, a launch pad); the stereo pair motorcycle_left / motorcycle_right, two
# views of one scene, stays together in the training split.
PHOTOS_TEST = ("chelsea", "coffee", "rocket", "china")
PHOTOS_PATCH_SIZE = 32
_PHOTO_DIRS = {"skimage": ("data",), "sklearn": ("datasets", "images")}
_PHOTO_DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
_TAG_PHOTO_ORDER = 6  # a stream tag distinct from the _TAG_* above


def photo_path(package: str, file: str) -> str:
  """The path of a photograph bundled inside an installed wheel; raises if the file is not there.

  Only the package's directory is consulted (importlib's find_spec does not even import the package), so
  a photograph that the installed version does not ship is an error, never a download.
  """
  if package not in _PHOTO_DIRS:
    raise ValueError(f"package must be one of {sorted(_PHOTO_DIRS)}, got {package!r}.")
  dist = _PHOTO_DISTRIBUTIONS[package]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"the 'photos' dataset reads the photographs bundled with {dist}; "
                      f"install it: pip install {dist}")
  path = os.path.join(list(spec.submodule_search_locations)[0], *_PHOTO_DIRS[package], file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is not in the installed {dist}; the 'photos' dataset needs the "
                            f"photographs bundled inside its wheel.")
  return path


@functools.lru_cache(maxsize=None)
def read_photo(name: str) -> np.ndarray:
  """One bundled photograph of `PHOTOS` as read-only uint8 [H, W, 3], decoded by Pillow (cached).

  The PNGs decode to the same pixels everywhere. The JPEGs (hubble_deep_field, retina, rocket, china,
  flower) are decoded by the libjpeg in Pillow's wheel (libjpeg-turbo, default integer IDCT); another
  JPEG decoder may round some pixels differently, so the dataset's metadata records each photo's sha256
  and the library versions, which makes such a change visible.
  """
  entries = {n: (package, file) for n, package, file in PHOTOS}
  if name not in entries:
    raise ValueError(f"photo must be one of {[n for n, _, _ in PHOTOS]}, got {name!r}.")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(photo_path(*entries[name])) as im:
    if im.mode != "RGB":
      raise ValueError(f"photo {name!r} decodes to mode {im.mode!r}; the 'photos' dataset expects RGB.")
    pixels = np.array(im, dtype=np.uint8)
  pixels.setflags(write=False)
  return pixels


def _patch_origins(height: int, width: int, patch_size: int, stride: int) -> np.ndarray:
  """Top-left corners (row, col) of every patch_size x patch_size patch on a stride grid, row-major: int32
  [n, 2]. Patches that would cross the bottom or right edge are left out."""
  rows = np.arange(0, height - patch_size + 1, stride)
  cols = np.arange(0, width - patch_size + 1, stride)
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def _check_positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def package_versions(dists) -> dict:
  """{distribution name: installed version, or None if it is not installed}, for provenance records."""
  versions = {}
  for dist in dists:
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  return versions


def _load_photos(name: str, *, split: str, seed: int, patch_size: int = PHOTOS_PATCH_SIZE,
                 patch_stride: int | None = None) -> Dataset:
  """RGB patches of the photographs bundled with scikit-image and scikit-learn, K = 256, split by photo.

  The 11 photographs of `PHOTOS` are cut into patch_size x patch_size x 3 patches on a grid: the
  training split from the 7 training photos with step `patch_stride` (default patch_size; a smaller
  stride gives overlapping patches), the test split from the 4 photos of `PHOTOS_TEST` with step
  patch_size always (the test patches tile their photos without overlap, each test pixel counted once,
  and do not depend on patch_stride). Patches crossing a photo's bottom or right edge are left out. No
  test photo contributes a training patch. Each split is put in a fixed pseudo-random order (independent
  of `seed`), so a prefix of the test split (eval.num_examples) is a sample of all four test photos.

  Sizes: 32x32 patches, stride 32: 4235 train / 862 test patches; stride 16: 16399 train / 862 test.

  Labels are zeros (num_labels = 0). `metadata` holds: patch_size, patch_stride (this split's),
  train_patch_stride, test_patch_stride, num_patches (this split's), num_train_patches, num_test_patches,
  train_photos and test_photos (names), photos (this split's photos: name, source file, shape,
  num_patches, sha256 of the decoded pixels), photo_index (int32 [N], index into photos) and
  patch_origin (int32 [N, 2], the patch's top-left (row, col) in its photo), and versions (of
  scikit-image, scikit-learn and Pillow, which decode the photos).

  Args:
    name: the source name ("photos").
    split: "train" or "test".
    seed: ignored; the split and the order are fixed.
    patch_size: side of the square patches, 1 <= patch_size <= 300 (the shortest side of a photo).
    patch_stride: step between the top-left corners of training patches, >= 1 (default patch_size).
  Returns:
    a Dataset of uint8 images [N, patch_size, patch_size, 3], num_levels 256.
  """
  del seed  # The split and the order are fixed in the code, not by the run's seed.
  split_code = _check_split(split, name)
  patch_size = _check_positive_int(patch_size, "patch_size")
  train_stride = patch_size if patch_stride is None else _check_positive_int(patch_stride, "patch_stride")
  strides = {"train": train_stride, "test": patch_size}
  photos = {n: read_photo(n) for n, _, _ in PHOTOS}
  shortest = min(min(p.shape[:2]) for p in photos.values())
  if patch_size > shortest:
    raise ValueError(f"patch_size must be <= {shortest} (the shortest side of a photo), got {patch_size}.")
  names = {"test": [n for n, _, _ in PHOTOS if n in PHOTOS_TEST]}
  names["train"] = [n for n, _, _ in PHOTOS if n not in PHOTOS_TEST]
  origins = {s: [_patch_origins(*photos[n].shape[:2], patch_size, strides[s]) for n in names[s]]
             for s in ("train", "test")}
  patches, photo_index, origin = [], [], []
  for i, (n, o) in enumerate(zip(names[split], origins[split])):
    patches += [photos[n][r:r + patch_size, c:c + patch_size] for r, c in o]
    photo_index.append(np.full(len(o), i, np.int32))
    origin.append(o)
  order = _random_state(_TAG_PHOTO_ORDER, split_code).permutation(len(patches))
  images = np.stack(patches)[order]
  files = {n: (package, file) for n, package, file in PHOTOS}
  versions = package_versions(("scikit-image", "scikit-learn", "pillow"))
  metadata = {
      "patch_size": patch_size,
      "patch_stride": strides[split],
      "train_patch_stride": strides["train"],
      "test_patch_stride": strides["test"],
      "num_patches": len(images),
      "num_train_patches": sum(len(o) for o in origins["train"]),
      "num_test_patches": sum(len(o) for o in origins["test"]),
      "train_photos": list(names["train"]),
      "test_photos": list(names["test"]),
      "photos": [{"name": n, "source": f"{_PHOTO_DISTRIBUTIONS[files[n][0]]}: {files[n][1]}",
                  "shape": list(photos[n].shape), "num_patches": len(o),
                  "sha256": hashlib.sha256(photos[n].tobytes()).hexdigest()}
                 for n, o in zip(names[split], origins[split])],
      "photo_index": np.concatenate(photo_index)[order],
      "patch_origin": np.concatenate(origin)[order],
      "versions": versions,
  }
  return Dataset(images=images, labels=np.zeros(len(images), np.int32), num_levels=256, name=name,
                 num_labels=0, metadata=metadata)


# Name -> loader. Names not listed here are tried as TFDS names.
LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist": _load_tfds,
    "cifar10": _load_tfds,
    "downsampled_imagenet/32x32": _load_tfds,
    "npz": _load_npz,
    "photos": _load_photos,
    "gaussian_mixture": _load_gaussian_mixture,
    "uniform": _load_uniform,
}


def load(name: str, *, split: str, data_dir: str | None = None, path: str | None = None, seed: int = 0,
         **kw: Any) -> Dataset:
  """Loads one split of a dataset by name through `LOADERS` (unknown names go to TFDS).

  Args:
    name: a key of LOADERS, or any TFDS name.
    split: "train" or "test" (TFDS names take any TFDS split string, e.g. "validation" or "train[:10%]").
    data_dir: TFDS data directory (TFDS datasets only).
    path: the .npz file (npz only).
    seed: picks the samples of synthetic data; real data splits are fixed and ignore it.
    **kw: loader-specific options, e.g. num_levels, shape, num_examples for synthetic data, download for
      TFDS.
  Returns:
    a validated Dataset.
  """
  loader = LOADERS.get(name, _load_tfds)
  kwargs = dict(kw)
  if data_dir is not None:
    kwargs["data_dir"] = data_dir
  if path is not None:
    kwargs["path"] = path
  params = inspect.signature(loader).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    allowed = sorted(p for p in params if p not in ("name", "split", "seed"))
    raise ValueError(f"load({name!r}) got unexpected argument(s) {unknown}; it accepts split, seed and "
                     f"{allowed}.")
  return loader(name, split=split, seed=seed, **kwargs)
