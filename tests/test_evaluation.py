"""Evaluation: metrics.json contents, ASR 1 for a model that produces the target, ASR 0 for a random clean model,
the clipping defence switch reaching the sampler, FD plumbing for 32x32 grayscale models."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from diffcleanse_jax.attacks import make_target, make_trigger
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.evaluation import eval_settings, evaluate_mode, evaluate_model
from diffcleanse_jax.io.native import save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import preset

S = 16
FAST = dict(num_samples=4, method="ddim", num_steps=3, batch_size=4, clean=True)


def _config(**eval_overrides):
  c = tiny_test.get_config()
  c.eval.update(dict(FAST, **eval_overrides))
  return c


def _flags(model, trigger=None, target=None):
  return types.SimpleNamespace(mode="evaluate", model=model, trigger=trigger, target=target)


@pytest.fixture(scope="module")
def clean_model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("m") / "clean"
  save_pretrained(DiffusionModel.from_config(preset("tiny"), key=1), str(d), format="diffusers")
  return str(d)


def test_evaluate_mode_writes_metrics_and_a_random_clean_model_has_asr_0(clean_model_dir, tmp_path):
  out = tmp_path / "eval"
  evaluate_mode(_config(), str(out), _flags(clean_model_dir, "BOX_4", "CORNER"))
  m = json.load(open(out / "metrics.json"))
  for k in ("asr", "mse", "ssim", "num_samples", "sampler", "clip_sample", "fd", "model", "trigger", "target",
            "clean_asr", "clean_mse", "mse_threshold"):
    assert k in m, k
  assert m["asr"] == 0.0 and m["clean_asr"] == 0.0
  assert m["mse"] > 1e-2 and -1 <= m["ssim"] < 0.5
  assert m["num_samples"] == 4 and m["mse_threshold"] == 1e-3
  assert m["sampler"] == dict(method="ddim", num_steps=3, clip_sample=False, timestep_spacing="leading", eta=0.0)
  assert m["clip_sample"] is False
  assert m["fd"] is None  # 16x16: the Fashion-MNIST classifier does not apply
  assert m["trigger"] == "BOX_4" and m["target"] == "CORNER" and m["model"]["path"] == clean_model_dir
  for png in ("samples_clean.png", "samples_triggered.png", "trigger.png", "target.png", "config.json"):
    assert os.path.isfile(out / png), png


def _target_on_trigger_sampler(target, calls):
  """Stands in for samplers.sample: the target image for triggered noise (mostly -1 + eps), noise otherwise."""

  def fake(model, params, x_T, key, cfg, **kw):
    calls.append(cfg)
    triggered = jnp.mean(x_T, axis=(1, 2, 3)) < -0.5
    other = jnp.clip(x_T, -1, 1)
    return jnp.where(triggered[:, None, None, None], jnp.asarray(target)[None], other)

  return fake


def test_a_model_whose_triggered_samples_are_the_target_gets_asr_1(monkeypatch):
  model = DiffusionModel.from_config(preset("tiny"), key=2)
  g, y = make_trigger("BOX_4", S, 1), make_target("CORNER", S, 1)
  calls = []
  monkeypatch.setattr(samplers, "sample", _target_on_trigger_sampler(y, calls))
  m = evaluate_model(model, g, y, FAST, jax.random.key(0), return_samples=True)
  assert m["asr"] == 1.0 and m["mse"] < 1e-5 and m["ssim"] > 0.999
  assert m["clean_asr"] == 0.0 and m["clean_mse"] > 0.05
  assert m["triggered_pixel_std"] < 1e-6
  np.testing.assert_allclose(m["triggered_samples"], np.broadcast_to(y, (4, S, S, 1)), atol=1 / 255)
  assert len(calls) == 2  # one triggered and one clean batch


def test_trigger_without_target_reports_samples_but_no_backdoor_metrics(clean_model_dir, tmp_path, monkeypatch):
  y = make_target("CORNER", S, 1)
  monkeypatch.setattr(samplers, "sample", _target_on_trigger_sampler(y, []))
  evaluate_mode(_config(), str(tmp_path), _flags(clean_model_dir, "BOX_4"))
  m = json.load(open(tmp_path / "metrics.json"))
  assert m["asr"] is None and m["mse"] is None and m["ssim"] is None and m["target"] is None
  assert m["triggered_pixel_std"] < 1e-6  # the trigger collapses every sample onto one image
  assert os.path.isfile(tmp_path / "samples_triggered.png") and os.path.isfile(tmp_path / "samples_clean.png")
  with pytest.raises(ValueError, match="--target needs --trigger"):
    evaluate_mode(_config(), str(tmp_path), _flags(clean_model_dir, None, "CORNER"))


@pytest.mark.parametrize("clip", [False, True])
def test_clip_sample_switch_reaches_the_sampler(clean_model_dir, tmp_path, monkeypatch, clip):
  calls = []
  monkeypatch.setattr(samplers, "sample", _target_on_trigger_sampler(make_target("CORNER", S, 1), calls))
  evaluate_mode(_config(clip_sample=clip, method="ddpm", num_steps=0), str(tmp_path),
                _flags(clean_model_dir, "BOX_4", "CORNER"))
  assert calls and all(c.clip_sample is clip for c in calls)
  assert all(c.method == "ddpm" and c.num_steps is None for c in calls)  # 0 = every training step
  m = json.load(open(tmp_path / "metrics.json"))
  assert m["clip_sample"] is clip and m["sampler"]["clip_sample"] is clip and m["sampler"]["num_steps"] == 1000


def test_clipping_changes_real_samples():
  """The flag reaches the real sampler: with clipping the DDPM chain differs (random models' x0-hat leaves [-1,1])."""
  model = DiffusionModel.from_config(preset("tiny"), key=3)
  g = make_trigger("BOX_4", S, 1)
  a = evaluate_model(model, g, None, dict(FAST, clean=False), jax.random.key(0), return_samples=True)
  b = evaluate_model(model, g, None, dict(FAST, clean=False, clip_sample=True), jax.random.key(0),
                     return_samples=True)
  assert a["clip_sample"] is False and b["clip_sample"] is True
  assert np.max(np.abs(a["triggered_samples"] - b["triggered_samples"])) > 1e-3


def test_fd_is_reported_for_32x32_grayscale_models(monkeypatch):
  cfg = dict(preset("tiny"), sample_size=32)
  model = DiffusionModel.from_config(cfg, key=4)
  ref = np.random.default_rng(0).uniform(-1, 1, (40, 32, 32, 1)).astype(np.float32)
  monkeypatch.setattr(samplers, "sample", lambda model, params, x_T, key, c, **kw: jnp.clip(x_T, -1, 1))
  m = evaluate_model(model, None, None, dict(FAST, num_samples=8, batch_size=8, fd_num_samples=16),
                     jax.random.key(0), fd_reference=ref)
  assert m["fd_num_samples"] == 16 and m["num_clean_samples"] == 16
  assert np.isfinite(m["fd"]) and m["fd"] > 0
  assert m["asr"] is None


def test_eval_settings_validate():
  with pytest.raises(ValueError, match="unknown field 'clip'"):
    eval_settings({"clip": True})
  with pytest.raises(ValueError, match="num_samples=0"):
    eval_settings({"num_samples": 0})
  assert eval_settings(None)["method"] == "ddpm" and eval_settings(None)["num_steps"] == 0


@pytest.mark.parametrize("which", ["evaluation", "cleanse_local"])
def test_fd_samples_can_come_from_their_own_sampler(monkeypatch, which):
  """eval.fd_method/fd_num_steps: the FD set is drawn with that sampler (from the same noise), the clean grid and
  clean_asr keep the eval sampler; with the knobs unset the FD reuses the clean samples (one sampler call set)."""
  from diffcleanse_jax.defense import cleanse
  from diffcleanse_jax.metrics import classifier
  model = DiffusionModel.from_config(dict(preset("tiny"), sample_size=32), key=4)
  calls, fd_inputs = [], []

  def fake_sample(model, params, x_T, key, c, **kw):
    calls.append((c.method, c.num_steps, int(x_T.shape[0])))
    return jnp.clip(x_T * (0.1 if c.method == "ddpm" else 1.0), -1, 1)  # |0.1 x_T| < 0.5

  monkeypatch.setattr(samplers, "sample", fake_sample)
  monkeypatch.setattr(classifier, "fd_score", lambda x, **kw: (fd_inputs.append(np.asarray(x)), 7.0)[1])
  fn = evaluate_model if which == "evaluation" else cleanse.local_evaluate_model
  ev = dict(FAST, num_samples=8, batch_size=8, fd_num_samples=16, fd_method="ddpm", fd_num_steps=5)
  m = fn(model, None, None, ev, jax.random.key(0), return_samples=True)
  assert sum(n for meth, s, n in calls if (meth, s) == ("ddim", 3)) == 8    # the clean grid
  assert sum(n for meth, s, n in calls if (meth, s) == ("ddpm", 5)) == 16   # the FD set
  assert m["fd"] == 7.0 and m["fd_num_samples"] == 16 and len(fd_inputs[0]) == 16
  assert np.abs(fd_inputs[0]).max() < 0.5 < np.abs(m["clean_samples"]).max()
  if which == "evaluation":
    assert m["fd_sampler"]["method"] == "ddpm" and m["fd_sampler"]["num_steps"] == 5
  calls.clear(), fd_inputs.clear()
  fn(model, None, None, dict(ev, fd_method="", fd_num_steps=0), jax.random.key(0))
  assert {(meth, s) for meth, s, n in calls} == {("ddim", 3)} and sum(n for *_, n in calls) == 16


def test_eval_settings_reject_an_unknown_fd_sampler():
  with pytest.raises(ValueError, match="fd_method='dpm'"):
    eval_settings(dict(fd_method="dpm"))
  with pytest.raises(ValueError, match="fd_num_steps=-1"):
    eval_settings(dict(fd_num_steps=-1))
