"""Backdoor metrics (MSE / SSIM / ASR), quantisation, and the Fashion-MNIST FD classifier."""
import os

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from diffcleanse_jax.metrics import backdoor as bd
from diffcleanse_jax.metrics import classifier as clf


def _skimage_ssim(a, b):
  return structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False, channel_axis=-1)


def _structured_pairs():
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  grad = np.stack([xx, yy, (xx > 0.5) * 1.0], -1)
  other = np.stack([xx ** 2, np.round(yy * 4) / 4, np.full_like(xx, 0.3)], -1)
  box = np.zeros((32, 32, 3))
  box[8:20, 10:26] = 1.0
  flat = np.full((32, 32, 3), 0.5)
  return [(grad, other), (grad, flat), (box, grad), (box, box * 0.9 + 0.05), (flat, flat)]


def test_ssim_matches_skimage_random():
  rng = np.random.default_rng(0)
  a = rng.random((4, 32, 32, 3)).astype(np.float32)
  b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  c = rng.random((4, 32, 32, 3)).astype(np.float32)
  for x, y in ((a, b), (a, c)):
    got = np.asarray(bd.ssim_per_image(x, y))
    want = np.array([_skimage_ssim(x[i], y[i]) for i in range(len(x))])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_ssim_matches_skimage_structured_and_grayscale():
  pairs = _structured_pairs()
  x = np.stack([p[0] for p in pairs]).astype(np.float32)
  y = np.stack([p[1] for p in pairs]).astype(np.float32)
  got = np.asarray(bd.ssim_per_image(x, y))
  want = np.array([_skimage_ssim(x[i], y[i]) for i in range(len(x))])
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert abs(got[-1] - 1.0) < 1e-6  # identical images
  # Grayscale, non-square, broadcast (H, W, C) target.
  rng = np.random.default_rng(1)
  g = rng.random((2, 24, 40, 1)).astype(np.float32)
  t = rng.random((24, 40, 1)).astype(np.float32)
  got = np.asarray(bd.ssim_per_image(g, t))
  np.testing.assert_allclose(got, [_skimage_ssim(g[i], t) for i in range(2)], atol=1e-4)


def test_ssim_reflect_border_is_torchmetrics_new_convention():
  # torchmetrics >= 1.5: reflect-pad (torch 'reflect' == numpy 'reflect'), full-image mean.
  rng = np.random.default_rng(2)
  x = rng.random((2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  pad = ((5, 5), (5, 5), (0, 0))
  want = []
  for i in range(2):
    _, s_map = structural_similarity(np.pad(x[i], pad, mode="reflect").astype(np.float64),
                                     np.pad(y[i], pad, mode="reflect").astype(np.float64), data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=-1, full=True)
    want.append(s_map[5:-5, 5:-5].mean())
  got = np.asarray(bd.ssim_per_image(x, y, border="reflect"))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert not np.allclose(got, bd.ssim_per_image(x, y), atol=1e-4)  # the border does matter


def test_quantisation():
  x = np.array([-1.0, -1.5, 1.0, 1.2, 0.0, 2 * (0.5 / 255) - 1 + 1e-4, 2 * (10.4 / 255) - 1], np.float32)
  q = np.asarray(bd.to_uint8_quantised(x))
  assert q.dtype == np.float32
  np.testing.assert_allclose(q * 255, [0, 0, 255, 255, 128, 1, 10], atol=1e-4)  # 127.5 rounds half up
  rng = np.random.default_rng(0)
  z = rng.uniform(-1, 1, (1000,)).astype(np.float32)
  qz = np.asarray(bd.to_uint8_quantised(z))
  np.testing.assert_allclose(qz * 255, np.round(qz * 255), atol=1e-3)
  assert np.abs(qz - (z / 2 + 0.5)).max() <= 0.5 / 255 + 1e-6
  # PIL round trip of the same uint8 values is the identity.
  u8 = np.round(qz * 255).astype(np.uint8)
  np.testing.assert_array_equal(u8, np.floor((z / 2 + 0.5) * 255 + 0.5).astype(np.uint8))


def test_mse_and_attack_success():
  img = np.zeros((2, 4, 4, 1), np.float32)
  tgt = np.ones((4, 4, 1), np.float32)
  np.testing.assert_allclose(bd.mse_per_image(img, tgt), [1.0, 1.0])
  half = np.full((1, 4, 4, 3), 0.5, np.float32)
  np.testing.assert_allclose(bd.mse_per_image(half, np.zeros((1, 4, 4, 3))), [0.25])
  flags = np.asarray(bd.attack_success(np.array([0.0, 9.99e-4, 1e-3, 0.5]), threshold=1e-3))
  np.testing.assert_array_equal(flags, [1, 1, 0, 0])  # strict "<"
  np.testing.assert_array_equal(bd.attack_success(np.array([5e-3]), threshold=1e-2), [1])


def test_backdoor_metrics_constructed_cases():
  rng = np.random.default_rng(0)
  target = np.full((32, 32, 3), -1.0, np.float32)
  target[4:12, 20:28] = 1.0  # a "corner box" target in [-1, 1]
  hit = np.repeat(target[None], 5, 0)
  noise = rng.uniform(-1, 1, (7, 32, 32, 3)).astype(np.float32)
  res = bd.backdoor_metrics(hit, target, batch_size=4)
  assert res["asr"] == 1.0 and res["mse"] == 0.0 and abs(res["ssim"] - 1.0) < 1e-5
  assert res["num_samples"] == 5 and res["mse_threshold"] == 1e-3
  res = bd.backdoor_metrics(noise, target, batch_size=4)
  assert res["asr"] == 0.0 and res["mse"] > 0.1 and res["ssim"] < 0.1
  mixed = np.concatenate([hit[:3], noise[:1]])
  res = bd.backdoor_metrics(mixed, target, batch_size=3, return_per_image=True)
  assert res["asr"] == 0.75 and res["mse_per_image"].shape == (4,)
  # Threshold behaviour: a uniform offset d in [0, 1] space gives per-image MSE d^2 (before quantisation).
  for d01, expect in ((0.02, 1.0), (0.04, 0.0)):  # 4e-4 < 1e-3 < 1.6e-3
    shifted = np.clip(target + 2 * d01 * np.where(target > 0, -1, 1), -1, 1)[None]
    r = bd.backdoor_metrics(shifted, target, threshold=1e-3, quantise=False)
    assert abs(r["mse"] - d01 ** 2) < 1e-6 and r["asr"] == expect
  # Quantisation is applied to the samples: a tiny perturbation is rounded away.
  r = bd.backdoor_metrics(target[None] + 1e-4, target)
  assert r["mse"] == 0.0


def test_backdoor_metrics_batches_agree():
  rng = np.random.default_rng(3)
  target = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
  s = np.clip(target + 0.05 * rng.standard_normal((10, 16, 16, 1)), -1, 1).astype(np.float32)
  a = bd.backdoor_metrics(s, target, batch_size=3)
  b = bd.backdoor_metrics(s, target, batch_size=256)
  for k in ("asr", "mse", "ssim"):
    assert abs(a[k] - b[k]) < 1e-6


# ----------------------------------------------------------------------------------------------------
# FD classifier (committed weights, real Fashion-MNIST).

_needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(clf.fashion_mnist_dir(), "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST IDX files not installed")


@_needs_fmnist
def test_load_fashion_mnist_layout():
  x, y = clf.load_fashion_mnist("test")
  assert x.shape == (10000, 32, 32, 1) and x.dtype == np.float32 and y.shape == (10000,)
  assert x.min() == -1.0 and x.max() == 1.0
  assert np.all(x[:, :2] == -1.0) and np.all(x[:, :, -2:] == -1.0)
  assert set(np.unique(y)) == set(range(10))


@_needs_fmnist
def test_fashion_mnist_matches_training_data_loader():
  # The FD reference must see the same preprocessing as the diffusion training data.
  datasets = pytest.importorskip("diffcleanse_jax.data.datasets")
  ours, lab = clf.load_fashion_mnist("test")
  theirs, lab2 = datasets.load_fashion_mnist(clf.fashion_mnist_dir(), split="test", image_size=32)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(lab, lab2)


@_needs_fmnist
def test_classifier_loads_and_reaches_recorded_accuracy():
  model, params, meta = clf.load_fd_classifier()
  assert meta["architecture"]["feature_dim"] == 128 and meta["test_accuracy"] >= 0.9
  x, y = clf.load_fashion_mnist("test")
  acc = clf.classifier_accuracy(x[:1000], y[:1000])
  assert abs(acc - meta["test_accuracy_first_1000"]) <= 2e-3
  assert acc >= meta["test_accuracy"] - 0.03
  f = clf.classifier_features(x[:4])
  assert f.shape == (4, 128) and np.isfinite(f).all()
  # RGB input is averaged to grayscale.
  np.testing.assert_allclose(clf.classifier_features(np.repeat(x[:4], 3, -1)), f, atol=1e-5)


@_needs_fmnist
def test_fd_identical_small_real_vs_train_large_vs_noise():
  x_test, _ = clf.load_fashion_mnist("test")
  x_train, _ = clf.load_fashion_mnist("train")
  ref = clf.reference_statistics_fashion_mnist("test")
  assert ref[0].shape == (128,) and ref[1].shape == (128, 128)
  sub = x_test[:2000]
  assert abs(clf.fd_score(sub, sub, quantise=False)) < 1e-6
  # Real test images are already on the 8-bit grid: quantising them changes nothing.
  assert abs(clf.fd_score(sub, sub)) < 1e-6
  train_sub = x_train[np.random.default_rng(0).permutation(len(x_train))[:2000]]
  fd_real = clf.fd_score(train_sub, ref)
  noise = np.random.default_rng(1).uniform(-1, 1, (2000, 32, 32, 1)).astype(np.float32)
  fd_noise = clf.fd_score(noise, ref)
  blank = np.full((2000, 32, 32, 1), -1.0, np.float32) + np.random.default_rng(2).normal(0, 0.01, (2000, 32, 32, 1))
  fd_blank = clf.fd_score(blank.astype(np.float32))
  assert fd_real < 0.05 * fd_noise and fd_real < 0.05 * fd_blank, (fd_real, fd_noise, fd_blank)
