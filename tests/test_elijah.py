"""Elijah: inversion loss and optimiser, uniformity/TV features, decision, removal loss, detect() smoke test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.defense import elijah
from toys import _fast_compiles  # noqa: F401  (module-scoped autouse fixture)


def _linear_eps(params, x, t):
  """A hand-made 'UNet': eps = a x - c (c an image), hashable as a module-level function."""
  return params["a"] * x - params["c"][None]


def _toy_setup(n=64, side=8):
  k1, k2 = jax.random.split(jax.random.key(3))
  noise = jax.random.normal(k1, (n, side, side, 1))
  c = jnp.full((side, side, 1), -0.2).at[2:5, 2:5].set(0.3)
  return noise, {"a": jnp.float32(1.0), "c": c}


def test_loss_value_by_hand():
  noise, params = _toy_setup()
  tau = jnp.linspace(-1, 1, 64).reshape(8, 8, 1)
  # mean_b (a (noise_b + tau) - c) - lam tau = a mbar + (a - lam) tau - c
  expect = np.mean(np.abs(np.asarray(noise).mean(0) + 0.5 * np.asarray(tau) - np.asarray(params["c"])))
  got = elijah.elijah_loss(_linear_eps, params, tau, noise, 999, lam=0.5)
  np.testing.assert_allclose(float(got), expect, rtol=1e-5)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_inversion_reaches_known_minimiser(loop):
  # loss = mean |mbar + 0.5 tau - c| is minimised (to 0) by tau* = 2 (c - mbar).
  noise, params = _toy_setup()
  tau_star = 2.0 * (params["c"] - noise.mean(0))
  tau0 = elijah.init_trigger(jax.random.key(0), (8, 8, 1))
  assert float(tau0.max()) <= 0.0 and float(tau0.min()) >= -1.0
  tau, losses = elijah.invert_trigger(_linear_eps, params, tau0, noise, 999, num_iters=100, lam=0.5, lr=0.1,
                                      loop=loop)
  assert losses.shape == (100,)
  assert float(losses[-1]) < 0.02 < float(losses[0])
  np.testing.assert_allclose(np.asarray(tau), np.asarray(tau_star), atol=0.06)


def test_scan_and_python_loops_agree():
  noise, params = _toy_setup(n=8)
  tau0 = elijah.init_trigger(jax.random.key(1), (8, 8, 1))
  a, la = elijah.invert_trigger(_linear_eps, params, tau0, noise, 999, num_iters=5, loop="python")
  b, lb = elijah.invert_trigger(_linear_eps, params, tau0, noise, 999, num_iters=5, loop="scan")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-6)


def test_trimmed_uniformity_constructed():
  n = 16
  # Row i holds the values 0..15 (a cyclic shift) times (i + 1): per-row trimmed mean = 7.5 (i + 1);
  # trimming the 4 smallest/largest row means keeps i + 1 = 5..12, mean 8.5 -> 63.75.
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  d = ((j - i) % n) * (i + 1.0)
  assert float(elijah.trimmed_uniformity(d, 4)) == pytest.approx(63.75)
  # Outliers in the dropped tails do not matter.
  d2 = np.array(d)
  d2[:, 0] = 0.0
  d2[0, :] = 1e6
  d2[0, 0] = -1e6
  base = np.full((n, n), 2.0)
  base[:, :3] = -50.0
  base[:, -3:] = 70.0
  assert float(elijah.trimmed_uniformity(base, 4)) == pytest.approx(2.0)
  # Small n: trim is lowered so that something remains.
  assert float(elijah.trimmed_uniformity(np.ones((4, 4)), 4)) == pytest.approx(1.0)


def test_pairwise_distances():
  imgs = np.zeros((3, 4, 4, 1), np.float32)
  imgs[1] = 1.0
  imgs[2, :2] = 1.0  # half the pixels
  d = np.asarray(elijah.pairwise_distances(imgs, "rms"))
  np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-6)
  assert d[0, 1] == pytest.approx(1.0, abs=1e-6)
  assert d[0, 2] == pytest.approx(np.sqrt(0.5), abs=1e-6)
  assert d[1, 2] == pytest.approx(np.sqrt(0.5), abs=1e-6)
  np.testing.assert_allclose(d, d.T, atol=1e-6)
  a = np.zeros((2, 2, 2, 1), np.float32)
  a[0, 0] = 1.0
  a[1, 1] = 1.0  # orthogonal
  c = np.asarray(elijah.pairwise_distances(a, "cosine"))
  assert c[0, 1] == pytest.approx(1.0, abs=1e-6) and c[0, 0] == 0.0
  with pytest.raises(ValueError):
    elijah.pairwise_distances(a, "lpips")


def test_total_variation():
  assert float(elijah.total_variation(np.full((3, 8, 8, 2), 0.7, np.float32))) == 0.0
  h, w = 4, 5
  checker = ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2).astype(np.float32)[None, :, :, None]
  # every neighbour pair differs by 1: h (w-1) horizontal + (h-1) w vertical; batch mean with a zero image
  batch = np.concatenate([checker, np.zeros_like(checker)])
  assert float(elijah.total_variation(checker)) == pytest.approx(h * (w - 1) + (h - 1) * w)
  assert float(elijah.total_variation(batch)) == pytest.approx((h * (w - 1) + (h - 1) * w) / 2)


def test_decide_and_calibrate():
  flag, score, thr = elijah.decide(0.05, 10.0, uniformity_threshold=0.1)
  assert flag and score == pytest.approx(0.95) and thr == pytest.approx(0.9) and score > thr
  flag, score, thr = elijah.decide(0.3, 10.0, uniformity_threshold=0.1)
  assert not flag and score < thr
  assert elijah.decide(0.3, 1.0, 0.1, tv_threshold=2.0)[0]
  assert elijah.calibrate_uniformity_threshold([0.3, 0.25, 0.4]) == pytest.approx(0.125)
  assert all(v is not None for v in elijah.DEFAULTS.values())  # config sections drop None values


def _affine_eps(params, x, t):
  return params["w"] * x + params["b"] * (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def test_removal_loss_is_sum_of_terms():
  acp = jnp.asarray(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), jnp.float32)
  params = {"w": jnp.float32(0.9), "b": jnp.float32(0.1)}
  frozen = {"w": jnp.float32(1.1), "b": jnp.float32(-0.2)}
  x0 = jax.random.uniform(jax.random.key(0), (4, 6, 6, 1), minval=-1, maxval=1)
  tau = jnp.full((6, 6, 1), -0.5)
  key = jax.random.key(7)
  # hand computation with the same draws (t ~ U{0..T-1}, one eps shared by the three terms)
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (4,), 0, 1000)
  eps = jax.random.normal(k_eps, x0.shape)
  a = acp[t][:, None, None, None]
  xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
  ddpm = jnp.mean((0.9 * xt + 0.1 * (t / 1000.0)[:, None, None, None] - eps) ** 2)
  ref = 1.1 * eps - 0.2 * 0.999
  trig = jnp.mean((0.9 * (eps + tau) + 0.1 * 0.999 - ref) ** 2)
  clean = jnp.mean((0.9 * eps + 0.1 * 0.999 - ref) ** 2)
  terms = elijah.removal_loss_terms(_affine_eps, params, frozen, x0, key, tau, acp)
  np.testing.assert_allclose([float(terms[k]) for k in ("ddpm", "trigger", "clean")],
                             [float(ddpm), float(trig), float(clean)], rtol=1e-5)
  total = elijah.removal_loss(_affine_eps, params, frozen, x0, key, tau, acp)
  assert float(total) == pytest.approx(float(ddpm + trig + clean), rel=1e-5)
  loss_fn = elijah.make_removal_loss(_affine_eps, frozen, tau, acp)
  assert float(jax.jit(loss_fn)(params, {"image": x0}, key)) == pytest.approx(float(total), rel=1e-5)
  g = jax.grad(loss_fn)(params, x0, key)
  assert np.isfinite(float(g["w"])) and np.isfinite(float(g["b"]))
  # theta == theta0 and tau = 0: both distillation terms vanish
  same = elijah.removal_loss_terms(_affine_eps, frozen, frozen, x0, key, jnp.zeros_like(tau), acp)
  assert float(same["trigger"]) == 0.0 and float(same["clean"]) == 0.0


def test_detect_tiny_model():
  detection = pytest.importorskip("diffcleanse_jax.defense.detection")
  from diffcleanse_jax.model import DiffusionModel
  from diffcleanse_jax.models.presets import preset

  model = DiffusionModel.from_config(preset("tiny"), 0)
  cfg = dict(num_iters=2, num_noise=4, num_samples=6, sampler_steps=2, trim=1)
  res = elijah.detect(model, cfg, jax.random.key(0))
  assert isinstance(res, detection.DetectionResult)
  assert res.method == "elijah" and isinstance(res.backdoored, bool)
  assert np.isfinite(res.score) and np.isfinite(res.threshold)
  assert res.trigger.shape == (16, 16, 1) and res.trigger.dtype == np.float32
  assert res.details["samples01"].shape == (6, 16, 16, 1)
  assert 0.0 <= res.details["uniformity"] <= 1.0 and res.details["tv"] >= 0.0
  assert res.backdoored == (res.details["uniformity"] < cfg.get("uniformity_threshold", 0.1))
  assert len(res.details["inversion"]["losses"]) == 2
