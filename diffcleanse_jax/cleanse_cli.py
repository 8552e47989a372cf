"""`launch.py --mode=cleanse`: the glue between the attack side (true trigger/target names) and the defence.

  python launch.py --config=configs/fmnist_cleanse.py --mode=cleanse --model=runs/attack/model --workdir=runs/clean

`--model` (required): a diffusers folder, a native model folder, or a training/attack workdir (its `model/`
sub-folder, else its newest checkpoint).

The true trigger and target are optional and only used for evaluation (and for pruning with
config.prune.use_true_trigger). They are resolved in this order:
  1. `--trigger` / `--target`: a name (attacks.triggers.TRIGGER_NAMES / attacks.targets.TARGET_NAMES), an image
     file or a .npy array (H,W,C) in [-1,1];
  2. otherwise an `attack.json` written by the attack workflow, looked up in the model folder and then in its
     parent (the attack workflow writes the model to WORKDIR/model and WORKDIR/attack.json next to it): the
     arrays next to that attack.json (`trigger_file`/`target_file`, default trigger.npy / target.npy) win, else its `trigger` / `target` names
     (top level or under an `attack` key) are resolved like the flags;
  3. otherwise none: the run is fully blind (the defender's view) and the report's ASR is the MSCR-style collapse
     of samples from noise + the inverted trigger.

This module lives outside diffcleanse_jax/defense/ on purpose: the defence never imports the attacks package.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from diffcleanse_jax.defense.cleanse import cleanse
from diffcleanse_jax.defense.workflow import load_model_dir
from diffcleanse_jax.workflows import need_flag, write_config

ATTACK_JSON = "attack.json"


def find_attack_json(model_path: str) -> str | None:
  """`attack.json` in the model folder or its parent, else None."""
  p = os.path.abspath(model_path)
  for d in (p, os.path.dirname(p)):
    f = os.path.join(d, ATTACK_JSON)
    if os.path.isfile(f):
      return f
  return None


def _attack_field(info: dict, name: str) -> Any:
  for d in (info, info.get("attack") if isinstance(info.get("attack"), dict) else None,
            info.get("config", {}).get("attack") if isinstance(info.get("config"), dict) else None):
    if isinstance(d, dict) and d.get(name) not in (None, ""):
      return d[name]
  return None


def resolve_trigger_target(model_path: str, image_shape, trigger: str | None = None, target: str | None = None,
                           log=logging.info) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """(trigger, target, where they came from); each (H,W,C) float32 in [-1,1] or None."""
  from diffcleanse_jax.attacks.targets import make_target
  from diffcleanse_jax.attacks.triggers import make_trigger

  s, c = int(image_shape[0]), int(image_shape[-1])
  trigger_size = None
  source = "flags" if (trigger or target) else "none"
  g = y = None
  if not trigger and not target:
    aj = find_attack_json(model_path)
    if aj is not None:
      source = aj
      d = os.path.dirname(aj)
      with open(aj) as f:
        info = json.load(f)
      tnpy = os.path.join(d, str(info.get("trigger_file") or "trigger.npy"))
      ynpy = os.path.join(d, str(info.get("target_file") or "target.npy"))
      g = np.load(tnpy).astype(np.float32) if os.path.isfile(tnpy) else None
      y = np.load(ynpy).astype(np.float32) if os.path.isfile(ynpy) else None
      trigger = None if g is not None else _attack_field(info, "trigger")
      target = None if y is not None else _attack_field(info, "target")
      ts = _attack_field(info, "trigger_size")
      trigger_size = int(ts) if ts else None
  if trigger:
    g = make_trigger(str(trigger), s, c, trigger_size, bounded=False)  # an inverted trigger.npy is unbounded
  if target:
    y = make_target(str(target), s, c, trigger=g)
  for name, a in (("trigger", g), ("target", y)):
    if a is not None:
      if a.ndim == 2 and c == 1:
        a = a[:, :, None]
      if tuple(a.shape) != (s, s, c):
        raise ValueError(f"true {name} from {source} has shape {tuple(a.shape)}, the model's images are {(s, s, c)}")
  if g is not None and g.ndim == 2:
    g = g[:, :, None]
  if y is not None and y.ndim == 2:
    y = y[:, :, None]
  if g is not None or y is not None:
    log(f"true trigger/target from {source}: trigger={'yes' if g is not None else 'no'}, "
        f"target={'yes' if y is not None else 'no'} (evaluation only)")
  return g, y, source


def cleanse_mode(config, workdir: str, flags) -> dict:
  """--mode=cleanse: detect, remove, evaluate; writes WORKDIR/cleansed, report.json, report.md."""
  model_path = need_flag(flags, "model")
  write_config(config, workdir)
  model = load_model_dir(model_path)
  logging.info("cleansing %r", model)
  g, y, source = resolve_trigger_target(model_path, model.image_shape, getattr(flags, "trigger", None),
                                        getattr(flags, "target", None))
  from diffcleanse_jax.evaluation import evaluate_model

  return cleanse(model, config, workdir, jax.random.key(int(config.seed)), true_trigger=g, true_target=y,
                 evaluate_fn=evaluate_model, report_extra={"true_trigger_source": source})
