"""Compressor baselines (vdiff/baselines.py): the arithmetic, and the source coding theorem as a check.

Reference numbers: bits/dim = 8 B / (N D) by definition; no lossless code beats the entropy on average
(Shannon 1948), and iid uniform levels on g values have entropy exactly log2 g bits/dim.
"""

import math

import numpy as np
import pytest

from vdiff import baselines

pytest.importorskip("PIL")

# The full codes (png_net is not one: it drops the per-file headers, see baselines.py).
CODES = ("png", "lzma", "lzma_per_image", "gzip", "gzip_per_image")


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
    for m in ("png", "lzma_per_image", "gzip_per_image"):
      assert out[m]["bpd"] < 1.0, (m, out[m])


def test_uniform_random_bytes_do_not_compress():
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, size=(64, 16, 16, 3)).astype(np.uint8)
  out = baselines.compress_all(images, 256)
  for m in CODES:
    assert out[m]["bpd"] >= 8.0 - 0.01, (m, out[m])
    assert out[m]["bpd"] < 9.0, (m, out[m])  # and the overhead is modest at 768 dims per image


@pytest.mark.parametrize("g", [2, 5, 17, 100])
def test_no_code_beats_the_entropy_of_uniform_levels(g):
  # IID uniform levels on {0..g-1} in K = 256 bytes: entropy exactly log2 g bits/dim. With N D = 64 k
  # symbols the empirical entropy of the sample is within ~0.01 bits of log2 g, so a code shorter than
  # log2 g - 0.02 would contradict the source coding theorem (or mean bits_per_dim is wrong).
  rng = np.random.RandomState(g)
  images = rng.randint(0, g, size=(256, 16, 16, 1)).astype(np.uint8)
  out = baselines.compress_all(images, 256)
  for m in CODES:
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
