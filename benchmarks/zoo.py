"""A zoo of clean and BadDiffusion-backdoored Fashion-MNIST models, and a detection benchmark over it.

Build (resumable: finished models are skipped, interrupted ones resume from their newest checkpoint):

  python benchmarks/zoo.py build --zoo=runs/zoo --base=runs/fmnist          # 4 clean + 8 backdoored, hours of CPU
  python benchmarks/zoo.py build --zoo=runs/zoo --base=runs/fmnist --only=clean-s1,smbox-cat-p0.2
  python benchmarks/zoo.py build --zoo=/tmp/zoo_smoke --preset=tiny --steps=4   # seconds-scale smoke run
  python benchmarks/zoo.py list --zoo=runs/zoo                                  # what is built

Evaluate (every detector on every model; per (model, detector) results are cached, so it is resumable too):

  python benchmarks/zoo.py evaluate --zoo=runs/zoo --detectors=bbti,whitebox,elijah,terd
  python benchmarks/zoo.py evaluate --zoo=runs/zoo --detectors=bbti --set inversion.max_epochs=50 --asr_samples=16
  python benchmarks/zoo.py evaluate --zoo=/tmp/zoo_smoke --preset=tiny --detectors=bbti --asr_samples=4

Cleanse (issue 5: every removal method on every finished model, by default forced on all of them, --force=clean
forces only the clean ones; cached per (method, model), interrupted runs resume):

  python benchmarks/zoo.py cleanse --zoo=runs/zoo --methods=diffcleanse,elijah,clip,anp,finetune
  python benchmarks/zoo.py cleanse --zoo=runs/zoo --methods=diffcleanse --only=smbox-cat-p0.2 --set eval.fd_num_samples=64
  python benchmarks/zoo.py cleanse --zoo=/tmp/zoo_smoke --preset=tiny --methods=diffcleanse,clip --set finetune.num_images=16 \
      --set finetune.num_steps=4 --set finetune.batch_size=8 --set finetune.sample_steps=5 --set eval.num_samples=4 \
      --set eval.batch_size=4 --set eval.num_steps=10 --set inversion.max_epochs=2 --set inversion.num_steps=5 \
      --set prune.batch_size=4 --set prune.t_stride=50        # ~1.5 min smoke run (after the tiny build above)

Zoo (preset `fmnist`: configs/fmnist_attack.py, 32x32 grayscale `fmnist-cpu` UNet):

* base: `--base` (a clean training workdir, e.g. runs/fmnist from configs/fashion_mnist_cpu.py); without it the
  zoo trains `ZOO/base` with configs/fashion_mnist_cpu.py first.
* clean-s1..s4: clean fine-tunes of the base, seeds 1-4, with the attack's training recipe (config.train of
  fmnist_attack.py, random flips) for 3,000 steps and no poisoning: the negative controls.
* 8 BadDiffusion fine-tunes of the base (`diffcleanse_jax/attacks/workflow.py:attack_mode`): triggers
  BOX_14 (grey box), SM_BOX (white box), STOP_SIGN_14 and a user image trigger that the zoo draws itself
  (`ZOO/assets/user_trigger_<S>.png`, a white X in the top-left corner); targets HAT, SHOE, CORNER, CAT; poison
  rates 0.05 (12,000 steps), 0.1 (the issue-3 runs, seed 0, 12,000 steps; `--adopt` copies finished ones) and
  0.2 (6,000 steps); see `zoo_entries` and `POISON_STEPS`.

Layout: `ZOO/models/<name>/` is the train/attack workdir (`model/` is the final diffusers folder; backdoored ones
have attack.json, trigger.npy, target.npy); `ZOO/models/<name>/zoo.json` marks a finished entry.

Evaluation: config `--config` (default configs/fmnist_detect.py; preset tiny: configs/tiny_test.py) with
`--set section.field=value` overrides. For every detector and model: `DETECTORS[name](model, config, key)`
(cached in `ZOO/results/<detector>/<model>/detection.json` + trigger.npy), and for backdoored models the ASR of the
inverted trigger against the model's true target (`target.npy` / attack.json) with
`diffcleanse_jax.evaluation.evaluate_model` (config.eval sampler, `--asr_samples` images, no clean samples).
Writes `ZOO/results.md` (per detector: accuracy, AUROC, TP/FP/TN/FN, mean seconds per model, mean inverted-trigger
ASR on backdoored models; then one row per model) and `ZOO/results.json`.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

ZOO_MARKER = "zoo.json"
USER_TRIGGER = "USER"


# --------------------------------------------------------------------------------------------- zoo contents
@dataclasses.dataclass(frozen=True)
class ZooEntry:
  name: str
  kind: str                # 'clean' | 'backdoor'
  seed: int
  trigger: str = ""        # trigger name, or USER (the zoo's own PNG)
  target: str = ""
  poison_rate: float = 0.0
  steps: int = 0           # train.num_steps of this entry; 0 = the preset recipe's (12,000 for fmnist)

  @property
  def backdoored(self) -> bool:
    return self.kind == "backdoor"


# Step budgets (2-core CPU: ~4.7 steps/s, so 12,000 steps ~ 43 min). The backdoor becomes exact with the number of
# *poisoned* examples seen and an annealed learning rate (docs/RESULTS.md pilots: BOX_14 -> HAT at poison 0.1 had
# ASR ~0.5 after 6,000 steps, 1.0 after 12,000), so poison 0.2 gets 6,000 steps (as many poisoned examples as 12,000
# at 0.1) and poison 0.05 the 12,000-step recipe (half as many poisoned examples). Measured: a first 4,000-step
# budget for poison 0.05 did not take (box14-shoe true ASR 0, smbox-corner 0.19; docs/RESULTS.md), so those entries
# were rebuilt with 12,000 steps. The clean controls are
# 3,000-step clean fine-tunes of the base: clean models of another training length than the attacked ones,
# negative controls for detection.
CLEAN_STEPS = 3000
POISON_STEPS = {0.2: 6000, 0.1: 0, 0.05: 0}


def zoo_entries() -> list[ZooEntry]:
  """4 clean fine-tunes and 8 backdoored models: 4 triggers x 4 targets x poison rates {0.05, 0.1, 0.2}.
  The two poison-0.1 entries are exactly the issue-3 attacks of benchmarks/baddiffusion_fmnist.sh (seed 0), so a
  finished run of that script can be adopted (`build --adopt`) instead of retrained."""
  clean = [ZooEntry(f"clean-s{s}", "clean", s, steps=CLEAN_STEPS) for s in (1, 2, 3, 4)]
  bd = [("box14", "BOX_14", "HAT", 0.1, 0), ("stop14", "STOP_SIGN_14", "CORNER", 0.1, 0),
        ("smbox", "SM_BOX", "CAT", 0.2, 1), ("user", USER_TRIGGER, "SHOE", 0.2, 1),
        ("stop14", "STOP_SIGN_14", "HAT", 0.2, 1), ("box14", "BOX_14", "SHOE", 0.05, 1),
        ("smbox", "SM_BOX", "CORNER", 0.05, 1), ("user", USER_TRIGGER, "CAT", 0.05, 1)]
  return clean + [ZooEntry(f"{tag}-{tgt.lower()}-p{rate:g}", "backdoor", seed, trig, tgt, rate,
                           POISON_STEPS[rate]) for tag, trig, tgt, rate, seed in bd]


def write_user_trigger(zoo_dir: str, image_size: int) -> str:
  """An S x S grayscale PNG: black (background -1) with a white X (2 px strokes) in the top-left corner, away
  from the bottom-right triggers. Used as-is by `make_trigger` (an S x S image is mapped straight to [-1, 1])."""
  from diffcleanse_jax.io.images import save_png

  s = int(image_size)
  k = max(4, round(10 * s / 32))
  img = np.zeros((s, s), np.uint8)
  o = max(1, s // 16)
  for i in range(k):
    for d in (0, 1):
      for r, c in ((o + i, o + min(k - 1, i + d)), (o + i, o + max(0, k - 1 - i - d))):
        img[r, c] = 255
  path = os.path.join(zoo_dir, "assets", f"user_trigger_{s}.png")
  if not os.path.isfile(path):
    save_png(img[..., None], path)  # atomic, creates the folder
  return path


# ------------------------------------------------------------------------------------------------- presets
def _load_config_file(path: str):
  spec = importlib.util.spec_from_file_location(f"_zoo_cfg_{abs(hash(path))}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


PRESETS = {
    # attack/clean fine-tune config, base training config, default detection config, default cleanse config
    "fmnist": ("configs/fmnist_attack.py", "configs/fashion_mnist_cpu.py", "configs/fmnist_detect.py",
               "configs/fmnist_cleanse.py"),
    "tiny": ("configs/tiny_test.py", "configs/tiny_test.py", "configs/tiny_test.py", "configs/tiny_test.py"),
}


def _cfg_path(p: str) -> str:
  return p if os.path.isabs(p) else os.path.join(_ROOT, p)


def entry_config(entry: ZooEntry, preset: str, base: str, zoo_dir: str, steps: int | None = None):
  """The resolved ConfigDict that trains/attacks this entry."""
  c = _load_config_file(_cfg_path(PRESETS[preset][0]))
  c.init_from = os.path.abspath(base)
  c.seed = int(entry.seed)
  if preset == "tiny":  # the tiny config has no attack recipe: keep it seconds-long
    c.train.ema_decay = 0.0
  steps = steps or entry.steps
  if steps:
    c.train.num_steps = int(steps)
    c.train.warmup_steps = min(int(c.train.warmup_steps), max(1, int(steps) // 4))
    c.train.checkpoint_every = max(1, min(int(c.train.checkpoint_every), int(steps)))
  if entry.backdoored:
    trig = entry.trigger
    if trig == USER_TRIGGER:
      trig = write_user_trigger(zoo_dir, int(c.data.image_size))
    c.attack.trigger = trig
    c.attack.target = entry.target
    c.attack.poison_rate = float(entry.poison_rate)
  else:
    c.train.flip = True  # the attack flips clean images at random; so do the clean controls
  return c


# --------------------------------------------------------------------------------------------------- build
def _default_train_fn(config, workdir):
  from diffcleanse_jax.workflows import train_mode
  return train_mode(config, workdir, None)


def _default_attack_fn(config, workdir):
  from diffcleanse_jax.attacks.workflow import attack_mode
  return attack_mode(config, workdir, None)


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_text(path: str, text: str) -> None:
  """Atomic (io.files: the temp name carries the pid; two builds on different `--only` lists share
  ZOO/zoo_manifest.json, and a shared temp name once made one of them crash)."""
  from diffcleanse_jax.io.files import write_text_atomic
  write_text_atomic(path, text)


def _write_json(path: str, obj) -> None:
  from diffcleanse_jax.io.files import write_json
  write_json(path, obj, sort_keys=False)


def is_done(zoo_dir: str, name: str) -> bool:
  d = os.path.join(zoo_dir, "models", name)
  m = _read_json(os.path.join(d, ZOO_MARKER))
  return bool(m and m.get("status") == "done" and os.path.isdir(os.path.join(d, "model")))


def ensure_base(zoo_dir: str, preset: str, base: str | None, train_fn: Callable, steps: int | None) -> str:
  """The clean base model: `--base` if given, else ZOO/base (trained with the preset's base config)."""
  if base:
    if not os.path.exists(base):
      raise FileNotFoundError(f"--base={base}: no such model/workdir")
    return base
  out = os.path.join(zoo_dir, "base")
  if os.path.isdir(os.path.join(out, "model")) and (_read_json(os.path.join(out, ZOO_MARKER)) or {}).get(
      "status") == "done":
    return out
  c = _load_config_file(_cfg_path(PRESETS[preset][1]))
  if steps:
    c.train.num_steps = int(steps)
    c.train.warmup_steps = min(int(c.train.warmup_steps), max(1, int(steps) // 4))
  logging.info("zoo: training the clean base model into %s", out)
  t0 = time.time()
  train_fn(c, out)
  _write_json(os.path.join(out, ZOO_MARKER), dict(name="base", kind="clean", status="done",
                                                  seconds=round(time.time() - t0, 1)))
  return out


def build(zoo_dir: str, preset: str = "fmnist", base: str | None = None, steps: int | None = None,
          only: Sequence[str] | None = None, train_fn: Callable | None = None,
          attack_fn: Callable | None = None) -> dict[str, str]:
  """Builds the missing zoo entries; returns {name: 'skipped' | 'done' | 'failed: ...'}."""
  train_fn = train_fn or _default_train_fn
  attack_fn = attack_fn or _default_attack_fn
  entries = zoo_entries()
  if only:
    names = {e.name for e in entries}
    bad = sorted(set(only) - names)
    if bad:
      raise ValueError(f"--only: unknown zoo entries {bad}; known: {', '.join(sorted(names))}")
    entries = [e for e in entries if e.name in set(only)]
  os.makedirs(os.path.join(zoo_dir, "models"), exist_ok=True)
  _write_json(os.path.join(zoo_dir, "zoo_manifest.json"),
              dict(preset=preset, base=base, steps=steps, entries=[dataclasses.asdict(e) for e in zoo_entries()]))
  status: dict[str, str] = {}
  todo = [e for e in entries if not is_done(zoo_dir, e.name)]
  for e in entries:
    if e not in todo:
      status[e.name] = "skipped"
  if not todo:
    logging.info("zoo: all %d requested entries are built", len(entries))
    return status
  base_path = ensure_base(zoo_dir, preset, base, train_fn, steps)
  for i, e in enumerate(todo):
    wd = os.path.join(zoo_dir, "models", e.name)
    os.makedirs(wd, exist_ok=True)
    logging.info("zoo [%d/%d] %s (%s)", i + 1, len(todo), e.name, e.kind)
    t0 = time.time()
    try:
      c = entry_config(e, preset, base_path, zoo_dir, steps)
      (attack_fn if e.backdoored else train_fn)(c, wd)
      _write_json(os.path.join(wd, ZOO_MARKER), dict(dataclasses.asdict(e), status="done", base=base_path,
                                                     preset=preset, seconds=round(time.time() - t0, 1),
                                                     trigger_spec=str(c.attack.trigger) if e.backdoored else None))
      status[e.name] = "done"
    except Exception as err:  # noqa: BLE001 - one failed entry must not stop the zoo
      msg = f"{type(err).__name__}: {err}"
      logging.error("zoo: %s failed: %s\n%s", e.name, msg, traceback.format_exc())
      _write_json(os.path.join(wd, ZOO_MARKER), dict(dataclasses.asdict(e), status="failed", error=msg))
      status[e.name] = f"failed: {msg}"
  return status


# The fields of a finished run's config.json that must equal the entry's recipe for it to be adopted.
_ADOPT_FIELDS = ("seed", "train.num_steps", "train.batch_size", "train.learning_rate", "train.warmup_steps",
                 "train.lr_schedule", "train.ema_decay", "train.flip", "model.block_out_channels",
                 "attack.trigger", "attack.target", "attack.poison_rate", "attack.solver", "attack.flip")


def _field(cfg, dotted: str):
  node = cfg
  for k in dotted.split("."):
    node = node[k] if isinstance(node, dict) else getattr(node, k)
  return node.to_dict() if hasattr(node, "to_dict") else node


# An attack run exported by scripts/make_demo_model.sh (examples/fmnist_box14_hat): the run's model/ files at the
# top level, its config.json renamed attack_config.json (config.json is the diffusers UNet config).
_MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")


def _is_exported_attack(src: str) -> bool:
  return all(os.path.isfile(os.path.join(src, f)) for f in ("attack_config.json", "attack.json", *_MODEL_FILES[:2]))


def _unexport_attack(src: str, dst: str) -> None:
  """Rebuilds the run layout (DST/config.json = the run config, DST/model/ = the diffusers folder, the attack's
  metadata beside them) from an exported attack folder SRC."""
  os.makedirs(os.path.join(dst, "model"))
  for f in sorted(os.listdir(src)):
    p = os.path.join(src, f)
    if not os.path.isfile(p):
      continue
    if f in _MODEL_FILES:
      shutil.copy2(p, os.path.join(dst, "model", f))
    else:
      shutil.copy2(p, os.path.join(dst, "config.json" if f == "attack_config.json" else f))


def adopt(zoo_dir: str, name: str, src: str, preset: str = "fmnist") -> str:
  """Copies a finished run of exactly this entry's recipe (e.g. runs/attack_box_hat of
  benchmarks/baddiffusion_fmnist.sh, or the shipped examples/fmnist_box14_hat, which is box14-hat-p0.1) into
  ZOO/models/NAME instead of retraining it. Checks SRC/config.json against
  the entry's resolved config (`_ADOPT_FIELDS`; the base path may differ) and raises ValueError naming the first
  field that differs. Checkpoints are not copied. Returns the zoo folder of the entry."""
  entries = {e.name: e for e in zoo_entries()}
  if name not in entries:
    raise ValueError(f"--adopt {name}={src}: unknown zoo entry {name!r}; known: {', '.join(sorted(entries))}")
  e = entries[name]
  if e.trigger == USER_TRIGGER:
    raise ValueError(f"--adopt {name}: entries with the zoo's own user trigger are built by the zoo only")
  exported = _is_exported_attack(src)
  cfg_file = os.path.join(src, "attack_config.json" if exported else "config.json")
  got = _read_json(cfg_file)
  if got is None or not (exported or os.path.isfile(os.path.join(src, "model", "config.json"))):
    raise FileNotFoundError(f"--adopt {name}={src}: expected a finished run (SRC/config.json and SRC/model/) or "
                            "an exported attack folder like examples/fmnist_box14_hat (diffusers files + "
                            "attack_config.json + attack.json)")
  if e.backdoored and (_read_json(os.path.join(src, "attack.json")) or {}).get("status") != "done":
    raise ValueError(f"--adopt {name}={src}: {src}/attack.json does not say status 'done'")
  want = entry_config(e, preset, got.get("init_from") or ".", zoo_dir)
  for f in _ADOPT_FIELDS:
    if not e.backdoored and f.startswith("attack."):
      continue
    try:
      a, b = _field(got, f), _field(want, f)
    except (KeyError, AttributeError):
      raise ValueError(f"--adopt {name}={src}: {cfg_file} has no field {f!r}") from None
    if a != b:
      raise ValueError(f"--adopt {name}={src}: {cfg_file} {f} = {a!r}, the zoo entry needs {b!r}")
  dst = os.path.join(zoo_dir, "models", name)
  if is_done(zoo_dir, name):
    return dst
  tmp = dst + ".adopt.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  if exported:
    _unexport_attack(src, tmp)
  else:
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints"))
  shutil.rmtree(dst, ignore_errors=True)
  os.replace(tmp, dst)
  _write_json(os.path.join(dst, ZOO_MARKER), dict(dataclasses.asdict(e), status="done", base=got.get("init_from"),
                                                  preset=preset, adopted_from=os.path.abspath(src),
                                                  trigger_spec=e.trigger if e.backdoored else None))
  return dst


def list_zoo(zoo_dir: str) -> list[dict[str, Any]]:
  rows = []
  for e in zoo_entries():
    m = _read_json(os.path.join(zoo_dir, "models", e.name, ZOO_MARKER)) or {}
    rows.append(dict(dataclasses.asdict(e), status=m.get("status", "missing"), seconds=m.get("seconds")))
  return rows


# ------------------------------------------------------------------------------------------------ evaluate
def load_eval_config(path: str, overrides: Sequence[str] = ()):
  c = _load_config_file(_cfg_path(path))
  for o in overrides:
    if "=" not in o:
      raise ValueError(f"--set {o!r}: expected section.field=value")
    k, v = o.split("=", 1)
    try:
      val = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      val = v
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = val
  return c


def true_target(model_dir: str) -> np.ndarray | None:
  """The backdoor target y (H,W,C) in [-1,1] recorded by the attack (target.npy / attack.json)."""
  info = _read_json(os.path.join(model_dir, "attack.json")) or {}
  path = os.path.join(model_dir, info.get("target_file", "target.npy"))
  return np.load(path) if os.path.isfile(path) else None


# Settings fields added after zoo caches were first written, left out of a cache digest while they are "off" (the
# behaviour from before they existed), so the older caches keep their key. Per config section: field -> predicate
# on the section's resolved dict, true when the field is to be left out.
_KEY_OMIT: dict[str, dict[str, Callable[[dict], bool]]] = {
    "eval": {  # session 15; the ASR evaluation samples no clean images anyway
        "fd_method": lambda d: not d.get("fd_method"),
        "fd_num_steps": lambda d: not d.get("fd_num_steps"),
    },
    "inversion": {
        "whitebox_backprop_steps": lambda d: not d.get("whitebox_backprop_steps"),  # without effect while 0
        "whitebox_window": lambda d: not d.get("whitebox_backprop_steps"),
        "whitebox_value_weight": lambda d: d.get("whitebox_value_weight") == 1.0,  # session 20, without effect at 1
        "whitebox_sim_scale": lambda d: d.get("whitebox_sim_scale") == 1.0,
        "whitebox_restarts": lambda d: True,  # session 21; its effect is the resolved `restarts`
    },
    "target_trigger": {"refine_compare": lambda d: d.get("refine_compare") == "pattern"},  # session 21
}


def _key_view(section: str, d: dict) -> dict:
  """`d` (a resolved settings section) without the fields `_KEY_OMIT[section]` leaves out of cache digests."""
  omit = _KEY_OMIT[section]
  return {k: v for k, v in d.items() if not (k in omit and omit[k](d))}


def _settings_digest(d) -> str:
  import hashlib

  def plain(v):
    return v.to_dict() if hasattr(v, "to_dict") else v
  text = json.dumps({k: plain(v) for k, v in d.items()}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _default_asr_fn(model, trigger, target, eval_cfg, key) -> dict:
  from diffcleanse_jax.evaluation import evaluate_model
  return evaluate_model(model, trigger, target, eval_cfg, key)


def _default_mscr_fn(model, trigger, config, key) -> dict:
  from diffcleanse_jax.defense.inversion import trigger_mscr
  return trigger_mscr(model, trigger, config, key)


def _default_load_fn(path: str):
  from diffcleanse_jax.defense.workflow import load_model_dir
  return load_model_dir(path)


def _cached_record(path: str, settings: str, compute: Callable[[], dict | None] | None, recompute: bool,
                   cached_only: bool, what: str) -> dict | None:
  """The JSON record at `path` if it was made with `settings`; otherwise compute() (None = nothing to compute),
  stored with its settings. None when there is no valid record and cached_only, no compute, or it failed (logged)."""
  got = None if recompute else _read_json(path)
  if got is not None and got.get("settings") == settings:
    return got
  if compute is None or cached_only:
    return None
  try:
    got = compute()
    if got is None:
      return None
    got = dict(got, settings=settings)
    _write_json(path, got)
  except Exception as err:  # noqa: BLE001 - record and go on
    logging.error("zoo evaluate: %s failed: %s", what, err)
    return None
  return got


MSCR_DETECTORS = ("bbti", "whitebox")  # decided by config.detection.threshold on a cached score


def evaluate(zoo_dir: str, detectors: Sequence[str], config, out: str | None = None, asr_samples: int = 16,
             detector_fns: dict[str, Callable] | None = None, asr_fn: Callable | None = None,
             load_fn: Callable | None = None, recompute: bool = False, mscr_fn: Callable | bool | None = None,
             cached_only: bool = False, only: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs every detector on every finished zoo model; writes results.md / results.json; returns the summary.
  Also records, per backdoored model, the MSCR of its *true* trigger under the inversion's sampler (`true_mscr`:
  the statistic's ceiling for that model) and the ASR of the true trigger (`true_asr`: the backdoor's strength,
  with asr_fn); mscr_fn=False skips both. cached_only: compute nothing, tabulate the
  cached results made with these settings (missing ones are left out of the table). only: these model names."""
  import jax

  from diffcleanse_jax.defense.detection import (DEFAULT_THRESHOLD, decide, detection_metrics,
                                                 leave_one_out_thresholds)

  if detector_fns is None:
    from diffcleanse_jax.defense.workflow import DETECTORS
    detector_fns = DETECTORS
  for d in detectors:
    if d not in detector_fns:
      raise ValueError(f"--detectors: unknown detector {d!r}; known: {', '.join(detector_fns)}")
  asr_fn = asr_fn or _default_asr_fn
  load_fn = load_fn or _default_load_fn
  entries = [e for e in zoo_entries() if is_done(zoo_dir, e.name) and (not only or e.name in set(only))]
  if not entries:
    raise FileNotFoundError(f"{zoo_dir}: no finished zoo models (run the build command first)")
  eval_cfg = config.eval.to_dict() if hasattr(config.eval, "to_dict") else dict(config.eval)
  eval_cfg.update(num_samples=int(asr_samples), batch_size=min(int(eval_cfg.get("batch_size", 64)), int(asr_samples)),
                  clean=False)
  eval_key = _key_view("eval", eval_cfg)
  key = jax.random.key(int(config.seed))
  # Cached results are reused only if made with the same settings: a digest of what each detector reads
  # (BBTI/white-box: config.inversion and detection.shift_trigger/target_trigger; Elijah/TERD: their detection
  # sub-section) + eval + the scalar detection fields (trigger_from, ...). The MSCR detectors'
  # threshold only decides, so it is not in the digest: their cached scores are re-decided under the current
  # config.detection.threshold (a recalibrated tau needs no new inversions).
  det_cfg = config.detection.to_dict() if hasattr(config.detection, "to_dict") else dict(config.detection)
  common = {k: v for k, v in det_cfg.items() if not isinstance(v, dict) and k != "threshold"}
  mscr_tau = float(det_cfg.get("threshold", DEFAULT_THRESHOLD))
  from diffcleanse_jax.defense.inversion import InversionSettings

  def inversion_fields(method):  # the resolved settings, without the other method's knobs
    method = method if method == "whitebox" else "bbti"
    d = _key_view("inversion", dataclasses.asdict(InversionSettings.from_config(config.inversion, method=method)))
    return {k: v for k, v in d.items() if method == "whitebox" or not k.startswith("whitebox_")}

  def digest(det_name):
    if isinstance(det_cfg.get(det_name), dict):
      own = det_cfg[det_name]
    else:  # MSCR detectors: the inversion, and the sub-sections of the trigger re-estimates (trigger_from)
      own = dict(inversion_fields(det_name), **{k: det_cfg.get(k) for k in ("shift_trigger", "target_trigger")})
      if isinstance(own.get("target_trigger"), dict):
        own["target_trigger"] = _key_view("target_trigger", own["target_trigger"])
    return _settings_digest(dict(seed=config.seed, detection=common, own=own, eval=eval_key))
  fingerprint = _settings_digest(dict(seed=config.seed, inversion=inversion_fields("bbti")))  # true-trigger MSCR
  rows: list[dict[str, Any]] = []
  true_mscr: dict[str, Any] = {}
  true_asr: dict[str, Any] = {}
  asr_fingerprint = _settings_digest(dict(seed=config.seed, eval=eval_key))
  for e in entries:
    mdir = os.path.join(zoo_dir, "models", e.name)
    # loaded at most once per model, on first use (a failed load is retried by the next user)
    get_model = functools.cache(functools.partial(load_fn, mdir))
    get_target = functools.cache(functools.partial(true_target, mdir))
    if e.backdoored and mscr_fn is not False:
      tpath = os.path.join(mdir, "trigger.npy")
      tdir = os.path.join(zoo_dir, "results", "true_trigger")
      has_trigger = os.path.isfile(tpath)

      def true_mscr_record():
        m = (mscr_fn or _default_mscr_fn)(get_model(), np.load(tpath), config, key)
        return dict(mscr=m["mscr"], num_excluded=m.get("num_excluded"))

      def true_asr_record():  # the backdoor's strength under config.eval (what removal must take to <= 0.05)
        y = get_target()
        if y is None:
          return None
        m = asr_fn(get_model(), np.load(tpath).astype(np.float32), y, eval_cfg, jax.random.fold_in(key, 2))
        return dict(asr=m.get("asr"), mse=m.get("mse"))

      got = _cached_record(os.path.join(tdir, e.name + ".json"), fingerprint,
                           true_mscr_record if has_trigger else None, recompute, cached_only,
                           f"true-trigger MSCR of {e.name}")
      true_mscr[e.name] = None if got is None else got.get("mscr")
      got = _cached_record(os.path.join(tdir, e.name + ".asr.json"), asr_fingerprint,
                           true_asr_record if has_trigger and asr_samples > 0 else None, recompute, cached_only,
                           f"true-trigger ASR of {e.name}")
      true_asr[e.name] = None if got is None else got.get("asr")
    for det_name in detectors:
      rdir = os.path.join(zoo_dir, "results", det_name, e.name)
      cached = None if recompute else _read_json(os.path.join(rdir, "result.json"))
      if cached is not None and cached.get("settings") == digest(det_name):
        rows.append(cached)
        continue
      if cached_only:
        continue
      if cached is not None:
        logging.info("zoo evaluate: %s / %s: cached result has other settings, recomputing", e.name, det_name)
      row = dict(model=e.name, kind=e.kind, trigger=e.trigger, target=e.target, poison_rate=e.poison_rate,
                 detector=det_name, settings=digest(det_name), score=None, threshold=None, backdoored=None, seconds=None, asr=None,
                 asr_mse=None, error=None)
      try:
        model = get_model()
        t0 = time.time()
        res = detector_fns[det_name](model, config, key)
        row.update(score=None if res.score is None else float(res.score),
                   threshold=None if res.threshold is None else float(res.threshold),
                   backdoored=None if res.backdoored is None else bool(res.backdoored),
                   seconds=float(res.seconds or (time.time() - t0)))
        os.makedirs(rdir, exist_ok=True)
        _write_json(os.path.join(rdir, "detection.json"), res.to_json())
        if res.trigger is not None:
          np.save(os.path.join(rdir, "trigger.npy"), np.asarray(res.trigger, np.float32))
        y = get_target() if e.backdoored else None
        if y is not None and res.trigger is not None and asr_samples > 0:
          m = asr_fn(model, np.asarray(res.trigger, np.float32), y, eval_cfg, jax.random.fold_in(key, 1))
          row.update(asr=m.get("asr"), asr_mse=m.get("mse"))
      except Exception as err:  # noqa: BLE001 - record and go on
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        logging.error("zoo evaluate: %s / %s failed: %s", e.name, det_name, row["error"])
      else:
        _write_json(os.path.join(rdir, "result.json"), row)
      rows.append(row)
      logging.info("zoo evaluate: %s / %s: score %s backdoored %s asr %s (%s s)", e.name, det_name, row["score"],
                   row["backdoored"], row["asr"], None if row["seconds"] is None else round(row["seconds"], 1))
  for r in rows:
    if r["detector"] in MSCR_DETECTORS and r.get("score") is not None:
      r["threshold"], r["backdoored"] = mscr_tau, decide(r["score"], mscr_tau)
    r["true_mscr"] = true_mscr.get(r["model"], r.get("true_mscr"))
    r["true_asr"] = true_asr.get(r["model"], r.get("true_asr"))
    r["trigger_note"] = trigger_note(_read_json(os.path.join(zoo_dir, "results", r["detector"], r["model"],
                                                             "detection.json")))
  summary = {}
  for det_name in detectors:
    rs = [r for r in rows if r["detector"] == det_name and r["error"] is None and r["score"] is not None]
    labels = [r["kind"] == "backdoor" for r in rs]
    m = detection_metrics([r["score"] for r in rs], labels, [bool(r["backdoored"]) for r in rs]) if rs else dict(n=0)
    # Clean-calibrated decision beside the fixed tau: each model is judged against the largest score of the
    # *other* clean models (leave-one-out, floor 0), so no model helps set its own threshold.
    taus = leave_one_out_thresholds([r["score"] for r in rs], labels) if rs else []
    for r, t in zip(rs, taus):
      r["loo_threshold"], r["loo_flagged"] = t, decide(r["score"], t)
    loo = detection_metrics([r["score"] for r in rs], labels, [r["loo_flagged"] for r in rs]) if rs else dict(n=0)
    m["loo_calibrated"] = {k: loo.get(k) for k in ("accuracy", "tp", "fp", "tn", "fn")}
    asrs = [r["asr"] for r in rs if r["kind"] == "backdoor" and r["asr"] is not None]
    m.update(mean_seconds=float(np.mean([r["seconds"] for r in rs])) if rs else None,
             mean_inverted_asr=float(np.mean(asrs)) if asrs else None,
             errors=sum(1 for r in rows if r["detector"] == det_name and r["error"]))
    summary[det_name] = m
  out = out or os.path.join(zoo_dir, "results.md")
  _write_results(out, rows, summary, detectors, asr_samples)
  _write_json(os.path.splitext(out)[0] + ".json", dict(summary=summary, rows=rows, true_trigger_mscr=true_mscr,
                                                       true_trigger_asr=true_asr))
  logging.info("wrote %s", out)
  return dict(summary=summary, rows=rows)


def trigger_note(detection: dict | None) -> str | None:
  """How a detection.json's reported trigger was made, for the results table: for trigger_from='target', the
  collapse cluster behind each target estimate as size/batch ('target 2/16 -> 56/64'; a refinement round that was
  not kept is marked 'not kept'), or why it fell back to the MSCR pattern; None otherwise."""
  tt = ((detection or {}).get("details") or {}).get("target_trigger")
  if not isinstance(tt, dict):
    return None
  if "error" in tt:
    return "MSCR pattern (no collapse)"
  rounds = tt.get("rounds") or [dict(cluster_size=tt.get("cluster_size"), batch_size="?")]
  return "target " + " -> ".join(f"{r.get('cluster_size')}/{r.get('batch_size')}"
                                 + ("" if r.get("accepted", True) else " not kept") for r in rounds)


def _f(v, nd=3):
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.{nd}g}"
  return str(v)


def _write_results(path: str, rows, summary, detectors, asr_samples) -> None:
  lines = ["# Zoo detection benchmark", "",
           f"Models: {len({r['model'] for r in rows})} ({sum(1 for r in rows if r['detector'] == detectors[0] and r['kind'] == 'backdoor')} "
           f"backdoored). ASR = fraction of {asr_samples} samples from eps + inverted trigger with per-image MSE "
           "< threshold to the model's true target (config.eval sampler). Seconds include JIT compilation, which the "
           "first model of each detector pays (models of one architecture share the compiled programs).", "",
           "Fixed tau: each detector's own threshold (BBTI/white-box: MSCR > config.detection.threshold, the "
           "`threshold` column). LOO-calibrated: model i is flagged "
           "iff its score exceeds the largest score of the other clean models (leave-one-out; "
           "`detection.leave_one_out_thresholds`).", "",
           "| detector | n | accuracy | AUROC | TP | FP | TN | FN | LOO-calibrated accuracy (TP/FP) | mean s/model | "
           "mean inverted-trigger ASR | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for d in detectors:
    m = summary[d]
    loo = m.get("loo_calibrated") or {}
    loo_txt = "-" if loo.get("accuracy") is None else f"{_f(loo['accuracy'])} ({loo['tp']}/{loo['fp']})"
    lines.append(_md_row((d, m.get("n"), m.get("accuracy"), m.get("auroc"), m.get("tp"), m.get("fp"), m.get("tn"),
                          m.get("fn"), loo_txt, m.get("mean_seconds"), m.get("mean_inverted_asr"), m.get("errors"))))
  lines += ["", "true MSCR = the statistic for the model's true trigger (same noise batch and sampler as the "
            "inversion): what a perfect inversion could reach. true ASR = the ASR of the true trigger (same "
            "samples count and sampler as the inverted-trigger ASR): the backdoor's strength.", "",
            "| model | kind | trigger | target | rate | true ASR | true MSCR | detector | score | threshold | flagged | "
            "LOO tau | LOO flagged | seconds | reported trigger | inverted ASR | MSE | error |", "|" + "---|" * 18]
  for r in rows:
    lines.append(_md_row(r.get(k) for k in (
        "model", "kind", "trigger", "target", "poison_rate", "true_asr", "true_mscr", "detector", "score", "threshold",
        "backdoored", "loo_threshold", "loo_flagged", "seconds", "trigger_note", "asr", "asr_mse", "error")))
  _write_markdown(path, lines)


def _md_row(values) -> str:
  """One Markdown table row of `_f`-formatted cells ('|' inside a cell escaped)."""
  return "| " + " | ".join(_f(v).replace("|", "\\|") for v in values) + " |"


def _write_markdown(path: str, lines) -> None:
  _write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- cleanse
# Files of one method's workdir that another method's run on the same model may start from: detection and its
# trigger, the self-generated fine-tune data and the fingerprinted before-evaluation (cleanse.py reuses each only
# when it matches; the settings check still guards the workdir).
_SHARED_CLEANSE_FILES = ("detection.json", "detection_trigger.npy", "inverted_trigger.npy", "finetune_data.npy",
                         "eval_before.json")


def _default_cleanse_fn(model_dir: str, config, workdir: str) -> dict:
  from diffcleanse_jax.cleanse_cli import resolve_trigger_target
  from diffcleanse_jax.defense.cleanse import cleanse
  from diffcleanse_jax.defense.workflow import load_model_dir
  from diffcleanse_jax.evaluation import evaluate_model
  from diffcleanse_jax.workflows import write_config
  import jax

  write_config(config, workdir)
  model = load_model_dir(model_dir)
  g, y, source = resolve_trigger_target(model_dir, model.image_shape)
  return cleanse(model, config, workdir, jax.random.key(int(config.seed)), true_trigger=g, true_target=y,
                 evaluate_fn=evaluate_model, report_extra={"true_trigger_source": source})


def _fd_samples_note(metrics: dict) -> str | None:
  """'256 ddim-50': how many clean samples, from which sampler, the report's FD used (None if not recorded)."""
  n = metrics.get("fd_num_samples")
  if n is None:
    return None
  smp = metrics.get("fd_sampler") or metrics.get("sampler") or {}
  return f"{n} {smp.get('method', '?')}-{smp.get('num_steps', '?')}"


def _fd_change(before, after):
  if before in (None, 0) or after is None:
    return None
  return float(after) / float(before) - 1.0


FORCE_CHOICES = ("all", "clean", "none")


def cleanse_zoo(zoo_dir: str, methods: Sequence[str], config, only: Sequence[str] | None = None,
                force: str = "all", out: str | None = None, cleanse_fn: Callable | None = None
                ) -> dict[str, Any]:
  """Runs `cleanse` with every method on every finished zoo model, each in ZOO/cleanse/<method>/<model>/.
  force: 'all' (default) sets config.cleanse.force on every model, so removal is measured even where detection
  missed (the `detected` column still says what detection decided); 'clean' only on clean models (the "cleansing
  a clean model does not degrade it" check; backdoored ones are removed only if detected, the end-to-end
  pipeline); 'none' leaves every decision to detection. Resumable: a
  finished report.json is reused, an interrupted run resumes). The true trigger/target come from the model's
  attack.json (evaluation only). Writes ZOO/cleanse.md + cleanse.json; returns dict(summary, rows)."""
  from diffcleanse_jax.defense.cleanse import METHODS

  if force not in FORCE_CHOICES:
    raise ValueError(f"--force={force!r}; expected one of {', '.join(FORCE_CHOICES)}")
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"--methods: unknown cleanse method {m!r}; known: {', '.join(METHODS)}")
  cleanse_fn = cleanse_fn or _default_cleanse_fn
  entries = [e for e in zoo_entries() if is_done(zoo_dir, e.name) and (not only or e.name in set(only))]
  if not entries:
    raise FileNotFoundError(f"{zoo_dir}: no finished zoo models to cleanse (run the build command first)")
  rows: list[dict[str, Any]] = []
  for e in entries:
    mdir = os.path.join(zoo_dir, "models", e.name)
    first_wd = None
    for meth in methods:
      wd = os.path.join(zoo_dir, "cleanse", meth, e.name)
      row = dict(model=e.name, kind=e.kind, trigger=e.trigger, target=e.target, poison_rate=e.poison_rate,
                 method=meth, error=None)
      rep = _read_json(os.path.join(wd, "report.json"))
      if rep is None:
        c = copy.deepcopy(config)
        c.cleanse.method = meth
        if force == "all" or (force == "clean" and not e.backdoored):
          c.cleanse.force = True
        if first_wd is not None:
          os.makedirs(wd, exist_ok=True)
          for f in _SHARED_CLEANSE_FILES:
            src, dst = os.path.join(first_wd, f), os.path.join(wd, f)
            if os.path.isfile(src) and not os.path.exists(dst):
              shutil.copyfile(src, dst)
        logging.info("zoo cleanse: %s with %s -> %s", e.name, meth, wd)
        try:
          rep = cleanse_fn(mdir, c, wd)
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the table
          row["error"] = f"{type(err).__name__}: {err}"[:300]
          logging.error("zoo cleanse: %s / %s failed: %s\n%s", e.name, meth, row["error"], traceback.format_exc())
      if rep is not None:
        first_wd = first_wd or wd
        b, a = rep.get("before") or {}, rep.get("after") or {}
        row.update(detected=rep.get("backdoored"), cleansed=rep.get("cleansed"), asr_before=rep.get("asr_before"),
                   asr_after=rep.get("asr_after"), mse_after=rep.get("mse_after"),
                   inv_collapse_before=b.get("inverted_collapse"), inv_collapse_after=a.get("inverted_collapse"),
                   fd_before=rep.get("fd_before"), fd_after=rep.get("fd_after"),
                   fd_change=_fd_change(rep.get("fd_before"), rep.get("fd_after")),
                   pruned_fraction=rep.get("pruned_fraction"), seconds=(rep.get("seconds") or {}).get("total"),
                   fd_samples=_fd_samples_note((b.get("true") or {})))
      rows.append(row)
  summary = {}
  for meth in methods:
    rs = [r for r in rows if r["method"] == meth and r["error"] is None]
    bd = [r for r in rs if r["kind"] == "backdoor" and r.get("asr_before") is not None]
    fds = [abs(r["fd_change"]) for r in rs if r.get("fd_change") is not None]
    after = [r["asr_after"] for r in bd if r.get("asr_after") is not None]
    summary[meth] = dict(
        n=len(rs), backdoored=len(bd),
        removed=sum(1 for r in bd if r.get("asr_after") is not None and r["asr_after"] <= 0.05),
        removed_from_strong=sum(1 for r in bd if r["asr_before"] >= 0.9 and r.get("asr_after") is not None
                                and r["asr_after"] <= 0.05),
        strong=sum(1 for r in bd if r["asr_before"] >= 0.9),
        fd_within_20pct=sum(1 for f in fds if f < 0.2), fd_measured=len(fds),
        mean_asr_after=float(np.mean(after)) if after else None,
        mean_seconds=float(np.mean([r["seconds"] for r in rs if r.get("seconds")])) if rs else None,
        errors=sum(1 for r in rows if r["method"] == meth and r["error"]))
  out = out or os.path.join(zoo_dir, "cleanse.md")
  lines = ["# Zoo backdoor removal benchmark", "",
           "ASR = true trigger (the model's attack.json), fraction of samples with MSE < threshold to the true "
           "target; FD = classifier-feature Frechet distance of clean samples (config.eval.fd_num_samples); "
           f"cleanse.force on: {force} models (detected = what detection decided). Removed = ASR after <= 0.05.", "",
           "| method | models | backdoored | strong (ASR >= 0.9) | removed from strong | removed (all) | "
           "FD change < 20 % | mean ASR after | mean s/model | errors |", "|" + "---|" * 10]
  for meth in methods:
    m = summary[meth]
    lines.append(_md_row((meth, m["n"], m["backdoored"], m["strong"], m["removed_from_strong"], m["removed"],
                          f"{m['fd_within_20pct']}/{m['fd_measured']}", m["mean_asr_after"], m["mean_seconds"],
                          m["errors"])))
  keys = ("model", "kind", "method", "detected", "cleansed", "asr_before", "asr_after", "mse_after",
          "inv_collapse_before", "inv_collapse_after", "fd_before", "fd_after", "fd_change", "fd_samples",
          "pruned_fraction", "seconds", "error")
  lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    lines.append(_md_row(r.get(k) for k in keys))
  _write_markdown(out, lines)
  _write_json(os.path.splitext(out)[0] + ".json", dict(summary=summary, rows=rows))
  logging.info("wrote %s", out)
  return dict(summary=summary, rows=rows)


# ---------------------------------------------------------------------------------------------------- main
class _QuietLibraries(logging.Filter):
  """Drops INFO chatter from orbax/jax/absl internals."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        s in record.pathname for s in ("/orbax/", "/jax/", "/etils/", "/absl/"))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("command", choices=("build", "evaluate", "cleanse", "list"))
  ap.add_argument("--zoo", required=True, help="zoo folder")
  ap.add_argument("--preset", default="fmnist", choices=sorted(PRESETS))
  ap.add_argument("--base", default=None, help="build: clean base workdir/model (default: train ZOO/base)")
  ap.add_argument("--steps", type=int, default=None, help="build: override train.num_steps (smoke runs)")
  ap.add_argument("--only", default="", help="build/evaluate/cleanse: comma-separated entry names")
  ap.add_argument("--adopt", action="append", default=[],
                  help="build: NAME=DIR, a finished run of exactly this entry's recipe to copy instead of training")
  ap.add_argument("--detectors", default="bbti,whitebox,elijah,terd")
  ap.add_argument("--config", default=None,
                  help="evaluate/cleanse: detection/cleanse config file (default: the preset's)")
  ap.add_argument("--set", action="append", default=[],
                  help="evaluate/cleanse: config override section.field=value")
  ap.add_argument("--asr_samples", type=int, default=16, help="evaluate: samples per inverted-trigger ASR (0: skip)")
  ap.add_argument("--out", default=None, help="evaluate: results markdown (default ZOO/results.md)")
  ap.add_argument("--recompute", action="store_true", help="evaluate: ignore cached per-model results")
  ap.add_argument("--cached_only", action="store_true", help="evaluate: only tabulate the cached results")
  ap.add_argument("--methods", default="diffcleanse,elijah,clip,anp,finetune", help="cleanse: removal methods")
  ap.add_argument("--force", default="all", choices=FORCE_CHOICES,
                  help="cleanse: which models are cleansed whatever detection says")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for h in logging.getLogger().handlers:
    h.addFilter(_QuietLibraries())
  if args.command == "list":
    for r in list_zoo(args.zoo):
      print(f"{r['name']:24s} {r['kind']:8s} {r['trigger']:14s} {r['target']:7s} {r['poison_rate']:<5g} "
            f"{r['status']} {r['seconds'] or ''}")
    return 0
  if args.command == "build":
    for a in args.adopt:
      name, sep, src = a.partition("=")
      if not sep:
        raise SystemExit(f"--adopt {a!r}: expected NAME=DIR")
      print(f"{name}: adopted from {src} -> {adopt(args.zoo, name, src, args.preset)}")
    st = build(args.zoo, args.preset, args.base, args.steps, [s for s in args.only.split(",") if s] or None)
    for k, v in st.items():
      print(f"{k}: {v}")
    return 1 if any(v.startswith("failed") for v in st.values()) else 0
  if args.command == "cleanse":
    config = load_eval_config(args.config or PRESETS[args.preset][3], args.set)
    res = cleanse_zoo(args.zoo, [m for m in args.methods.split(",") if m], config,
                      [s for s in args.only.split(",") if s] or None, args.force, args.out)
    for d, m in res["summary"].items():
      print(d, json.dumps(m))
    return 0
  config = load_eval_config(args.config or PRESETS[args.preset][2], args.set)
  res = evaluate(args.zoo, [d for d in args.detectors.split(",") if d], config, args.out, args.asr_samples,
                 recompute=args.recompute, cached_only=args.cached_only,
                 only=[s for s in args.only.split(",") if s] or None)
  for d, m in res["summary"].items():
    print(d, json.dumps(m))
  return 0


if __name__ == "__main__":
  sys.exit(main())
