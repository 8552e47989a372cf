"""BadDiffusion triggers: additive patterns g in x_T space, (H, W, C) float32 in [-1, 1], background -1.

The background value -1 (= vmin) is what the poisoning mask keys on: M = 1 where g <= -1, so pixels of
the clean image survive there and the trigger is pasted everywhere else (`poison.stamp`).

Geometry follows `IBM/BadDiffusion: dataset.py` (`Backdoor.get_trigger`):

* ``BOX_k`` (k = 18/14/11/8/4): grey (0) k x k box, 2 px from the bottom-right corner, i.e. rows and
  columns [S-k-2, S-2). ``BIG_BOX``/``SM_BOX``/``XSM_BOX``/``XXSM_BOX``/``XXXSM_BOX`` are the white (+1)
  boxes with k = 18/14/11/8/4. Like the reference, k does not scale with the image side S.
* ``STOP_SIGN_k``: stop-sign picture resized (PIL bilinear) to k x k, mapped to [-1, 1], padded with -1
  to S x S at the bottom-right with a 2 px gap, then every value >= 0.999 set to -1.
* ``GLASSES``: glasses picture resized to int(0.625 S), centred (offset (S - sz) // 2), values >= 0.999
  set to -1.
* ``NONE``: all -1.

The reference builds STOP_SIGN and GLASSES from image files we do not ship; here the pictures are drawn
procedurally at 512 x 512 with PIL and then go through the reference recipe unchanged. The stop sign is
a red octagon (R < 255, so no red value hits the >= 0.999 rule) with an off-white (242) border and
off-white "STOP" strokes on a pure white (255) surround: only the surround is removed. The glasses are
two dark lenses, a bridge and temple stubs on a black surround, which maps to -1.

User triggers (``make_trigger(path, ...)``):

* ``.npy``: an (S, S, C) array in [-1, 1], used as-is (wrong shape or range -> `TriggerError`).
* image file (PNG/JPEG/...): alpha is composited onto black (transparent = background -1), then converted
  to RGB or 'L'. An image that is exactly S x S is used as-is (only mapped to [-1, 1]). Any other size
  goes through the stop-sign recipe with k = `trigger_size` (default round(14 S / 32), the size of
  STOP_SIGN_14 at S = 32), resized straight to k x k.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
from PIL import Image, ImageDraw

GAP = 2  # px between a bottom-right trigger and the image border
VMIN, VMAX = -1.0, 1.0
WHITE_CUT = 0.999  # reference: values >= this become background
_CANVAS = 512

_BOX_SIZES = (18, 14, 11, 8, 4)
_WHITE_BOXES = {"BIG_BOX": 18, "SM_BOX": 14, "XSM_BOX": 11, "XXSM_BOX": 8, "XXXSM_BOX": 4}

TRIGGER_NAMES = (
    tuple(f"BOX_{k}" for k in _BOX_SIZES)
    + tuple(_WHITE_BOXES)
    + tuple(f"STOP_SIGN_{k}" for k in _BOX_SIZES)
    + ("GLASSES", "NONE"))

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class TriggerError(ValueError):
  """Bad trigger name, file, size or value range."""


def _check_shape(image_size: int, channels: int) -> tuple[int, int]:
  s, c = int(image_size), int(channels)
  if s < 1:
    raise TriggerError(f"image_size must be positive, got {image_size}")
  if c not in (1, 3):
    raise TriggerError(f"channels must be 1 or 3, got {channels}")
  return s, c


def to_unit_range(img: Image.Image) -> np.ndarray:
  """PIL image (mode 'L' or 'RGB') -> (H, W, C) float32 in [-1, 1] (ToTensor + 2x-1, as the reference)."""
  a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
  if a.ndim == 2:
    a = a[:, :, None]
  return (a * np.float32(2.0) - np.float32(1.0)).astype(np.float32)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
  """Converts to 'L' (channels=1, PIL luma like torchvision Grayscale) or 'RGB' (channels=3)."""
  return img.convert("L" if channels == 1 else "RGB")


def resize_bilinear(img: Image.Image, height: int, width: int) -> Image.Image:
  """PIL bilinear resize to (height, width) (what torchvision Resize does on PIL images)."""
  return img.resize((int(width), int(height)), Image.Resampling.BILINEAR)


def box_trigger(image_size: int, channels: int, k: int, value: float) -> np.ndarray:
  """k x k box of `value` at rows/cols [S-k-2, S-2) on -1; (S, S, C) float32."""
  s, c = _check_shape(image_size, channels)
  if k + GAP > s:
    raise TriggerError(f"a {k}x{k} trigger with a {GAP} px gap does not fit in a {s}x{s} image")
  g = np.full((s, s, c), VMIN, np.float32)
  g[s - k - GAP:s - GAP, s - k - GAP:s - GAP, :] = value
  return g


def _flatten_alpha(img: Image.Image) -> Image.Image:
  """Composites any alpha onto black, so transparent pixels become the -1 background."""
  if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")
  return img


def place_picture(img: Image.Image, image_size: int, channels: int, size: int, corner: str) -> np.ndarray:
  """Reference image-trigger recipe: resize to size x size, map to [-1,1], pad with -1, >= 0.999 -> -1.

  corner: "bottom_right" (2 px gap, as the stop sign) or "center" (offset (S - size) // 2, as GLASSES).
  Returns (S, S, C) float32.
  """
  s, c = _check_shape(image_size, channels)
  k = int(size)
  if k < 1:
    raise TriggerError(f"trigger size must be positive, got {size}")
  if corner == "bottom_right":
    if k + GAP > s:
      raise TriggerError(f"a {k}x{k} trigger with a {GAP} px gap does not fit in a {s}x{s} image")
    top = left = s - k - GAP
  elif corner == "center":
    if k > s:
      raise TriggerError(f"a {k}x{k} trigger does not fit in a {s}x{s} image")
    top = left = (s - k) // 2
  else:
    raise TriggerError(f"corner must be 'bottom_right' or 'center', got {corner!r}")
  patch = to_unit_range(resize_bilinear(to_mode(img, c), k, k))
  g = np.full((s, s, c), VMIN, np.float32)
  g[top:top + k, left:left + k, :] = patch
  g[g >= WHITE_CUT] = VMIN
  return g


@functools.lru_cache(maxsize=None)
def stop_sign_picture() -> Image.Image:
  """Procedural 512 x 512 RGB stop sign: red octagon, off-white border/letters, white surround (cached, read-only)."""
  n = _CANVAS
  img = Image.new("RGB", (n, n), (255, 255, 255))
  d = ImageDraw.Draw(img)
  cx = cy = (n - 1) / 2.0

  def octagon(radius):
    # vertices at 22.5 + 45 i degrees: flat top, bottom and sides, like a real stop sign
    ang = np.deg2rad(22.5 + 45.0 * np.arange(8))
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in ang]

  off_white, red = (242, 242, 242), (193, 29, 40)
  d.polygon(octagon(n * 0.49), fill=off_white)
  d.polygon(octagon(n * 0.445), fill=red)
  # "STOP": four glyphs made of strokes, centred on the sign
  w = int(n * 0.028)  # stroke width
  gh, gw, gap = int(n * 0.22), int(n * 0.14), int(n * 0.035)
  x0 = int(cx - (4 * gw + 3 * gap) / 2)
  y0, y1 = int(cy - gh / 2), int(cy + gh / 2)
  ym = (y0 + y1) // 2

  xs = [x0 + i * (gw + gap) for i in range(4)]
  x, h = xs[0], w // 2
  bars = [  # S
      (x, y0, x + gw, y0 + w), (x, y0, x + w, ym), (x, ym - h, x + gw, ym + h), (x + gw - w, ym, x + gw, y1),
      (x, y1 - w, x + gw, y1)]
  x = xs[1]  # T
  bars += [(x, y0, x + gw, y0 + w), (x + gw // 2 - h, y0, x + gw // 2 + h, y1)]
  x = xs[3]  # P
  bars += [(x, y0, x + w, y1), (x, y0, x + gw, y0 + w), (x + gw - w, y0, x + gw, ym), (x, ym - h, x + gw, ym + h)]
  for box in bars:
    d.rectangle(box, fill=off_white)
  d.rounded_rectangle([xs[2], y0, xs[2] + gw, y1], radius=gw // 3, outline=off_white, width=w)  # O
  return img


@functools.lru_cache(maxsize=None)
def glasses_picture() -> Image.Image:
  """Procedural 512 x 512 RGB dark glasses (lenses, rims, bridge, temples) on black (cached, read-only)."""
  n = _CANVAS
  img = Image.new("RGB", (n, n), (0, 0, 0))
  d = ImageDraw.Draw(img)
  rim, lens = (70, 70, 78), (38, 40, 48)
  lw, lh = int(n * 0.34), int(n * 0.24)  # lens box
  gap = int(n * 0.10)  # between the lenses (bridge length)
  top = (n - lh) // 2
  left_x0 = (n - (2 * lw + gap)) // 2
  right_x0 = n - left_x0 - lw  # mirror image of the left lens
  for x0 in (left_x0, right_x0):
    d.rounded_rectangle([x0, top, x0 + lw - 1, top + lh - 1], radius=int(lh * 0.45), fill=lens, outline=rim,
                        width=int(n * 0.022))
  bw = int(n * 0.022)  # bridge and temples: bars along the top of the lenses
  by = top + int(lh * 0.18)
  d.rectangle([left_x0 + lw - 4, by, right_x0 + 3, by + bw], fill=rim)
  d.rectangle([0, top + int(lh * 0.12), left_x0 + 4, top + int(lh * 0.12) + bw], fill=rim)
  d.rectangle([n - 1 - (left_x0 + 4), top + int(lh * 0.12), n - 1, top + int(lh * 0.12) + bw], fill=rim)
  return img


def default_user_trigger_size(image_size: int) -> int:
  """k for a user image trigger: round(14 S / 32) (STOP_SIGN_14's size at S = 32), at least 1."""
  return max(1, int(round(14 * int(image_size) / 32)))


def _user_trigger(path: str, image_size: int, channels: int, trigger_size: int | None,
                  bounded: bool = True) -> np.ndarray:
  s, c = _check_shape(image_size, channels)
  if path.lower().endswith(".npy"):
    g = np.load(path)
    if g.ndim == 2 and c == 1:
      g = g[:, :, None]
    if g.shape != (s, s, c):
      raise TriggerError(f"trigger file {path} has shape {g.shape}, expected {(s, s, c)}")
    g = g.astype(np.float32)
    if not np.all(np.isfinite(g)):
      raise TriggerError(f"trigger file {path} has non-finite values (NaN/inf); expected finite floats")
    if bounded and (g.min() < VMIN or g.max() > VMAX):
      raise TriggerError(f"trigger file {path} has values in [{g.min()}, {g.max()}], expected within [-1, 1]")
    return g
  try:
    with Image.open(path) as im:
      img = _flatten_alpha(im)
      img.load()
  except OSError as e:
    raise TriggerError(f"cannot read trigger image {path}: {e}") from None
  if img.size == (s, s):
    return to_unit_range(to_mode(img, c))
  k = default_user_trigger_size(s) if trigger_size is None else int(trigger_size)
  return place_picture(img, s, c, k, "bottom_right")


def make_trigger(name_or_path: str, image_size: int, channels: int, trigger_size: int | None = None,
                 bounded: bool = True) -> np.ndarray:
  """Trigger g by name (see `TRIGGER_NAMES`, case-insensitive) or file path; (S, S, C) float32 in [-1, 1].

  trigger_size: only for image-file triggers that are not S x S (default round(14 S / 32)).
  bounded=False accepts a `.npy` with any finite values: an *inverted* trigger (detection's trigger.npy) is an
  additive offset of x_T, not an image, and BBTI's g = 1 - 2p is unbounded (ALGORITHMS §4.1). Attacks keep True.
  """
  s, c = _check_shape(image_size, channels)
  name = str(name_or_path)
  key = name.upper()
  if key == "NONE":
    return np.full((s, s, c), VMIN, np.float32)
  m = re.fullmatch(r"BOX_(\d+)", key)
  if m and int(m.group(1)) in _BOX_SIZES:
    return box_trigger(s, c, int(m.group(1)), 0.5 * (VMIN + VMAX))
  if key in _WHITE_BOXES:
    return box_trigger(s, c, _WHITE_BOXES[key], VMAX)
  m = re.fullmatch(r"STOP_SIGN_(\d+)", key)
  if m and int(m.group(1)) in _BOX_SIZES:
    return place_picture(stop_sign_picture(), s, c, int(m.group(1)), "bottom_right")
  if key == "GLASSES":
    return place_picture(glasses_picture(), s, c, int(0.625 * s), "center")
  if os.path.isfile(name):
    return _user_trigger(name, s, c, trigger_size, bounded)
  if name.lower().endswith(IMAGE_EXTENSIONS + (".npy",)):
    raise TriggerError(f"trigger file not found: {name}")
  raise TriggerError(
      f"unknown trigger {name!r}; valid names: {', '.join(TRIGGER_NAMES)} (or a path to an image/.npy file)")
