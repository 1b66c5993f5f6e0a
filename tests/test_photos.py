"""Tests of the `photos` source (vdiff/data.py): split by photo, provenance, determinism, metadata, offline.

Reference pixels come from the libraries' own loaders (skimage.data.astronaut() etc., sklearn's
load_sample_image), a code path independent of `data.read_photo`; reference counts from the grid formula
floor((side - p) / s) + 1 per axis.
"""

import hashlib
import socket

import numpy as np
import pytest

from vdiff import data

skimage_data = pytest.importorskip("skimage.data")


def _reference_photo(name):
  """The photo as scikit-image's / scikit-learn's own loaders return it."""
  from sklearn import datasets as sk_datasets
  if name in ("china", "flower"):
    return sk_datasets.load_sample_image(f"{name}.jpg")
  if name.startswith("motorcycle_"):
    left, right, _ = skimage_data.stereo_motorcycle()
    return left if name == "motorcycle_left" else right
  return getattr(skimage_data, name)()


def _grid_count(shape, p, s):
  return ((shape[0] - p) // s + 1) * ((shape[1] - p) // s + 1)


def _window_hashes(photo, p):
  """A hash of every p x p window of photo [H, W, 3] at every offset: [H - p + 1, W - p + 1] uint64.

  hash(r, c) = sum_{i, j < p} v[r + i, c + j] A^i B^j mod 2^64, v the pixel's 24-bit RGB value, computed
  from 2D prefix sums of v[i, j] A^i B^j (uint64 arithmetic wraps mod 2^64) times A^-r B^-c (A, B odd, so
  invertible mod 2^64). Equal windows have equal hashes, so distinct hashes prove distinct windows.
  """
  a, b = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
  v = (photo[..., 0].astype(np.uint64) | photo[..., 1].astype(np.uint64) << np.uint64(8)
       | photo[..., 2].astype(np.uint64) << np.uint64(16))
  h, w = v.shape

  def powers(base, n):  # base^0 .. base^(n - 1) mod 2^64, exactly (uint64 throughout, never float)
    factors = np.full(n, base, np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)

  y = v * powers(a, h)[:, None] * powers(b, w)[None, :]
  s = np.zeros((h + 1, w + 1), np.uint64)
  s[1:, 1:] = y.cumsum(0, dtype=np.uint64).cumsum(1, dtype=np.uint64)
  window = s[p:, p:] - s[:-p, p:] - s[p:, :-p] + s[:-p, :-p]
  inv_a, inv_b = pow(a, -1, 2**64), pow(b, -1, 2**64)
  return window * powers(inv_a, h - p + 1)[:, None] * powers(inv_b, w - p + 1)[None, :]


@pytest.fixture(scope="module")
def splits():
  return data.load("photos", split="train"), data.load("photos", split="test")


def test_shapes_dtype_levels_and_documented_counts(splits):
  train, test = splits
  # The counts documented in data.py and the README: stride 32 over the 7 training / 4 test photos.
  assert train.images.shape == (4235, 32, 32, 3) and test.images.shape == (862, 32, 32, 3)
  for ds in splits:
    assert ds.images.dtype == np.uint8 and ds.num_levels == 256 and ds.num_labels == 0
    assert ds.labels.dtype == np.int32 and not ds.labels.any()
    assert ds.shape == (32, 32, 3) and ds.num_dims == 3072
    assert ds.true_bpd is None
  assert train.images.min() == 0 and train.images.max() == 255
  assert len(data.load("photos", split="train", patch_stride=16)) == 16399


def test_every_patch_is_its_photo_at_its_origin_and_counts_match_the_grid(splits):
  for ds, stride in zip(splits, (32, 32)):
    m = ds.metadata
    assert m["patch_size"] == 32 and m["patch_stride"] == stride
    assert m["num_patches"] == len(ds) == len(m["photo_index"]) == len(m["patch_origin"])
    expected_total = 0
    for i, photo in enumerate(m["photos"]):
      ref = _reference_photo(photo["name"])
      assert photo["shape"] == list(ref.shape)
      assert photo["sha256"] == hashlib.sha256(np.ascontiguousarray(ref).tobytes()).hexdigest()
      assert photo["num_patches"] == _grid_count(ref.shape, 32, stride)
      expected_total += photo["num_patches"]
      sel = np.flatnonzero(m["photo_index"] == i)
      assert len(sel) == photo["num_patches"]
      # Every grid origin exactly once.
      got = sorted(map(tuple, m["patch_origin"][sel].tolist()))
      want = [(r, c) for r in range(0, ref.shape[0] - 31, stride) for c in range(0, ref.shape[1] - 31, stride)]
      assert got == want
      for k in sel:
        r, c = m["patch_origin"][k]
        np.testing.assert_array_equal(ds.images[k], ref[r:r + 32, c:c + 32])
    assert expected_total == len(ds)
  assert splits[0].metadata["num_train_patches"] == 4235 == len(splits[0])
  assert splits[1].metadata["num_test_patches"] == 862 == len(splits[1])


def test_split_is_by_photo_and_no_test_patch_occurs_in_a_training_photo(splits):
  train, test = splits
  names = [n for n, _, _ in data.PHOTOS]
  assert set(train.metadata["train_photos"]) | set(train.metadata["test_photos"]) == set(names)
  assert not set(train.metadata["train_photos"]) & set(train.metadata["test_photos"])
  assert [p["name"] for p in test.metadata["photos"]] == test.metadata["test_photos"]
  assert [p["name"] for p in train.metadata["photos"]] == train.metadata["train_photos"]
  # The stereo pair shows one scene twice: both views on the same side.
  assert {"motorcycle_left", "motorcycle_right"} <= set(train.metadata["train_photos"])
  # No test patch equals any 32x32 window of any training photo, at ANY offset (not only the grid).
  test_hashes = {int(h) for img in test.images for h in _window_hashes(img, 32).ravel()}
  assert len(test_hashes) > 800  # distinct patches (a few flat ones may coincide)
  for name in train.metadata["train_photos"]:
    hashes = _window_hashes(_reference_photo(name), 32)
    assert not test_hashes & set(hashes.ravel().tolist()), name
  # The hash finds a window where it is: each test patch is a window of its own photo (positive control).
  chelsea = _window_hashes(_reference_photo("chelsea"), 32)
  k = int(np.flatnonzero(test.metadata["photo_index"] == 0)[0])
  r, c = test.metadata["patch_origin"][k]
  assert int(_window_hashes(test.images[k], 32)[0, 0]) == int(chelsea[r, c])


def test_deterministic_independent_of_seed_and_prefix_samples_every_test_photo(splits):
  train, test = splits
  data.read_photo.cache_clear()  # decode the files again
  again = data.load("photos", split="test", seed=123)
  np.testing.assert_array_equal(again.images, test.images)
  np.testing.assert_array_equal(again.metadata["patch_origin"], test.metadata["patch_origin"])
  np.testing.assert_array_equal(data.load("photos", split="train", seed=7).images, train.images)
  # The fixed order shuffles the photos: a 128-patch prefix (the `tiny` evaluation) holds all four.
  assert set(test.metadata["photo_index"][:128].tolist()) == {0, 1, 2, 3}


def test_patch_geometry_is_configurable_and_test_patches_never_overlap():
  train = data.load("photos", split="train", patch_size=16, patch_stride=8)
  test = data.load("photos", split="test", patch_size=16, patch_stride=8)
  assert train.images.shape[1:] == (16, 16, 3) and test.images.shape[1:] == (16, 16, 3)
  assert train.metadata["patch_stride"] == 8 and test.metadata["patch_stride"] == 16
  assert train.metadata["test_patch_stride"] == 16
  assert len(train) == sum(_grid_count(p["shape"], 16, 8) for p in train.metadata["photos"])
  assert len(test) == sum(_grid_count(p["shape"], 16, 16) for p in test.metadata["photos"])
  assert test.metadata["num_train_patches"] == len(train)
  # The test split does not depend on the training stride.
  np.testing.assert_array_equal(test.images, data.load("photos", split="test", patch_size=16).images)
  for kw, match in ((dict(patch_size=0), "patch_size"), (dict(patch_size=301), "patch_size"),
                    (dict(patch_stride=0), "patch_stride"), (dict(patch_size=2.5), "patch_size")):
    with pytest.raises(ValueError, match=match):
      data.load("photos", split="train", **kw)
  with pytest.raises(ValueError, match="split"):
    data.load("photos", split="validation")


def test_loads_offline_from_files_inside_the_installed_wheels(monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  data.read_photo.cache_clear()
  ds = data.load("photos", split="test")
  assert len(ds) == 862
  import os
  import skimage
  import sklearn
  roots = {"skimage": os.path.dirname(skimage.__file__), "sklearn": os.path.dirname(sklearn.__file__)}
  for _, package, file in data.PHOTOS:
    path = data.photo_path(package, file)
    assert os.path.isfile(path) and path.startswith(roots[package])


def test_goes_through_the_common_batching_path(splits):
  train, test = splits
  # Two processes read the two halves of the one-process global batch.
  whole = data.train_batch(train, 64, seed=3, step=5, random_flip=True)
  halves = [data.train_batch(train, 64, seed=3, step=5, process_index=p, process_count=2, random_flip=True)
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
  # Evaluation covers each of the 862 test patches exactly once, padding masked (862 = 8 * 100 + 62).
  batches = list(data.eval_batches(test, 100, process_index=1, process_count=2))
  assert len(batches) == 9 and all(b["image"].shape == (50, 32, 32, 3) for b in batches)
  # Process 1 reads rows 50..99 of each global batch: 50 real rows in each of the 8 full batches, and rows
  # 850..861 (12) of the last one, whose real rows are 800..861.
  assert sum(b["mask"].sum() for b in batches) == 8 * 50 + 12


def test_training_config_forwards_the_patch_geometry():
  from experiments.configs import photos as photos_config
  from vdiff import train as train_lib
  config = photos_config.get_config("vdm")
  config.data.patch_size = 16
  config.data.patch_stride = 16
  ds = train_lib.load_data(config, "train")
  assert ds.shape == (16, 16, 3) and ds.metadata["patch_stride"] == 16
  assert len(ds) == sum(_grid_count(p["shape"], 16, 16) for p in ds.metadata["photos"])


@pytest.mark.parametrize("family", ["vdm", "diffenc", "cdm"])
def test_photos_config_words_choose_the_family(family):
  from experiments.configs import photos as photos_config
  c = photos_config.get_config(f"{family},tiny")
  assert c.model.family == family and c.data.name == "photos"
  assert c.training.num_steps == 20  # `tiny` applies on top of the family
  full = photos_config.get_config(family)
  assert full.training.num_steps == photos_config.NUM_STEPS[family]
  assert (full.model.encoder.kind == "trainable") == (family == "diffenc")
  assert full.eval.estimator == ("cdm" if family == "cdm" else "elbo")
  with pytest.raises(ValueError, match="family"):
    photos_config.get_config("vdm,cdm")
