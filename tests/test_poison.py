"""Poisoning semantics: membership, mask/stamp, clean pairs, on-the-fly batch targets, flips."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.attacks import (PoisonError, make_batch_targets, make_target, make_trigger, num_poisoned,
                                     poison_dataset, random_hflip, select_poisoned, stamp, trigger_mask)


def _data(n=50, s=32, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (n, s, s, c)).astype(np.float32)


@pytest.mark.parametrize("n,p", [(1000, 0.07), (60000, 0.05), (50, 0.1), (7, 0.5), (10, 0.0), (10, 1.0), (999, 0.3)])
def test_poison_count_exact(n, p):
  mask = select_poisoned(n, p, seed=3)
  assert mask.shape == (n,) and mask.dtype == bool
  assert mask.sum() == int(n * p) == num_poisoned(n, p)


def test_membership_deterministic_from_seed():
  a = select_poisoned(1000, 0.2, seed=1)
  np.testing.assert_array_equal(a, select_poisoned(1000, 0.2, seed=1))
  assert not np.array_equal(a, select_poisoned(1000, 0.2, seed=2))
  x = _data(40)
  g, y = make_trigger("BOX_14", 32, 3), make_target("CORNER", 32, 3)
  d1, d2 = poison_dataset(x, g, y, 0.25, seed=5), poison_dataset(x, g, y, 0.25, seed=5)
  for k in ("image", "poison", "is_poisoned"):
    np.testing.assert_array_equal(d1[k], d2[k])


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_rate_outside_unit_interval(p):
  with pytest.raises(PoisonError) as e:
    select_poisoned(10, p, 0)
  assert isinstance(e.value, ValueError)
  with pytest.raises(PoisonError):
    poison_dataset(_data(4), make_trigger("BOX_14", 32, 3), make_target("CORNER", 32, 3), p, 0)


def test_poison_dataset_pairs_and_mask_semantics():
  x = _data(40)
  g = make_trigger("BOX_14", 32, 3)  # grey box at rows/cols 16..29
  y = make_target("NOSHIFT", 32, 3, trigger=g)
  d = poison_dataset(x, g, y, 0.25, seed=0)
  pois = d["is_poisoned"]
  assert pois.sum() == 10
  assert d["image"].shape == d["poison"].shape == x.shape and d["image"].dtype == np.float32
  # clean: r = 0, x0 = x
  np.testing.assert_array_equal(d["poison"][~pois], 0.0)
  np.testing.assert_array_equal(d["image"][~pois], x[~pois])
  # poisoned: x0 = y, r = clean image outside the box, trigger value inside
  np.testing.assert_array_equal(d["image"][pois], np.broadcast_to(y, (10,) + y.shape))
  r = d["poison"][pois]
  inside = np.zeros((32, 32), bool)
  inside[16:30, 16:30] = True
  np.testing.assert_array_equal(r[:, inside], 0.0)
  np.testing.assert_array_equal(r[:, ~inside], x[pois][:, ~inside])


def test_stamp_mask_uses_background_only():
  g = np.full((4, 4, 1), -1.0, np.float32)
  g[0, 0] = -0.999  # barely above background: still trigger
  g[1, 1] = 1.0
  x = np.full((2, 4, 4, 1), 0.25, np.float32)
  np.testing.assert_array_equal(trigger_mask(g)[..., 0].sum(), 14)
  r = stamp(x, g)
  assert r[0, 0, 0, 0] == np.float32(-0.999) and r[1, 1, 1, 0] == 1.0 and r[0, 2, 2, 0] == 0.25
  # stop sign: pixels outside its box keep the image
  s = make_trigger("STOP_SIGN_14", 32, 3)
  xi = _data(3)
  rs = stamp(xi, s)
  m = s == -1
  np.testing.assert_array_equal(rs[:, m], xi[:, m])
  np.testing.assert_array_equal(rs[:, ~m], np.broadcast_to(s[~m], rs[:, ~m].shape))


def test_make_batch_targets_matches_dataset_numpy_and_jit():
  x = _data(24, s=16, c=1)
  g = make_trigger("SM_BOX", 16, 1)
  y = make_target("BOX", 16, 1)
  d = poison_dataset(x, g, y, 0.5, seed=9)
  x0, r = make_batch_targets(x, d["is_poisoned"], g, y)
  np.testing.assert_array_equal(x0, d["image"])
  np.testing.assert_array_equal(r, d["poison"])
  fn = jax.jit(make_batch_targets)
  jx0, jr = fn(jnp.asarray(x), jnp.asarray(d["is_poisoned"]), jnp.asarray(g), jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(jx0), d["image"])
  np.testing.assert_array_equal(np.asarray(jr), d["poison"])


def test_random_hflip_then_stamp():
  x = jnp.asarray(_data(64, s=8, c=3))
  out = random_hflip(jax.random.PRNGKey(0), x)
  flipped = np.all(np.asarray(out) == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
  assert np.all(flipped | kept) and 10 < flipped.sum() < 54
  np.testing.assert_array_equal(np.asarray(random_hflip(jax.random.PRNGKey(0), x)), np.asarray(out))
  # the flip acts on the clean image; the trigger is stamped afterwards, unflipped
  g = np.full((8, 8, 3), -1, np.float32)
  g[6, 6] = 0.5
  pois = jnp.ones((64,), bool)
  _, r = make_batch_targets(out, pois, g, np.zeros((8, 8, 3), np.float32))
  assert np.all(np.asarray(r)[:, 6, 6] == 0.5)
  np.testing.assert_array_equal(np.asarray(r)[:, 6, 1], np.asarray(out)[:, 6, 1])


def test_shape_errors():
  with pytest.raises(PoisonError, match="match"):
    poison_dataset(_data(4), make_trigger("BOX_14", 32, 1), make_target("CORNER", 32, 3), 0.5, 0)
  with pytest.raises(PoisonError, match=r"\(N, H, W, C\)"):
    poison_dataset(_data(4)[0], make_trigger("BOX_14", 32, 3), make_target("CORNER", 32, 3), 0.5, 0)
