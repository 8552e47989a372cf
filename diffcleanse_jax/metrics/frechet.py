"""Fréchet distance between Gaussians fitted to feature sets (FID / FD), as pytorch-fid computes it.

Host-side float64 numpy/scipy: the (D, D) matrix square root is done once per evaluation, so there is
nothing to gain from the device here. Feature extraction (Inception, classifier) runs batched on device.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from scipy import linalg


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma with ddof=1 (np.cov, as pytorch-fid)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {f.shape}")
  if f.shape[0] < 2:
    raise ValueError("feature_statistics needs at least 2 feature vectors")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """d^2 = ||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^{1/2}) for mu (D,), sigma (D, D); returns a Python float.

  pytorch-fid's robustness: if sqrtm is not finite, retry with eps * I added to both covariances; drop an
  imaginary part whose diagonal is within 1e-3 of 0, else raise ValueError.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances have bad shapes: {sigma1.shape}, {sigma2.shape} for D={mu1.shape[0]}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of the covariances")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features1: Any, features2: Any) -> float:
  """Fréchet distance between Gaussians fitted to (N1, D) and (N2, D) feature sets."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: Any) -> None:
  """Writes pytorch-fid style `.npz` statistics (keys `mu`, `sigma`, plus any `extra` arrays)."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads pytorch-fid style `.npz` statistics (`mu` (D,), `sigma` (D, D)) as float64."""
  with np.load(path, allow_pickle=False) as f:
    return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
