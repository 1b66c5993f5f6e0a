"""Compressor baselines (vdiff/baselines.py): the arithmetic, and the source coding theorem as a check.

Reference numbers: bits/dim = 8 B / (N D) by definition; no lossless code beats the entropy on average
(Shannon 1948), and iid uniform levels on g values have entropy exactly log2 g bits/dim. Losslessness:
each per-image code's own decoder (Pillow, imagecodecs, lzma, gzip) returns the input levels.
"""

import importlib.util
import io
import math

import numpy as np
import pytest

from vdiff import baselines

pytest.importorskip("PIL")

# The full codes (png_net is not one: it drops the per-file headers, see baselines.py).
CODES = ("png", "lzma", "lzma_per_image", "gzip", "gzip_per_image")
# The image codecs this installation has (JPEG XL / JPEG-LS need imagecodecs).
IMAGE_CODES = tuple(m for m in ("webp", "jpegxl", "jpegls") if baselines.available(m))
PER_IMAGE_CODES = ("png", "lzma_per_image", "gzip_per_image") + IMAGE_CODES


def test_bits_per_dim_arithmetic():
  # 100 bytes for 2 images of 4x4x1 = 32 dims: 800 bits / 32 dims.
  assert baselines.bits_per_dim(100, 2, 16) == pytest.approx(25.0)
  assert baselines.bits_per_dim(96, 3, 32) == pytest.approx(8.0)
  with pytest.raises(ValueError):
    baselines.bits_per_dim(1, 0, 16)


@pytest.mark.parametrize("shape", [(64, 8, 8, 1), (16, 16, 16, 3)])
def test_constant_images_compress_far_below_one_bit(shape):
  images = np.full(shape, 7, np.uint8)
  out = baselines.compress_all(images, 256)
  for m in ("lzma", "gzip"):
    assert out[m]["bpd"] < 0.2, (m, out[m])
  # Per-image codes pay a header per image: a constant 8x8 grey PNG is ~73 bytes, 9 bits/dim, all of it
  # header; without the per-file constant (png_net) it is below 1 bit/dim. At 16x16x3 = 768 dims per
  # image the headers are amortised and every per-image code is below 1 bit/dim.
  assert out["png_net"]["bpd"] < 1.0, out["png_net"]
  if shape[1] * shape[2] * shape[3] >= 768:
    for m in ("png", "lzma_per_image", "gzip_per_image") + tuple(c for c in IMAGE_CODES if c != "jpegls"):
      assert out[m]["bpd"] < 1.0, (m, out[m])
    if "jpegls" in IMAGE_CODES:  # its header alone is ~82 bytes, 0.85 bits/dim at 768 dims
      assert out["jpegls"]["bpd"] < 1.2, out["jpegls"]


def test_uniform_random_bytes_do_not_compress():
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, size=(64, 16, 16, 3)).astype(np.uint8)
  out = baselines.compress_all(images, 256)
  for m in CODES:
    assert out[m]["bpd"] >= 8.0 - 0.01, (m, out[m])
    assert out[m]["bpd"] < 9.0, (m, out[m])  # and the overhead is modest at 768 dims per image
  for m in IMAGE_CODES:  # predictive image coders expand noise more (9.5 to 11.5 bits/dim measured)
    assert out[m]["bpd"] >= 8.0 - 0.01, (m, out[m])


@pytest.mark.parametrize("g", [2, 5, 17, 100])
def test_no_code_beats_the_entropy_of_uniform_levels(g):
  # IID uniform levels on {0..g-1} in K = 256 bytes: entropy exactly log2 g bits/dim. With N D = 64 k
  # symbols the empirical entropy of the sample is within ~0.01 bits of log2 g, so a code shorter than
  # log2 g - 0.02 would contradict the source coding theorem (or mean bits_per_dim is wrong).
  rng = np.random.RandomState(g)
  images = rng.randint(0, g, size=(256, 16, 16, 1)).astype(np.uint8)
  out = baselines.compress_all(images, 256)
  for m in CODES + IMAGE_CODES:
    assert out[m]["bpd"] >= math.log2(g) - 0.02, (m, g, out[m])
  # The compressors are decent: the whole-array lzma is within 1.5 bits of the entropy here.
  assert out["lzma"]["bpd"] < math.log2(g) + 1.5, out["lzma"]


def test_png_net_removes_the_per_file_constant():
  images = np.zeros((10, 4, 4, 1), np.uint8)
  out = baselines.compress_all(images, 17, methods=("png", "png_net"))
  overhead = baselines.png_overhead_bytes(1)
  assert out["png"]["bytes"] - out["png_net"]["bytes"] == 10 * overhead
  assert 50 <= overhead <= 80  # signature + IHDR + IDAT + IEND framing of a 1x1 grey PNG


def test_png_needs_grey_or_rgb_and_levels_are_checked():
  out = baselines.compress_all(np.zeros((2, 4, 4, 2), np.uint8), 256)
  assert "png" not in out and "lzma" in out
  with pytest.raises(ValueError, match="levels"):
    baselines.compress_all(np.full((2, 4, 4, 1), 17, np.uint8), 17)
  with pytest.raises(ValueError, match="num_levels"):
    baselines.compress_all(np.zeros((2, 4, 4, 1), np.int32), 1024)


def _patches(channels):
  """A few 32x32 photo patches (RGB), or their first channel (grey), and random noise: uint8 [5, 32, 32, C]."""
  rng = np.random.RandomState(1)
  if importlib.util.find_spec("skimage") is not None:
    from vdiff import data
    images = data.load("photos", split="test").images[:4]
  else:
    images = np.cumsum(rng.randint(-3, 4, size=(4, 32, 32, 3)), axis=2) % 256
  images = np.concatenate([images, rng.randint(0, 256, size=(1, 32, 32, 3))]).astype(np.uint8)
  return images[..., :channels]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("method", PER_IMAGE_CODES)
def test_each_per_image_code_is_lossless(method, channels):
  images = _patches(channels)
  encoders = {"png": baselines.png_encode, "lzma_per_image": lambda x: baselines.lzma_encode(x.tobytes()),
              "gzip_per_image": lambda x: baselines.gzip_encode(x.tobytes())}
  encoders.update({m: baselines.IMAGE_CODECS[m][0] for m in IMAGE_CODES})
  total = 0
  for img in images:
    encoded = encoders[method](img)
    total += len(encoded)
    decoded = baselines.decode_image(method, encoded, channels)
    np.testing.assert_array_equal(decoded.reshape(img.shape), img)
    assert decoded.dtype == np.uint8 and decoded.size == img.size
  # compress_all counts exactly these bytes: bits/dim = 8 B / (N D), D = 32 * 32 * C.
  out = baselines.compress_all(images, 256, methods=(method,))
  assert out[method]["bytes"] == total
  assert out[method]["bpd"] == pytest.approx(8.0 * total / (5 * 32 * 32 * channels), rel=1e-12)


@pytest.mark.skipif(not IMAGE_CODES, reason="no image codec library")
def test_image_codec_sizes_match_the_libraries_called_directly():
  # The same settings written out independently of baselines.py (Pillow / imagecodecs calls).
  from PIL import Image
  images = _patches(3)[:3]
  out = baselines.compress_all(images, 256, methods=IMAGE_CODES)
  for m in IMAGE_CODES:
    if m == "webp":
      def size(x):
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
        return len(buf.getvalue())
    else:
      import imagecodecs
      if m == "jpegxl":
        size = lambda x: len(imagecodecs.jpegxl_encode(x, lossless=True, effort=9, usecontainer=False))
      else:
        size = lambda x: len(imagecodecs.jpegls_encode(x, level=0))
    b = sum(size(x) for x in images)
    assert out[m]["bytes"] == b, m
    assert out[m]["bpd"] == pytest.approx(8.0 * b / (3 * 3072), rel=1e-12), m  # N = 3, D = 3072


def test_missing_codec_library_is_left_out_by_default_and_an_error_when_asked(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "imagecodecs" else real(name, *a))
  images = np.zeros((2, 8, 8, 3), np.uint8)
  out = baselines.compress_all(images, 256)
  assert out["unavailable"] == ["jpegxl", "jpegls"]
  assert "jpegxl" not in out and "jpegls" not in out and "webp" in out and "png" in out
  with pytest.raises(ImportError, match="imagecodecs"):
    baselines.compress_all(images, 256, methods=("jpegxl",))


def test_codec_baselines_command_prints_a_table_and_json(capsys):
  from experiments import codec_baselines
  doc = codec_baselines.main(["--data=digits", "--num-examples=20", "--methods=png,lzma"])
  out = capsys.readouterr()
  assert '"baselines"' in out.out and "| png |" in out.err and "| lzma |" in out.err
  b = doc["baselines"]
  assert b["num_images"] == 20 and b["num_dims"] == 64 and doc["data"]["num_levels"] == 17
  assert b["png"]["bpd"] == pytest.approx(8.0 * b["png"]["bytes"] / (20 * 64), rel=1e-12)


def test_bpd_by_group_is_each_groups_own_code():
  # Each group's bits/dim is that of compress_all on the group's images alone (an independent call);
  # the whole-array codes have no per-group figure; a group array of the wrong shape is refused.
  images = _patches(3)
  groups = np.array([1, 0, 1, 2, 0])
  methods = ("png", "lzma", "gzip_per_image", "webp")
  out = baselines.compress_all(images, 256, methods=methods, groups=groups, group_names=["a", "b", "c"])
  for m in ("png", "gzip_per_image", "webp"):
    assert set(out[m]["bpd_by_group"]) == {"a", "b", "c"}, m
    for g, name in enumerate("abc"):
      alone = baselines.compress_all(images[groups == g], 256, methods=(m,))
      assert out[m]["bpd_by_group"][name] == pytest.approx(alone[m]["bpd"], rel=1e-12), (m, name)
    sizes = [np.sum(groups == g) for g in range(3)]
    assert np.dot(sizes, [out[m]["bpd_by_group"][n] for n in "abc"]) / 5 == pytest.approx(out[m]["bpd"])
  assert "bpd_by_group" not in out["lzma"]
  with pytest.raises(ValueError, match="groups"):
    baselines.compress_all(images, 256, methods=("png",), groups=groups[:4])


def test_bpd_per_image_is_each_images_own_code():
  # Reference: each image's PNG / gzip bytes from the encoders called on that image alone; their mean is
  # the method's bits/dim. The whole-array codes have no per-image figure, and none is given unasked.
  images = _patches(3)
  out = baselines.compress_all(images, 256, methods=("png", "gzip", "gzip_per_image"), per_image=True)
  d = images[0].size
  own = {"png": [baselines.png_bytes(x) for x in images],
         "gzip_per_image": [baselines.gzip_bytes(x.astype(np.uint8).tobytes()) for x in images]}
  for m, sizes in own.items():
    assert out[m]["bpd_per_image"] == pytest.approx([8.0 * b / d for b in sizes], rel=1e-12), m
    assert np.mean(out[m]["bpd_per_image"]) == pytest.approx(out[m]["bpd"], rel=1e-12), m
  assert "bpd_per_image" not in out["gzip"]
  assert "bpd_per_image" not in baselines.compress_all(images, 256, methods=("png",))["png"]


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="photos need scikit-image")
def test_codec_baselines_on_photos_break_down_by_photo(capsys):
  from experiments import bench_likelihood
  from experiments import codec_baselines
  from vdiff import data
  doc = codec_baselines.main(["--data=photos", "--num-examples=40", "--methods=png"])
  ds = data.load("photos", split="test")
  index = ds.metadata["photo_index"][:40]
  by = doc["baselines"]["png"]["bpd_by_group"]
  assert set(by) == {p["name"] for i, p in enumerate(ds.metadata["photos"]) if np.any(index == i)}
  for i, p in enumerate(ds.metadata["photos"]):
    own = sum(baselines.png_bytes(x) for x in ds.images[:40][index == i])
    assert by[p["name"]] == pytest.approx(8.0 * own / (np.sum(index == i) * 3072), rel=1e-12)
  assert "bits/dim by photo" in capsys.readouterr().err
  # An estimator's per-image bits/dim are averaged over the same photos.
  values = np.arange(40, dtype=np.float64)
  means = bench_likelihood.by_photo(values, bench_likelihood.photo_groups(ds, 40))
  assert means == {p["name"]: float(values[index == i].mean()) for i, p in enumerate(ds.metadata["photos"])}
  assert bench_likelihood.photo_groups(data.load("digits", split="test")) is None
