"""BadDiffusion data poisoning (`IBM/BadDiffusion: dataset.py`, MODE_FIXED).

Per sample, the training pair is (x0, r):
* poisoned: r = M * x + (1 - M) * g with M = 1 where g <= -1 (the trigger background), and x0 = y (target);
* clean:    r = 0 and x0 = x.

Membership: exactly int(N p) samples, chosen by a permutation drawn from `seed`, are poisoned, and this set
is fixed for the whole run. Augmentation: the reference flips the clean image horizontally at random (p = 0.5)
BEFORE stamping the trigger, anew on every epoch; the target y is never flipped. To reproduce that, keep the
clean images and `is_poisoned` on the host, flip each batch per step (`random_hflip`) and build (x0, r) on the
fly with `make_batch_targets`, which works on numpy and jax arrays alike (inside jit too). `poison_dataset`
materialises unflipped (x0, r) arrays for inspection and small data sets.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class PoisonError(ValueError):
  """Bad poison rate or mismatched shapes."""


def _check_rate(poison_rate: float) -> float:
  p = float(poison_rate)
  if not 0.0 <= p <= 1.0:
    raise PoisonError(f"poison_rate must be within [0, 1], got {poison_rate}")
  return p


def num_poisoned(n: int, poison_rate: float) -> int:
  """int(N p): the number of poisoned samples (reference MODE_FIXED)."""
  return int(int(n) * _check_rate(poison_rate))


def select_poisoned(n: int, poison_rate: float, seed: int) -> np.ndarray:
  """(N,) bool mask with exactly int(N p) True entries, chosen deterministically from `seed`."""
  k = num_poisoned(n, poison_rate)
  idx = np.random.default_rng(seed).permutation(int(n))[:k]
  mask = np.zeros(int(n), dtype=bool)
  mask[idx] = True
  return mask


def trigger_mask(trigger: Any) -> Any:
  """M = 1 where the trigger is background (<= -1), else 0; same shape/dtype kind as `trigger`."""
  return (trigger <= -1.0).astype(trigger.dtype)


def stamp(x: Any, trigger: Any) -> Any:
  """Pastes the trigger onto images: M * x + (1 - M) * g; x (..., H, W, C), trigger (H, W, C), numpy or jax."""
  m = trigger_mask(trigger)
  return m * x + (1 - m) * trigger


def make_batch_targets(x: Any, is_poisoned: Any, trigger: Any, target: Any) -> tuple[Any, Any]:
  """(x0, r) for a batch: x (B, H, W, C) clean (already flipped), is_poisoned (B,) bool, trigger/target (H, W, C).

  x0 = target where poisoned else x; r = stamp(x, trigger) where poisoned else 0. Pure arithmetic, so it
  accepts numpy or jax arrays and can run inside jit.
  """
  p = is_poisoned.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  x0 = p * target + (1 - p) * x
  r = p * stamp(x, trigger)
  return x0, r


def random_hflip(key: Any, x: Any) -> Any:
  """Flips each image of x (B, H, W, C) left-right with probability 1/2 (jax; one draw per image)."""
  import jax
  import jax.numpy as jnp
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def poison_dataset(images: np.ndarray, trigger: np.ndarray, target: np.ndarray, poison_rate: float,
                   seed: int) -> dict[str, np.ndarray]:
  """Materialised poisoned data set (no flips).

  images (N, H, W, C) in [-1, 1]; trigger, target (H, W, C). Returns dict(image=x0 (N, H, W, C): the target
  for poisoned samples, the clean image otherwise; poison=r (N, H, W, C); is_poisoned=(N,) bool).
  """
  images = np.asarray(images, np.float32)
  trigger = np.asarray(trigger, np.float32)
  target = np.asarray(target, np.float32)
  if images.ndim != 4:
    raise PoisonError(f"images must be (N, H, W, C), got shape {images.shape}")
  if trigger.shape != images.shape[1:] or target.shape != images.shape[1:]:
    raise PoisonError(f"trigger {trigger.shape} and target {target.shape} must match image shape {images.shape[1:]}")
  is_poisoned = select_poisoned(images.shape[0], poison_rate, seed)
  sel = is_poisoned[:, None, None, None]
  x0 = np.where(sel, target, images)
  r = np.where(sel, stamp(images, trigger), np.float32(0.0))
  return dict(image=x0, poison=r, is_poisoned=is_poisoned)
