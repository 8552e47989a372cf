"""Inception-v3, FID variant (pytorch-fid `InceptionV3([3])`), in flax.linen, NHWC; 2048-d pool3 features.

Structure as `pytorch_fid.inception.fid_inception_v3`: torchvision's Inception3 stem and InceptionB/D blocks,
with the patched `FIDInceptionA`/`FIDInceptionC`/`FIDInceptionE_1` (average pools exclude padding) and
`FIDInceptionE_2` (max pool in the pool branch). Input (B, H, W, 3) in [0, 1] is resized to 299x299 with
torch's bilinear rule (align_corners=False, no antialiasing) and mapped to [-1, 1].

Parameter names follow the pytorch-fid state dict mechanically: `Mixed_5b.branch1x1.conv.weight` ->
params['Mixed_5b']['branch1x1']['conv']['kernel'] (OIHW -> HWIO), `.bn.weight/.bn.bias` -> params ...
['bn']['scale'/'bias'], `.bn.running_mean/.bn.running_var` -> batch_stats ...['bn']['mean'/'var'].
BatchNorm runs in inference mode with eps 1e-3. No weights ship with the package (none may be
redistributed offline): pass pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` to `load_fid_inception`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax.metrics import frechet
from diffcleanse_jax.metrics.backdoor import pm1_to_01, to_uint8_quantised

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
_HIGHEST = jax.lax.Precision.HIGHEST
# State-dict entries that exist in the .pth file but are not part of the pool3 feature extractor.
_IGNORED_KEYS = ("fc.weight", "fc.bias")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BasicConv2d(nn.Module):
  """torchvision `BasicConv2d`: conv (no bias) -> BatchNorm(eps 1e-3, inference) -> ReLU. NHWC."""

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: (B, 35, 35, Cin) -> (B, 35, 35, 224 + pool_features)."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: (B, 35, 35, 288) -> (B, 17, 17, 768)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: (B, 17, 17, 768) -> (B, 17, 17, 768)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: (B, 17, 17, 768) -> (B, 8, 8, 1280)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (`max_pool=False`, FIDInceptionE_1) / Mixed_7c (`max_pool=True`, FIDInceptionE_2) -> 2048 ch."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_same(x)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of F.interpolate(mode='bilinear', align_corners=False, antialias=False)."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def resize_bilinear_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, size[0], size[1], C), matching torch's bilinear resize (align_corners=False)."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(size):
    return x
  mh = jnp.asarray(torch_bilinear_matrix(h, size[0]), jnp.float32)
  mw = jnp.asarray(torch_bilinear_matrix(w, size[1]), jnp.float32)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=_HIGHEST)


class FIDInceptionV3(nn.Module):
  """pytorch-fid InceptionV3 up to pool3: (B, H, W, 3) in [0, 1] -> (B, 2048) features.

  `resize_input` (to 299x299) and `normalize_input` ([0, 1] -> [-1, 1]) default to pytorch-fid's.
  Grayscale input (C=1) is repeated to 3 channels (pytorch-fid's ImagePathDataset converts to RGB).
  """

  resize_input: bool = True
  normalize_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear_torch(x, (299, 299))
    if self.normalize_input:
      x = 2 * x - 1
    x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = FIDInceptionE(max_pool=False, name="Mixed_7b")(x)
    x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------------
# Variables: random init, state-dict conversion, loading.


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random pytorch-fid-layout state dict (He-normal kernels, perturbed BN): for tests and plumbing only."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in expected_state_dict_shapes().items():
    if name.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      sd[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif name.endswith("bn.weight"):
      sd[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name.endswith("bn.bias") or name.endswith("running_mean"):
      sd[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:  # running_var
      sd[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
  return sd


def init_fid_inception(seed: int = 0) -> dict[str, Any]:
  """Random variables {'params', 'batch_stats'} from `random_state_dict(seed)`: no FID meaning, tests only."""
  return convert_pytorch_fid_state_dict(random_state_dict(seed))


def _flax_to_torch_name(collection: str, path: tuple[str, ...]) -> str:
  leaf = path[-1]
  if collection == "params":
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  elif collection == "batch_stats":
    torch_leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    raise KeyError(f"unexpected variable collection {collection!r}")
  return ".".join(path[:-1] + (torch_leaf,))


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  out = {}
  for collection, tree in shapes.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(p.key for p in path)
      out[(collection, keys)] = tuple(leaf.shape)
  return out


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel":  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """pytorch-fid state-dict names -> torch shapes for the pool3 extractor (470 entries; no fc, no counters)."""
  return {_flax_to_torch_name(c, p): _torch_shape(p, s) for (c, p), s in _variable_shapes().items()}


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
  """pytorch-fid InceptionV3 state dict {name: array} -> flax variables {'params', 'batch_stats'} (float32).

  `fc.*` and `*.num_batches_tracked` are ignored. Raises KeyError on missing names (and, with `strict`, on
  unknown ones) and ValueError on shape mismatches.
  """
  sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  missing = []
  for (collection, path), shape in _variable_shapes().items():
    name = _flax_to_torch_name(collection, path)
    if name not in sd:
      missing.append(name)
      continue
    arr = np.asarray(sd[name], np.float32)
    want = _torch_shape(path, shape)
    if arr.shape != want:
      raise ValueError(f"{name}: shape {arr.shape} in the state dict, expected {want}")
    if path[-1] == "kernel":
      arr = arr.transpose(2, 3, 1, 0)
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(arr)
  if missing:
    raise KeyError(f"{len(missing)} FID Inception weights missing from the state dict, e.g. {missing[:3]}")
  if strict:
    known = set(expected_state_dict_shapes())
    unknown = [k for k in sd if k not in known and k not in _IGNORED_KEYS and not k.endswith("num_batches_tracked")]
    if unknown:
      raise KeyError(f"unexpected state-dict entries (not FID Inception v3): {unknown[:5]}")
  return variables


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `convert_pytorch_fid_state_dict`: flax variables -> {torch name: numpy array (torch layout)}."""
  out = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      keys = tuple(p.key for p in path)
      arr = np.asarray(leaf)
      out[_flax_to_torch_name(collection, keys)] = arr.transpose(3, 2, 0, 1) if keys[-1] == "kernel" else arr
  return out


def load_fid_inception(path: str | os.PathLike) -> dict[str, Any]:
  """Loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an `.npz` of the same names) as flax variables.

  The `.pth` is read without torch by `diffcleanse_jax.io.torch_pickle.load_torch_state_dict`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path!r}. Download pytorch-fid's {FID_WEIGHTS_FILENAME} "
        "(github.com/mseitzer/pytorch-fid releases, tag fid_weights) and pass its path.")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      sd = {k: f[k] for k in f.files}
  else:
    from diffcleanse_jax.io.torch_pickle import load_torch_state_dict  # lazy: optional reader
    sd = load_torch_state_dict(path)
  return convert_pytorch_fid_state_dict(sd)


# ----------------------------------------------------------------------------------------------------
# Features and FID.


@jax.jit
def _apply_features(variables: Mapping[str, Any], images01: jax.Array) -> jax.Array:
  return FIDInceptionV3().apply(variables, images01)


def inception_features(images01: Any, variables: Mapping[str, Any], batch_size: int = 50) -> np.ndarray:
  """(N, H, W, 3 or 1) images in [0, 1] -> (N, 2048) float32 pool3 features, in fixed-size batches."""
  images = np.asarray(images01, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
  n = images.shape[0]
  bs = int(min(batch_size, n))
  feats = []
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], np.float32)])
    feats.append(np.asarray(_apply_features(variables, jnp.asarray(chunk)))[:m])
  return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


def sample_features(samples_pm1: Any, variables: Mapping[str, Any], batch_size: int = 50,
                    quantise: bool = True) -> np.ndarray:
  """Generated samples (N, H, W, C) in [-1, 1] -> (N, 2048) features, after the 8-bit PNG round trip
  (`quantise=True`, ALGORITHMS §6) or the plain clamp(x / 2 + 1 / 2, 0, 1)."""
  x = jnp.asarray(samples_pm1, jnp.float32)
  return inception_features(to_uint8_quantised(x) if quantise else pm1_to_01(x), variables, batch_size)


def fid_from_samples(samples_pm1: Any, reference: Any, variables: Mapping[str, Any], batch_size: int = 50,
                     quantise: bool = True) -> float:
  """FID of generated samples (N, H, W, C) in [-1, 1] against `reference`.

  reference: (mu, sigma) statistics, a path to a pytorch-fid `.npz`, or (M, H, W, C) images in [0, 1].
  Samples are quantised to 8 bit first (PNG round trip, ALGORITHMS §6) unless `quantise=False`.
  The 2048x2048 `scipy.linalg.sqrtm` takes tens of seconds on a small CPU (as in pytorch-fid).
  """
  mu1, s1 = frechet.feature_statistics(sample_features(samples_pm1, variables, batch_size, quantise))
  if isinstance(reference, (str, os.PathLike)):
    mu2, s2 = frechet.load_statistics(reference)
  elif isinstance(reference, (tuple, list)) and len(reference) == 2:
    mu2, s2 = reference
  else:
    mu2, s2 = frechet.feature_statistics(inception_features(reference, variables, batch_size))
  return frechet.frechet_distance(mu1, s1, mu2, s2)
