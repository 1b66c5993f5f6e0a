"""Image grids of K-level samples written as PNG."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, num_levels: int, *, ncols: int | None = None, pad: int = 1,
              scale: int = 1) -> np.ndarray:
  """K-level integer images [N, H, W, C] (C = 1 or 3) -> one uint8 picture [rows, cols, C]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must have shape [N, H, W, 1 or 3], got {images.shape}.")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  pix = np.round(images.astype(np.float64) * 255.0 / max(num_levels - 1, 1)).clip(0, 255)
  canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pix[i]
  if scale > 1:
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
  return canvas


def save_grid(path: str, images: np.ndarray, num_levels: int, **kw) -> None:
  """Write `make_grid(images, num_levels)` as a PNG file (images upscaled so small data stay visible)."""
  h = np.asarray(images).shape[1]
  kw.setdefault("scale", max(1, 64 // max(h, 1)))
  canvas = make_grid(images, num_levels, **kw)
  Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas).save(path)
