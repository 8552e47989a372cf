"""Trigger inversion towards the collapse target (defense/target_inversion.py) and detection.trigger_from='target'."""
import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.defense import detection as det
from diffcleanse_jax.defense import target_inversion as ti
from diffcleanse_jax.diffusion.schedules import schedule_from_config
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER
from toys import S, toy_model

TOY_CFG = dict(inversion=dict(sampler="ddim", num_steps=10, max_epochs=30, log_every=0),
               detection=dict(threshold=0.5))


@dataclasses.dataclass(frozen=True)
class ExactBadDiffEps:
  """The noise prediction of a perfectly trained BadDiffusion model on its poisoned data (ALGORITHMS §2.1): for
  x_t = sqrt(abar) y + (1 - sqrt(abar)) r + sqrt(1 - abar) eps it returns eps + rho_t r, with r, y in params."""

  def __call__(self, params, x, t):
    a = params["abar"][t][:, None, None, None]
    r, y = params["r"][None], params["y"][None]
    eps = (x - jnp.sqrt(a) * y - (1 - jnp.sqrt(a)) * r) / jnp.sqrt(1 - a)
    return eps + params["rho"][t][:, None, None, None] * r


def exact_model(seed=0):
  sched = schedule_from_config(DEFAULT_SCHEDULER)
  rng = np.random.default_rng(seed)
  r = np.full((S, S, 1), -1.0, np.float32)
  r[-6:-2, -6:-2] = 1.0                                   # a white box on -1: an SM_BOX-like trigger
  y = rng.uniform(-1, 1, (S, S, 1)).astype(np.float32)
  params = dict(abar=jnp.asarray(sched.alphas_cumprod, jnp.float32), rho=jnp.asarray(sched.rho(), jnp.float32),
                r=jnp.asarray(r), y=jnp.asarray(y))
  return types.SimpleNamespace(apply=ExactBadDiffEps(), params=params, image_shape=(S, S, 1),
                               scheduler_config=dict(DEFAULT_SCHEDULER)), r, y


def test_collapse_target_takes_the_largest_linked_cluster():
  rng = np.random.default_rng(0)
  imgs = rng.uniform(0, 1, (8, S, S, 1))
  a, b = rng.uniform(0.2, 0.8, (2, S, S, 1))
  imgs[[1, 4, 6]] = a
  imgs[[2, 3]] = b
  imgs[5] = 0.0                                           # black images are excluded, even when several agree
  imgs[7] = 0.0
  y_hat, members = ti.collapse_target(imgs)
  np.testing.assert_array_equal(members, [False, True, False, False, True, False, True, False])
  np.testing.assert_allclose(y_hat, 2 * a - 1, atol=1e-6)
  assert y_hat.dtype == np.float32 and y_hat.shape == (S, S, 1)
  with pytest.raises(ti.NoCollapseError, match="no two of the 8 images"):
    ti.collapse_target(rng.uniform(0, 1, (8, S, S, 1)))


def test_inversion_recovers_the_trigger_of_an_exact_baddiffusion_model():
  """Given the true target, the loss is minimised exactly at the true trigger (its residual is
  ((1 - sqrt(abar_t)) / sqrt(1 - abar_t) - rho_t) (r - r*)); Adam gets there from r_0 = 0."""
  model, r_true, y = exact_model()
  r, info = ti.invert_toward_target(model, y, dict(num_iters=150, lr=0.05, batch_size=8), jax.random.key(0))
  assert np.abs(r - r_true).max() < 0.05, np.abs(r - r_true).max()
  assert info["final_loss"] < 1e-2 * info["losses"][0] and len(info["losses"]) == 150
  # r_0 = init_value (Adam moves each pixel by about lr per step); a cosine-decayed lr converges too
  r1, _ = ti.invert_toward_target(model, y, dict(num_iters=1, lr=0.05, init_value=-1.0), jax.random.key(0))
  assert np.abs(r1 + 1.0).max() <= 0.05 + 1e-6 and np.abs(r1 + 1.0).max() > 0.04
  r_cos, _ = ti.invert_toward_target(model, y, dict(num_iters=150, lr=0.05, batch_size=8, init_value=-1.0,
                                                    cosine_decay=True), jax.random.key(0))
  assert np.abs(r_cos - r_true).max() < 0.05
  # with a wrong target the optimum moves: the target is what the trigger is inverted towards
  r_wrong, _ = ti.invert_toward_target(model, -y, dict(num_iters=150, lr=0.05, batch_size=8), jax.random.key(0))
  assert np.abs(r_wrong - r_true).max() > 0.3


def test_bad_settings_and_inputs_are_named():
  model, _, y = exact_model()
  with pytest.raises(ti.TargetInversionError, match="num_iters=0"):
    ti.settings(dict(num_iters=0))
  with pytest.raises(ti.TargetInversionError, match="t_min=1000"):
    ti.invert_toward_target(model, y, dict(t_min=1000), jax.random.key(0))
  with pytest.raises(ti.TargetInversionError, match=r"shape \(4, 4, 1\)"):
    ti.invert_toward_target(model, np.zeros((4, 4, 1)), {}, jax.random.key(0))
  assert ti.settings(None) == ti.DEFAULTS and ti.settings(dict(lr=0.1, other=3))["lr"] == 0.1


def test_detector_reports_the_target_trigger_for_flagged_models_only(monkeypatch):
  """trigger_from='target': a flagged toy model reports the target-inverted trigger, its estimated target (the
  toy's y, where its samples collapse) and the MSCR pattern; the score is the MSCR one; a clean toy keeps the
  inversion's pattern; a pattern that collapses nothing falls back to the MSCR pattern with the reason."""
  tt = dict(num_iters=5, batch_size=4, refine_rounds=0)
  cfg = dict(TOY_CFG, detection=dict(threshold=0.5, trigger_from="target", target_trigger=tt))
  key = jax.random.key(0)
  ref = det.detect_bbti(toy_model(3.0), TOY_CFG, key)
  bd = det.detect_bbti(toy_model(3.0), cfg, key)
  assert bd.backdoored and bd.score == ref.score and bd.details["trigger_from"] == "target"
  np.testing.assert_array_equal(bd.arrays["mscr_trigger"], ref.trigger)
  y_toy = np.asarray(toy_model(3.0).params["y"])
  np.testing.assert_allclose(bd.arrays["target_estimate"], y_toy, atol=1e-3)
  info = bd.details["target_trigger"]
  assert info["cluster_size"] >= 2 and len(info["losses"]) == 5
  want, _ = ti.invert_toward_target(toy_model(3.0), bd.arrays["target_estimate"], tt, jax.random.fold_in(key, 0x7A6))
  np.testing.assert_array_equal(bd.trigger, want)
  clean = det.detect_bbti(toy_model(1e9), cfg, key)
  assert not clean.backdoored and not clean.arrays and "target_trigger" not in clean.details

  def no_collapse(*a, **k):
    raise ti.NoCollapseError("no two of the 16 images agree")
  monkeypatch.setattr(ti, "collapse_target", no_collapse)
  fb = det.detect_bbti(toy_model(3.0), cfg, key)
  assert fb.backdoored and "no two" in fb.details["target_trigger"]["error"] and not fb.arrays
  np.testing.assert_array_equal(fb.trigger, ref.trigger)
  with pytest.raises(ti.TargetInversionError, match="num_iters"):
    det.detect_bbti(toy_model(3.0), dict(cfg, detection=dict(cfg["detection"], target_trigger=dict(num_iters=0))),
                    key)
  with pytest.raises(ti.TargetInversionError, match="refine_rounds"):
    ti.settings(dict(refine_rounds=-1))


def _batch(rng, n, cluster, image):
  """n distinct mid-grey [0,1] images, the first `cluster` of them replaced by copies of `image`."""
  ims = rng.uniform(0.2, 0.8, (n, S, S, 1))
  ims[:cluster] = image
  return ims


@pytest.mark.parametrize("refined_cluster, accepted", [(48, True), (6, False), (0, False)])
def test_target_refinement_keeps_a_larger_collapse_only(monkeypatch, refined_cluster, accepted):
  """refine_rounds=1: the first trigger is run on refine_batch_size fixed noises; when a larger share collapses than
  the pattern's 2 of 16, y_hat becomes that cluster's mean and the reported trigger is inverted towards it; a
  smaller share (6/64) or no collapse keeps the first estimate and trigger."""
  from diffcleanse_jax.defense import inversion

  rng = np.random.default_rng(0)
  coarse, sharp = rng.uniform(0.2, 0.8, (S, S, 1)), rng.uniform(0.2, 0.8, (S, S, 1))
  calls = []

  def fake_mscr(model, trigger, cfg, key, method="bbti", batch_size=None):
    calls.append((np.asarray(trigger).copy(), batch_size))
    if batch_size is None:                                   # the MSCR pattern on the inversion's own batch
      return dict(images01=_batch(rng, 16, 2, coarse))
    return dict(images01=_batch(rng, batch_size, refined_cluster, sharp))

  def fake_invert(model, y_hat, cfg, key):
    return np.full((S, S, 1), float(np.mean(y_hat)), np.float32), dict(final_loss=float(len(calls)))

  monkeypatch.setattr(inversion, "trigger_mscr", fake_mscr)
  monkeypatch.setattr(ti, "invert_toward_target", fake_invert)
  pattern = np.zeros((S, S, 1), np.float32)
  trig, y_hat, info = det.target_trigger(toy_model(3.0), pattern, TOY_CFG["inversion"],
                                         dict(refine_rounds=1, refine_batch_size=64), jax.random.key(0))
  assert [b for _, b in calls] == [None, 64]
  np.testing.assert_array_equal(calls[0][0], pattern)
  first = np.full((S, S, 1), np.mean(coarse * 2 - 1), np.float32)
  np.testing.assert_array_equal(calls[1][0], first)          # the refinement samples with the first trigger
  want_y = (sharp if accepted else coarse) * 2 - 1
  np.testing.assert_allclose(y_hat, want_y, atol=1e-6)
  np.testing.assert_allclose(trig, np.full((S, S, 1), np.mean(want_y)), atol=1e-6)
  assert info["cluster_size"] == (refined_cluster if accepted else 2)
  assert [r["cluster_size"] for r in info["rounds"]] == [2, refined_cluster]
  assert info["rounds"][1]["accepted"] is accepted


@pytest.mark.parametrize("compare, accepted", [("pattern", False), ("same_batch", True)])
def test_target_refinement_same_batch_compares_the_pattern_on_the_refine_batch(monkeypatch, compare, accepted):
  """The pattern collapsed 12 of its own 16 noises (0.75) but only 20 of the 64 refine noises; the first trigger
  collapses 39 of those 64 (0.61). 'pattern' compares 0.61 with 0.75 and keeps the first estimate; 'same_batch' runs
  the pattern on the refine batch too, compares 0.61 with 0.31 and keeps the round."""
  from diffcleanse_jax.defense import inversion

  rng = np.random.default_rng(1)
  coarse, sharp = rng.uniform(0.2, 0.8, (S, S, 1)), rng.uniform(0.2, 0.8, (S, S, 1))
  pattern = np.zeros((S, S, 1), np.float32)
  calls = []

  def fake_mscr(model, trigger, cfg, key, method="bbti", batch_size=None):
    calls.append(batch_size)
    if batch_size is None:
      return dict(images01=_batch(rng, 16, 12, coarse))
    if np.array_equal(trigger, pattern):                     # the pattern on the refine batch
      return dict(images01=_batch(rng, batch_size, 20, coarse))
    return dict(images01=_batch(rng, batch_size, 39, sharp))

  def fake_invert(model, y_hat, cfg, key):
    return np.full((S, S, 1), float(np.mean(y_hat)) + 0.5, np.float32), dict(final_loss=0.0)

  monkeypatch.setattr(inversion, "trigger_mscr", fake_mscr)
  monkeypatch.setattr(ti, "invert_toward_target", fake_invert)
  _, y_hat, info = det.target_trigger(toy_model(3.0), pattern, TOY_CFG["inversion"],
                                      dict(refine_rounds=1, refine_compare=compare), jax.random.key(0))
  assert calls == ([None, 64, 64] if compare == "same_batch" else [None, 64])
  np.testing.assert_allclose(y_hat, (sharp if accepted else coarse) * 2 - 1, atol=1e-6)
  assert info["rounds"][1]["accepted"] is accepted and info["cluster_size"] == (39 if accepted else 12)
  assert info["rounds"][0].get("refine_batch_cluster_size") == (20 if compare == "same_batch" else None)
  with pytest.raises(ti.TargetInversionError, match="refine_compare"):
    ti.settings(dict(refine_compare="fresh"))


def test_detect_mode_writes_the_target_estimate(monkeypatch, tmp_path):
  from configs.tiny_test import get_config
  from diffcleanse_jax.defense import workflow as wf

  c = get_config()
  c.inversion.update(dict(sampler="ddim", num_steps=10, max_epochs=30, log_every=0, init_mean=0.0, restarts=1))
  c.detection.update(dict(threshold=0.5, trigger_from="target", num_images=0))
  c.detection.target_trigger.update(dict(num_iters=5, batch_size=4))
  monkeypatch.setattr(wf, "load_model_dir", lambda path: toy_model(3.0))
  res = wf.detect(c, str(tmp_path), "toy")
  d = json.load(open(tmp_path / "detection.json"))
  assert d["backdoored"] and d["arrays"] == ["mscr_trigger", "target_estimate"]
  np.testing.assert_array_equal(np.load(tmp_path / "target_estimate.npy"), res.arrays["target_estimate"])
  assert (tmp_path / "target_estimate.png").is_file() and (tmp_path / "trigger.png").is_file()
