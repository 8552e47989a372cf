"""BadDiffusion backdoor targets y: (H, W, C) float32 in [-1, 1] (`IBM/BadDiffusion: dataset.py`, `get_target`).

bg2grey(z) clamps every value <= -0.4 up to -0.4 (-0.4 = vmin + 0.3 (vmax - vmin)).

* ``NOSHIFT`` (alias ``TRIGGER``): bg2grey(trigger).
* ``SHIFT``: trigger rolled cyclically 5 px left and 3 px up (dx = -5, dy = -3), then bg2grey.
* ``CORNER``: 10 x 10 grey (0) box at rows/cols 0..9 on -1, then bg2grey.
* ``BOX``: 10 x 10 white (+1) box at rows/cols 0..9 on -1, no bg2grey (VillanDiffusion's white box).
  Both boxes are 10 x 10 at every S, as in the reference.
* ``SHOE``: Fashion-MNIST train[0] (the ankle boot) read from the IDX file, PIL bilinear resize to S x S
  (the reference's torchvision Resize([S, S]); identity at S = 28), then bg2grey.
* ``HAT`` (alias ``FEDORA_HAT``): a fedora drawn procedurally (the reference's `static/fedora-hat.png` is not
  shipped): brown crown and brim (mostly above -0.4, so bg2grey keeps their shading) and a near-black band
  (clamped to -0.4) on a white (+1) background; resized to S x S, bg2grey.
* ``CAT``: scikit-image's bundled `skimage.data.chelsea()` photo (stands in for the reference's
  `static/cat_wo_bg.png`), resized to S x S, bg2grey.
* a path: ``.npy`` (S, S, C) in [-1, 1] used as-is; an image file is converted to RGB/'L' (alpha dropped, as
  PIL's convert does in the reference), resized to S x S, bg2grey.

Grayscale (C = 1) uses PIL's 'L' conversion.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageDraw

from diffcleanse_jax.attacks.triggers import IMAGE_EXTENSIONS, resize_bilinear, to_mode, to_unit_range

GREY_BG = -0.4
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILE = "train-images-idx3-ubyte.gz"
SHIFT_DX, SHIFT_DY = -5, -3
CORNER_SIZE = 10

TARGET_NAMES = ("NOSHIFT", "TRIGGER", "SHIFT", "CORNER", "BOX", "SHOE", "HAT", "FEDORA_HAT", "CAT")
_NEEDS_TRIGGER = ("NOSHIFT", "TRIGGER", "SHIFT")


class TargetError(ValueError):
  """Bad target name, file, size or value range, or a missing input."""


def bg2grey(z: np.ndarray) -> np.ndarray:
  """Clamps values <= -0.4 up to -0.4 (returns a new float32 array)."""
  return np.maximum(np.asarray(z, np.float32), np.float32(GREY_BG))


def roll(z: np.ndarray, dx: int, dy: int) -> np.ndarray:
  """Cyclic shift of an (H, W, C) image by dx columns (negative = left) and dy rows (negative = up)."""
  return np.roll(np.asarray(z), shift=(int(dy), int(dx)), axis=(0, 1))


def corner_box(image_size: int, channels: int, value: float, size: int = CORNER_SIZE) -> np.ndarray:
  """size x size box of `value` at rows/cols [0, size) on -1; (S, S, C) float32."""
  s, c = int(image_size), int(channels)
  y = np.full((s, s, c), -1.0, np.float32)
  y[:size, :size, :] = value
  return y


def fashion_mnist_image(index: int = 0, root: str = DEFAULT_FASHION_MNIST) -> np.ndarray:
  """One Fashion-MNIST training image as (28, 28) uint8 (via the data layer's IDX reader)."""
  from diffcleanse_jax.data.datasets import DatasetError, load_idx
  images_gz = os.path.join(root, FASHION_MNIST_FILE)
  if not os.path.isfile(images_gz):
    raise TargetError(f"Fashion-MNIST file not found: {images_gz} (install it with `apt-get install dataset-fashion-mnist`)")
  try:
    images, _ = load_idx(images_gz, os.path.join(root, "train-labels-idx1-ubyte.gz"))
  except DatasetError as e:
    raise TargetError(str(e)) from None
  if not 0 <= index < len(images):
    raise TargetError(f"Fashion-MNIST index {index} out of range [0, {len(images)})")
  return np.array(images[index], dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def hat_picture() -> Image.Image:
  """Procedural 512 x 512 RGB fedora on a white background (cached, read-only)."""
  n = 512
  img = Image.new("RGB", (n, n), (255, 255, 255))
  d = ImageDraw.Draw(img)
  crown, crown_light, band, brim = (128, 100, 76), (150, 120, 92), (34, 30, 28), (112, 88, 66)
  cx = n / 2
  # brim: wide, flat ellipse, slightly upturned look via a second lighter ellipse on top
  d.ellipse([n * 0.06, n * 0.58, n * 0.94, n * 0.78], fill=brim)
  # crown: tapered body with a rounded, pinched top
  body = [(cx - n * 0.26, n * 0.68), (cx - n * 0.22, n * 0.34), (cx - n * 0.12, n * 0.25), (cx - n * 0.04, n * 0.30),
          (cx + n * 0.04, n * 0.30), (cx + n * 0.12, n * 0.25), (cx + n * 0.22, n * 0.34), (cx + n * 0.26, n * 0.68)]
  d.polygon(body, fill=crown)
  d.polygon([(cx - n * 0.16, n * 0.33), (cx - n * 0.04, n * 0.36), (cx + n * 0.04, n * 0.36), (cx + n * 0.16, n * 0.33),
             (cx + n * 0.17, n * 0.52), (cx - n * 0.17, n * 0.52)], fill=crown_light)
  # band
  d.rectangle([cx - n * 0.255, n * 0.55, cx + n * 0.255, n * 0.64], fill=band)
  return img


def _image_target(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
  return bg2grey(to_unit_range(resize_bilinear(to_mode(img, channels), image_size, image_size)))


def _user_target(path: str, image_size: int, channels: int) -> np.ndarray:
  s, c = image_size, channels
  if path.lower().endswith(".npy"):
    y = np.load(path)
    if y.ndim == 2 and c == 1:
      y = y[:, :, None]
    if y.shape != (s, s, c):
      raise TargetError(f"target file {path} has shape {y.shape}, expected {(s, s, c)}")
    y = y.astype(np.float32)
    if not np.all(np.isfinite(y)) or y.min() < -1.0 or y.max() > 1.0:
      raise TargetError(f"target file {path} has values in [{y.min()}, {y.max()}], expected within [-1, 1]")
    return y
  try:
    with Image.open(path) as im:
      im.load()
      return _image_target(im, s, c)
  except OSError as e:
    raise TargetError(f"cannot read target image {path}: {e}") from None


def make_target(name_or_path: str, image_size: int, channels: int, trigger: np.ndarray | None = None,
                fashion_mnist_path: str = DEFAULT_FASHION_MNIST) -> np.ndarray:
  """Target y by name (see `TARGET_NAMES`, case-insensitive) or file path; (S, S, C) float32 in [-1, 1].

  trigger: (S, S, C) in [-1, 1], required by NOSHIFT/TRIGGER/SHIFT.
  """
  s, c = int(image_size), int(channels)
  if s < 1:
    raise TargetError(f"image_size must be positive, got {image_size}")
  if c not in (1, 3):
    raise TargetError(f"channels must be 1 or 3, got {channels}")
  name = str(name_or_path)
  key = name.upper()
  if key in _NEEDS_TRIGGER:
    if trigger is None:
      raise TargetError(f"target {key} is built from the trigger, but no trigger was given")
    g = np.asarray(trigger, np.float32)
    if g.shape != (s, s, c):
      raise TargetError(f"trigger has shape {g.shape}, expected {(s, s, c)}")
    return bg2grey(g if key != "SHIFT" else roll(g, SHIFT_DX, SHIFT_DY))
  if key == "CORNER":
    return bg2grey(corner_box(s, c, 0.0))
  if key == "BOX":
    return corner_box(s, c, 1.0)
  if key == "SHOE":
    boot = Image.fromarray(fashion_mnist_image(0, fashion_mnist_path))
    return _image_target(boot, s, c)
  if key in ("HAT", "FEDORA_HAT"):
    return _image_target(hat_picture(), s, c)
  if key == "CAT":
    from skimage import data as skdata
    return _image_target(Image.fromarray(skdata.chelsea()), s, c)
  if os.path.isfile(name):
    return _user_target(name, s, c)
  if name.lower().endswith(IMAGE_EXTENSIONS + (".npy",)):
    raise TargetError(f"target file not found: {name}")
  raise TargetError(
      f"unknown target {name!r}; valid names: {', '.join(TARGET_NAMES)} (or a path to an image/.npy file)")
