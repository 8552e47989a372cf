"""Fashion-MNIST CNN classifier and the Fréchet distance (FD) in its feature space.

FD here is NOT FID: the features are the 128-d penultimate layer of a small CNN trained on Fashion-MNIST
(`benchmarks/train_fd_classifier.py`), not Inception pool3. Numbers are comparable only with other FD
numbers from the same committed weights (`assets/fmnist_classifier.msgpack`).

Images are (B, 32, 32, C) in [-1, 1]: Fashion-MNIST 28x28 mapped to [-1, 1] and padded by 2 px of -1
background, as BadDiffusion's FASHION data. C=3 input is averaged to one channel.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax.metrics import frechet

ASSET_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                          "fmnist_classifier.msgpack")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FASHION_MNIST_DIR"

class FMNISTClassifier(nn.Module):
  """Small CNN: (B, 32, 32, C) in [-1, 1] -> logits (B, num_classes); `features` gives (B, feature_dim).

  Three [conv3x3 -> ReLU -> 2x2 max-pool] stages (widths `channels`), then dense `feature_dim` + ReLU
  (the FD embedding), then a linear classifier head.
  """

  channels: Sequence[int] = (32, 64, 64)
  feature_dim: int = 128
  num_classes: int = 10

  def setup(self):
    self.convs = [nn.Conv(c, (3, 3), padding="SAME", name=f"conv{i}") for i, c in enumerate(self.channels)]
    self.dense = nn.Dense(self.feature_dim, name="dense")
    self.head = nn.Dense(self.num_classes, name="head")

  def features(self, x: jax.Array) -> jax.Array:
    """(B, 32, 32, C) in [-1, 1] -> (B, feature_dim) penultimate (post-ReLU) embedding."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != 1:
      x = jnp.mean(x, axis=-1, keepdims=True)
    for conv in self.convs:
      x = nn.max_pool(nn.relu(conv(x)), (2, 2), strides=(2, 2))
    return nn.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX gz files).


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> str:
  """Dataset folder: `data_dir`, else $FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist."""
  return os.fspath(data_dir or os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR)


def load_fashion_mnist(split: str = "test", data_dir: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST `split` -> images (N, 32, 32, 1) float32 in [-1, 1], labels (N,) int32 (the data layer's
  loader, so the FD reference sees exactly what diffusion training sees)."""
  from diffcleanse_jax.data.datasets import load_fashion_mnist as _load
  return _load(fashion_mnist_dir(data_dir), split=split, image_size=32)


# ----------------------------------------------------------------------------------------------------
# Weights (msgpack with an embedded JSON header).


def save_fd_classifier(path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes {'meta_json': JSON string (architecture, training config, accuracy), 'params': ...} as msgpack."""
  payload = {"meta_json": json.dumps(dict(meta), sort_keys=True),
             "params": jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params))}
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(payload))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  with open(path, "rb") as f:
    payload = flax.serialization.msgpack_restore(f.read())
  meta = json.loads(payload["meta_json"])
  params = jax.tree.map(jnp.asarray, payload["params"])
  return params, meta


def load_fd_classifier(path: str | os.PathLike | None = None) -> tuple[FMNISTClassifier, dict[str, Any], dict[str, Any]]:
  """Loads the committed classifier -> (module, params, meta). meta holds 'architecture', 'training', 'test_accuracy'."""
  path = os.fspath(path or ASSET_PATH)
  if not os.path.exists(path):
    raise FileNotFoundError(f"classifier weights {path!r} not found; run benchmarks/train_fd_classifier.py")
  params, meta = _load_cached(os.path.abspath(path))
  arch = meta["architecture"]
  model = FMNISTClassifier(channels=tuple(arch["channels"]), feature_dim=int(arch["feature_dim"]),
                           num_classes=int(arch["num_classes"]))
  return model, params, meta


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _apply(model: FMNISTClassifier, params: Any, x: jax.Array, method: str) -> jax.Array:
  fn = FMNISTClassifier.features if method == "features" else FMNISTClassifier.__call__
  return model.apply({"params": params}, x, method=fn)


def _batched(model, params, images, method, batch_size):
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
  n = images.shape[0]
  bs = int(min(batch_size, max(n, 1)))
  outs = []
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    m = chunk.shape[0]
    if m < bs:
      chunk = np.concatenate([chunk, np.full((bs - m,) + chunk.shape[1:], -1.0, np.float32)])
    outs.append(np.asarray(_apply(model, params, jnp.asarray(chunk), method))[:m])
  return np.concatenate(outs)


def classifier_features(images_pm1: Any, batch_size: int = 1000, path: str | os.PathLike | None = None) -> np.ndarray:
  """(N, 32, 32, C) in [-1, 1] -> (N, feature_dim) float32 embeddings of the committed classifier."""
  model, params, _ = load_fd_classifier(path)
  return _batched(model, params, images_pm1, "features", batch_size)


def classifier_logits(images_pm1: Any, batch_size: int = 1000, path: str | os.PathLike | None = None) -> np.ndarray:
  """(N, 32, 32, C) in [-1, 1] -> (N, 10) float32 logits of the committed classifier."""
  model, params, _ = load_fd_classifier(path)
  return _batched(model, params, images_pm1, "logits", batch_size)


def classifier_accuracy(images_pm1: Any, labels: Any, batch_size: int = 1000,
                        path: str | os.PathLike | None = None) -> float:
  """Top-1 accuracy of the committed classifier on (N, 32, 32, C) images in [-1, 1] with (N,) labels."""
  pred = classifier_logits(images_pm1, batch_size, path).argmax(-1)
  return float(np.mean(pred == np.asarray(labels)))


@functools.lru_cache(maxsize=4)
def _reference_stats_cached(split: str, data_dir: str, path: str) -> tuple[np.ndarray, np.ndarray]:
  images, _ = load_fashion_mnist(split, data_dir)
  return frechet.feature_statistics(classifier_features(images, path=path or None))


def reference_statistics_fashion_mnist(split: str = "test", data_dir: str | os.PathLike | None = None,
                                       path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu (128,), sigma (128, 128)) float64 of classifier features over the real Fashion-MNIST `split` (cached)."""
  mu, sigma = _reference_stats_cached(split, fashion_mnist_dir(data_dir), os.fspath(path or ""))
  return mu.copy(), sigma.copy()


def fd_score(samples_pm1: Any, reference: Any = None, quantise: bool = True, batch_size: int = 1000,
             path: str | os.PathLike | None = None) -> float:
  """FD (Fréchet distance in classifier feature space, not FID) of samples (N, 32, 32, C) in [-1, 1].

  reference: None (real Fashion-MNIST test set), (mu, sigma) statistics, or (M, 32, 32, C) images in [-1, 1]
  (used as given). Samples are quantised to 8 bit first (PNG round trip) unless `quantise=False`.
  """
  x = np.clip(np.asarray(samples_pm1, np.float32), -1.0, 1.0)
  if quantise:
    x = (np.floor((x / 2 + 0.5) * 255.0 + 0.5) / 255.0) * 2 - 1
  mu1, s1 = frechet.feature_statistics(classifier_features(x, batch_size, path))
  if reference is None:
    mu2, s2 = reference_statistics_fashion_mnist("test", path=path)
  elif isinstance(reference, (tuple, list)) and len(reference) == 2:
    mu2, s2 = reference
  else:
    mu2, s2 = frechet.feature_statistics(classifier_features(reference, batch_size, path))
  return frechet.frechet_distance(mu1, s1, mu2, s2)
