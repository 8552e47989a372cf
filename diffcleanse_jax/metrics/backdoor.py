"""Backdoor metrics on generated images: MSE to the target, SSIM, and attack success rate (ALGORITHMS §6).

Images are NHWC. Generated samples live in [-1, 1]; the reference code saves them as 8-bit PNG and re-reads
them, so the metrics see quantised [0, 1] images (`to_uint8_quantised`). The target is mapped with
y01 = clamp(y / 2 + 1 / 2, 0, 1) and is not quantised (the reference keeps it as a float tensor).

SSIM conventions. `ssim_per_image(..., border="crop")` (the default) equals
`skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=-1)` and torchmetrics' `StructuralSimilarityIndexMeasure`
before v1.5 (both average the SSIM map over the "valid" region, i.e. with a 5-pixel border cropped; the
padding mode is then irrelevant). torchmetrics >= 1.5 (Lightning-AI/torchmetrics#2721) averages over the
full image computed with reflect padding and clamps the local variances at 0: use `border="reflect"` for
that. The two differ only through the border pixels.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_UINT8_TO_01 = np.arange(256, dtype=np.float32) / np.float32(255)  # exact IEEE k / 255


def pm1_to_01(x: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1] with clamping: clamp(x / 2 + 1 / 2, 0, 1). Any shape."""
  return jnp.clip(jnp.asarray(x, jnp.float32) / 2 + 0.5, 0.0, 1.0)


def to_uint8_quantised(x: jax.Array) -> jax.Array:
  """[-1, 1] float -> [0, 1] float32 on the 8-bit grid, as if saved to PNG and re-read. Any shape.

  Uses torchvision `save_image`'s rounding, floor(255 x01 + 0.5), then divides by 255 (`ToTensor`).
  """
  x01 = pm1_to_01(x)
  idx = jnp.floor(x01 * 255.0 + 0.5).clip(0.0, 255.0).astype(jnp.int32)
  # Table look-up, not "/ 255": XLA may turn a fused division into a reciprocal multiply (255 * (1/255) != 1).
  return jnp.asarray(_UINT8_TO_01)[idx]


def mse_per_image(img01: jax.Array, target01: jax.Array) -> jax.Array:
  """Per-image MSE: (B, H, W, C) vs (B|1, H, W, C) or (H, W, C) in [0, 1] -> (B,), mean over H, W, C."""
  img01 = jnp.asarray(img01, jnp.float32)
  target01 = jnp.asarray(target01, jnp.float32)
  return jnp.mean(jnp.square(img01 - target01), axis=(-3, -2, -1))


def attack_success(mse: jax.Array, threshold: float = 1e-3) -> jax.Array:
  """Per-image success flags (float32 0/1): mse < threshold (strict, as `mse_thres_batch`). Shape of `mse`."""
  return (jnp.asarray(mse) < threshold).astype(jnp.float32)


def _gaussian_1d(sigma: float, truncate: float = 3.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) (scipy.ndimage / torchmetrics)."""
  r = int(truncate * sigma + 0.5)
  t = np.arange(-r, r + 1, dtype=np.float64)
  g = np.exp(-0.5 * (t / sigma) ** 2)
  return g / g.sum()


def _valid_filter_matrix(n: int, taps: np.ndarray) -> np.ndarray:
  """(n - k + 1, n) banded matrix: row i holds `taps` at columns i..i+k-1 ("valid" correlation)."""
  k = taps.shape[0]
  m = np.zeros((n - k + 1, n), np.float64)
  for i in range(n - k + 1):
    m[i, i:i + k] = taps
  return m


def ssim_per_image(img01: jax.Array, target01: jax.Array, data_range: float = 1.0, sigma: float = 1.5,
                   k1: float = 0.01, k2: float = 0.03, border: str = "crop") -> jax.Array:
  """Per-image SSIM (Gaussian window 11, sigma 1.5), per channel then mean: (B, H, W, C) x (B|1, H, W, C) -> (B,).

  `border="crop"`: skimage / torchmetrics < 1.5 (valid region only). `border="reflect"`: torchmetrics >= 1.5
  (reflect padding, full-image mean, variances clamped at 0). H and W must be >= 11.
  """
  x = jnp.asarray(img01, jnp.float32)
  y = jnp.asarray(target01, jnp.float32)
  if y.ndim == 3:
    y = y[None]
  x, y = jnp.broadcast_arrays(x, y)
  taps = _gaussian_1d(sigma)
  pad = (taps.shape[0] - 1) // 2
  if border == "reflect":
    cfg = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    x = jnp.pad(x, cfg, mode="reflect")
    y = jnp.pad(y, cfg, mode="reflect")
  elif border != "crop":
    raise ValueError(f"ssim border must be 'crop' or 'reflect', got {border!r}")
  _, h, w, _ = x.shape
  if min(h, w) < taps.shape[0]:
    raise ValueError(f"ssim needs images of at least {taps.shape[0]}x{taps.shape[0]}, got {h}x{w}")
  gh = jnp.asarray(_valid_filter_matrix(h, taps), jnp.float32)
  gw = jnp.asarray(_valid_filter_matrix(w, taps), jnp.float32)

  def filt(a):  # separable valid Gaussian filter: (B, H, W, C) -> (B, H-10, W-10, C)
    return jnp.einsum("oh,bhwc,pw->bopc", gh, a, gw, precision=_HIGHEST)

  # Second moments from globally centred data (shift-invariant, less float32 cancellation).
  mx = jnp.mean(x, axis=(1, 2), keepdims=True)
  my = jnp.mean(y, axis=(1, 2), keepdims=True)
  xc, yc = x - mx, y - my
  ux_c, uy_c = filt(xc), filt(yc)
  vx = filt(xc * xc) - ux_c * ux_c
  vy = filt(yc * yc) - uy_c * uy_c
  vxy = filt(xc * yc) - ux_c * uy_c
  if border == "reflect":
    vx, vy = jnp.maximum(vx, 0.0), jnp.maximum(vy, 0.0)
  ux, uy = ux_c + mx, uy_c + my
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("quantise", "ssim_border"))
def _batch_metrics(samples_pm1: jax.Array, target01: jax.Array, quantise: bool = True,
                   ssim_border: str = "crop") -> tuple[jax.Array, jax.Array]:
  """(B, H, W, C) samples in [-1, 1], (1, H, W, C) target in [0, 1] -> per-image (mse (B,), ssim (B,))."""
  img = to_uint8_quantised(samples_pm1) if quantise else pm1_to_01(samples_pm1)
  return mse_per_image(img, target01), ssim_per_image(img, target01, border=ssim_border)


def backdoor_metrics(samples_pm1: Any, target_pm1: Any, threshold: float = 1e-3, batch_size: int = 256,
                     quantise: bool = True, ssim_border: str = "crop", return_per_image: bool = False
                     ) -> dict[str, Any]:
  """MSE / SSIM / ASR of backdoor samples against the target (VillanDiff `Metric`, ALGORITHMS §6).

  samples_pm1: (N, H, W, C) in [-1, 1], quantised to 8 bit first (`quantise=True`, as the PNG round trip).
  target_pm1: (H, W, C) or (1, H, W, C) in [-1, 1], mapped to [0, 1] by clamp(y / 2 + 1 / 2, 0, 1).
  threshold: ASR counts samples with per-image MSE < threshold (1e-3 BadDiff/VillanDiff, 1e-2 TrojDiff D2I).
  Returns dict(asr, mse, ssim, num_samples, mse_threshold) of Python floats/int (means over images);
  with `return_per_image`, also `mse_per_image` and `ssim_per_image` (N,) numpy arrays.
  Computed in fixed-size batches (the last one padded) with one jitted per-batch function.
  """
  samples = np.asarray(samples_pm1, np.float32)
  if samples.ndim != 4:
    raise ValueError(f"samples must be (N, H, W, C), got shape {samples.shape}")
  target = np.asarray(target_pm1, np.float32)
  if target.ndim == 3:
    target = target[None]
  if target.shape[1:] != samples.shape[1:]:
    raise ValueError(f"target shape {target.shape[1:]} does not match sample shape {samples.shape[1:]}")
  target01 = pm1_to_01(jnp.asarray(target[:1]))
  n = samples.shape[0]
  if n == 0:
    raise ValueError("backdoor_metrics needs at least one sample")
  bs = int(min(batch_size, n))
  mses, ssims = [], []
  for start in range(0, n, bs):
    chunk = samples[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], np.float32)])
    mse_b, ssim_b = _batch_metrics(jnp.asarray(chunk), target01, quantise=quantise, ssim_border=ssim_border)
    mses.append(np.asarray(mse_b)[:m])
    ssims.append(np.asarray(ssim_b)[:m])
  mse = np.concatenate(mses).astype(np.float64)
  ssim = np.concatenate(ssims).astype(np.float64)
  out = dict(asr=float(np.mean(mse < threshold)), mse=float(mse.mean()), ssim=float(ssim.mean()),
             num_samples=int(n), mse_threshold=float(threshold))
  if return_per_image:
    out["mse_per_image"] = mse
    out["ssim_per_image"] = ssim
  return out


def ssim_success(ssim: jax.Array, threshold: float = 0.8) -> jax.Array:
  """Elijah's `eval_samples` success flags (float32 0/1): per-image SSIM > threshold. Shape of `ssim`."""
  return (jnp.asarray(ssim) > threshold).astype(jnp.float32)

