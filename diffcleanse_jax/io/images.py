"""PNG output: image grids and single images, written atomically."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
from PIL import Image


def to_uint8(images01: np.ndarray) -> np.ndarray:
  """[0,1] float -> uint8 (round half up, as torchvision/diffusers `numpy_to_pil`)."""
  return (np.clip(np.asarray(images01, np.float32), 0, 1) * 255).round().astype(np.uint8)


def make_grid(images01: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """(N,H,W,C) in [0,1] -> one uint8 grid image (H', W', C) with `pad` px white-ish separators."""
  x = to_uint8(images01)
  n, h, w, c = x.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
  return grid


def save_png(image_u8: np.ndarray, path: str, scale: int = 1) -> str:
  """Writes (H,W,C) uint8 (C=1 or 3) as PNG via a temp file + rename; `scale` enlarges with nearest."""
  arr = np.asarray(image_u8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  img = Image.fromarray(arr)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=d)
  os.close(fd)
  try:
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_grid(images01: np.ndarray, path: str, ncol: int | None = None, scale: int = 1) -> str:
  """(N,H,W,C) in [0,1] -> PNG grid at `path`."""
  return save_png(make_grid(images01, ncol), path, scale)


def save_image_pm1(image: np.ndarray, path: str, scale: int = 4) -> str:
  """One (H,W,C) image in [-1,1] (a trigger, a target) -> PNG."""
  return save_png(to_uint8(np.clip(np.asarray(image) / 2 + 0.5, 0, 1)), path, scale)
