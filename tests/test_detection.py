"""Backdoor detection (defense/detection.py, defense/workflow.py): decision rule, calibration, metrics, the
BBTI detector on a toy backdoored vs diverse model, --mode=detect and --mode=scan on a tiny saved model."""
import csv
import dataclasses
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.defense import detection as det
from diffcleanse_jax.defense import workflow as wf
from diffcleanse_jax.diffusion.schedules import schedule_from_config
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER

S = 16


@dataclasses.dataclass(frozen=True)
class ToyEps:
  """Backdoored toy (see tests/test_inversion.py): a bright bottom-right box in x_T (mean > c) makes the DDIM
  chain end exactly at the target y; otherwise outputs are diverse (a * tanh(x))."""

  def __call__(self, params, x, t):
    abar = params["acp"][t][:, None, None, None]
    y, reg = params["y"][None], params["region"][None]
    e_y = (x - jnp.sqrt(abar) * y) / jnp.sqrt(1 - abar)
    fire = (jnp.sum(e_y * reg, axis=(1, 2, 3)) / jnp.sum(reg) > params["c"])[:, None, None, None]
    x0c = jnp.tanh(x) * jnp.where(reg > 0, 0.9, 1.3)
    return jnp.where(fire, e_y, (x - jnp.sqrt(abar) * x0c) / jnp.sqrt(1 - abar))


def toy_model(c: float):
  region = np.zeros((S, S, 1), np.float32)
  region[-8:-2, -8:-2] = 1
  y = np.where(region > 0, 0.8, -0.4).astype(np.float32)
  acp = jnp.asarray(schedule_from_config(DEFAULT_SCHEDULER).alphas_cumprod, jnp.float32)
  params = dict(acp=acp, y=jnp.asarray(y), region=jnp.asarray(region), c=jnp.float32(c))
  return types.SimpleNamespace(apply=ToyEps(), params=params, image_shape=(S, S, 1),
                               scheduler_config=dict(DEFAULT_SCHEDULER), source=f"toy(c={c})")


TOY_CFG = dict(inversion=dict(sampler="ddim", num_steps=10, max_epochs=30, log_every=0),
               detection=dict(threshold=0.5))


# ------------------------------------------------------------------------------------------ decision rule
def test_decide_calibrate_auroc_metrics():
  assert det.decide(0.5625, 0.5) and not det.decide(0.5, 0.5)  # strict
  assert det.calibrate_threshold([]) == 0.5
  assert det.calibrate_threshold([0.0, 0.125]) == 0.5               # floored at 0.5
  assert det.calibrate_threshold([0.0, 0.625], margin=0.0625) == pytest.approx(0.6875)
  assert det.calibrate_threshold([0.0, 0.1, 0.2, 0.9], quantile=0.5, floor=0.0) == pytest.approx(0.15)
  assert det.auroc([0.9, 1.0, 0.1, 0.0], [True, True, False, False]) == 1.0
  assert det.auroc([0.5, 0.5], [True, False]) == 0.5
  assert det.auroc([0.3], [True]) is None
  m = det.detection_metrics([1.0, 0.0, 0.75, 0.6], [True, False, True, False], [True, False, True, True])
  assert (m["tp"], m["fp"], m["tn"], m["fn"], m["accuracy"]) == (2, 1, 1, 0, 0.75)


def test_detection_result_to_json_drops_the_trigger():
  r = det.DetectionResult("bbti", True, np.float32(1.0), 0.5, np.zeros((4, 4, 1)), 1.5,
                          dict(mscr=np.array([0.0, 1.0]), big=np.zeros((100, 100)), n=np.int64(3)))
  d = r.to_json()
  assert set(d) == {"method", "backdoored", "score", "threshold", "seconds", "details"}
  assert d["details"]["mscr"] == [0.0, 1.0] and d["details"]["big"]["array_shape"] == [100, 100]
  json.dumps(d)


# ------------------------------------------------------------------------------------------------ toy models
def test_bbti_detects_toy_backdoor_and_passes_diverse_model():
  bd = det.detect_bbti(toy_model(3.0), TOY_CFG, jax.random.key(0))
  assert bd.backdoored and bd.score == 1.0 and bd.method == "bbti"
  assert bd.details["mscr_per_epoch"][-1] == 1.0 and bd.trigger.shape == (S, S, 1)
  clean = det.detect_bbti(toy_model(1e9), TOY_CFG, jax.random.key(0))
  assert not clean.backdoored and clean.score < 0.5
  assert len(clean.details["mscr_per_epoch"]) == 30
  json.dumps(bd.to_json())


def test_registry_and_missing_detector():
  assert {"bbti", "whitebox", "elijah", "terd"} <= set(wf.DETECTORS)
  with pytest.raises(wf.DetectorUnavailable, match="no_such_module"):
    wf._lazy("no_such_module", "x")(None, {}, None)
  with pytest.raises(ValueError, match="detection.method"):
    wf.get_detector("nope")


def test_defense_stage1_never_imports_attacks():
  root = os.path.join(os.path.dirname(__file__), "..", "diffcleanse_jax", "defense")
  for name in ("inversion.py", "detection.py", "workflow.py", "__init__.py"):
    src = open(os.path.join(root, name)).read()
    pattern = r"^\s*(from|import)\s+diffcleanse_jax\.attacks|^\s*from\s+diffcleanse_jax\s+import\s+.*\battacks\b"
    assert not re.search(pattern, src, re.M), name
    assert "import_module(\"diffcleanse_jax.attacks" not in src and "diffcleanse_jax.attacks." not in src.replace(
        "never imports `diffcleanse_jax.attacks`", ""), name


# ------------------------------------------------------------------------------------------- modes on disk
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  from diffcleanse_jax.io.native import save_pretrained
  from diffcleanse_jax.model import DiffusionModel
  from diffcleanse_jax.models.presets import preset

  d = tmp_path_factory.mktemp("models")
  save_pretrained(DiffusionModel.from_config(preset("tiny"), key=0), str(d / "good"), format="native")
  return d


def _tiny_config():
  from configs.tiny_test import get_config
  c = get_config()
  c.inversion.batch_size = 4
  c.inversion.num_steps = 2
  c.inversion.max_epochs = 2
  c.detection.num_images = 4
  c.detection.image_batch_size = 8
  return c


def test_detect_mode_writes_report(tiny_model_dir, tmp_path):
  flags = types.SimpleNamespace(mode="detect", model=str(tiny_model_dir / "good"))
  res = wf.detect_mode(_tiny_config(), str(tmp_path), flags)
  d = json.load(open(tmp_path / "detection.json"))
  for k in ("backdoored", "score", "threshold", "method", "seconds", "details"):
    assert k in d
  assert d["method"] == "bbti" and d["threshold"] == 0.5 and d["backdoored"] == (d["score"] > 0.5)
  assert len(d["details"]["mscr_per_epoch"]) == d["details"]["epochs"] <= 2
  assert np.load(tmp_path / "trigger.npy").shape == (16, 16, 1)
  np.testing.assert_array_equal(np.load(tmp_path / "trigger.npy"), res.trigger)
  for f in ("trigger.png", "samples_clean.png", "samples_inverted.png", "config.json"):
    assert (tmp_path / f).is_file(), f
  with pytest.raises(ValueError, match="--model"):
    wf.detect_mode(_tiny_config(), str(tmp_path), types.SimpleNamespace(mode="detect", model=None))


def test_scan_mode_turns_broken_folders_into_error_rows(tiny_model_dir, tmp_path):
  models = tmp_path / "zoo"
  models.mkdir()
  os.symlink(tiny_model_dir / "good", models / "a_good")
  (models / "b_broken").mkdir()
  (models / "b_broken" / "config.json").write_text("{not json")
  (models / "c_empty").mkdir()
  (models / "notes.txt").write_text("not a model")
  out = tmp_path / "scan"
  rows = wf.scan_mode(_tiny_config(), str(out), types.SimpleNamespace(mode="scan", models_dir=str(models)))
  assert [r["name"] for r in rows] == ["a_good", "b_broken", "c_empty"]
  good, broken, empty = rows
  assert good["error"] is None and good["method"] == "bbti" and 0.0 <= good["score"] <= 1.0
  assert broken["error"] and empty["error"] and broken["score"] is None
  with open(out / "scan.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["name"] for r in table] == ["a_good", "b_broken", "c_empty"]
  assert list(table[0]) == list(wf.SCAN_COLUMNS) and table[1]["error"]
  md = (out / "scan.md").read_text()
  assert "3 models" in md and "1 errors" not in md and "2 errors" in md
  assert (out / "models" / "a_good" / "detection.json").is_file()
