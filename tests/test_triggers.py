"""Triggers and targets: exact geometry, procedural pictures, user files, errors."""
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from diffcleanse_jax.attacks import TARGET_NAMES, TRIGGER_NAMES, TargetError, TriggerError, make_target, make_trigger
from diffcleanse_jax.attacks.targets import DEFAULT_FASHION_MNIST, bg2grey

FMNIST = DEFAULT_FASHION_MNIST
BOXES = {"BOX_18": (18, 0.0), "BOX_14": (14, 0.0), "BOX_11": (11, 0.0), "BOX_8": (8, 0.0), "BOX_4": (4, 0.0),
         "BIG_BOX": (18, 1.0), "SM_BOX": (14, 1.0), "XSM_BOX": (11, 1.0), "XXSM_BOX": (8, 1.0), "XXXSM_BOX": (4, 1.0)}


def _box(s, c, r0, r1, value, bg):
  z = np.full((s, s, c), bg, np.float32)
  z[r0:r1, r0:r1] = value
  return z


def _nonbg_bbox(g):
  rows, cols = np.nonzero((g > -1).any(-1))
  return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize("c", [1, 3])
def test_box14_exact_pixels(c):
  g = make_trigger("BOX_14", 32, c)
  assert g.shape == (32, 32, c) and g.dtype == np.float32
  np.testing.assert_array_equal(g, _box(32, c, 16, 30, 0.0, -1.0))  # rows/cols 16..29


@pytest.mark.parametrize("name", sorted(BOXES))
@pytest.mark.parametrize("s", [32, 64])
def test_box_family_geometry(name, s):
  k, v = BOXES[name]
  np.testing.assert_array_equal(make_trigger(name, s, 3), _box(s, 3, s - k - 2, s - 2, v, -1.0))


@pytest.mark.parametrize("name", TRIGGER_NAMES)
@pytest.mark.parametrize("s,c", [(32, 1), (32, 3), (64, 3)])
def test_every_trigger_shape_and_range(name, s, c):
  g = make_trigger(name, s, c)
  assert g.shape == (s, s, c) and g.dtype == np.float32
  assert g.min() >= -1.0 and g.max() <= 1.0
  if name == "NONE":
    assert np.all(g == -1.0)
  else:
    assert (g > -1.0).any() and (g == -1.0).any()


def test_names_case_insensitive():
  np.testing.assert_array_equal(make_trigger("box_14", 32, 3), make_trigger("BOX_14", 32, 3))


@pytest.mark.parametrize("k", [18, 14, 11, 8, 4])
@pytest.mark.parametrize("s", [32, 64])
def test_stop_sign_confined_to_bottom_right(k, s):
  g = make_trigger(f"STOP_SIGN_{k}", s, 3)
  outside = np.ones((s, s), bool)
  outside[s - k - 2:s - 2, s - k - 2:s - 2] = False
  assert np.all(g[outside] == -1.0)
  assert (g[~outside] > -1.0).mean() > 0.5  # the sign fills most of its k x k box
  assert g.max() < 0.999  # the >= 0.999 rule removed the white surround


def test_stop_sign_is_red_and_grey_version_works():
  g = make_trigger("STOP_SIGN_14", 32, 3)
  inner = g[16 + 4:30 - 4, 16 + 4:30 - 4]
  red = (inner[..., 0] > inner[..., 1] + 0.5) & (inner[..., 0] > inner[..., 2] + 0.5)
  assert red.mean() > 0.5
  g1 = make_trigger("STOP_SIGN_14", 32, 1)
  assert g1.shape == (32, 32, 1) and (g1[16:30, 16:30] > -1).any()


@pytest.mark.parametrize("s", [32, 64, 256])
def test_glasses_centred(s):
  g = make_trigger("GLASSES", s, 3)
  sz = int(0.625 * s)
  off = (s - sz) // 2
  r0, r1, c0, c1 = _nonbg_bbox(g)
  assert off <= r0 and r1 < off + sz and off <= c0 and c1 < off + sz
  assert abs((c0 + c1) / 2 - (s - 1) / 2) <= 1.0
  assert abs((r0 + r1) / 2 - (s - 1) / 2) <= 1.5
  frac = (g > -1).any(-1).mean()
  assert 0.01 < frac < 0.2


def test_unknown_name_lists_valid_names():
  with pytest.raises(TriggerError) as e:
    make_trigger("BOX_13", 32, 3)
  assert isinstance(e.value, ValueError)
  for name in TRIGGER_NAMES:
    assert name in str(e.value)


def test_bad_shape_errors():
  with pytest.raises(TriggerError, match="does not fit"):
    make_trigger("BOX_18", 16, 3)
  with pytest.raises(TriggerError, match="channels"):
    make_trigger("BOX_14", 32, 2)
  with pytest.raises(TriggerError, match="not found"):
    make_trigger("/nonexistent/trigger.png", 32, 3)


def _save_png(path, arr):
  Image.fromarray(arr).save(path)
  return str(path)


def test_user_png_trigger_resized_bottom_right(tmp_path):
  a = np.full((100, 80, 3), 255, np.uint8)
  a[10:90, 10:70] = (20, 40, 200)  # blue block on white
  p = _save_png(tmp_path / "blue.png", a)
  g = make_trigger(p, 32, 3)
  k = 14  # round(14 * 32 / 32)
  outside = np.ones((32, 32), bool)
  outside[32 - k - 2:30, 32 - k - 2:30] = False
  assert np.all(g[outside] == -1.0)
  assert (g[~outside] > -1).any() and g.max() < 0.999
  blue = g[~outside]
  assert (blue[..., 2] > 0.4).any()
  # explicit size and another image side
  g2 = make_trigger(p, 64, 1, trigger_size=20)
  r0, r1, c0, c1 = _nonbg_bbox(g2)
  assert r0 >= 64 - 22 and r1 <= 61 and c0 >= 64 - 22 and c1 <= 61
  # default size scales with S
  g3 = make_trigger(p, 64, 3)
  r0, _, c0, _ = _nonbg_bbox(g3)
  assert r0 >= 64 - 28 - 2 and c0 >= 64 - 28 - 2 and r0 <= 64 - 28 + 2


def test_user_png_full_size_used_as_is(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  p = _save_png(tmp_path / "full.png", a)
  np.testing.assert_allclose(make_trigger(p, 32, 3), a.astype(np.float32) / 255 * 2 - 1, atol=1e-6)


def test_user_rgba_transparent_is_background(tmp_path):
  a = np.zeros((50, 50, 4), np.uint8)
  a[..., :3] = 200  # light grey, but fully transparent
  a[20:30, 20:30, 3] = 255  # opaque square
  p = _save_png(tmp_path / "rgba.png", a)
  g = make_trigger(p, 32, 3)
  region = g[16:30, 16:30]
  assert (region == -1).any() and (region > -1).any()


def test_npy_trigger(tmp_path):
  g = np.full((32, 32, 3), -1, np.float32)
  g[3:5, 3:5] = 0.5
  p = str(tmp_path / "g.npy")
  np.save(p, g)
  np.testing.assert_array_equal(make_trigger(p, 32, 3), g)
  with pytest.raises(TriggerError, match="shape"):
    make_trigger(p, 64, 3)
  with pytest.raises(TriggerError, match="shape"):
    make_trigger(p, 32, 1)
  np.save(p, g * 2)
  with pytest.raises(TriggerError, match=r"\[-1, 1\]"):
    make_trigger(p, 32, 3)
  # an inverted trigger (an x_T offset, e.g. BBTI's unbounded g = 1 - 2p) is accepted where unbounded is allowed
  np.testing.assert_array_equal(make_trigger(p, 32, 3, bounded=False), g * 2)
  bad = g.copy()
  bad[0, 0, 0] = np.nan
  np.save(p, bad)
  for bounded in (True, False):
    with pytest.raises(TriggerError, match="non-finite"):
      make_trigger(p, 32, 3, bounded=bounded)


def test_evaluation_accepts_an_unbounded_inverted_trigger_file(tmp_path):
  from diffcleanse_jax.evaluation import resolve_trigger
  g = np.linspace(-6.5, 7.8, 32 * 32, dtype=np.float32).reshape(32, 32, 1)  # a BBTI pattern's range
  p = str(tmp_path / "trigger.npy")
  np.save(p, g)
  np.testing.assert_array_equal(resolve_trigger(p, (32, 32, 1)), g)


# ---------------------------------------------------------------- targets

def test_noshift_and_trigger_alias():
  g = make_trigger("BOX_14", 32, 3)
  y = make_target("NOSHIFT", 32, 3, trigger=g)
  np.testing.assert_array_equal(y, _box(32, 3, 16, 30, 0.0, -0.4))
  np.testing.assert_array_equal(make_target("TRIGGER", 32, 3, trigger=g), y)
  np.testing.assert_array_equal(g, _box(32, 3, 16, 30, 0.0, -1.0))  # trigger not modified


def test_shift_target():
  g = make_trigger("BOX_14", 32, 1)
  y = make_target("SHIFT", 32, 1, trigger=g)
  want = np.full((32, 32, 1), -0.4, np.float32)
  want[16 - 3:30 - 3, 16 - 5:30 - 5] = 0.0  # 3 px up, 5 px left
  np.testing.assert_array_equal(y, want)
  # cyclic: a box near the border wraps around to the opposite edges
  g = make_trigger("BOX_4", 8, 1)  # rows/cols 2..5
  y = make_target("SHIFT", 8, 1, trigger=g)
  assert y[7, 5, 0] == 0.0 and y[0, 0, 0] == 0.0 and y[2, 2, 0] == -0.4


@pytest.mark.parametrize("c", [1, 3])
def test_corner_and_box_targets(c):
  np.testing.assert_array_equal(make_target("CORNER", 32, c), _box(32, c, 0, 10, 0.0, -0.4))
  np.testing.assert_array_equal(make_target("BOX", 32, c), _box(32, c, 0, 10, 1.0, -1.0))
  np.testing.assert_array_equal(make_target("corner", 64, c), _box(64, c, 0, 10, 0.0, -0.4))


def _boot_independent():
  with gzip.open(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"), "rb") as f:
    raw = f.read(16 + 28 * 28)
  with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz"), "rb") as f:
    labels = f.read(8 + 1)
  assert labels[8] == 9  # train[0] is an ankle boot
  return np.frombuffer(raw[16:], np.uint8).reshape(28, 28)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST not installed")
def test_shoe_is_fashion_mnist_ankle_boot():
  boot = _boot_independent()
  unit = boot.astype(np.float32) / 255 * 2 - 1
  y28 = make_target("SHOE", 28, 1)
  np.testing.assert_allclose(y28[..., 0], np.maximum(unit, -0.4), atol=1e-6)
  y3 = make_target("SHOE", 28, 3)
  for ch in range(3):
    np.testing.assert_array_equal(y3[..., ch], y28[..., 0])
  y32 = make_target("SHOE", 32, 3)
  up = np.asarray(Image.fromarray(boot).resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255 * 2 - 1
  np.testing.assert_allclose(y32[..., 0], np.maximum(up, -0.4), atol=1e-6)
  assert y32.min() == np.float32(-0.4) and y32.max() > 0.5


def test_shoe_missing_dataset_error(tmp_path):
  with pytest.raises(TargetError, match="train-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
    make_target("SHOE", 32, 3, fashion_mnist_path=str(tmp_path))


@pytest.mark.parametrize("name", ["HAT", "CAT"])
@pytest.mark.parametrize("s,c", [(32, 3), (32, 1), (64, 3)])
def test_picture_targets(name, s, c):
  y = make_target(name, s, c)
  assert y.shape == (s, s, c) and y.dtype == np.float32
  assert y.min() >= -0.4 - 1e-7 and y.max() <= 1.0
  assert y.std() > 0.1
  assert len(np.unique(np.round(y, 2))) > 5  # bg2grey leaves more than a silhouette


def test_hat_white_background_and_fedora_alias():
  y = make_target("HAT", 32, 3)
  assert np.all(y[0] == 1.0) and np.all(y[:, 0] == 1.0)
  assert (y == np.float32(-0.4)).any()  # the band
  np.testing.assert_array_equal(make_target("FEDORA_HAT", 32, 3), y)


def test_target_errors():
  for name in ("NOSHIFT", "TRIGGER", "SHIFT"):
    with pytest.raises(TargetError, match="trigger"):
      make_target(name, 32, 3)
  with pytest.raises(TargetError) as e:
    make_target("DOG", 32, 3)
  for name in TARGET_NAMES:
    assert name in str(e.value)
  with pytest.raises(TargetError, match="shape"):
    make_target("SHIFT", 32, 3, trigger=make_trigger("BOX_14", 32, 1))


def test_user_target_files(tmp_path):
  a = np.zeros((40, 60, 3), np.uint8)
  a[:, 30:] = 255
  p = _save_png(tmp_path / "half.png", a)
  y = make_target(p, 32, 3)
  assert y.shape == (32, 32, 3) and y[:, 0].max() == np.float32(-0.4) and y[:, -1].min() == 1.0
  z = np.linspace(-1, 1, 32 * 32).reshape(32, 32, 1).astype(np.float32)
  q = str(tmp_path / "y.npy")
  np.save(q, z)
  np.testing.assert_array_equal(make_target(q, 32, 1), z)  # used as-is, no bg2grey
  with pytest.raises(TargetError, match="shape"):
    make_target(q, 32, 3)


def test_bg2grey():
  z = np.array([-1.0, -0.5, -0.4, -0.39, 0.3, 1.0], np.float32)
  np.testing.assert_array_equal(bg2grey(z), np.array([-0.4, -0.4, -0.4, -0.39, 0.3, 1.0], np.float32))
