"""End-to-end cleanse on the tiny preset (stand-in detector), resumption, methods, and the CLI glue."""
import json
import os
import shutil

import numpy as np
import pytest

import jax

from configs import tiny_test
from diffcleanse_jax import cleanse_cli
from diffcleanse_jax.defense import cleanse as cl
from diffcleanse_jax.defense import workflow
from diffcleanse_jax.defense.detection import DetectionResult
from diffcleanse_jax.io.native import load_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import preset

TRIGGER = np.where(np.arange(16)[:, None, None] >= 10, 0.5, -1.0) * np.ones((16, 16, 1), np.float32)


def _stub_detector(backdoored=True):
  def detect(model, cfg, key):
    return DetectionResult(method="stub", backdoored=backdoored, score=1.0 if backdoored else 0.0, threshold=0.5,
                           trigger=TRIGGER.astype(np.float32), seconds=0.01, details={"note": "test stand-in"})
  return detect


@pytest.fixture
def stub(monkeypatch):
  monkeypatch.setitem(workflow.DETECTORS, "stub", _stub_detector(True))
  monkeypatch.setitem(workflow.DETECTORS, "stub_clean", _stub_detector(False))


def _config(**cleanse):
  c = tiny_test.get_config()
  c.detection.method = "stub"
  c.mesh.num_devices = 2
  c.prune.update(dict(ratio=0.1, batch_size=4, t_threshold=990, t_stride=3, t_chunk=4))
  c.finetune.update(dict(num_images=8, sample_steps=2, sample_batch_size=8, batch_size=4, num_steps=4,
                         checkpoint_every=2, log_every=1, ema_decay=0.9, learning_rate=1e-3))
  c.eval.update(dict(num_samples=4, method="ddim", num_steps=2, batch_size=4))
  c.cleanse.update(dict(grid_size=4, **cleanse))
  return c


def _model():
  return DiffusionModel.from_config(preset("tiny"), key=0).replace(source="tiny-test-model")


def test_cleanse_end_to_end_writes_a_loadable_pruned_model_and_reports_then_resumes(tmp_path, stub):
  wd = str(tmp_path / "run")
  target = np.zeros((16, 16, 1), np.float32)
  logs = []
  rep = cl.cleanse(_model(), _config(), wd, jax.random.key(0), true_trigger=TRIGGER, true_target=target,
                   log=logs.append)
  for k in ("backdoored", "asr_before", "asr_after", "pruned_fraction", "seconds", "params_before", "params_after",
            "flops_before", "flops_after", "mse_before", "mse_after", "fd_before", "detection", "pruning", "finetune"):
    assert k in rep, k
  assert rep["backdoored"] is True and rep["cleansed"] is True
  assert rep["params_after"] < rep["params_before"] and 0 < rep["pruned_fraction"] < 0.05
  assert rep["flops_after"] < rep["flops_before"]
  assert set(rep["seconds"]) >= {"detect", "data", "score", "prune", "finetune", "eval_before", "eval_after", "total"}
  assert rep["before"]["true"]["asr"] is not None and "inverted_collapse" in rep["after"]
  assert rep["pruning"]["groups_pruned"] == 6 and rep["pruning"]["num_groups"] == 22
  saved = json.load(open(os.path.join(wd, "report.json")))
  assert saved["asr_definition"].startswith("true trigger")
  cleansed = load_pretrained(os.path.join(wd, "cleansed"))
  assert cleansed.spec.widths and cleansed.num_params == rep["params_after"]
  md = open(os.path.join(wd, "report.md")).read()
  assert "| ASR |" in md and "samples_clean_after.png" in md and "trigger_inverted.png" in md
  for f in ("samples_clean_before.png", "samples_inverted_after.png", "samples_true_after.png", "trigger_true.png"):
    assert os.path.isfile(os.path.join(wd, "images", f)), f

  # interrupted after the step-2 checkpoint: the rerun reuses every stage and resumes the fine-tune
  first = [np.asarray(x) for x in jax.tree.leaves(cleansed.params)]
  shutil.rmtree(os.path.join(wd, "finetune", "checkpoints", "4"))
  shutil.rmtree(os.path.join(wd, "cleansed"))
  os.remove(os.path.join(wd, "report.json"))
  logs2 = []
  cl.cleanse(_model(), _config(), wd, jax.random.key(0), true_trigger=TRIGGER, true_target=target, log=logs2.append)
  text = "\n".join(logs2)
  assert "detection: reusing" in text and "pruning: reusing" in text and "reusing 8 generated images" in text
  assert "resumed from" in text
  assert json.load(open(os.path.join(wd, "finetune", "loss_history.json")))["start_step"] == 2
  again = [np.asarray(x) for x in jax.tree.leaves(load_pretrained(os.path.join(wd, "cleansed")).params)]
  for a, b in zip(first, again):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  with pytest.raises(ValueError, match="different settings .*prune"):
    c = _config()
    c.prune.ratio = 0.2
    cl.cleanse(_model(), c, wd, jax.random.key(0))


def test_clip_method_and_clean_model(tmp_path, stub):
  rep = cl.cleanse(_model(), _config(method="clip", evaluate=False), str(tmp_path / "clip"), jax.random.key(0))
  m = load_pretrained(str(tmp_path / "clip" / "cleansed"))
  assert m.scheduler_config["clip_sample"] is True and rep["params_after"] == rep["params_before"]
  c = _config(evaluate=False)
  c.detection.method = "stub_clean"
  rep = cl.cleanse(_model(), c, str(tmp_path / "clean"), jax.random.key(0))
  assert rep["backdoored"] is False and rep["cleansed"] is False and rep["asr_after"] is None
  # a model the detector calls clean is written out unchanged (no pruning, no fine-tuning) unless forced
  out = load_pretrained(str(tmp_path / "clean" / "cleansed"))
  assert out.num_params == rep["params_before"] and not out.spec.widths
  for a, b in zip(jax.tree.leaves(_model().params), jax.tree.leaves(out.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not os.path.exists(str(tmp_path / "clean" / "finetune"))


def test_unknown_method_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="config.cleanse.method='magic'"):
    cl.cleanse(_model(), _config(method="magic"), str(tmp_path), jax.random.key(0))


def test_cli_resolves_true_trigger_and_target_from_attack_json(tmp_path):
  wd = tmp_path / "attack"
  (wd / "model").mkdir(parents=True)
  json.dump({"trigger": "BOX_4", "target": "CORNER", "trigger_file": "trigger.npy", "target_file": "target.npy"},
            open(wd / "attack.json", "w"))
  g, y, src = cleanse_cli.resolve_trigger_target(str(wd / "model"), (16, 16, 1))
  assert src.endswith("attack.json") and g.shape == (16, 16, 1) and y.shape == (16, 16, 1)
  np.save(wd / "trigger.npy", TRIGGER)  # arrays next to attack.json win over its names
  g2, _, _ = cleanse_cli.resolve_trigger_target(str(wd / "model"), (16, 16, 1))
  np.testing.assert_array_equal(g2, TRIGGER)
  g3, y3, src3 = cleanse_cli.resolve_trigger_target(str(wd / "model"), (16, 16, 1), trigger="BOX_8")
  assert src3 == "flags" and y3 is None and not np.array_equal(g3, TRIGGER)
  assert cleanse_cli.resolve_trigger_target(str(tmp_path / "elsewhere"), (16, 16, 1))[:2] == (None, None)


@pytest.mark.parametrize("method", ["prune", "finetune", "elijah", "anp"])
def test_other_methods_run_and_write_a_loadable_model(tmp_path, stub, method):
  c = _config(method=method, evaluate=False, anp_steps=2, anp_batch_size=4)
  rep = cl.cleanse(_model(), c, str(tmp_path), jax.random.key(0), true_target=np.zeros((16, 16, 1), np.float32))
  m = load_pretrained(str(tmp_path / "cleansed"))
  assert rep["cleansed"] is True and m.num_params == rep["params_after"]
  if method == "prune":
    assert rep["params_after"] < rep["params_before"] and "finetune" not in rep
  else:
    assert rep["params_after"] == rep["params_before"]
  if method == "anp":
    assert {"collapse", "mse_to_target", "max_perturbation"} <= set(rep["anp"])
  if method in ("finetune", "elijah"):
    assert rep["finetune"]["num_steps"] == 4


def test_stage_two_modules_do_not_import_the_attacks_package():
  import subprocess
  import sys
  code = ("import sys; import diffcleanse_jax.defense.cleanse, diffcleanse_jax.defense.pruning, "
          "diffcleanse_jax.defense.finetune, diffcleanse_jax.defense.anp; "
          "bad = [m for m in sys.modules if m.startswith('diffcleanse_jax.attacks')]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
