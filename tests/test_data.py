"""Tests of vdiff.data: sources, validation, deterministic batching, and synthetic data of known density."""

import importlib.util
import math
import sys

import numpy as np
import pytest
from scipy import stats

from vdiff import data
from vdiff import likelihood


def _toy(n, *, shape=(2, 3, 1), num_levels=4):
  """A dataset whose label is its index, to track which examples a batch holds."""
  images = (np.arange(n * int(np.prod(shape))) % num_levels).reshape((n,) + shape).astype(np.uint8)
  return data.Dataset(images=images, labels=np.arange(n), num_levels=num_levels, name="toy")


def _factorised_entropy_bpd(mean, std, num_levels):
  """Exact discrete entropy (bits/dim) of a clipped, quantised N(mean, diag(std^2)): a sum over the K bins
  of each dimension, independent of data.py (scipy.stats.norm.cdf, edges at -1 + 2k/K, edge bins open)."""
  edges = -1.0 + 2.0 * np.arange(num_levels + 1) / num_levels
  edges[0], edges[-1] = -np.inf, np.inf
  h = 0.0
  for m, s in zip(np.ravel(mean), np.ravel(std)):
    p = np.diff(stats.norm.cdf(edges, loc=m, scale=s))
    p = p[p > 0]
    h += -(p * np.log2(p)).sum()
  return h / np.size(mean)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_levels_and_split_sizes():
  train = data.load("digits", split="train")
  test = data.load("digits", split="test")
  assert train.images.shape == (1497, 8, 8, 1) and len(train) == 1497
  assert test.images.shape == (300, 8, 8, 1) and len(test) == 300
  for ds in (train, test):
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    assert ds.num_levels == 17 and ds.num_labels == 10
    assert ds.shape == (8, 8, 1) and ds.num_dims == 64
    assert ds.true_bpd is None
  # sklearn's digits use all 17 levels 0..16.
  assert train.images.min() == 0 and train.images.max() == 16


def test_digits_split_is_fixed_and_partitions_the_data():
  from sklearn import datasets as sk_datasets
  train = data.load("digits", split="train", seed=0)
  test = data.load("digits", split="test", seed=0)
  # The run's seed does not move the split.
  assert np.array_equal(data.load("digits", split="test", seed=123).images, test.images)
  # Reference numbers: the split is RandomState(0).permutation(1797) (frozen by NEP 19); these counts and
  # sums were recorded from it and pin the split down.
  assert np.bincount(test.labels, minlength=10).tolist() == [27, 25, 36, 28, 38, 25, 30, 31, 25, 35]
  assert int(test.images.sum()) == 93605 and int(train.images.sum()) == 468113
  # Train + test is the whole of sklearn's data, as a multiset of (label, image) rows.
  full = sk_datasets.load_digits()
  rows = lambda im, lab: sorted(bytes([l]) + i.tobytes() for i, l in zip(im.reshape(len(im), -1), lab))
  ours = rows(np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels]))
  assert ours == rows(full.images.astype(np.uint8), full.target)


# -------------------------------------------------------------------------------------------- batching


def test_train_batch_is_a_pure_function_of_seed_and_step():
  ds = _toy(20)
  a = data.train_batch(ds, 4, seed=3, step=7, random_flip=True)
  b = data.train_batch(ds, 4, seed=3, step=7, random_flip=True)
  for key in ("image", "label"):
    assert np.array_equal(a[key], b[key])
  # A fresh process (cache cleared) gives the same batch: nothing depends on what was called before.
  data._epoch_permutation.cache_clear()
  assert np.array_equal(data.train_batch(ds, 4, seed=3, step=7)["label"], a["label"])
  assert not np.array_equal(data.train_batch_indices(20, 4, seed=3, step=8),
                            data.train_batch_indices(20, 4, seed=3, step=7))
  assert not np.array_equal(data.train_batch_indices(20, 20, seed=4, step=0),
                            data.train_batch_indices(20, 20, seed=3, step=0))


@pytest.mark.parametrize("num_examples,batch_size", [(12, 4), (12, 12), (10, 4), (7, 3)])
def test_train_batches_cover_each_example_at_most_once_per_epoch(num_examples, batch_size):
  per_epoch = num_examples // batch_size
  epochs = []
  for epoch in range(3):
    idx = np.concatenate([data.train_batch_indices(num_examples, batch_size, seed=1, step=s)
                          for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)])
    assert len(np.unique(idx)) == len(idx) == per_epoch * batch_size  # No repeats within an epoch.
    if num_examples % batch_size == 0:
      assert np.array_equal(np.sort(idx), np.arange(num_examples))  # Every example exactly once.
    epochs.append(idx)
  assert not np.array_equal(epochs[0], epochs[1])  # Each epoch has its own order.


def test_process_slices_partition_the_global_batch():
  ds = _toy(24)
  for count in (2, 4):
    slices = [data.process_slice(8, p, count) for p in range(count)]
    assert np.array_equal(np.concatenate([np.arange(8)[s] for s in slices]), np.arange(8))
    whole = data.train_batch(ds, 8, seed=5, step=3, random_flip=True)
    parts = [data.train_batch(ds, 8, seed=5, step=3, process_index=p, process_count=count,
                              random_flip=True) for p in range(count)]
    assert all(len(p["label"]) == 8 // count for p in parts)
    for key in ("image", "label"):
      assert np.array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match="global_batch_size=6 must be divisible by process_count=4"):
    data.process_slice(6, 0, 4)
  with pytest.raises(ValueError, match="process_index must be in"):
    data.process_slice(8, 2, 2)
  with pytest.raises(ValueError, match="global_batch_size must be in"):
    data.train_batch_indices(5, 6, seed=0, step=0)
  with pytest.raises(ValueError, match="step must be a non-negative integer"):
    data.train_batch_indices(5, 2, seed=0, step=-1)


def test_random_flip_flips_some_images_horizontally_and_only_those():
  ds = _toy(64, shape=(2, 5, 1), num_levels=16)
  plain = data.train_batch(ds, 64, seed=2, step=0)
  flipped = data.train_batch(ds, 64, seed=2, step=0, random_flip=True)
  assert np.array_equal(plain["label"], flipped["label"])
  is_flipped = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
                for f, p in zip(flipped["image"], plain["image"])]
  is_same = [np.array_equal(f, p) for f, p in zip(flipped["image"], plain["image"])]
  assert all(a or b for a, b in zip(is_flipped, is_same))
  assert 10 < sum(is_flipped) < 54  # Binomial(64, 1/2): far outside 6 standard deviations otherwise.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once_with_masks(process_count):
  n, batch_size = 10, 4
  ds = _toy(n)
  per_process = [list(data.eval_batches(ds, batch_size, process_index=p, process_count=process_count))
                 for p in range(process_count)]
  local = batch_size // process_count
  seen = []
  for batches in per_process:
    assert len(batches) == 3  # ceil(10 / 4) on every process.
    for b in batches:
      assert b["image"].shape == (local, 2, 3, 1) and b["label"].shape == (local,)
      assert b["mask"].shape == (local,) and b["mask"].dtype == np.float32
      seen += b["label"][b["mask"] == 1].tolist()
      assert np.all(b["label"][b["mask"] == 0] == 0) and np.all(b["image"][b["mask"] == 0] == 0)
  assert sorted(seen) == list(range(n))
  masks = np.concatenate([b["mask"] for batches in per_process for b in batches])
  assert masks.sum() == n and len(masks) == 12
  # A masked mean over the padded batches is the exact mean over the split.
  values = np.concatenate([b["image"].reshape(local, -1).sum(-1) * b["mask"]
                           for batches in per_process for b in batches])
  assert values.sum() / masks.sum() == ds.images.reshape(n, -1).sum(-1).mean()


def test_eval_batches_validate_eagerly():
  with pytest.raises(ValueError, match="global_batch_size=5 must be divisible by process_count=2"):
    data.eval_batches(_toy(10), 5, process_count=2)


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("images,num_levels,message", [
    (np.zeros((2, 3, 3, 1), np.float32), 4, "integer dtype"),
    (np.full((2, 3, 3, 1), np.nan, np.float32), 4, "NaN or Inf"),
    (np.full((2, 3, 3, 1), np.inf), 4, "NaN or Inf"),
    (np.zeros((2, 3, 3), np.uint8), 4, r"rank 4 \[N, H, W, C\], got shape \(2, 3, 3\)"),
    (np.zeros((0, 3, 3, 1), np.uint8), 4, "must not be empty"),
    (np.full((2, 3, 3, 1), -1, np.int32), 4, r"values < 0 \(min -1\)"),
    (np.full((2, 3, 3, 1), 4, np.int32), 4, r"values >= num_levels=4 \(max 4\)"),
    (np.zeros((2, 3, 3, 1), np.uint8), 1, "num_levels must be an integer >= 2, got 1"),
    (np.zeros((2, 3, 3, 1), np.uint8), 4.0, "num_levels must be an integer >= 2, got 4.0"),
])
def test_validate_images_errors(images, num_levels, message):
  with pytest.raises(ValueError, match=message):
    data.validate_images(images, num_levels)


def test_validate_images_accepts_valid_data_and_dataset_validates():
  data.validate_images(np.full((2, 3, 3, 1), 3, np.int32), 4)
  with pytest.raises(ValueError, match="labels must have shape"):
    data.Dataset(images=np.zeros((2, 1, 1, 1), np.uint8), labels=np.zeros(3), num_levels=2, name="x")
  with pytest.raises(ValueError, match="values >= num_levels=2"):
    data.Dataset(images=np.full((2, 1, 1, 1), 2, np.uint8), labels=np.zeros(2, int), num_levels=2,
                 name="x")


def test_load_rejects_unknown_arguments_and_splits():
  with pytest.raises(ValueError, match=r"load\('digits'\) got unexpected argument\(s\) \['path'\]"):
    data.load("digits", split="train", path="x.npz")
  with pytest.raises(ValueError, match="split must be one of"):
    data.load("digits", split="validation")
  with pytest.raises(ValueError, match="needs path="):
    data.load("npz", split="train")
  assert {"digits", "mnist", "cifar10", "downsampled_imagenet/32x32", "npz", "gaussian_mixture",
          "uniform"} <= set(data.LOADERS)


# ---------------------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("name,shape,num_labels", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_data_source_without_tensorflow(name, shape, num_labels):
  tfds = pytest.importorskip("tensorflow_datasets")
  # The test environment has no TensorFlow (tfds.data_source reads array_record files without it); were it
  # installed, the check that it is never imported below would still hold.
  if importlib.util.find_spec("tensorflow") is None:
    with pytest.raises(ImportError):
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  assert "tensorflow" not in sys.modules
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load(name, split="train")
  assert "tensorflow" not in sys.modules  # Never imported.
  assert ds.images.shape == (6,) + shape and ds.images.dtype == np.uint8
  assert ds.num_levels == 256 and ds.num_labels == num_labels and ds.labels.dtype == np.int32
  assert np.all((0 <= ds.labels) & (ds.labels < num_labels))
  batch = data.train_batch(ds, 3, seed=0, step=1)
  assert batch["image"].shape == (3,) + shape


# ----------------------------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path):
  rng = np.random.RandomState(0)
  train = rng.randint(0, 256, (5, 4, 4, 3)).astype(np.uint8)
  test = rng.randint(0, 256, (3, 4, 4, 3)).astype(np.uint8)
  path = data.make_npz(str(tmp_path / "d.npz"), train, test, train_labels=[0, 1, 2, 1, 0],
                       test_labels=[2, 2, 0])
  tr = data.load("npz", split="train", path=path)
  te = data.load("npz", split="test", path=path)
  assert np.array_equal(tr.images, train) and np.array_equal(te.images, test)
  assert tr.labels.tolist() == [0, 1, 2, 1, 0] and te.labels.tolist() == [2, 2, 0]
  assert tr.num_levels == 256 and tr.num_labels == 3  # uint8 -> 256; labels max + 1.
  # Rank-3 int images without labels: a channel axis is added; K is the file's num_levels.
  path = data.make_npz(str(tmp_path / "e.npz"), np.array([[[0, 5]]]), np.array([[[9, 1]], [[2, 3]]]),
                       num_levels=12)
  te = data.load("npz", split="test", path=path)
  assert te.images.shape == (2, 1, 2, 1) and te.num_levels == 12 and te.num_labels == 0
  assert te.labels.tolist() == [0, 0]
  # An explicit num_levels wins and is checked.
  path = data.make_npz(str(tmp_path / "f.npz"), np.zeros((2, 2, 2), int), np.ones((1, 2, 2), np.int32),
                       num_levels=17)
  assert data.load("npz", split="train", path=path).num_levels == 17
  with pytest.raises(ValueError, match="integer dtype"):  # np.zeros is float64.
    data.make_npz(str(tmp_path / "g.npz"), np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), num_levels=4)
  with pytest.raises(ValueError, match="values >= num_levels=4"):
    data.make_npz(str(tmp_path / "h.npz"), np.full((2, 2, 2), 4), np.zeros((2, 2, 2), int), num_levels=4)
  with pytest.raises(ValueError, match="split 'valid' is not in"):
    data.load("npz", split="valid", path=path)


def test_npz_number_of_levels_is_never_guessed_from_the_values(tmp_path):
  # 8-bit data whose maximum happens to be 246: the old reader took K = max + 1 = 247 for int32 images,
  # which moves every bits/dim by the log2(256 / 247) of the dequantisation offset. K comes only from
  # uint8 (K = 256) or the file's num_levels; anything else is refused, naming the key to set.
  rng = np.random.RandomState(0)
  train = rng.randint(0, 247, (6, 4, 4, 1))
  test = rng.randint(0, 247, (3, 4, 4, 1))
  train[0, 0, 0, 0] = 246
  path = str(tmp_path / "int32.npz")
  np.savez(path, train=train.astype(np.int32), test=test.astype(np.int32))
  with pytest.raises(ValueError, match=r"no 'num_levels'.*int32.*key 'num_levels'"):
    data.load("npz", split="train", path=path)
  with pytest.raises(ValueError, match="num_levels is required"):
    data.make_npz(str(tmp_path / "x.npz"), train.astype(np.int32), test.astype(np.int32))
  np.savez(path, train=train.astype(np.uint8), test=test.astype(np.uint8))
  assert data.load("npz", split="test", path=path).num_levels == 256
  np.savez(path, train=train.astype(np.int32), test=test.astype(np.int32), num_levels=np.int64(1000))
  assert data.load("npz", split="test", path=path).num_levels == 1000
  # A num_levels past 16-bit data (or past int32, where the levels themselves overflow) names the key.
  for k in (2**40, 2**17):
    np.savez(path, train=train.astype(np.int32), test=test.astype(np.int32), num_levels=np.int64(k))
    with pytest.raises(ValueError, match=r"key 'num_levels' of .*num_levels must be <= 65536"):
      data.load("npz", split="train", path=path)
  np.savez(path, train=train.astype(np.int32), test=test.astype(np.int32), num_levels=np.float64(17.5))
  with pytest.raises(ValueError, match="key 'num_levels' .* must be an integer scalar"):
    data.load("npz", split="train", path=path)


def test_npz_splits_of_different_shapes_are_refused(tmp_path):
  # A 6x6 test split evaluated with the 8x8 training split's D = 64 gives a wrong bits/dim; the reader
  # refuses the file whichever split is asked for, naming both shapes.
  path = str(tmp_path / "mixed.npz")
  np.savez(path, train=np.zeros((4, 8, 8), np.uint8), test=np.zeros((2, 6, 6), np.uint8))
  for split in ("train", "test"):
    with pytest.raises(ValueError, match=r"differ in shape.*\(8, 8, 1\).*\(6, 6, 1\)|"
                                         r"differ in shape.*\(6, 6, 1\).*\(8, 8, 1\)"):
      data.load("npz", split=split, path=path)
  with pytest.raises(ValueError, match=r"one example shape.*\(8, 8, 1\) and \(6, 6, 1\)"):
    data.make_npz(str(tmp_path / "y.npz"), np.zeros((4, 8, 8), np.uint8), np.zeros((2, 6, 6), np.uint8))


def test_labels_outside_num_labels_are_refused(tmp_path):
  images = np.zeros((3, 2, 2, 1), np.uint8)
  for labels in ([0, 1, 10], [0, -1, 2]):
    with pytest.raises(ValueError, match=r"labels of 'toy' must lie in .* = \{0..9\}, got values in"):
      data.Dataset(images=images, labels=labels, num_levels=4, name="toy", num_labels=10)
  assert data.Dataset(images=images, labels=[0, 9, 3], num_levels=4, name="toy", num_labels=10)
  # The .npz reader names the key: labels past the file's num_labels, and negative labels.
  path = str(tmp_path / "labels.npz")
  np.savez(path, train=images, test=images, train_labels=np.array([0, 3, 1]),
           test_labels=np.array([0, 1, 2]), num_labels=np.int64(3))
  with pytest.raises(ValueError, match=r"key 'train_labels' of .* \[0, 3\], outside \{0..num_labels-1\}"):
    data.load("npz", split="train", path=path)
  assert data.load("npz", split="test", path=path).num_labels == 3
  np.savez(path, train=images, test=images, train_labels=np.array([0, -2, 1]),
           test_labels=np.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"key 'train_labels' .* \[-2, 1\]"):
    data.load("npz", split="train", path=path)


# ------------------------------------------------------------------------------- known-density data


@pytest.mark.parametrize("num_levels,active,first", [(256, None, None), (17, None, None), (16, 5, None),
                                                     (16, 3, 0), (2, 1, None)])
def test_uniform_entropy_is_exactly_log2_of_the_number_of_levels(num_levels, active, first):
  ds = data.load("uniform", split="train", num_levels=num_levels, num_active_levels=active,
                 first_level=first, num_examples=500)
  g = num_levels if active is None else active
  lo = (num_levels - g) // 2 if first is None else first
  assert ds.true_bpd == math.log2(g) and ds.true_bpd_stderr == 0.0
  assert ds.images.shape == (500, 4, 4, 1) and ds.num_levels == num_levels
  assert ds.images.min() == lo and ds.images.max() == lo + g - 1  # 8000 draws hit every level.
  # The plug-in entropy of the 8000 draws, with the Miller-Madow bias correction (g - 1) / (2 n ln 2),
  # matches log2(g).
  p = np.bincount(ds.images.ravel().astype(int)) / ds.images.size
  p = p[p > 0]
  plug_in = -(p * np.log2(p)).sum() + (g - 1) / (2 * ds.images.size * math.log(2))
  assert abs(plug_in - math.log2(g)) < 0.01
  with pytest.raises(ValueError, match="num_active_levels must be in"):
    data.load("uniform", split="train", num_levels=4, num_active_levels=5)


def test_synthetic_splits_are_independent_draws_and_seeded():
  a = data.load("uniform", split="train", seed=1, num_examples=50)
  assert np.array_equal(a.images, data.load("uniform", split="train", seed=1, num_examples=50).images)
  assert not np.array_equal(a.images, data.load("uniform", split="test", seed=1, num_examples=50).images)
  assert not np.array_equal(a.images, data.load("uniform", split="train", seed=2, num_examples=50).images)


def test_gaussian_mixture_probabilities_sum_to_one_with_clipping():
  # D = 2, K = 8: all 64 codes enumerated. Means near the edges put mass outside [-1, 1] into edge bins.
  means = np.array([[0.9, -0.95], [-0.2, 0.1], [0.0, 1.3]])
  stds = np.array([[0.3, 0.2], [0.05, 0.5], [0.4, 0.1]])
  k = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(-1, 2)
  logp = data.gaussian_mixture_log_prob(k, means=means, stds=stds, weights=[1, 2, 3], num_levels=8)
  assert abs(np.exp(logp).sum() - 1.0) < 1e-12


def test_gaussian_log_prob_matches_per_dimension_product():
  mean, std, num_levels = np.array([0.3, -0.8, 0.97]), np.array([0.2, 0.1, 0.05]), 64
  k = np.array([[0, 0, 63], [40, 6, 62], [41, 1, 50]])
  edges = -1.0 + 2.0 * np.arange(num_levels + 1) / num_levels
  edges[0], edges[-1] = -np.inf, np.inf
  expected = np.sum(np.log(stats.norm.cdf(edges[k + 1], mean, std) - stats.norm.cdf(edges[k], mean, std)),
                    -1)
  logp = data.gaussian_mixture_log_prob(k, means=mean[None], stds=std[None], num_levels=num_levels)
  # Row 2 has a tail bin (k=50, 7.5 std below the mean 0.97), where the log-space form keeps its accuracy.
  np.testing.assert_allclose(logp, expected, rtol=1e-9)


@pytest.mark.parametrize("num_levels", [4, 32, 256])
def test_gaussian_entropy_monte_carlo_matches_exact_summation(num_levels):
  # One component with diagonal covariance: P(k) factorises, so the entropy is an exact finite sum.
  # Means near +-1 put visible mass into the clipped edge bins.
  rng = np.random.RandomState(7)
  mean = rng.uniform(-1.0, 1.0, (1, 4, 4, 1))
  std = rng.uniform(0.05, 0.5, (1, 4, 4, 1))
  ds = data.load("gaussian_mixture", split="test", num_levels=num_levels, means=mean, stds=std,
                 num_examples=10, entropy_samples=40_000)
  exact = _factorised_entropy_bpd(mean, std, num_levels)
  assert ds.true_bpd_stderr > 0
  assert abs(ds.true_bpd - exact) < 4 * ds.true_bpd_stderr, (ds.true_bpd, exact, ds.true_bpd_stderr)


def test_discrete_entropy_approaches_differential_entropy_as_levels_grow():
  # H_K = -E log2 P(k) / D -> h + log2(K / 2) (docs/math.md sec. 4; the bin width is Delta = 2 / K), with
  # h = 1/2 log2(2 pi e s^2) bits/dim for N(mu, s^2 I); s <= 0.12 keeps the clipped mass below 1e-15.
  # The gap is Sheppard's correction, mean_i (Delta / s_i)^2 / (24 ln 2) + O(Delta^4): it falls 16-fold
  # per 4-fold K.
  mean = np.array([[0.1, -0.2, 0.0, 0.3]])
  std = np.array([[0.1, 0.12, 0.08, 0.1]])
  h = np.mean(0.5 * np.log2(2 * np.pi * np.e * std**2))
  for num_levels in (128, 512, 2048):
    exact = _factorised_entropy_bpd(mean, std, num_levels)
    gap = exact - likelihood.dequantization_offset_bpd(num_levels) - h
    sheppard = np.mean((2.0 / num_levels / std)**2) / (24 * np.log(2))
    np.testing.assert_allclose(gap, sheppard, rtol=0.05)
  assert 0 < gap < 1e-5
  # The Monte-Carlo entropy of data.py agrees with h + log2(K / 2) within its error.
  mc, se = data.gaussian_mixture_entropy_bpd(means=mean, stds=std, num_levels=2048, num_samples=50_000)
  assert abs(mc - likelihood.dequantization_offset_bpd(2048) - h) < 4 * se + 1e-5


def test_gaussian_mixture_dataset_samples_the_distribution_of_its_entropy():
  ds = data.load("gaussian_mixture", split="train", num_examples=3000, entropy_samples=20_000)
  assert ds.images.shape == (3000, 4, 4, 1) and ds.images.dtype == np.uint8 and ds.num_levels == 256
  assert ds.num_labels == 4 and set(np.unique(ds.labels)) == {0, 1, 2, 3}
  assert 0 < ds.true_bpd_stderr < 0.005
  # The default components have stds in [0.1, 0.3]: the true bits/dim lies between that of a single
  # Gaussian with std 0.1 and that of one with std 0.3 plus log2(M) / D (at most the label's entropy).
  lo = 0.5 * math.log2(2 * math.pi * math.e * 0.1**2) + 7
  hi = 0.5 * math.log2(2 * math.pi * math.e * 0.3**2) + 7 + math.log2(4) / 16
  assert lo < ds.true_bpd < hi
  # With explicit parameters: the mean -log2 P(k) / D of the dataset's own samples (an independent
  # draw) equals the reported entropy within the two Monte-Carlo errors.
  means = np.linspace(-0.6, 0.6, 3 * 16).reshape(3, 4, 4, 1)
  stds = np.linspace(0.05, 0.4, 3 * 16).reshape(3, 4, 4, 1)[::-1]
  kw = dict(num_levels=64, means=means, stds=stds, weights=[1.0, 2.0, 1.0])
  ds = data.load("gaussian_mixture", split="test", seed=4, num_examples=20_000, entropy_samples=20_000,
                 **kw)
  kw.pop("num_levels")
  bits = -data.gaussian_mixture_log_prob(ds.images, num_levels=64, **kw) / (16 * math.log(2))
  se = bits.std() / math.sqrt(len(bits))
  assert abs(bits.mean() - ds.true_bpd) < 4 * math.hypot(se, ds.true_bpd_stderr)
  assert np.bincount(ds.labels).tolist() == pytest.approx([5000, 10000, 5000], abs=400)
