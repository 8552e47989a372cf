"""The project's own checkpoint formats (orbax), and `load_pretrained` / `save_pretrained`.

native model folder:  diffcleanse_model.json (model config incl. `_pruned_widths`, scheduler config, metadata)
                      params/ (orbax StandardCheckpointer)
training workdir:     checkpoints/<step>/{state,meta}/ (orbax CheckpointManager, see `diffcleanse_jax.train`)
diffusers folder:     config.json + diffusion_pytorch_model.{safetensors,bin} (+ scheduler_config.json)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.unet import ConfigError, UNetSpec, abstract_params

NATIVE_META = "diffcleanse_model.json"
NATIVE_FORMAT = "diffcleanse-native/1"


class ModelLoadError(ValueError):
  """A model path that cannot be loaded; the message names the path and what was expected."""


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ModelLoadError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _check_tree(path: str, restored, expected) -> None:
  got = {"/".join(map(str, (getattr(k, "key", k) for k in p))): v.shape
         for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  want = {"/".join(map(str, (getattr(k, "key", k) for k in p))): v.shape
          for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise ModelLoadError(f"{path}: parameters do not match the saved config (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
  for k in sorted(want):
    if tuple(got[k]) != tuple(want[k]):
      raise ModelLoadError(f"{path}: parameter {k} has shape {tuple(got[k])}, config implies {tuple(want[k])}")


def save_native(model: DiffusionModel, path: str, metadata: dict | None = None) -> str:
  """Writes a native model folder atomically (temp sibling folder + rename; an old folder is replaced)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    meta = {"format": NATIVE_FORMAT, "model_config": model.config, "scheduler_config": model.scheduler_config,
            "metadata": dict(model.metadata, **(metadata or {}))}
    with open(os.path.join(tmp, NATIVE_META), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=str)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), jax.device_get(model.params))
    ckptr.wait_until_finished()
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def _spec_from_meta(meta: dict, source: str) -> UNetSpec:
  cfg = meta.get("model_config")
  if not isinstance(cfg, dict):
    raise ModelLoadError(f"{source}: no 'model_config' object")
  try:
    return UNetSpec.from_config(cfg, source=source, strict=False)
  except ConfigError as e:
    raise ModelLoadError(str(e)) from None


def load_native(path: str) -> DiffusionModel:
  meta_path = os.path.join(path, NATIVE_META)
  meta = _read_json(meta_path)
  if meta.get("format") != NATIVE_FORMAT:
    raise ModelLoadError(f"{meta_path}: format {meta.get('format')!r}, expected {NATIVE_FORMAT!r}")
  spec = _spec_from_meta(meta, meta_path)
  expected = abstract_params(spec)
  params_dir = os.path.join(path, "params")
  if not os.path.isdir(params_dir):
    raise ModelLoadError(f"{params_dir}: missing (the native folder is incomplete)")
  params = ocp.StandardCheckpointer().restore(os.path.abspath(params_dir))
  _check_tree(params_dir, params, expected)
  return DiffusionModel(spec, params, meta.get("scheduler_config"), source=path, metadata=meta.get("metadata"))


def _training_step_dir(path: str) -> str | None:
  """Resolves a workdir, its checkpoints/ folder or one step folder to the newest step folder."""
  cands = [path, os.path.join(path, "checkpoints")]
  for c in cands:
    if os.path.isdir(os.path.join(c, "state")) and os.path.isdir(os.path.join(c, "meta")):
      return c
    if os.path.isdir(c):
      steps = sorted((int(n) for n in os.listdir(c) if n.isdigit()), reverse=True)
      for st in steps:
        d = os.path.join(c, str(st))
        if os.path.isdir(os.path.join(d, "state")):
          return d
  return None


def load_training_checkpoint(path: str, use_ema: bool = True) -> DiffusionModel:
  """Model from a training checkpoint (EMA weights when present and `use_ema`)."""
  step_dir = _training_step_dir(path)
  if step_dir is None:
    raise ModelLoadError(f"{path}: no training checkpoint (expected checkpoints/<step>/state)")
  meta_dir = os.path.join(step_dir, "meta")
  meta_files = [os.path.join(meta_dir, n) for n in os.listdir(meta_dir)] if os.path.isdir(meta_dir) else []
  meta = None
  for mf in meta_files:
    if os.path.isfile(mf):
      try:
        meta = _read_json(mf)
        break
      except ModelLoadError:
        continue
  if not isinstance(meta, dict):
    raise ModelLoadError(f"{meta_dir}: no readable JSON metadata")
  spec = _spec_from_meta(meta, meta_dir)
  state = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(step_dir, "state")))
  key = "ema_params" if use_ema and "ema_params" in state else "params"
  params = jax.tree.map(np.asarray, state[key])
  _check_tree(step_dir, params, abstract_params(spec))
  return DiffusionModel(spec, params, meta.get("scheduler_config"), source=path,
                        metadata={"checkpoint": step_dir, "weights": key, "run": meta})


def is_diffusers_folder(path: str) -> bool:
  """config.json next to diffusion_pytorch_model.* (or a pipeline's unet/ subfolder). A training workdir also
  has a config.json (the run config) but no weights file beside it."""
  for sub in ("", "unet"):
    d = os.path.join(path, sub)
    if os.path.isfile(os.path.join(d, "config.json")) and any(
        n.startswith("diffusion_pytorch_model") for n in (os.listdir(d) if os.path.isdir(d) else [])):
      return True
  return False


def load_pretrained(path: str, use_ema: bool = True) -> DiffusionModel:
  """Loads a diffusers folder, a native model folder, a training workdir/checkpoint (newest step), or an
  original-DDPM-layout checkpoint (ermongroup/ddim, pytorch_diffusion, TrojDiff: a .pth/.pt/.ckpt file, or a ddim
  log folder with ckpt.pth and config.yml)."""
  if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
    raise ModelLoadError(f"{path}: no such file or directory")
  path = os.fspath(path)
  from diffcleanse_jax.io import original_ddpm
  if original_ddpm.find_original_checkpoint(path) is not None and not is_diffusers_folder(path):
    spec, params, scheduler_config, _ = original_ddpm.load_original_checkpoint(path, use_ema)
    return DiffusionModel(spec, params, scheduler_config, source=path)
  if not os.path.isdir(path):
    raise ModelLoadError(f"{path}: expected a folder (diffusers model folder, native model folder or workdir) "
                         f"or an original-DDPM/ddim checkpoint file ({', '.join(original_ddpm.CHECKPOINT_SUFFIXES)})")
  if os.path.isfile(os.path.join(path, NATIVE_META)):
    return load_native(path)
  if is_diffusers_folder(path):
    from diffcleanse_jax.io import diffusers as diffusers_io
    spec, params, scheduler_config, _ = diffusers_io.load_diffusers_folder(path)
    return DiffusionModel(spec, params, scheduler_config, source=path)
  if _training_step_dir(path) is not None:
    return load_training_checkpoint(path, use_ema)
  for sub in ("cleansed", "model"):  # the output folders of --mode=cleanse / --mode=train|attack
    if os.path.isdir(os.path.join(path, sub)):
      return load_pretrained(os.path.join(path, sub), use_ema)
  if os.path.isfile(os.path.join(path, "config.json")):
    from diffcleanse_jax.io import diffusers as diffusers_io
    diffusers_io.load_diffusers_folder(path)  # raises the precise error (e.g. weights file missing)
  raise ModelLoadError(f"{path}: not a model folder (no config.json, {NATIVE_META} or checkpoints/)")


def save_pretrained(model: DiffusionModel, path: str, format: str = "diffusers") -> str:  # noqa: A002
  """Writes `model` as a diffusers folder (uniform or pruned widths; pruned ones carry `_pruned_widths`) or as a
  native folder."""
  if format == "native":
    return save_native(model, path)
  if format == "diffusers":
    from diffcleanse_jax.io import diffusers as diffusers_io
    diffusers_io.save_diffusers_folder(path, model.spec, model.params, model.scheduler_config)
    return path
  raise ValueError(f"save_pretrained format={format!r}; expected 'diffusers' or 'native'")
