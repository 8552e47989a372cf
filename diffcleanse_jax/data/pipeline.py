"""Deterministic, resumable batching of host numpy arrays, and placement onto a device mesh.

The global batch at step k is a pure function of (seed, k): epochs are permutations drawn from
(seed, epoch), so a run resumed at `start_step` sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from diffcleanse_jax.data.datasets import DatasetError

_FLIP_STREAM = 0x666C6970  # "flip": keeps flip draws independent of the epoch permutations


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """Permutation of range(n) (int64, shape (n,)) drawn from PCG64 seeded with [seed, epoch]."""
  return np.random.Generator(np.random.PCG64([int(seed), int(epoch)])).permutation(int(n))


def flip_mask(batch_size: int, seed: int, step: int) -> np.ndarray:
  """(batch_size,) bool: which examples of the global batch at `step` are flipped horizontally."""
  rng = np.random.Generator(np.random.PCG64([int(seed), int(step), _FLIP_STREAM]))
  return rng.random(int(batch_size)) < 0.5


class BatchIterator:
  """Infinite iterator of batches {"image": (b, ...), **extra} where b = batch_size // process_count.

  `batch_size` is the global batch; this process gets rows [process_index * b, (process_index + 1) * b)
  of it. drop_last=True: each epoch yields n // batch_size batches and skips the remainder;
  drop_last=False: batches run on across epoch boundaries, so every example is seen once per epoch.
  flip=True mirrors "image" along W (axis 2 of NHWC) for a random half of each batch (seeded by step);
  `extra` arrays (same leading dim as images) are indexed alongside but never flipped.
  """

  def __init__(self, images: np.ndarray, batch_size: int, seed: int, drop_last: bool = True, flip: bool = False,
               process_index: int = 0, process_count: int = 1, extra: Mapping[str, np.ndarray] | None = None,
               start_step: int = 0):
    self.images = np.asarray(images)
    if self.images.ndim < 1 or self.images.shape[0] == 0:
      raise DatasetError(f"BatchIterator: need at least one example, got images of shape {self.images.shape}")
    self.n = int(self.images.shape[0])
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.drop_last = bool(drop_last)
    self.flip = bool(flip)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    if self.batch_size < 1:
      raise DatasetError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
    if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
      raise DatasetError(f"BatchIterator: need 0 <= process_index < process_count, got {process_index} / "
                         f"{process_count}")
    if self.batch_size % self.process_count:
      raise DatasetError(f"BatchIterator: global batch_size {self.batch_size} is not divisible by "
                         f"process_count {self.process_count}; pick a multiple of {self.process_count}")
    if self.drop_last and self.batch_size > self.n:
      raise DatasetError(f"BatchIterator: batch_size {self.batch_size} exceeds the {self.n} examples with "
                         "drop_last=True; lower the batch size or use drop_last=False")
    if self.flip and self.images.ndim != 4:
      raise DatasetError(f"BatchIterator: flip=True needs NHWC images, got shape {self.images.shape}")
    self.extra = {}
    for key, value in dict(extra or {}).items():
      value = np.asarray(value)
      if key == "image":
        raise DatasetError("BatchIterator: extra may not use the key 'image' (reserved for the images)")
      if value.ndim < 1 or value.shape[0] != self.n:
        raise DatasetError(f"BatchIterator: extra[{key!r}] has shape {value.shape}, expected leading dim {self.n}")
      self.extra[key] = value
    self.local_batch_size = self.batch_size // self.process_count
    self.step = int(start_step)
    if self.step < 0:
      raise DatasetError(f"BatchIterator: start_step must be >= 0, got {start_step}")
    self._perm_cache: dict[int, np.ndarray] = {}

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch (rounded up when drop_last=False, where batches straddle epochs)."""
    return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perm_cache.get(epoch)
    if perm is None:
      if len(self._perm_cache) >= 4:
        self._perm_cache.pop(min(self._perm_cache))
      perm = self._perm_cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
    return perm

  def global_indices(self, step: int) -> np.ndarray:
    """(batch_size,) int64 example indices of the global batch at `step`."""
    step, b = int(step), self.batch_size
    if self.drop_last:
      epoch, pos = divmod(step, self.n // b)
      return self._perm(epoch)[pos * b:(pos + 1) * b]
    start = step * b  # position in the endless concatenation of epoch permutations
    parts, epoch, offset = [], start // self.n, start % self.n
    while b > 0:
      part = self._perm(epoch)[offset:offset + b]
      parts.append(part)
      b -= part.shape[0]
      epoch, offset = epoch + 1, 0
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's shard of the global batch at `step` (pure in (seed, step); does not advance)."""
    lo = self.process_index * self.local_batch_size
    hi = lo + self.local_batch_size
    idx = self.global_indices(step)[lo:hi]
    image = self.images[idx]
    if self.flip:
      m = flip_mask(self.batch_size, self.seed, step)[lo:hi]
      image[m] = image[m, :, ::-1]
    out = {"image": image}
    for key, value in self.extra.items():
      out[key] = value[idx]
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch


def shard_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host-local numpy batch (array or dict of arrays) -> global jax.Array(s) laid out by `sharding`.

  Each process passes its own rows; the global leading dim is process_count times the local one.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
