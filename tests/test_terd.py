"""TERD: reversed loss, cosine schedule, stage A/B steps, KL statistics and decision, input detection, detect()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.defense import terd
from diffcleanse_jax.diffusion.samplers import SamplerConfig
from diffcleanse_jax.diffusion.schedules import Schedule, make_betas
from toys import _fast_compiles  # noqa: F401  (module-scoped autouse fixture)

SCHED = Schedule(make_betas())
ACP = jnp.asarray(SCHED.alphas_cumprod, jnp.float32)


def _exact_eps(params, x, t):
  """The exact noise for x = sqrt(abar) x0 + sqrt(1-abar) eps + mu (x0 tiled over the 2B batch of the loss)."""
  a = ACP[t][:, None, None, None]
  x0 = jnp.concatenate([params["x0"], params["x0"]])
  return (x - jnp.sqrt(a) * x0 - params["mu"][None]) / jnp.sqrt(1 - a)


def _draws(b=4, shape=(6, 6, 1), lo=990, hi=1000):
  k = jax.random.split(jax.random.key(0), 4)
  x0 = jax.random.normal(k[0], (b, *shape))
  t = jax.random.randint(k[1], (b,), lo, hi)
  return x0, t, jax.random.normal(k[2], (b, *shape)), jax.random.normal(k[3], (b, *shape))


def test_reversed_loss_zero_for_exact_predictor():
  x0, t, e1, e2 = _draws()
  mu = jnp.linspace(-1, 1, 36).reshape(6, 6, 1)
  params = {"x0": x0, "mu": mu}
  assert float(terd.reversed_loss(_exact_eps, params, x0, mu, t, e1, e2, ACP, True)) == pytest.approx(0, abs=1e-6)
  # without mu in the inputs the exact predictor is the one with mu = 0
  p0 = {"x0": x0, "mu": jnp.zeros_like(mu)}
  assert float(terd.reversed_loss(_exact_eps, p0, x0, mu, t, e1, e2, ACP, False)) == pytest.approx(0, abs=1e-6)
  # a predictor that is off by a constant still gives 0: only differences between the two noises count
  p1 = {"x0": x0, "mu": mu + 0.3}
  assert float(terd.reversed_loss(_exact_eps, p1, x0, mu, t, e1, e2, ACP, True)) == pytest.approx(0, abs=1e-5)


def _identity_eps(params, x, t):
  return x


def test_reversed_loss_value_by_hand():
  # eps_theta(x) = x: (eps1 - x1) - (eps2 - x2) = (1 - sqrt(1 - abar_t)) (eps1 - eps2)
  x0, t, e1, e2 = _draws(lo=0, hi=1000)
  mu = jnp.full((6, 6, 1), 0.7)
  s = jnp.sqrt(1 - ACP[t])[:, None, None, None]
  d = (1 - s) * (e1 - e2)
  expect = 0.5 * float(jnp.mean(jnp.sum(d * d, axis=(1, 2, 3))))
  got = terd.reversed_loss(_identity_eps, None, x0, mu, t, e1, e2, ACP, True)
  assert float(got) == pytest.approx(expect, rel=1e-5)


def test_cosine_lr_and_profiles():
  assert float(terd.cosine_lr(0.5, 0, 100)) == pytest.approx(0.5)
  assert float(terd.cosine_lr(0.5, 50, 100)) == pytest.approx(0.25)
  assert float(terd.cosine_lr(0.5, 99, 100)) == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 0.99)), abs=1e-7)
  assert terd.resolve_iterations({}) == (100, 20)
  assert terd.resolve_iterations({"profile": "paper"}) == (3000, 1000)
  assert terd.resolve_iterations({"profile": "paper", "stage_b_iters": 5}) == (3000, 5)
  assert terd.resolve_iterations({"stage_a_iters": 0, "stage_b_iters": -1}) == (0, 20)
  assert all(v is not None for v in terd.DEFAULTS.values())
  with pytest.raises(ValueError):
    terd.resolve_iterations({"profile": "gpu"})


def _shift_eps(params, x, t):
  """Toy 'backdoored' predictor: the output tracks x except a fixed offset pattern."""
  return x - params["g"][None] * jnp.tanh(jnp.mean(x, axis=(1, 2, 3), keepdims=True))


def test_stages_run_and_clip_bounds_stage_b():
  params = {"g": jnp.linspace(-1, 1, 36).reshape(6, 6, 1)}
  mu0 = -jax.random.uniform(jax.random.key(1), (6, 6, 1))
  rcfg = SamplerConfig(method="ddim", num_steps=3, clip_sample=True)
  mu_a, log_a = terd.estimate_trigger(_shift_eps, params, mu0, jax.random.key(2), ACP, stage_a_iters=3,
                                      stage_b_iters=0, batch_size=4)
  assert log_a["stage_a"].shape == (3,) and log_a["stage_b"].shape == (0,)
  assert np.all(np.isfinite(np.asarray(mu_a))) and not np.allclose(np.asarray(mu_a), np.asarray(mu0))
  mu_b, log_b = terd.estimate_trigger(_shift_eps, params, mu_a, jax.random.key(3), ACP, schedule=SCHED,
                                      refine_cfg=rcfg, stage_a_iters=0, stage_b_iters=2, batch_size=4,
                                      clip_norm=0.01, lr=0.5)
  assert log_b["stage_b"].shape == (2,)
  # two SGD steps of a clipped gradient: |delta| <= sum_k lr_k * 0.01
  step = float(jnp.linalg.norm((mu_b - mu_a).ravel()))
  assert step <= 0.5 * 0.01 * (1 + 0.5 * (1 + np.cos(np.pi / 2))) + 1e-6
  assert np.all(np.isfinite(log_b["stage_b_lo"]))
  # the reference-faithful gradient path through the refinement sampler also runs
  mu_c, _ = terd.estimate_trigger(_shift_eps, params, mu_a, jax.random.key(3), ACP, schedule=SCHED,
                                  refine_cfg=rcfg, stage_a_iters=0, stage_b_iters=1, batch_size=4,
                                  grad_through_sampler=True)
  assert np.all(np.isfinite(np.asarray(mu_c)))
  with pytest.raises(ValueError):
    terd.estimate_trigger(_shift_eps, params, mu_a, jax.random.key(3), ACP, stage_a_iters=0, stage_b_iters=1)


def test_kl_statistics_and_decision():
  zero = np.zeros((8, 8, 3), np.float32)
  s = terd.terd_statistics(zero)
  assert s["kl_mean"] == 0.0 and s["kl_var"] == 0.0
  assert s["M_r"] == pytest.approx(0.4) and s["V_r"] == pytest.approx(-0.003)
  flag, score, thr = terd.decide(s)
  assert not flag and score == 0.0 and thr == 1.0
  ones = terd.terd_statistics(np.ones((8, 8, 3)))  # KL = 0.5 everywhere
  assert ones["M_r"] == pytest.approx(0.9) and ones["kl_var"] == pytest.approx(0.0)
  flag, score, _ = terd.decide(ones)
  assert flag and score == pytest.approx(0.5 / 0.1)
  # a BadDiffusion-like box trigger: -1 background, 0 inside a box -> large variance too
  box = -np.ones((32, 32, 1))
  box[16:30, 16:30] = 0.0
  sb = terd.terd_statistics(box)
  p = 196 / 1024
  assert sb["kl_mean"] == pytest.approx(0.5 * (1 - p)) and sb["kl_var"] == pytest.approx(0.25 * p * (1 - p))
  assert terd.decide(sb)[0]
  # variance alone can trigger the flag
  sparse = np.zeros((10, 10, 1))
  sparse[0, :5] = 2.0  # KL 2 on 5 of 100 dims: mean 0.1 (M_r = 0.5, not above), var 0.19
  ss = terd.terd_statistics(sparse)
  assert ss["M_r"] == pytest.approx(0.5) and terd.decide(ss)[0]
  # gamma != 1: KL = -log g + (g^2 - 1)/2
  sg = terd.terd_statistics(np.zeros(4), gamma=np.full(4, 2.0))
  assert sg["kl_mean"] == pytest.approx(-np.log(2.0) + 1.5)
  with pytest.raises(ValueError):
    terd.decide(s, m_threshold=0.3)
  cal = terd.calibrate_thresholds([zero + 0.1, zero - 0.2], margin=2.0)
  assert cal["m_threshold"] == pytest.approx(0.4 + 2.0 * 0.02) and cal["v_threshold"] == pytest.approx(-0.003)
  # benign estimates are not flagged with calibrated thresholds; zero-width variance threshold stays usable
  assert not terd.decide(terd.terd_statistics(zero - 0.2), **cal)[0]
  assert terd.decide(sb, **cal) == (True, np.inf, 1.0)


def test_input_detection():
  mu = np.full((2, 2, 1), 2.0, np.float32)
  pts = np.stack([mu, np.zeros_like(mu), 0.4 * mu, 0.6 * mu, -mu])
  np.testing.assert_array_equal(np.asarray(terd.is_poisoned_input(pts, mu)), [True, False, False, True, False])
  assert np.asarray(terd.is_poisoned_input(mu, mu)).shape == ()
  rng = np.random.default_rng(0)
  big = np.zeros((8, 8, 1), np.float32)
  big[2:6, 2:6] = 1.5
  clean = rng.standard_normal((200, 8, 8, 1)).astype(np.float32)
  assert float(np.mean(terd.is_poisoned_input(clean, big))) < 0.1
  assert float(np.mean(terd.is_poisoned_input(clean + big, big))) > 0.9
  # with a covariance diagonal: log N(x; mu, diag g) = -1/2 sum((x - mu)^2 / g + log g) + const
  g = np.full((2, 2, 1), 4.0, np.float32)
  x = np.zeros((1, 2, 2, 1), np.float32)
  # poison: -1/2 (4 * 4/4 + 4 log 4) = -2 - 2 log 4 < benign 0
  assert not bool(terd.is_poisoned_input(x, mu, g)[0])


def test_detect_tiny_model():
  detection = pytest.importorskip("diffcleanse_jax.defense.detection")
  from diffcleanse_jax.model import DiffusionModel
  from diffcleanse_jax.models.presets import preset

  model = DiffusionModel.from_config(preset("tiny"), 0)
  cfg = dict(stage_a_iters=2, stage_b_iters=1, batch_size=2, refine_steps=2)
  res = terd.detect(model, cfg, jax.random.key(0))
  assert isinstance(res, detection.DetectionResult)
  assert res.method == "terd" and isinstance(res.backdoored, bool)
  assert np.isfinite(res.score) and res.threshold == 1.0
  assert res.trigger.shape == (16, 16, 1) and res.trigger.dtype == np.float32
  assert res.backdoored == (res.score > 1.0)
  assert len(res.details["inversion"]["stage_a"]) == 2 and len(res.details["inversion"]["stage_b"]) == 1
