"""Lossless compressors as likelihood baselines: bits/dim of PNG, WebP, JPEG-XL, JPEG-LS, xz and gzip.

A lossless code of N images of D dimensions each in B bytes is a model of the data whose negative log2
likelihood is 8 B bits, so

    bits/dim = 8 B / (N D)

is directly comparable with a model's bits/dim of the same integer data (a discrete NLL, docs/math.md sec. 0;
no dequantisation offset). A compressor can never beat the data's entropy on average (Shannon's source
coding theorem), so each number here is an upper bound on the entropy, as every likelihood model's is:
a model that does no better than PNG has not learned much.

Every image is stored as its raw levels, one byte per dimension (K <= 256: level k is the byte k, not
rescaled to 0..255; rescaling is a bijection, so it changes the compressed size only through the
compressor's heuristics, and storing the levels keeps "the same integers the model sees"). Rows are
H lines of W C bytes (grey for C = 1, RGB for C = 3), in the [N, H, W, C] order of vdiff's datasets.

Baselines (names are the keys of `compress_all`):
  png             each image a separate PNG file (Pillow, optimize=True, compress_level=9), 8-bit grey
                  (C = 1) or RGB (C = 3). INCLUDES every file's fixed overhead: the 8-byte signature and
                  the IHDR, IDAT and IEND chunk framing, ~57 bytes per file even for a 1x1 image. For
                  tiny images (4x4, 8x8) this overhead dominates; see `png_net`.
  png_net         png minus, per image, the size of a 1x1 PNG of the same mode (the per-file constant:
                  signature, chunk headers and CRCs, zlib header and Adler-32, and one pixel's data), i.e.
                  an estimate of the pixel data's share of the PNG. Not a code by itself (a decoder
                  needs the headers), so it can go below the entropy by a little; report both.
  lzma            lzma (xz container, preset 9 | PRESET_EXTREME) over the whole test array as one byte
                  string: a code of the whole set, one header for all images.
  lzma_per_image  the same, each image compressed separately (header per image included).
  gzip            gzip (level 9, mtime 0) over the whole array.
  gzip_per_image  the same, each image separately.
  webp            each image a separate lossless WebP file (Pillow: lossless=True, quality=100, method=4,
                  exact=True), RIFF header included. Grey images (C = 1) are stored as RGB with three equal
                  channels (WebP has no grey mode; its lossless coder's subtract-green transform makes the
                  two copies nearly free). method=4 rather than 6: on 32x32 photo patches it gave smaller
                  files (3.38 vs 3.44 bits/dim on 100 patches) and is ~50x faster.
  jpegxl          each image a separate lossless JPEG XL codestream (imagecodecs / libjxl: lossless=True,
                  effort=9, no container), header included. Needs `pip install imagecodecs`.
  jpegls          each image a separate lossless JPEG-LS file (imagecodecs / CharLS: NEAR = 0), header
                  included. Needs `pip install imagecodecs`.

Every per-image code's decoder returns exactly the input levels (`decode_image`; tested in
tests/test_baselines.py). Methods whose library is missing are left out of `compress_all`'s default set
and named in its "unavailable" entry.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import lzma
import math
from typing import Callable

import numpy as np

LZMA_PRESET = 9 | lzma.PRESET_EXTREME
GZIP_LEVEL = 9
PNG_COMPRESS_LEVEL = 9
WEBP_METHOD = 4
JPEGXL_EFFORT = 9


def bits_per_dim(num_bytes: int, num_images: int, num_dims: int) -> float:
  """bits/dim = 8 B / (N D) of B compressed bytes for N images of D dimensions each."""
  if num_images < 1 or num_dims < 1:
    raise ValueError(f"num_images and num_dims must be >= 1, got {num_images} and {num_dims}.")
  if num_bytes < 0:
    raise ValueError(f"num_bytes must be >= 0, got {num_bytes}.")
  return 8.0 * num_bytes / (num_images * num_dims)


def _as_bytes(images, num_levels: int) -> np.ndarray:
  """Validate K-level images [N, H, W, C] (K <= 256) and return them as uint8 levels (no rescaling)."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}.")
  if images.shape[0] < 1:
    raise ValueError("images must hold at least one image.")
  if not np.issubdtype(images.dtype, np.integer):
    raise ValueError(f"images must be integer levels, got dtype {images.dtype}.")
  if not 2 <= num_levels <= 256:
    raise ValueError(f"num_levels must be in [2, 256] (one byte per dimension), got {num_levels}.")
  lo, hi = int(images.min()), int(images.max())
  if lo < 0 or hi >= num_levels:
    raise ValueError(f"levels must lie in [0, {num_levels - 1}], got min {lo}, max {hi}.")
  return images.astype(np.uint8)


def _png_mode(channels: int) -> str:
  if channels == 1:
    return "L"
  if channels == 3:
    return "RGB"
  raise ValueError(f"PNG needs 1 (grey) or 3 (RGB) channels, got {channels}.")


def png_encode(image: np.ndarray) -> bytes:
  """One uint8 image [H, W, C] (C = 1 or 3) as a PNG file (Pillow, optimize=True, compress_level=9)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = _png_mode(image.shape[-1])
  pixels = image[..., 0] if mode == "L" else image
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels), mode=mode).save(
      buf, format="PNG", optimize=True, compress_level=PNG_COMPRESS_LEVEL)
  return buf.getvalue()


def png_bytes(image: np.ndarray) -> int:
  """Size in bytes of one uint8 image [H, W, C] saved as a PNG (optimize=True, compress_level=9)."""
  return len(png_encode(image))


def webp_encode(image: np.ndarray) -> bytes:
  """One uint8 image [H, W, C] (C = 1 or 3) as a lossless WebP file; grey is stored as RGB (R = G = B)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _png_mode(image.shape[-1])  # the same channel check: 1 or 3
  rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  buf = io.BytesIO()
  # exact=True keeps every pixel's value (the lossless coder may otherwise alter fully transparent
  # pixels; there are none in RGB, but the flag makes the contract explicit).
  Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(
      buf, format="WEBP", lossless=True, quality=100, method=WEBP_METHOD, exact=True)
  return buf.getvalue()


def jpegxl_encode(image: np.ndarray) -> bytes:
  """One uint8 image [H, W, C] (C = 1 or 3) as a lossless JPEG XL codestream (libjxl effort 9)."""
  import imagecodecs  # pylint: disable=g-import-not-at-top
  _png_mode(image.shape[-1])
  return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(image), lossless=True,
                                         effort=JPEGXL_EFFORT, usecontainer=False))


def jpegls_encode(image: np.ndarray) -> bytes:
  """One uint8 image [H, W, C] (C = 1 or 3) as a lossless (NEAR = 0) JPEG-LS file (CharLS)."""
  import imagecodecs  # pylint: disable=g-import-not-at-top
  _png_mode(image.shape[-1])
  pixels = image[..., 0] if image.shape[-1] == 1 else image  # CharLS takes grey as [H, W]
  return bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(pixels), level=0))


def decode_image(method: str, encoded: bytes, channels: int) -> np.ndarray:
  """Decodes one image written by the per-image code `method` back to uint8 [H, W, channels].

  Args:
    method: one of "png", "webp", "jpegxl", "jpegls", "lzma_per_image", "gzip_per_image"
      (the raw-byte codes return a flat uint8 array; reshape it).
    encoded: the file's bytes.
    channels: C of the original image (WebP returns RGB for grey input: the first channel is kept).
  """
  if method in ("png", "webp"):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(encoded)) as im:
      x = np.array(im)
  elif method in ("jpegxl", "jpegls"):
    import imagecodecs  # pylint: disable=g-import-not-at-top
    x = np.asarray(imagecodecs.jpegxl_decode(encoded) if method == "jpegxl"
                   else imagecodecs.jpegls_decode(encoded))
  elif method == "lzma_per_image":
    return np.frombuffer(lzma.decompress(encoded), np.uint8)
  elif method == "gzip_per_image":
    return np.frombuffer(gzip.decompress(encoded), np.uint8)
  else:
    raise ValueError(f"method must be a per-image code, got {method!r}.")
  if x.ndim == 2:
    x = x[..., None]
  return x[..., :1] if channels == 1 else x


# Per-image image codecs: name -> (encoder, note, module the encoder needs).
IMAGE_CODECS = {
    "webp": (webp_encode, f"per-image lossless WebP files (Pillow, quality 100, method {WEBP_METHOD}), "
             "headers included", "PIL"),
    "jpegxl": (jpegxl_encode, f"per-image lossless JPEG XL codestreams (libjxl, effort {JPEGXL_EFFORT}), "
               "headers included", "imagecodecs"),
    "jpegls": (jpegls_encode, "per-image lossless JPEG-LS files (CharLS, NEAR 0), headers included",
               "imagecodecs"),
}


def available(method: str) -> bool:
  """Whether the library a baseline needs is installed (PNG / WebP: Pillow; JPEG XL / JPEG-LS: imagecodecs)."""
  if method in IMAGE_CODECS:
    module = IMAGE_CODECS[method][2]
  elif method.startswith("png"):
    module = "PIL"
  else:
    return True
  if importlib.util.find_spec(module) is None:
    return False
  if module == "imagecodecs":
    import imagecodecs  # pylint: disable=g-import-not-at-top
    codec = {"jpegxl": imagecodecs.JPEGXL, "jpegls": imagecodecs.JPEGLS}[method]
    return bool(codec.available)
  return True


def png_overhead_bytes(channels: int) -> int:
  """Bytes of a 1x1 PNG of this mode: the per-file constant that `png_net` subtracts."""
  return png_bytes(np.zeros((1, 1, channels), np.uint8))


def lzma_encode(data: bytes) -> bytes:
  """`data` in the xz format, LZMA2 preset 9 | PRESET_EXTREME (see `lzma_bytes`)."""
  dict_size = min(64 << 20, max(4096, len(data)))
  filters = [{"id": lzma.FILTER_LZMA2, "preset": LZMA_PRESET, "dict_size": dict_size}]
  return lzma.compress(data, format=lzma.FORMAT_XZ, filters=filters)


def lzma_bytes(data: bytes) -> int:
  """Size of `data` in the xz format, LZMA2 preset 9 | PRESET_EXTREME.

  The dictionary is capped at the input's size (at least 4 KiB): presets 6..9 differ only in dictionary
  size, and a dictionary larger than the input cannot change the output (the xz header stores the size
  in a fixed-width field), but allocating preset 9's 64 MiB dictionary costs ~0.2 s per call, which
  would make per-image compression of a test set take minutes.
  """
  return len(lzma_encode(data))


def gzip_encode(data: bytes) -> bytes:
  """`data` in the gzip format, level 9, mtime 0 (so equal inputs give equal files)."""
  return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def gzip_bytes(data: bytes) -> int:
  return len(gzip_encode(data))


def _per_image(fn: Callable[[np.ndarray], int], images: np.ndarray) -> np.ndarray:
  """int64 [N]: fn(image), the bytes of each image's own code."""
  return np.array([fn(img) for img in images], np.int64)


def compress_all(images, num_levels: int, *, methods: tuple[str, ...] | None = None,
                 groups=None, group_names=None, per_image: bool = False) -> dict:
  """Bits/dim of every compressor baseline on K-level images [N, H, W, C].

  Args:
    images: integer levels in {0..K-1}, [N, H, W, C]; C must be 1 or 3 for the PNG baselines.
    num_levels: K (<= 256: one byte per dimension).
    methods: a subset of METHODS (default: all whose library is installed; the image codecs are
      skipped when C is not 1 or 3). Asking for a method whose library is missing raises ImportError.
    groups: optional int [N], a group per image (e.g. the photos' `photo_index`): every code that codes
      each image on its own (png, png_net, webp, jpegxl, jpegls, lzma_per_image,
      gzip_per_image) also reports its bits/dim over each group's images.
    group_names: optional names of the groups (group g is group_names[g]), the keys of "bpd_by_group".
    per_image: also give each per-image method's bits/dim of every image, "bpd_per_image" (a list of N
      floats, 8 bytes_i / D; their mean is "bpd"), for gaps paired with a model's per-image bits/dim.
  Returns:
    {method: {"bpd": bits/dim, "bytes": total compressed bytes, "note": what is counted}} plus
    "num_images", "num_dims", "raw_bpd" (8: the uncompressed bytes), "uniform_bpd" (log2 K, the
    code that ignores the data) and "unavailable" (default methods left out for a missing library).
    With `groups`, each per-image method's entry also holds "bpd_by_group" {group (its name where
    given): bits/dim of the group's images}; the whole-array codes (lzma, gzip) have none (their bytes
    are not per image).
  """
  x = _as_bytes(images, num_levels)
  n, d = x.shape[0], int(np.prod(x.shape[1:]))
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
      raise ValueError(f"groups must be an integer array of shape ({n},) (one group per image), got "
                       f"{groups.dtype} {groups.shape}.")
  unavailable = [m for m in METHODS if not available(m)]
  if methods is None:
    methods = tuple(m for m in METHODS if m not in unavailable)
  methods = tuple(methods)
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown baseline(s) {unknown}; expected some of {METHODS}.")
  missing = [m for m in methods if m in unavailable]
  if missing:
    raise ImportError(f"baseline(s) {missing} need a library that is not installed "
                      f"(JPEG XL / JPEG-LS: pip install imagecodecs).")
  if x.shape[-1] not in (1, 3):
    methods = tuple(m for m in methods if not (m.startswith("png") or m in IMAGE_CODECS))
  out = {"num_images": n, "num_dims": d, "num_levels": int(num_levels), "raw_bpd": 8.0,
         "uniform_bpd": math.log2(num_levels), "unavailable": unavailable}
  png_sizes = None
  for m in methods:
    sizes = None  # bytes of each image's own code, for the per-image methods
    if m in ("png", "png_net"):
      if png_sizes is None:
        png_sizes = _per_image(png_bytes, x)
      if m == "png":
        sizes, note = png_sizes, "per-image PNG files, per-file headers included"
      else:
        overhead = png_overhead_bytes(x.shape[-1])
        sizes = png_sizes - overhead
        note = f"per-image PNG minus {overhead} bytes per image (size of a 1x1 PNG); not a full code"
    elif m == "lzma":
      b, note = lzma_bytes(x.tobytes()), "xz, preset 9|EXTREME, whole array, one header"
    elif m == "lzma_per_image":
      sizes = _per_image(lambda img: lzma_bytes(img.tobytes()), x)
      note = "xz, preset 9|EXTREME, each image with its own header"
    elif m == "gzip":
      b, note = gzip_bytes(x.tobytes()), "gzip level 9, whole array, one header"
    elif m == "gzip_per_image":
      sizes = _per_image(lambda img: gzip_bytes(img.tobytes()), x)
      note = "gzip level 9, each image with its own header"
    else:
      encode, note, _ = IMAGE_CODECS[m]
      sizes = _per_image(lambda img: len(encode(img)), x)
    if sizes is not None:
      b = int(sizes.sum())
    out[m] = {"bpd": bits_per_dim(b, n, d), "bytes": int(b), "note": note}
    if sizes is not None and per_image:
      out[m]["bpd_per_image"] = (8.0 * sizes / d).tolist()
    if sizes is not None and groups is not None:
      out[m]["bpd_by_group"] = {
          (int(g) if group_names is None else group_names[g]):
              bits_per_dim(int(sizes[groups == g].sum()), int(np.sum(groups == g)), d)
          for g in np.unique(groups)}
  return out


METHODS = ("png", "png_net", "lzma", "lzma_per_image", "gzip", "gzip_per_image", "webp", "jpegxl",
           "jpegls")
