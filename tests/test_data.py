"""Data layer: loaders (real Fashion-MNIST, fake IDX / CIFAR / image folders), batching, sharding."""
import gzip
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffcleanse_jax import data
from diffcleanse_jax.data import BatchIterator, DatasetError

FMNIST = data.FASHION_MNIST_DIR
has_fmnist = pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _idx_bytes(arr, magic):
  header = np.array([magic, *arr.shape], dtype=">u4").tobytes()
  return header + arr.astype(np.uint8).tobytes()


def _write_idx_dir(d, n=5, prefix="train", gz=True):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
  op = gzip.open if gz else open
  ext = ".gz" if gz else ""
  with op(os.path.join(d, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
    f.write(_idx_bytes(imgs, 2051))
  with op(os.path.join(d, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
    f.write(_idx_bytes(labs, 2049))
  return imgs, labs


# ----------------------------------------------------------------------------------------- Fashion-MNIST


@has_fmnist
def test_fashion_mnist_real_train():
  x, y = data.load_fashion_mnist(split="train")
  assert x.shape == (60000, 32, 32, 1) and x.dtype == np.float32
  assert y.shape == (60000,) and y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
  assert x.min() == -1.0 and x.max() == 1.0
  assert y[0] == 9  # the ankle boot
  border = np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(), x[:, :, -2:].ravel()])
  assert np.all(border == -1.0)  # 2 px of background padding on every side
  assert x[0, 2:30, 2:30].max() == 1.0  # the 28x28 content sits inside


@has_fmnist
def test_fashion_mnist_real_test_resized():
  x, y = data.load_fashion_mnist(split="test", image_size=16)
  assert x.shape == (10000, 16, 16, 1) and y.shape == (10000,)
  assert -1.0 <= x.min() and x.max() <= 1.0
  x28, _ = data.load_fashion_mnist(split="test", image_size=28)
  assert x28.shape == (10000, 28, 28, 1)
  # bilinear downsampling keeps the mean brightness roughly unchanged
  assert abs(float(x[:100].mean()) - float(x28[:100].mean())) < 0.05


def test_missing_dir_and_file(tmp_path):
  with pytest.raises(DatasetError, match=r"Fashion-MNIST not found: directory .*nope does not exist.*"
                                         r"apt-get install dataset-fashion-mnist"):
    data.load_fashion_mnist(str(tmp_path / "nope"))
  with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is missing.*--config.data.path=DIR"):
    data.load_fashion_mnist(str(tmp_path))
  with pytest.raises(DatasetError, match="split='val'"):
    data.load_fashion_mnist(str(tmp_path), split="val")


def test_fake_idx_roundtrip_gz_and_raw(tmp_path):
  imgs, labs = _write_idx_dir(str(tmp_path), n=5, prefix="t10k", gz=False)
  x, y = data.load_mnist(str(tmp_path), split="test", image_size=32)
  assert x.shape == (5, 32, 32, 1)
  np.testing.assert_array_equal(y, labs.astype(np.int32))
  np.testing.assert_allclose(x[:, 2:30, 2:30, 0], imgs / 127.5 - 1.0, atol=1e-6)
  raw_imgs, raw_labs = data.load_idx(str(tmp_path / "t10k-images-idx3-ubyte"), str(tmp_path / "t10k-labels-idx1-ubyte"))
  np.testing.assert_array_equal(raw_imgs, imgs)
  assert raw_labs.dtype == np.int32


def test_corrupt_gz(tmp_path):
  _write_idx_dir(str(tmp_path))
  p = tmp_path / "train-images-idx3-ubyte.gz"
  p.write_bytes(p.read_bytes()[:200])  # truncated gzip stream
  with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
    data.load_fashion_mnist(str(tmp_path))


def test_bad_magic_short_file_and_count_mismatch(tmp_path):
  imgs, labs = _write_idx_dir(str(tmp_path))
  p = tmp_path / "train-images-idx3-ubyte.gz"
  with gzip.open(p, "wb") as f:
    f.write(_idx_bytes(imgs, 2049))
  with pytest.raises(DatasetError, match=r"bad IDX magic number 2049, expected 2051"):
    data.load_fashion_mnist(str(tmp_path))
  with gzip.open(p, "wb") as f:
    f.write(_idx_bytes(imgs, 2051)[:-10])
  with pytest.raises(DatasetError, match=r"truncated or corrupt"):
    data.load_fashion_mnist(str(tmp_path))
  with gzip.open(p, "wb") as f:
    f.write(_idx_bytes(imgs[:4], 2051))
  with pytest.raises(DatasetError, match=r"holds 4 images but .* holds 5 labels"):
    data.load_fashion_mnist(str(tmp_path))


# ----------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n, offset):
  rng = np.random.default_rng(offset)
  return {b"batch_label": b"batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
          b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
          b"filenames": [b"f%d.png" % i for i in range(n)]}


def _write_cifar(d, n=3):
  batches = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batches[name] = _cifar_batch(n, len(batches))
    with open(os.path.join(d, name), "wb") as f:
      pickle.dump(batches[name], f, protocol=2)
  return batches


def test_cifar10_fake_dir(tmp_path):
  root = tmp_path / "cifar-10-batches-py"
  root.mkdir()
  batches = _write_cifar(str(root))
  x, y = data.load_cifar10(str(tmp_path), split="train")  # parent dir works too
  assert x.shape == (15, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(y[3:6], batches["data_batch_2"][b"labels"])  # batches in order 1..5
  row = batches["data_batch_1"][b"data"][1].astype(np.float32) / 127.5 - 1.0
  # row layout: 1024 R, 1024 G, 1024 B, each a row-major 32x32 plane
  assert x[1, 0, 0, 0] == row[0] and x[1, 0, 1, 0] == row[1] and x[1, 1, 0, 0] == row[32]
  assert x[1, 0, 0, 1] == row[1024] and x[1, 31, 31, 2] == row[3071]
  xt, yt = data.load_cifar10(str(root), split="test", image_size=16)
  assert xt.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(yt, batches["test_batch"][b"labels"])


def test_cifar10_numpy1_spelling(tmp_path):
  # The official batches name numpy.core.multiarray._reconstruct (numpy 1); both spellings must load.
  batch = _cifar_batch(2, 0)
  blob = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy.core.multiarray\n_reconstruct" in blob
  (tmp_path / "test_batch").write_bytes(blob)
  x, y = data.load_cifar10(str(tmp_path), split="test")
  np.testing.assert_array_equal(y, batch[b"labels"])
  assert x.shape == (2, 32, 32, 3)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path):
  _write_cifar(str(tmp_path))
  marker = tmp_path / "pwned"
  evil = _cifar_batch(2, 0)
  evil[b"labels"] = _Evil(str(marker))
  with open(tmp_path / "data_batch_3", "wb") as f:
    pickle.dump(evil, f, protocol=2)
  with pytest.raises(DatasetError, match=r"data_batch_3: refusing to unpickle global (posix|os|nt)\.system"):
    data.load_cifar10(str(tmp_path))
  assert not marker.exists()


def test_cifar10_garbage_and_missing(tmp_path):
  _write_cifar(str(tmp_path))
  (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
  with pytest.raises(DatasetError, match=r"test_batch: not a readable CIFAR-10 python pickle"):
    data.load_cifar10(str(tmp_path), split="test")
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f, protocol=2)
  with pytest.raises(DatasetError, match=r"uint8 array of shape \(N, 3072\)"):
    data.load_cifar10(str(tmp_path), split="test")
  os.remove(tmp_path / "data_batch_5")
  with pytest.raises(DatasetError, match=r"data_batch_5 is missing.*cifar-10-python.tar.gz"):
    data.load_cifar10(str(tmp_path))


# ------------------------------------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
  (tmp_path / "b").mkdir()
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 6:34] = 255  # the center crop keeps columns 10..29 (all white); the black side bands are cut off
  Image.fromarray(wide).save(tmp_path / "b" / "wide.png")
  Image.fromarray(np.full((8, 8, 3), [255, 0, 0], np.uint8)).save(tmp_path / "a.PNG")
  Image.fromarray(np.full((16, 16), 0, np.uint8)).save(tmp_path / "c.bmp")
  (tmp_path / "notes.txt").write_text("ignored")
  assert [os.path.relpath(p, tmp_path) for p in data.list_image_files(str(tmp_path))] == [
      "a.PNG", os.path.join("b", "wide.png"), "c.bmp"]
  x, y = data.load_image_folder(str(tmp_path), image_size=10, channels=3)
  assert x.shape == (3, 10, 10, 3) and x.dtype == np.float32 and np.all(y == 0)
  np.testing.assert_allclose(x[0, 5, 5], [1.0, -1.0, -1.0])  # red stays red
  assert np.allclose(x[1], 1.0)  # crop of the wide image is all white
  assert np.allclose(x[2], -1.0)
  g, _ = data.load_image_folder(str(tmp_path), image_size=4, channels=1)
  assert g.shape == (3, 4, 4, 1)
  np.testing.assert_allclose(g[0], 76 / 127.5 - 1.0, atol=1e-6)  # PIL luma of pure red = 76


def test_image_folder_errors(tmp_path):
  with pytest.raises(DatasetError, match=r"holds no image files"):
    data.load_image_folder(str(tmp_path), 8)
  with pytest.raises(DatasetError, match=r"directory .*missing does not exist"):
    data.load_image_folder(str(tmp_path / "missing"), 8)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  with pytest.raises(DatasetError, match=r"broken.png: unreadable or corrupt image"):
    data.load_image_folder(str(tmp_path), 8)


# ------------------------------------------------------------------------------------ synthetic / factory


def test_synthetic_deterministic():
  a, la = data.synthetic(32, image_size=16, channels=3, seed=7)
  b, lb = data.synthetic(32, image_size=16, channels=3, seed=7)
  c, _ = data.synthetic(32, image_size=16, channels=3, seed=8)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c)
  assert a.shape == (32, 16, 16, 3) and a.dtype == np.float32 and la.dtype == np.int32
  assert set(la.tolist()) <= {0, 1, 2} and len(set(la.tolist())) == 3
  assert a.min() == -1.0 and a.max() <= 1.0
  fg = (a > -1.0).any(-1).mean(axis=(1, 2))  # every image has a visible shape on a -1 background
  assert np.all(fg > 0.02) and np.all(fg < 0.9)


def test_load_dataset_factory(tmp_path):
  x, y = data.load_dataset({"name": "synthetic", "num_examples": 12, "image_size": 8, "channels": 1, "seed": 3})
  np.testing.assert_array_equal(x, data.synthetic(12, 8, 1, 3)[0])
  cfg = ml_collections.ConfigDict({"name": "synthetic", "path": "", "split": "train", "image_size": 8,
                                   "channels": 3, "num_examples": 5, "seed": 3})
  x3, y3 = data.load_dataset(cfg)  # ConfigDict works too; synthetic draws colour shapes for channels=3
  assert x3.shape == (5, 8, 8, 3) and y3.shape == (5,)
  with pytest.raises(DatasetError, match=r"unknown data set name 'imagenet'.*fashion_mnist.*synthetic"):
    data.load_dataset({"name": "imagenet"})
  _write_idx_dir(str(tmp_path), n=5)
  rgb, lab = data.load_dataset({"name": "mnist", "path": str(tmp_path), "channels": 3, "num_examples": 4})
  assert rgb.shape == (4, 32, 32, 3) and lab.shape == (4,)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # grayscale repeated
  with pytest.raises(DatasetError, match=r"num_examples=9 but .* only 5 examples"):
    data.load_dataset({"name": "mnist", "path": str(tmp_path), "num_examples": 9})
  gray = data.match_channels(np.ones((2, 4, 4, 3), np.float32), 1)
  assert gray.shape == (2, 4, 4, 1) and np.allclose(gray, 1.0)
  with pytest.raises(DatasetError, match=r"has 2 channels but config data.channels=3"):
    data.match_channels(np.zeros((1, 2, 2, 2), np.float32), 3)


# ---------------------------------------------------------------------------------------------- pipeline


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_epoch_permutation():
  p = data.epoch_permutation(50, seed=1, epoch=0)
  np.testing.assert_array_equal(np.sort(p), np.arange(50))
  np.testing.assert_array_equal(p, data.epoch_permutation(50, 1, 0))
  assert not np.array_equal(p, data.epoch_permutation(50, 1, 1))
  assert not np.array_equal(p, data.epoch_permutation(50, 2, 0))


def test_iterator_determinism_epochs_and_resume():
  n = 20
  images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 3, 1), np.float32)
  labels = np.arange(n, dtype=np.int32) + 100
  it = BatchIterator(images, 4, seed=5, extra={"label": labels})
  batches = _take(it, 12)  # 5 steps per epoch -> 2.4 epochs
  assert it.steps_per_epoch == 5 and it.step == 12
  again = _take(BatchIterator(images, 4, seed=5, extra={"label": labels}), 12)
  for b1, b2 in zip(batches, again):
    np.testing.assert_array_equal(b1["image"], b2["image"])
  ids = [b["image"][:, 0, 0, 0].astype(int) for b in batches]
  for b in batches:  # extras travel with their images
    np.testing.assert_array_equal(b["label"], b["image"][:, 0, 0, 0].astype(np.int32) + 100)
  np.testing.assert_array_equal(np.sort(np.concatenate(ids[:5])), np.arange(n))  # epoch 0 is a permutation
  np.testing.assert_array_equal(np.sort(np.concatenate(ids[5:10])), np.arange(n))
  assert not np.array_equal(np.concatenate(ids[:5]), np.concatenate(ids[5:10]))
  resumed = BatchIterator(images, 4, seed=5, extra={"label": labels}, start_step=7)
  for k, b in zip(range(7, 12), _take(resumed, 5)):
    np.testing.assert_array_equal(b["image"], batches[k]["image"])
    np.testing.assert_array_equal(b["label"], batches[k]["label"])
  other = _take(BatchIterator(images, 4, seed=6), 5)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other))


def test_iterator_no_drop_last_sees_every_example():
  images = np.arange(10, dtype=np.float32)[:, None]
  it = BatchIterator(images, 4, seed=0, drop_last=False)
  seen = np.concatenate([b["image"][:, 0] for b in _take(it, 5)]).astype(int)  # 20 = two epochs
  np.testing.assert_array_equal(np.sort(seen[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(seen[10:]), np.arange(10))
  resumed = BatchIterator(images, 4, seed=0, drop_last=False, start_step=2)  # batch straddling epochs
  np.testing.assert_array_equal(next(resumed)["image"][:, 0].astype(int), seen[8:12])
  with pytest.raises(DatasetError, match=r"batch_size 16 exceeds the 10 examples"):
    BatchIterator(images, 16, seed=0)


def test_iterator_flip_and_process_shards():
  images, _ = data.synthetic(24, image_size=8, channels=1, seed=0)
  extra = {"label": np.arange(24, dtype=np.int32)}
  full = BatchIterator(images, 8, seed=3, flip=True, extra=extra, start_step=4)
  p0 = BatchIterator(images, 8, seed=3, flip=True, extra=extra, start_step=4, process_index=0, process_count=2)
  p1 = BatchIterator(images, 8, seed=3, flip=True, extra=extra, start_step=4, process_index=1, process_count=2)
  flipped = 0
  for g, a, b in zip(_take(full, 3), _take(p0, 3), _take(p1, 3)):
    assert a["image"].shape == (4, 8, 8, 1)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key])
    for img, idx in zip(g["image"], g["label"]):
      orig = images[idx]
      assert np.array_equal(img, orig) or np.array_equal(img, orig[:, ::-1])
      flipped += int(not np.array_equal(img, orig))
  assert 0 < flipped < 24
  with pytest.raises(DatasetError, match=r"global batch_size 6 is not divisible by process_count 4"):
    BatchIterator(images, 6, seed=0, process_count=4)


def test_shard_batch_onto_mesh():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images, labels = data.synthetic(40, image_size=8, channels=1, seed=1)
  batch = next(BatchIterator(images, 16, seed=0, extra={"label": labels}))
  out = data.shard_batch(batch, sharding)
  assert set(out) == {"image", "label"}
  assert isinstance(out["image"], jax.Array) and out["image"].shape == (16, 8, 8, 1)
  assert out["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  shards = out["image"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 8, 8, 1) for s in shards)
  single = data.shard_batch(batch["label"], sharding)
  np.testing.assert_array_equal(np.asarray(single), batch["label"])
