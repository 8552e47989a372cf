"""Backdoor detection (defense/detection.py, defense/workflow.py): decision rule, calibration, metrics, the
BBTI detector on a toy backdoored vs diverse model, --mode=detect and --mode=scan on a tiny saved model."""
import csv
import json
import os
import re
import types

import jax
import numpy as np
import pytest

from diffcleanse_jax.defense import detection as det
from diffcleanse_jax.defense import workflow as wf
from toys import S, toy_model

TOY_CFG = dict(inversion=dict(sampler="ddim", num_steps=10, max_epochs=30, log_every=0),
               detection=dict(threshold=0.5))


# ------------------------------------------------------------------------------------------ decision rule
def test_decide_calibrate_auroc_metrics():
  assert det.decide(0.5625, 0.5) and not det.decide(0.5, 0.5)  # strict
  assert det.calibrate_threshold([]) == 0.5
  assert det.calibrate_threshold([0.0, 0.125]) == 0.5               # floored at 0.5
  assert det.calibrate_threshold([0.0, 0.625], margin=0.0625) == pytest.approx(0.6875)
  assert det.calibrate_threshold([0.0, 0.1, 0.2, 0.9], quantile=0.5, floor=0.0) == pytest.approx(0.15)
  # leave-one-out: each model's tau comes from the other clean models only
  taus = det.leave_one_out_thresholds([0.0, 0.125, 0.5, 0.0], [False, False, True, False])
  assert taus == [0.125, 0.0, 0.125, 0.125]
  assert [det.decide(s, t) for s, t in zip([0.0, 0.125, 0.5, 0.0], taus)] == [False, True, True, False]
  assert det.leave_one_out_thresholds([0.3], [False]) == [0.0]      # nothing else to calibrate on: floor
  with pytest.raises(ValueError, match="labels"):
    det.leave_one_out_thresholds([0.3], [])
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


def test_shift_trigger_source_replaces_the_trigger_of_flagged_models_only(tmp_path):
  """detection.trigger_from='shift': a flagged model reports the distribution-shift trigger (and keeps the MSCR
  pattern as arrays['mscr_trigger'], written as mscr_trigger.npy); the decision and score are the MSCR ones; a
  model that is not flagged keeps the inversion's pattern; an unknown source is a config error."""
  shift = dict(num_noise=8, num_iters=5, lam=0.5, lr=0.1)
  cfg = dict(TOY_CFG, detection=dict(threshold=0.5, trigger_from="shift", shift_trigger=shift))
  key = jax.random.key(0)
  ref = det.detect_bbti(toy_model(3.0), TOY_CFG, key)
  bd = det.detect_bbti(toy_model(3.0), cfg, key)
  assert bd.backdoored and bd.score == ref.score and bd.details["trigger_from"] == "shift"
  np.testing.assert_array_equal(bd.arrays["mscr_trigger"], ref.trigger)
  want, info = det.shift_trigger(toy_model(3.0), shift, jax.random.fold_in(key, 0x5417))
  np.testing.assert_array_equal(bd.trigger, want)
  assert np.abs(bd.trigger - ref.trigger).max() > 0 and len(bd.details["shift_trigger"]["losses"]) == 5
  assert info["num_noise"] == 8 and bd.seconds >= bd.details["decision_seconds"]
  d = wf.write_detection(bd, str(tmp_path))
  assert d["arrays"] == ["mscr_trigger"]
  np.testing.assert_array_equal(np.load(tmp_path / "mscr_trigger.npy"), ref.trigger)
  np.testing.assert_array_equal(np.load(tmp_path / "trigger.npy"), want)
  clean = det.detect_bbti(toy_model(1e9), cfg, key)
  assert not clean.backdoored and clean.arrays == {}
  np.testing.assert_array_equal(clean.trigger, det.detect_bbti(toy_model(1e9), TOY_CFG, key).trigger)
  with pytest.raises(ValueError, match="trigger_from"):
    det.detect_bbti(toy_model(3.0), dict(TOY_CFG, detection=dict(trigger_from="elijah")), key)


def test_registry_and_missing_detector():
  assert {"bbti", "whitebox", "elijah", "terd"} <= set(wf.DETECTORS)
  with pytest.raises(wf.DetectorUnavailable, match="no_such_module"):
    wf._lazy("no_such_module", "x")(None, {}, None)
  with pytest.raises(ValueError, match="detection.method"):
    wf.get_detector("nope")


def test_defense_stage1_never_imports_attacks():
  root = os.path.join(os.path.dirname(__file__), "..", "diffcleanse_jax", "defense")
  for name in ("inversion.py", "target_inversion.py", "detection.py", "workflow.py", "__init__.py"):
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


# ------------------------------------------------------------------------------------------- benchmarks/zoo.py
def _benchmark(name):
  """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
  import importlib.util
  import sys
  path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", name + ".py")
  spec = importlib.util.spec_from_file_location(name + "_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def _zoo():
  return _benchmark("zoo")


def test_zoo_build_logic_with_mocked_training(tmp_path):
  from diffcleanse_jax.attacks.triggers import make_trigger  # tests may see the attack side

  zoo = _zoo()
  entries = zoo.zoo_entries()
  clean = [e for e in entries if e.kind == "clean"]
  bd = [e for e in entries if e.backdoored]
  assert len(clean) >= 4 and len({e.seed for e in clean}) == len(clean) and len(bd) >= 8
  assert {"BOX_14", "SM_BOX", "STOP_SIGN_14", zoo.USER_TRIGGER} <= {e.trigger for e in bd}
  assert len({e.target for e in bd}) >= 4 and ({"SHOE", "CAT"} & {e.target for e in bd})
  assert {0.05, 0.2} <= {e.poison_rate for e in bd}
  assert all(e.steps == zoo.CLEAN_STEPS for e in clean)
  assert {e.steps for e in bd if e.poison_rate == 0.2} == {6000}

  calls, failed = [], []

  def fake_train(config, workdir):
    calls.append(("train", os.path.basename(workdir), config.seed, config.init_from, config.train.flip))
    os.makedirs(os.path.join(workdir, "model"), exist_ok=True)

  def fake_attack(config, workdir):
    name = os.path.basename(workdir)
    calls.append(("attack", name, config.attack.trigger, config.attack.target, config.attack.poison_rate))
    if name == "box14-shoe-p0.05" and not failed:
      failed.append(name)
      raise RuntimeError("boom")
    os.makedirs(os.path.join(workdir, "model"), exist_ok=True)

  z = str(tmp_path / "zoo")
  st = zoo.build(z, preset="tiny", steps=2, train_fn=fake_train, attack_fn=fake_attack)
  assert st["box14-shoe-p0.05"].startswith("failed") and st["clean-s1"] == "done" and st["stop14-hat-p0.2"] == "done"
  assert calls[0][:2] == ("train", "base")  # no --base: the zoo trains its own base first
  trains = [c for c in calls if c[0] == "train" and c[1] != "base"]
  assert all(c[3] == os.path.join(z, "base") and c[4] for c in trains) and len(trains) == 4
  attacks = {c[1]: c for c in calls if c[0] == "attack"}
  user = attacks["user-shoe-p0.2"][2]
  assert user.endswith(".png") and os.path.isfile(user)
  g = make_trigger(user, 16, 1)
  assert g.shape == (16, 16, 1) and g.min() == -1.0 and g.max() == 1.0 and (g > 0).sum() >= 8
  assert attacks["smbox-cat-p0.2"][2:] == ("SM_BOX", "CAT", 0.2)
  # second run: only the failed entry is redone, the base is not retrained
  calls.clear()
  st2 = zoo.build(z, preset="tiny", steps=2, train_fn=fake_train, attack_fn=fake_attack)
  assert [c[1] for c in calls] == ["box14-shoe-p0.05"] and st2["box14-shoe-p0.05"] == "done"
  assert st2["clean-s1"] == "skipped"
  assert all(r["status"] == "done" for r in zoo.list_zoo(z))


def test_zoo_entry_steps_and_adopting_a_finished_run(tmp_path):
  zoo = _zoo()
  e = {x.name: x for x in zoo.zoo_entries()}
  base = str(tmp_path / "base")
  c = zoo.entry_config(e["smbox-cat-p0.2"], "fmnist", base, str(tmp_path))
  assert c.train.num_steps == 6000 and c.attack.poison_rate == 0.2 and c.seed == 1
  assert zoo.entry_config(e["clean-s2"], "fmnist", base, str(tmp_path)).train.num_steps == zoo.CLEAN_STEPS
  c01 = zoo.entry_config(e["box14-hat-p0.1"], "fmnist", base, str(tmp_path))
  assert c01.train.num_steps == 12000 and c01.seed == 0  # the issue-3 recipe (benchmarks/baddiffusion_fmnist.sh)
  # a finished run of that recipe is adopted (copied without checkpoints); a different one is refused by field
  src = tmp_path / "attack_box_hat"
  (src / "model").mkdir(parents=True)
  (src / "model" / "config.json").write_text("{}")
  (src / "checkpoints").mkdir()
  (src / "attack.json").write_text(json.dumps(dict(status="done")))
  (src / "config.json").write_text(json.dumps(c01.to_dict()))
  z = str(tmp_path / "zoo")
  dst = zoo.adopt(z, "box14-hat-p0.1", str(src))
  assert zoo.is_done(z, "box14-hat-p0.1") and not os.path.exists(os.path.join(dst, "checkpoints"))
  assert json.load(open(os.path.join(dst, zoo.ZOO_MARKER)))["adopted_from"] == str(src)
  bad = c01.to_dict()
  bad["attack"]["poison_rate"] = 0.2
  (src / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="attack.poison_rate = 0.2"):
    zoo.adopt(str(tmp_path / "zoo2"), "box14-hat-p0.1", str(src))
  with pytest.raises(ValueError, match="unknown zoo entry"):
    zoo.adopt(z, "nope", str(src))


def test_zoo_adopts_the_shipped_demo_model_as_box14_hat(tmp_path):
  """examples/fmnist_box14_hat is the zoo's box14-hat-p0.1 recipe, exported: adopting it rebuilds the run layout
  (config.json = the attack's run config, model/ = the diffusers folder) and the zoo's loader reads it."""
  zoo = _zoo()
  z = str(tmp_path / "zoo")
  demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fmnist_box14_hat")
  dst = zoo.adopt(z, "box14-hat-p0.1", demo)
  assert zoo.is_done(z, "box14-hat-p0.1")
  assert json.load(open(os.path.join(dst, "config.json")))["attack"]["trigger"] == "BOX_14"
  assert json.load(open(os.path.join(dst, "model", "config.json")))["_class_name"] == "UNet2DModel"
  for f in ("attack.json", "trigger.npy", "target.npy"):
    assert os.path.isfile(os.path.join(dst, f)), f
  assert not os.path.exists(os.path.join(dst, "attack_config.json"))
  # the demo's recipe is not the poison-0.2 entry's: refused, naming the exported config file and the field
  with pytest.raises(ValueError, match=r"attack_config.json seed = 0, the zoo entry needs 1"):
    zoo.adopt(z, "stop14-hat-p0.2", demo)


def test_zoo_evaluate_logic_with_mocked_detectors(tmp_path):
  zoo = _zoo()
  z = tmp_path / "zoo"
  for e in zoo.zoo_entries():
    d = z / "models" / e.name
    (d / "model").mkdir(parents=True)
    (d / zoo.ZOO_MARKER).write_text(json.dumps(dict(status="done")))
    if e.backdoored:
      np.save(d / "target.npy", np.zeros((16, 16, 1), np.float32))
      np.save(d / "trigger.npy", np.zeros((16, 16, 1), np.float32))
      (d / "attack.json").write_text(json.dumps(dict(target_file="target.npy")))

  def perfect(model, cfg, key):
    s = 1.0 if "clean" not in model else 0.0
    return det.DetectionResult("perfect", s > 0.5, s, 0.5, np.zeros((16, 16, 1)), 2.0, {})

  def always(model, cfg, key):  # reports a target-inverted trigger with one kept refinement round
    rounds = [dict(cluster_size=2, batch_size=16), dict(cluster_size=48, batch_size=64, accepted=True)]
    return det.DetectionResult("always", True, 0.75, 0.5, np.zeros((16, 16, 1)), 4.0,
                               dict(target_trigger=dict(cluster_size=48, rounds=rounds)))

  def low(model, cfg, key):  # below the fixed 0.5 everywhere, but separable: clean 0 or 0.1, backdoored 0.3
    s = 0.3 if "clean" not in model else (0.1 if model.endswith(("s1", "s3")) else 0.0)
    return det.DetectionResult("low", s > 0.5, s, 0.5, np.zeros((16, 16, 1)), 1.0, {})

  asr_calls = []

  def fake_asr(model, trigger, target, eval_cfg, key):
    asr_calls.append(eval_cfg["num_samples"])
    return dict(asr=0.5, mse=0.01)

  from configs.tiny_test import get_config
  res = zoo.evaluate(str(z), ["perfect", "always", "low"], get_config(), asr_samples=4,
                     detector_fns=dict(perfect=perfect, always=always, low=low), asr_fn=fake_asr, load_fn=lambda p: p,
                     mscr_fn=lambda model, trig, cfg, key: dict(mscr=0.875, num_excluded=0))
  p, a, lo = res["summary"]["perfect"], res["summary"]["always"], res["summary"]["low"]
  assert p["accuracy"] == 1.0 and p["auroc"] == 1.0 and p["tp"] == 8 and p["fp"] == 0
  assert a["fp"] == 4 and a["accuracy"] == 8 / 12 and a["auroc"] == 0.5 and a["mean_seconds"] == 4.0
  assert p["mean_inverted_asr"] == 0.5 and asr_calls == [4] * (24 + 8)  # 3 detectors + the true triggers
  # fixed tau misses every backdoor of `low`; leave-one-out calibration on the clean models separates them, and
  # cannot rescue `always` (its clean models score as high as the backdoored ones: nothing exceeds them)
  assert lo["accuracy"] == 4 / 12 and lo["loo_calibrated"] == dict(accuracy=1.0, tp=8, fp=0, tn=4, fn=0)
  assert a["loo_calibrated"] == dict(accuracy=4 / 12, tp=0, fp=0, tn=4, fn=8)
  assert p["loo_calibrated"]["accuracy"] == 1.0
  low_rows = {r["model"]: r for r in res["rows"] if r["detector"] == "low"}
  assert low_rows["clean-s1"]["loo_threshold"] == 0.1 and not low_rows["clean-s1"]["loo_flagged"]
  md = (z / "results.md").read_text()
  assert "| perfect | 12 | 1 | 1 | 8 | 0 | 4 | 0 | 1 (8/0) |" in md and "smbox-cat-p0.2" in md
  assert "| low | 12 | 0.333 | 1 | 0 | 0 | 4 | 8 | 1 (8/0) |" in md
  assert md.count("| target 2/16 -> 48/64 |") == 12 and "reported trigger" in md  # from each detection.json
  assert {r["true_mscr"] for r in res["rows"] if r["kind"] == "backdoor"} == {0.875}
  assert {r["true_asr"] for r in res["rows"] if r["kind"] == "backdoor"} == {0.5}
  assert {r["true_asr"] for r in res["rows"] if r["kind"] == "clean"} == {None}
  # cached: a second evaluation calls nothing
  res2 = zoo.evaluate(str(z), ["perfect"], get_config(), asr_samples=4, detector_fns=dict(perfect=None),
                      asr_fn=None, load_fn=None)
  assert res2["summary"]["perfect"]["accuracy"] == 1.0
  # a cache written before eval.fd_method/fd_num_steps existed stays valid while they are off
  import ml_collections
  older = get_config()
  older.eval = ml_collections.ConfigDict({k: v for k, v in older.eval.items() if k not in ("fd_method", "fd_num_steps")})
  res_old = zoo.evaluate(str(z), ["perfect"], older, asr_samples=4, detector_fns=dict(perfect=None), asr_fn=None,
                         load_fn=None)
  assert res_old["summary"]["perfect"]["n"] == 12
  # the white-box window (inversion.whitebox_backprop_steps > 0) is part of the white-box cache key
  zoo.evaluate(str(z), ["whitebox"], get_config(), asr_samples=0, load_fn=lambda p: p, mscr_fn=False,
               detector_fns=dict(whitebox=perfect))
  windowed = get_config()
  windowed.inversion.whitebox_backprop_steps = 2
  assert zoo.evaluate(str(z), ["whitebox"], windowed, asr_samples=0, cached_only=True, detector_fns=dict(
      whitebox=None), load_fn=None, mscr_fn=False)["summary"]["whitebox"]["n"] == 0
  # whitebox_restarts is keyed by the white-box restarts it resolves to: = restarts hits the cache, more misses it
  for extra, n in ((0, 12), (1, 0)):
    wr = get_config()
    wr.inversion.whitebox_restarts = wr.inversion.restarts + extra
    assert zoo.evaluate(str(z), ["whitebox"], wr, asr_samples=0, cached_only=True, detector_fns=dict(
        whitebox=None), load_fn=None, mscr_fn=False)["summary"]["whitebox"]["n"] == n
  # other detection settings: the cache is stale and the detector runs again
  other = get_config()
  other.inversion.max_epochs = 3
  calls = []
  zoo.evaluate(str(z), ["perfect"], other, asr_samples=0, load_fn=lambda p: p, mscr_fn=False,
               detector_fns=dict(perfect=lambda m, c, k: calls.append(m) or perfect(m, c, k)))
  assert len(calls) == 12
  # cached_only tabulates what is cached with these settings and computes nothing
  res3 = zoo.evaluate(str(z), ["perfect", "always"], other, asr_samples=0, cached_only=True,
                      detector_fns=dict(perfect=None, always=None), load_fn=None, mscr_fn=False)
  assert res3["summary"]["perfect"]["n"] == 12 and res3["summary"]["always"]["n"] == 0
  # an MSCR detector's cached score is re-decided under a recalibrated threshold, without running it again
  zoo.evaluate(str(z), ["bbti"], get_config(), asr_samples=0, load_fn=lambda p: p, mscr_fn=False,
               detector_fns=dict(bbti=low))
  recal = get_config()
  recal.detection.threshold = 0.2
  res4 = zoo.evaluate(str(z), ["bbti"], recal, asr_samples=0, load_fn=None, mscr_fn=False,
                      detector_fns=dict(bbti=None))
  b4 = res4["summary"]["bbti"]
  assert b4["accuracy"] == 1.0 and b4["tp"] == 8 and b4["fp"] == 0
  assert {r["threshold"] for r in res4["rows"]} == {0.2}
  # ... but the settings of the reported trigger's re-estimate (a nested detection section) do make it stale
  retrig = get_config()
  retrig.detection.target_trigger.num_iters = 7
  calls.clear()
  zoo.evaluate(str(z), ["bbti"], retrig, asr_samples=0, load_fn=lambda p: p, mscr_fn=False,
               detector_fns=dict(bbti=lambda m, c, k: calls.append(m) or low(m, c, k)))
  assert len(calls) == 12
  # target_trigger.refine_compare (session 21) is out of the key at its old behaviour 'pattern', in it otherwise
  before = get_config()
  del before.detection.target_trigger["refine_compare"]
  assert zoo.evaluate(str(z), ["bbti"], before, asr_samples=0, cached_only=True, detector_fns=dict(bbti=None),
                      load_fn=None, mscr_fn=False)["summary"]["bbti"]["n"] == 0   # retrig's cache is the newest
  zoo.evaluate(str(z), ["bbti"], before, asr_samples=0, load_fn=lambda p: p, mscr_fn=False, detector_fns=dict(bbti=low))
  assert zoo.evaluate(str(z), ["bbti"], get_config(), asr_samples=0, cached_only=True, detector_fns=dict(bbti=None),
                      load_fn=None, mscr_fn=False)["summary"]["bbti"]["n"] == 12
  same = get_config()
  same.detection.target_trigger.refine_compare = "same_batch"
  assert zoo.evaluate(str(z), ["bbti"], same, asr_samples=0, cached_only=True, detector_fns=dict(bbti=None),
                      load_fn=None, mscr_fn=False)["summary"]["bbti"]["n"] == 0


def test_zoo_cleanse_logic_with_mocked_cleanse(tmp_path):
  zoo = _zoo()
  z = tmp_path / "zoo"
  names = ["clean-s1", "smbox-cat-p0.2", "box14-shoe-p0.05"]
  for n in names:
    (z / "models" / n / "model").mkdir(parents=True)
    (z / "models" / n / zoo.ZOO_MARKER).write_text(json.dumps(dict(status="done")))
  calls = []

  def fake_cleanse(model_dir, config, workdir):
    name, meth = os.path.basename(model_dir), config.cleanse.method
    calls.append((name, meth, bool(config.cleanse.force), sorted(os.listdir(workdir)) if os.path.isdir(workdir)
                  else []))
    if name == "box14-shoe-p0.05" and meth == "clip":
      raise RuntimeError("boom")
    os.makedirs(workdir, exist_ok=True)
    if meth == "diffcleanse":
      for f in ("detection.json", "eval_before.json"):
        with open(os.path.join(workdir, f), "w") as fh:
          fh.write("{}")
    bd = "clean" not in name
    rep = dict(backdoored=bd, cleansed=True, asr_before=1.0 if bd else 0.0,
               asr_after=0.0 if meth == "diffcleanse" else 0.5, fd_before=50.0,
               fd_after=55.0 if meth == "diffcleanse" else 100.0, pruned_fraction=0.006, seconds=dict(total=10.0),
               before=dict(inverted_collapse=1.0, true=dict(fd_num_samples=256, sampler=dict(method="ddpm", num_steps=1000),
                                                            fd_sampler=dict(method="ddim", num_steps=50))),
               after=dict(inverted_collapse=0.5))
    with open(os.path.join(workdir, "report.json"), "w") as fh:
      json.dump(rep, fh)
    return rep

  from configs.tiny_test import get_config
  with pytest.raises(ValueError, match="unknown cleanse method"):
    zoo.cleanse_zoo(str(z), ["nope"], get_config(), cleanse_fn=fake_cleanse)
  with pytest.raises(ValueError, match="--force"):
    zoo.cleanse_zoo(str(z), ["clip"], get_config(), force="some", cleanse_fn=fake_cleanse)
  res = zoo.cleanse_zoo(str(z), ["diffcleanse", "clip"], get_config(), force="clean", cleanse_fn=fake_cleanse)
  s = res["summary"]
  assert s["diffcleanse"]["removed_from_strong"] == 2 and s["diffcleanse"]["fd_within_20pct"] == 3
  assert s["clip"]["removed"] == 0 and s["clip"]["errors"] == 1 and s["clip"]["fd_within_20pct"] == 0
  assert ("clean-s1", "diffcleanse", True, []) in calls  # clean models are cleansed with force
  assert any(c[:2] == ("smbox-cat-p0.2", "diffcleanse") and not c[2] for c in calls)
  # the second method starts from the first one's detection and before-evaluation
  clip_call = [c for c in calls if c[:2] == ("smbox-cat-p0.2", "clip")][0]
  assert {"detection.json", "eval_before.json"} <= set(clip_call[3])
  md = (z / "cleanse.md").read_text()
  assert "| diffcleanse | 3 | 2 | 2 | 2 | 2 | 3/3 |" in md and "RuntimeError: boom" in md
  assert "| 0.1 | 256 ddim-50 |" in md  # the FD change and what the FD was measured on
  # finished reports are reused: only the failed run is retried
  calls.clear()
  zoo.cleanse_zoo(str(z), ["diffcleanse", "clip"], get_config(), cleanse_fn=fake_cleanse)
  assert [c[:2] for c in calls] == [("box14-shoe-p0.05", "clip")]
  # the default force='all' cleanses a backdoored model that detection missed, too
  z2 = tmp_path / "zoo2"
  (z2 / "models" / "smbox-cat-p0.2" / "model").mkdir(parents=True)
  (z2 / "models" / "smbox-cat-p0.2" / zoo.ZOO_MARKER).write_text(json.dumps(dict(status="done")))
  calls.clear()
  zoo.cleanse_zoo(str(z2), ["diffcleanse"], get_config(), cleanse_fn=fake_cleanse)
  assert [c[:3] for c in calls] == [("smbox-cat-p0.2", "diffcleanse", True)]


def test_detect_time_benchmark_times_a_real_detect_run(tiny_model_dir, tmp_path):
  bench = _benchmark("detect_time")
  out = tmp_path / "t.json"
  rc = bench.main(["--model", str(tiny_model_dir / "good"), "--config", "configs/tiny_test.py", "--out", str(out),
                   "--set", "inversion.batch_size=4", "--set", "inversion.num_steps=2",
                   "--set", "inversion.max_epochs=1", "--set", "detection.num_images=4",
                   "--compile_cache", str(tmp_path / "cache"), "--repeat", "2"])
  rows = json.load(open(out))["rows"]
  row = rows[0]
  assert rc == 0 and row["returncode"] == 0 and row["method"] == "bbti" and [r["run"] for r in rows] == [0, 1]
  assert row["wall_seconds"] >= row["detector_seconds"] >= row["decision_seconds"] > 0
  assert row["backdoored"] == (row["score"] > 0.5) and rows[1]["score"] == row["score"]
  assert "--compile_cache=" in row["command"] and any((tmp_path / "cache").iterdir())
  # a broken model folder is a failed row with the error, not a crash of the benchmark
  rc = bench.main(["--model", str(tmp_path / "missing"), "--config", "configs/tiny_test.py", "--out", str(out)])
  row = json.load(open(out))["rows"][0]
  assert rc == 1 and row["returncode"] != 0 and row["error"]


def test_chain_mscr_benchmark_tabulates_every_pattern_chain_and_seed(tiny_model_dir, tmp_path, capsys):
  from diffcleanse_jax.defense.inversion import trigger_mscr
  from diffcleanse_jax.defense.workflow import load_model_dir

  bench = _benchmark("chain_mscr")
  model_dir = str(tiny_model_dir / "good")
  model = load_model_dir(model_dir)
  g = np.full(model.image_shape, 0.5, np.float32)
  np.save(tmp_path / "g.npy", g)
  sets = ["--set", "inversion.batch_size=4"]
  bench.main([model_dir, "--config", "configs/tiny_test.py", "--trigger", str(tmp_path / "g.npy"),
              "--steps", "2,3", "--seeds", "0,1", *sets])
  lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| g.npy") or ln.startswith("| plain")]
  assert len(lines) == 2 * 2 * 2  # patterns x chains x seeds
  cfg = _benchmark("zoo").load_eval_config("configs/tiny_test.py", ["inversion.batch_size=4"])
  want = trigger_mscr(model, g, cfg.inversion, key=jax.random.key(1), num_steps=3)["mscr"]
  assert lines[3].split("|")[1:5] == [" g.npy ", " 3 ", " 1 ", f" {want:.3f} "]
  with pytest.raises(SystemExit, match="no trigger file"):  # a model folder without trigger.npy
    bench.main([model_dir, "--config", "configs/tiny_test.py", *sets])


def test_zoo_user_trigger_png(tmp_path):
  from PIL import Image
  zoo = _zoo()
  path = zoo.write_user_trigger(str(tmp_path), 32)
  img = np.asarray(Image.open(path))
  assert Image.open(path).mode == "L" and img.shape == (32, 32) and set(np.unique(img)) == {0, 255}
  ys, xs = np.nonzero(img)
  assert ys.max() < 16 and xs.max() < 16           # the X stays in the top-left quarter
  assert img[2, 2] == 255 and img[2, 11] == 255     # both strokes of the X start in the first row of it
  assert zoo.write_user_trigger(str(tmp_path), 32) == path and os.listdir(tmp_path / "assets") == [os.path.basename(path)]


def test_zoo_trigger_note_says_how_the_reported_trigger_was_made():
  zoo = _zoo()
  det_json = lambda tt: dict(details=dict(target_trigger=tt))
  rounds = [dict(cluster_size=12, batch_size=16), dict(cluster_size=40, batch_size=64, accepted=False)]
  assert zoo.trigger_note(det_json(dict(cluster_size=12, rounds=rounds))) == "target 12/16 -> 40/64 not kept"
  assert zoo.trigger_note(det_json(dict(error="no two of the 16 images agree"))) == "MSCR pattern (no collapse)"
  assert zoo.trigger_note(det_json(dict(cluster_size=3))) == "target 3/?"  # before refinement rounds were recorded
  assert zoo.trigger_note(dict(details={})) is None and zoo.trigger_note(None) is None


# ------------------------------------------------------------------------------------------ benchmarks/fd_spread.py
def test_fd_spread_slices_are_disjoint_and_changes_are_paired():
  fs = _benchmark("fd_spread")
  x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 2, 2, 1), np.float32)
  seen = []
  fds = fs.subset_fds(x, 4, fd_fn=lambda s: (seen.append(s[:, 0, 0, 0].tolist()), float(s.mean()))[1])
  assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]] and fds == [1.5, 5.5]  # the remainder (8, 9) is dropped
  assert fs.relative_changes([10.0, 20.0], [12.0, 15.0]) == pytest.approx([0.2, -0.25])
  with pytest.raises(ValueError, match="no slice of 64"):
    fs.subset_fds(x, 64)
  with pytest.raises(ValueError, match="at least 2"):
    fs.subset_fds(x, 1)


def test_zoo_cache_key_leaves_out_later_fields_only_while_off():
  # one table (_KEY_OMIT) says which later-added fields stay out of a cache digest, and while at which value
  zoo = _zoo()
  inv = dict(restarts=6, whitebox_backprop_steps=0, whitebox_window=4, whitebox_value_weight=1.0,
             whitebox_sim_scale=1.0, whitebox_restarts=6, lr=0.1)
  assert zoo._key_view("inversion", inv) == dict(restarts=6, lr=0.1)
  on = dict(inv, whitebox_backprop_steps=2, whitebox_value_weight=0.5)
  assert zoo._key_view("inversion", on) == dict(restarts=6, whitebox_backprop_steps=2, whitebox_window=4,
                                                whitebox_value_weight=0.5, lr=0.1)
  assert zoo._key_view("eval", dict(fd_method=None, fd_num_steps=0, num_samples=4)) == dict(num_samples=4)
  assert zoo._key_view("eval", dict(fd_method="ddim", fd_num_steps=50)) == dict(fd_method="ddim", fd_num_steps=50)
  assert zoo._key_view("target_trigger", dict(refine_compare="pattern", num_iters=3)) == dict(num_iters=3)
  assert "refine_compare" in zoo._key_view("target_trigger", dict(refine_compare="same_batch"))
