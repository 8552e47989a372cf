"""Image data sets as host numpy arrays: Fashion-MNIST / MNIST (IDX), CIFAR-10 (python pickles), image
folders and procedural shapes.

Every loader returns `(images, labels)`: images float32 NHWC in [-1, 1] (C=1 for grayscale, background
-1), labels int32 of shape (N,). Anything missing or malformed raises `DatasetError` with one line that
names the file or directory, what was expected and how to get it.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from typing import Any, Mapping

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_DIR = "/usr/share/datasets/mnist"
DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "image_folder", "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SYNTHETIC_DEFAULT_SIZE = 1024  # examples `load_dataset` makes for name="synthetic" when num_examples is unset
SYNTHETIC_KINDS = ("rectangle", "ellipse", "triangle")  # label k = SYNTHETIC_KINDS[k]

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim
_SPLITS = ("train", "test")


class DatasetError(ValueError):
  """A data set is missing, malformed or does not match the config (the message is one line)."""


_UINT8_TO_FLOAT = (np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0))


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], same shape (0 -> -1, 255 -> 1)."""
  return _UINT8_TO_FLOAT[np.asarray(images, dtype=np.uint8)]


def _check_split(split: str, what: str) -> str:
  if split not in _SPLITS:
    raise DatasetError(f"{what}: split={split!r} is not supported; expected one of {_SPLITS}")
  return split


# --------------------------------------------------------------------------------------------------- IDX


def _read_maybe_gz(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DatasetError(f"{path}: corrupt or truncated gzip data ({e}); re-download or reinstall the file") from None


def _idx_header(data: bytes, path: str, magic: int, ndim: int) -> tuple[int, ...]:
  header_len = 4 * (1 + ndim)
  if len(data) < header_len:
    raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, header alone needs {header_len})")
  fields = np.frombuffer(data[:header_len], dtype=">u4").astype(np.int64)
  if int(fields[0]) != magic:
    raise DatasetError(f"{path}: bad IDX magic number {int(fields[0])}, expected {magic} "
                       f"({'images, idx3-ubyte' if ndim == 3 else 'labels, idx1-ubyte'}); is this the right file?")
  dims = tuple(int(d) for d in fields[1:])
  expected = header_len + int(np.prod(dims, dtype=np.int64))
  if len(data) != expected:
    raise DatasetError(f"{path}: IDX header promises dims {dims} ({expected} bytes) but the file holds "
                       f"{len(data)} bytes; the file is truncated or corrupt, re-download it")
  return dims


def load_idx(images_gz: str, labels_gz: str) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-style IDX pair (gzipped or raw) -> (images uint8 (N, rows, cols), labels int32 (N,))."""
  img_data = _read_maybe_gz(images_gz)
  n, rows, cols = _idx_header(img_data, images_gz, _IDX_IMAGES_MAGIC, 3)
  if rows == 0 or cols == 0:
    raise DatasetError(f"{images_gz}: IDX images have empty dims {(n, rows, cols)}")
  lab_data = _read_maybe_gz(labels_gz)
  (n_labels,) = _idx_header(lab_data, labels_gz, _IDX_LABELS_MAGIC, 1)
  if n_labels != n:
    raise DatasetError(f"{images_gz} holds {n} images but {labels_gz} holds {n_labels} labels; "
                       "the two files must come from the same split")
  images = np.frombuffer(img_data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
  labels = np.frombuffer(lab_data, dtype=np.uint8, offset=8).astype(np.int32)
  return images, labels


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W) or (N, H, W, C) uint8 -> (N, size, size[, C]) uint8 with PIL bilinear."""
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((images.shape[0], size, size) + images.shape[3:], dtype=np.uint8)
  for i, im in enumerate(images):
    pil = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im)
    out[i] = np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(out.shape[1:])
  return out


def _check_size(image_size: Any, what: str) -> int:
  try:
    size = int(image_size)
  except (TypeError, ValueError):
    size = 0
  if size < 1:
    raise DatasetError(f"{what}: image_size must be a positive integer, got {image_size!r}")
  return size


def _load_mnist_like(title: str, path: str, split: str, image_size: int, how_to_get: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  split = _check_split(split, title)
  size = _check_size(image_size, title)
  prefix = "train" if split == "train" else "t10k"
  if not os.path.isdir(path):
    raise DatasetError(f"{title} not found: directory {path} does not exist; {how_to_get}")
  files = []
  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
    gz = os.path.join(path, f"{prefix}-{kind}.gz")
    raw = os.path.join(path, f"{prefix}-{kind}")
    if not os.path.exists(gz) and os.path.exists(raw):
      gz = raw
    if not os.path.exists(gz):
      raise DatasetError(f"{title} not found: {gz} is missing; {how_to_get}")
    files.append(gz)
  images, labels = load_idx(*files)
  if size == 32 and images.shape[1:] == (28, 28):
    x = np.full((images.shape[0], 32, 32, 1), -1.0, dtype=np.float32)  # 2 px of background on each side
    x[:, 2:30, 2:30, 0] = to_float(images)
    return x, labels
  return to_float(_resize_uint8(images, size))[..., None], labels


def load_fashion_mnist(path: str = FASHION_MNIST_DIR, split: str = "train", image_size: int = 32
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST -> (images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32); N = 60000 / 10000.

  28x28 is padded to 32x32 with 2 px of background (-1) when image_size=32, else resized (PIL bilinear).
  """
  path = FASHION_MNIST_DIR if path is None else os.fspath(path)
  return _load_mnist_like(
      "Fashion-MNIST", path, split, image_size,
      "install Debian's package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) "
      "or pass --config.data.path=DIR")


def load_mnist(path: str = MNIST_DIR, split: str = "train", image_size: int = 32
               ) -> tuple[np.ndarray, np.ndarray]:
  """MNIST (same IDX file names and layout as Fashion-MNIST) -> (images (N, S, S, 1), labels (N,))."""
  path = MNIST_DIR if path is None else os.fspath(path)
  return _load_mnist_like(
      "MNIST", path, split, image_size,
      "put train-/t10k-images-idx3-ubyte.gz and train-/t10k-labels-idx1-ubyte.gz in a directory "
      "and pass --config.data.path=DIR")


# ----------------------------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct():
  core = getattr(np, "_core", None)  # numpy >= 2 (numpy.core is a deprecated alias there)
  if core is None:
    core = np.core
  return core.multiarray._reconstruct


def _codecs_encode():
  import _codecs  # pylint: disable=import-outside-toplevel
  return _codecs.encode


# The only globals a CIFAR-10 batch may name: numpy's ndarray reconstruction (numpy 1 and 2 spellings),
# plus `_codecs.encode`, which Python 3 uses to write bytes objects at pickle protocol <= 2 (it only
# turns a str into bytes). Everything else (os.system, builtins.eval, ...) is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for untrusted CIFAR batches: only numpy array reconstruction globals resolve."""

  def __init__(self, f, source: str):
    super().__init__(f, encoding="bytes")
    self._source = source

  def find_class(self, module, name):
    getter = _PICKLE_ALLOWED.get((module, name))
    if getter is None:
      raise DatasetError(f"{self._source}: refusing to unpickle global {module}.{name}; a CIFAR-10 batch holds "
                         "only dicts, lists, bytes and numpy uint8 arrays (is this file tampered with?)")
    return getter()

  def persistent_load(self, pid):
    raise DatasetError(f"{self._source}: refusing persistent id in pickle; not a CIFAR-10 batch")


def _restricted_load(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return _RestrictedUnpickler(f, path).load()
  except DatasetError:
    raise
  except OSError as e:
    raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-except  (untrusted bytes: any decode failure is "corrupt")
    raise DatasetError(f"{path}: not a readable CIFAR-10 python pickle ({type(e).__name__}: {e}); "
                       "re-download the python version of CIFAR-10") from None


def _get_key(d: Mapping, key: str) -> Any:
  if key.encode() in d:
    return d[key.encode()]
  return d.get(key)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  obj = _restricted_load(path)
  if not isinstance(obj, dict):
    raise DatasetError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(obj).__name__}")
  data, labels = _get_key(obj, "data"), _get_key(obj, "labels")
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
    raise DatasetError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
  try:
    labels = np.asarray(labels, dtype=np.int64)
  except (TypeError, ValueError):
    labels = np.zeros((0, 0))
  if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
    raise DatasetError(f"{path}: b'labels' must be {data.shape[0]} integers in 0..9")
  # Each row: 1024 R, 1024 G, 1024 B, each a row-major 32x32 plane.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int32)


def load_cifar10(path: str, split: str = "train", image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """CIFAR-10 python batches dir (data_batch_1..5, test_batch) -> (images (N, S, S, 3), labels (N,)).

  `path` may also be the parent of `cifar-10-batches-py`. Pickles are read with a restricted unpickler.
  """
  split = _check_split(split, "CIFAR-10")
  size = _check_size(image_size, "CIFAR-10")
  how_to_get = ("download and extract the python version of CIFAR-10 (cifar-10-python.tar.gz) "
                "and pass --config.data.path=DIR/cifar-10-batches-py")
  if path is None:
    raise DatasetError(f"CIFAR-10 needs a directory: {how_to_get}")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise DatasetError(f"CIFAR-10 not found: directory {path} does not exist; {how_to_get}")
  nested = os.path.join(path, "cifar-10-batches-py")
  if not os.path.exists(os.path.join(path, "test_batch")) and os.path.isdir(nested):
    path = nested
  names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
  images, labels = [], []
  for name in names:
    f = os.path.join(path, name)
    if not os.path.exists(f):
      raise DatasetError(f"CIFAR-10 not found: {f} is missing; {how_to_get}")
    x, y = _read_cifar_batch(f)
    images.append(x)
    labels.append(y)
  x = np.concatenate(images)
  return to_float(_resize_uint8(x, size)), np.concatenate(labels)


# ------------------------------------------------------------------------------------------- image folder


def _center_crop_resize(im: Image.Image, size: int) -> Image.Image:
  w, h = im.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    im = im.resize((nw, nh), Image.BILINEAR)
  left, top = (nw - size) // 2, (nh - size) // 2
  return im.crop((left, top, left + size, top + size))


def list_image_files(path: str) -> list[str]:
  """Image files (PNG/JPEG/BMP, any case) under `path`, recursively, sorted by relative path."""
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(root, name))
  return sorted(found, key=lambda p: os.path.relpath(p, path))


def load_image_folder(path: str, image_size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Every PNG/JPEG/BMP under `path` -> (images (N, S, S, C) float32 in [-1, 1], labels zeros (N,)).

  Each image: converted to RGB (C=3) or L (C=1), shorter side resized to S (bilinear), center-cropped.
  """
  size = _check_size(image_size, f"image folder {path}")
  if channels not in (1, 3):
    raise DatasetError(f"image folder {path}: channels must be 1 or 3, got {channels!r}")
  if path is None:
    raise DatasetError("image folder: no directory given; pass --config.data.path=DIR")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise DatasetError(f"image folder not found: directory {path} does not exist; pass --config.data.path=DIR")
  files = list_image_files(path)
  if not files:
    raise DatasetError(f"image folder {path} holds no image files (looked recursively for {IMAGE_EXTENSIONS})")
  mode = "RGB" if channels == 3 else "L"
  out = np.empty((len(files), size, size, channels), dtype=np.uint8)
  for i, f in enumerate(files):
    try:
      with Image.open(f) as im:
        im.load()
        im = _center_crop_resize(im.convert(mode), size)
        out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, channels)
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many types for bad files)
      raise DatasetError(f"{f}: unreadable or corrupt image ({type(e).__name__}: {e}); fix or remove it") from None
  return to_float(out), np.zeros((len(files),), dtype=np.int32)


# ----------------------------------------------------------------------------------------------- synthetic


def synthetic(num: int, image_size: int = 32, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Procedural shapes for tests -> (images (num, S, S, C) float32 in [-1, 1], labels (num,) int32).

  One filled shape per image on a -1 background, label = kind index into SYNTHETIC_KINDS
  (rectangle, ellipse, triangle); grey (C=1) or colour (C=3) fill in [-0.5, 1]. Deterministic in `seed`.
  """
  num, size = int(num), _check_size(image_size, "synthetic")
  if num < 0:
    raise DatasetError(f"synthetic: num must be >= 0, got {num}")
  if channels < 1:
    raise DatasetError(f"synthetic: channels must be >= 1, got {channels!r}")
  rng = np.random.Generator(np.random.PCG64(int(seed)))
  kind = rng.integers(0, len(SYNTHETIC_KINDS), size=num)
  hw = rng.uniform(0.15, 0.35, size=num) * size  # half-extents
  hh = rng.uniform(0.15, 0.35, size=num) * size
  cx = rng.uniform(hw, size - hw)
  cy = rng.uniform(hh, size - hh)
  colour = rng.uniform(-0.5, 1.0, size=(num, channels)).astype(np.float32)
  c = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
  dx = (c[None, None, :] - cx[:, None, None]) / hw[:, None, None]  # (num, 1, S), in half-widths
  dy = (c[None, :, None] - cy[:, None, None]) / hh[:, None, None]  # (num, S, 1)
  rect = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
  ellipse = dx ** 2 + dy ** 2 <= 1
  triangle = (np.abs(dy) <= 1) & (np.abs(dx) <= (dy + 1) / 2)  # apex up, base at the bottom
  k = kind[:, None, None]
  mask = np.where(k == 0, rect, np.where(k == 1, ellipse, triangle))
  images = np.where(mask[..., None], colour[:, None, None, :], np.float32(-1.0)).astype(np.float32)
  return images, kind.astype(np.int32)


# ------------------------------------------------------------------------------------------------ factory


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  if cfg is None:
    return default
  if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def match_channels(images: np.ndarray, channels: int, what: str = "data set") -> np.ndarray:
  """(N, H, W, C) -> (N, H, W, channels): 1 -> 3 repeats, 3 -> 1 takes luma (0.299 R + 0.587 G + 0.114 B)."""
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if have == 3 and channels == 1:
    luma = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(images @ luma, -1.0, 1.0)[..., None].astype(np.float32)
  raise DatasetError(f"{what} has {have} channels but config data.channels={channels}; "
                     "only 1 <-> 3 conversion is supported, set data.channels to match")


def load_dataset(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
  """Data set from a config section (mapping or ConfigDict) -> (images (N, S, S, C) in [-1, 1], labels (N,)).

  Fields: name (one of DATASET_NAMES), path, split ("train"/"test"), image_size, channels (None/0 = as
  stored; 1 <-> 3 converted), num_examples (None/0 = all, else the first N), seed (synthetic only).
  """
  name = _cfg_get(cfg, "name")
  path = _cfg_get(cfg, "path") or None
  split = _cfg_get(cfg, "split", "train")
  image_size = _cfg_get(cfg, "image_size", 32)
  channels = _cfg_get(cfg, "channels") or None
  num = int(_cfg_get(cfg, "num_examples", 0) or 0)
  seed = int(_cfg_get(cfg, "seed", 0))
  if num < 0:
    raise DatasetError(f"data.num_examples must be >= 0 (0 = all), got {num}")
  if channels is not None and int(channels) not in (1, 3):
    raise DatasetError(f"data.channels must be 1 or 3 (or unset), got {channels!r}")
  channels = None if channels is None else int(channels)
  if name == "fashion_mnist":
    images, labels = load_fashion_mnist(path or FASHION_MNIST_DIR, split, image_size)
  elif name == "mnist":
    images, labels = load_mnist(path or MNIST_DIR, split, image_size)
  elif name == "cifar10":
    images, labels = load_cifar10(path, split, image_size)
  elif name == "image_folder":
    images, labels = load_image_folder(path, image_size, channels or 3)
  elif name == "synthetic":
    images, labels = synthetic(num or SYNTHETIC_DEFAULT_SIZE, image_size, channels or 1, seed)
  else:
    raise DatasetError(f"unknown data set name {name!r}; expected one of {DATASET_NAMES}")
  if num:
    if num > images.shape[0]:
      raise DatasetError(f"data.num_examples={num} but data set {name!r} ({path or 'default path'}, "
                         f"split {split!r}) has only {images.shape[0]} examples")
    images, labels = images[:num], labels[:num]
  if channels is not None:
    images = match_channels(images, channels, f"data set {name!r}")
  return images, labels
