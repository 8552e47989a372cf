"""diffusers `UNet2DModel` checkpoints <-> (UNetSpec, flax params), without torch.

Name map (ENGINEERING.md §3.6): torch `down_blocks.0.resnets.1.conv1.weight` (OIHW) <-> flax
`down_blocks_0/resnets_1/conv1/kernel` (HWIO, `transpose(2,3,1,0)`); Linear `(out,in)` <-> Dense `(in,out)`;
GroupNorm `weight` <-> `scale`; Fourier `time_proj.weight` <-> `time_proj/weight` (1-D, as is); learned
`time_proj.weight` <-> `time_proj/embedding`. Legacy attention names (`query, key, value, proj_attn`, as in the
`google/ddpm-*` checkpoints) are accepted on load; export always writes the current names. Converted trees are
checked against `abstract_params(spec)` in both directions, so a checkpoint that does not fit its config fails
with a message listing missing/unexpected keys and shape mismatches, never at the first forward pass.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffcleanse_jax.diffusion.schedules import validate_scheduler_config
from diffcleanse_jax.io import CheckpointError
from diffcleanse_jax.io.safetensors_io import load_safetensors, save_safetensors
from diffcleanse_jax.io.torch_pickle import load_torch_state_dict
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER
from diffcleanse_jax.models.unet import DIFFUSERS_DEFAULTS, UNetSpec, abstract_params, param_paths

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # sharded checkpoints: <weights name>.index.json + the shard files it names
CONFIG_NAME = "config.json"
PIPELINE_INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

_LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
_LIST_RE = re.compile(rf"({'|'.join(_LIST_MODULES)})_(\d+)")
_NORM_MODULES = ("norm1", "norm2", "group_norm", "conv_norm_out")
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MAX_LISTED = 5

ParamPath = tuple[str, ...]


# ------------------------------------------------------------------------------------------ name map
def _rename_legacy(name: str) -> str:
  """`...attentions.N.{query,key,value,proj_attn}.*` -> `...attentions.N.{to_q,to_k,to_v,to_out.0}.*`."""
  parts = name.split(".")
  if len(parts) >= 4 and parts[-2] in _LEGACY_ATTN and parts[-4] == "attentions" and parts[-3].isdigit():
    return ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
  return name


def _fold(parts: list[str]) -> list[str]:
  """['down_blocks', '0', 'resnets', '1', 'conv1'] -> ['down_blocks_0', 'resnets_1', 'conv1']."""
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return out


def _torch_module_name(mod: ParamPath) -> str:
  return ".".join(_LIST_RE.sub(r"\1.\2", m) if _LIST_RE.fullmatch(m) else m for m in mod)


def _torch_name(path: ParamPath) -> str:
  """Flax param path -> diffusers state-dict key (current names)."""
  leaf = path[-1]
  tleaf = "weight" if leaf in ("kernel", "scale", "embedding", "weight") else leaf
  return f"{_torch_module_name(path[:-1])}.{tleaf}"


def _torch_shape(path: ParamPath, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax leaf shape -> the shape the torch tensor has."""
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _convert_one(name: str, arr: np.ndarray, abstract: Mapping[ParamPath, Any]) -> tuple[ParamPath | None, np.ndarray]:
  """One torch tensor -> (flax path, array in flax layout); path None if the name is not a model parameter."""
  parts = _rename_legacy(name).split(".")
  if len(parts) < 2:
    return None, arr
  mod, leaf = tuple(_fold(parts[:-1])), parts[-1]
  if leaf != "weight":
    return mod + (leaf,), arr
  if mod == ("time_proj",):
    return mod + ("weight" if arr.ndim == 1 else "embedding",), arr
  if mod[-1] in _NORM_MODULES or (arr.ndim == 1 and (mod[-1].startswith("norm") or mod + ("scale",) in abstract)):
    return mod + ("scale",), arr
  path = mod + ("kernel",)
  target = abstract.get(path)
  if arr.ndim == 4 and target is not None and len(target.shape) == 2 and arr.shape[2:] == (1, 1):
    arr = arr[:, :, 0, 0]  # very old dumps store q/k/v/proj as 1x1 convs
  if arr.ndim == 4:
    return path, arr.transpose(2, 3, 1, 0)
  if arr.ndim == 2:
    return path, arr.T
  return path, arr


def _to_float32(arr: np.ndarray) -> np.ndarray:
  arr = np.asarray(arr)
  if arr.dtype != np.float32:
    arr = arr.astype(np.float32)
  return np.ascontiguousarray(arr)


@functools.lru_cache(maxsize=8)
def _abstract_flat(spec: UNetSpec) -> Mapping[ParamPath, Any]:
  """{flax path: ShapeDtypeStruct} for `spec` (cached: loading and exporting trace the model only once).
  Callers must not mutate it."""
  # Shapes do not depend on the image size: use the smallest one the down path accepts (cheapest trace).
  tree = abstract_params(spec, image_size=2 ** (len(spec.block_out_channels) - 1))
  return {tuple(p.split("/")): leaf for p, leaf in param_paths(tree)}


def _unflatten(flat: Mapping[ParamPath, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def _listing(items: list[str]) -> str:
  more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return "; ".join(items[:_MAX_LISTED]) + more


def torch_to_flax(state_dict: Mapping[str, Any], spec: UNetSpec, source: str = "state dict") -> dict:
  """diffusers UNet2DModel state dict -> flax params (nested dict of float32 numpy arrays) for `spec`.

  Accepts current and legacy attention names, a `module.` prefix, fp16/bf16/fp64 tensors (cast to float32).
  Raises CheckpointError listing missing keys, unexpected keys and shape mismatches (torch names and layouts).
  """
  abstract = _abstract_flat(spec)
  names = list(state_dict)
  strip = "module." if names and all(n.startswith("module.") for n in names) else ""
  converted: dict[ParamPath, np.ndarray] = {}
  origin: dict[ParamPath, str] = {}
  unexpected, mismatched = [], []
  for name in names:
    arr = np.asarray(state_dict[name])
    path, value = _convert_one(name[len(strip):], arr, abstract)
    if path is None or path not in abstract:
      unexpected.append(f"{name} {tuple(arr.shape)}")
      continue
    if path in origin:
      raise CheckpointError(f"{source}: {name!r} and {origin[path]!r} both map to {_torch_name(path)!r} "
                            "(a checkpoint with both legacy and current attention names?)")
    origin[path] = name
    want = tuple(abstract[path].shape)
    if tuple(value.shape) != want:
      mismatched.append(f"{name}: expected {_torch_shape(path, want)}, found {tuple(arr.shape)}")
      continue
    converted[path] = _to_float32(value)
  missing = [f"{_torch_name(p)} {_torch_shape(p, tuple(a.shape))}" for p, a in abstract.items()
             if p not in converted and p not in origin]
  if missing or unexpected or mismatched:
    parts = []
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    raise CheckpointError(f"{source}: weights do not match the model config ({' | '.join(parts)}); is the "
                          "config.json the one these weights were trained with (block_out_channels, "
                          "layers_per_block, block types, _pruned_widths)?")
  return _unflatten(converted)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """flax params -> diffusers state dict {name: C-contiguous numpy array} (current names, torch layouts).

  The exact inverse of `torch_to_flax` (without legacy renames); dtypes are kept.
  """
  out: dict[str, np.ndarray] = {}
  for p, leaf in param_paths(params):
    path = tuple(p.split("/"))
    arr = np.asarray(leaf)
    if path[-1] == "kernel" and arr.ndim == 4:
      arr = arr.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and arr.ndim == 2:
      arr = arr.T
    out[_torch_name(path)] = np.ascontiguousarray(arr)
  return out


# ------------------------------------------------------------------------------------------ files
def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A weights file as {name: numpy array}: `.safetensors`, else a torch zip pickle (`.bin`/`.pth`/`.pt`)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  return load_torch_state_dict(path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: {what} is not UTF-8 text ({e.reason})") from None
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON in {what} (line {e.lineno} column {e.colno}: {e.msg})") from None
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: {what} must be a JSON object, found {type(obj).__name__}")
  return obj


def _check_pipeline_index(root: Path) -> None:
  """A pipeline folder's `model_index.json` may only hold a UNet and a scheduler: a VAE/VQ-VAE (latent
  diffusion), a text encoder or any other component means its UNet does not denoise pixels from plain noise."""
  path = root / PIPELINE_INDEX_NAME
  if not path.is_file():
    return
  index = _read_json(path, "pipeline index")
  extra = sorted(k for k, v in index.items() if not k.startswith("_") and k not in ("unet", "scheduler")
                 and v not in (None, [None, None]))
  if extra:
    raise CheckpointError(f"{path}: pipeline {index.get('_class_name', '?')} has components {', '.join(extra)} "
                          "besides unet and scheduler (a latent or conditional pipeline); only pixel-space "
                          "unconditional pipelines (unet + scheduler, e.g. DDPMPipeline) are supported")


def _find_model_dir(root: Path) -> Path:
  if not root.exists():
    raise CheckpointError(f"{root}: no such folder")
  if not root.is_dir():
    raise CheckpointError(f"{root}: expected a diffusers model folder (config.json + weights), got a file")
  if (root / CONFIG_NAME).is_file():
    return root
  if (root / "unet" / CONFIG_NAME).is_file():
    _check_pipeline_index(root)
    return root / "unet"
  raise CheckpointError(f"{root}: no {CONFIG_NAME} (expected a diffusers UNet2DModel folder, or a pipeline "
                        f"folder with unet/{CONFIG_NAME})")


def _find_weights(model_dir: Path) -> Path:
  """The weights file, or the shard index (`<weights>.index.json`) of a sharded checkpoint."""
  for name in (WEIGHTS_SAFETENSORS, WEIGHTS_BIN, WEIGHTS_SAFETENSORS + INDEX_SUFFIX, WEIGHTS_BIN + INDEX_SUFFIX):
    if (model_dir / name).is_file():
      return model_dir / name
  others = sorted(p.name for p in model_dir.iterdir()
                  if p.suffix in (".safetensors", ".bin", ".json", ".pt", ".pth", ".ckpt") and p.name != CONFIG_NAME)
  hint = ""
  if others:
    hint = (f"; found {', '.join(others[:6])} (a variant such as .fp16 or .ema must be renamed to "
            f"{WEIGHTS_SAFETENSORS}, or its .index.json to {WEIGHTS_SAFETENSORS + INDEX_SUFFIX})")
  raise CheckpointError(f"{model_dir}: no {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN} (nor a sharded "
                        f"{INDEX_SUFFIX}){hint}")


def _load_sharded(index_path: Path) -> dict[str, np.ndarray]:
  """A sharded checkpoint (diffusers `save_pretrained(max_shard_size=...)`): its index's `weight_map` names,
  for every tensor, the shard file in the same folder that holds it."""
  index = _read_json(index_path, "shard index")
  wmap = index.get("weight_map")
  if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
    raise CheckpointError(f"{index_path}: weight_map must be a non-empty object of tensor name -> shard file")
  by_shard: dict[str, list[str]] = {}
  for name, shard in wmap.items():
    by_shard.setdefault(shard, []).append(name)
  state: dict[str, np.ndarray] = {}
  for shard, names in sorted(by_shard.items()):
    if Path(shard).name != shard or shard in (".", ".."):
      raise CheckpointError(f"{index_path}: shard {shard!r} must be a file name in the index's folder")
    path = index_path.parent / shard
    if not path.is_file():
      raise CheckpointError(f"{index_path}: shard file {shard} (holding {len(names)} tensors, e.g. {names[0]!r}) "
                            "is missing")
    tensors = load_state_dict(path)
    missing = [n for n in names if n not in tensors]
    if missing:
      raise CheckpointError(f"{path}: lacks {len(missing)} tensors that {index_path.name} places there, e.g. "
                            f"{missing[0]!r}")
    state.update({n: tensors[n] for n in names})
  return state


def load_diffusers_folder(path: str | os.PathLike) -> tuple[UNetSpec, dict, dict[str, Any], dict[str, Any]]:
  """Loads a diffusers UNet2DModel folder (or a DDPMPipeline folder with `unet/` and `scheduler/`).

  Returns (spec, params, scheduler_config, config): params is the flax tree (float32 numpy arrays),
  scheduler_config the `scheduler_config.json` dict (the project's DDPM defaults, with a logged warning, when
  the folder has none), config the raw `config.json` dict. Weights: `diffusion_pytorch_model.safetensors`
  preferred, else `.bin` (read without torch), else a sharded checkpoint's `.index.json` and its shards.
  Raises CheckpointError (files), ConfigError (model config values) or SchedulerConfigError (scheduler config:
  a non-epsilon or non-beta-schedule model).
  """
  root = Path(os.fspath(path))
  model_dir = _find_model_dir(root)
  config_path = model_dir / CONFIG_NAME
  config = _read_json(config_path, "model config")
  cls = config.get("_class_name")
  if cls is not None and cls != "UNet2DModel":
    raise CheckpointError(f"{config_path}: _class_name is {cls!r}; only UNet2DModel checkpoints are supported")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    log.warning("%s: ignoring config keys this loader does not know (from another diffusers version?): %s",
                config_path, ", ".join(unknown))
  spec = UNetSpec.from_config(config, source=str(config_path), strict=False)
  weights = _find_weights(model_dir)
  state = _load_sharded(weights) if weights.name.endswith(INDEX_SUFFIX) else load_state_dict(weights)
  params = torch_to_flax(state, spec, source=str(weights))
  candidates = [model_dir / SCHEDULER_CONFIG_NAME, root / "scheduler" / SCHEDULER_CONFIG_NAME]
  if model_dir == root:
    candidates.append(root.parent / "scheduler" / SCHEDULER_CONFIG_NAME)  # given the unet/ subfolder itself
  for cand in candidates:
    if cand.is_file():
      scheduler_config = _read_json(cand, "scheduler config")
      validate_scheduler_config(scheduler_config, str(cand))
      break
  else:
    scheduler_config = dict(DEFAULT_SCHEDULER)
    log.warning("%s: no %s found; using the default DDPM scheduler (%s)", root, SCHEDULER_CONFIG_NAME,
                ", ".join(f"{k}={v}" for k, v in DEFAULT_SCHEDULER.items() if not k.startswith("_")))
  return spec, params, scheduler_config, config


def _json_bytes(obj: Any, what: str) -> bytes:
  try:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} is not JSON-serialisable: {e}") from None


def _check_extra_name(name: str) -> str:
  p = Path(name)
  if not name or p.is_absolute() or ".." in p.parts or name in (CONFIG_NAME, WEIGHTS_SAFETENSORS,
                                                                SCHEDULER_CONFIG_NAME):
    raise CheckpointError(f"extra_files: invalid or reserved file name {name!r} (use a relative path inside "
                          "the folder, not config.json / scheduler_config.json / the weights file)")
  return name


def _write_file(path: Path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def save_diffusers_folder(path: str | os.PathLike, spec: UNetSpec, params: Mapping[str, Any],
                          scheduler_config: Mapping[str, Any] | None = None,
                          extra_files: Mapping[str, bytes | str | dict | list] | None = None) -> Path:
  """Writes a diffusers UNet2DModel folder: config.json, diffusion_pytorch_model.safetensors,
  scheduler_config.json, plus `extra_files` (name -> bytes, str, or a JSON-serialisable dict/list).

  A model with uniform widths loads in `diffusers.UNet2DModel.from_pretrained`; a pruned one carries its widths
  table under `_pruned_widths` (diffusers ignores the key, so diffusers itself cannot load it). The folder is
  built in a temporary sibling and renamed into place: a crash leaves the old folder or the new one, never a
  half-written one. An existing folder is replaced only if it is empty or holds a config.json.
  Returns the folder path.
  """
  target = Path(os.fspath(path)).absolute()
  if target.exists():
    if not target.is_dir():
      raise CheckpointError(f"{target}: exists and is not a folder")
    if any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
      raise CheckpointError(f"{target}: refusing to replace a non-empty folder that is not a model folder "
                            f"(no {CONFIG_NAME})")
  state_dict = flax_to_torch(params)
  torch_to_flax(state_dict, spec, source="params to export")  # same shapes/names check as on load
  config = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **spec.to_config()}
  sched = dict(DEFAULT_SCHEDULER if scheduler_config is None else scheduler_config)
  sched.setdefault("_class_name", "DDPMScheduler")
  sched.setdefault("_diffusers_version", DIFFUSERS_VERSION)
  files: dict[str, bytes] = {CONFIG_NAME: _json_bytes(config, "model config"),
                             SCHEDULER_CONFIG_NAME: _json_bytes(sched, "scheduler_config")}
  for name, content in (extra_files or {}).items():
    name = _check_extra_name(name)
    if isinstance(content, bytes):
      files[name] = content
    elif isinstance(content, str):
      files[name] = content.encode("utf-8")
    else:
      files[name] = _json_bytes(content, f"extra_files[{name!r}]")

  target.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{secrets.token_hex(4)}"
  tmp = target.parent / f".{target.name}.tmp-{tag}"
  tmp.mkdir()
  try:
    save_safetensors(state_dict, tmp / WEIGHTS_SAFETENSORS, metadata={"format": "pt"})
    for name, data in files.items():
      (tmp / name).parent.mkdir(parents=True, exist_ok=True)
      _write_file(tmp / name, data)
    if target.exists():
      old = target.parent / f".{target.name}.old-{tag}"
      os.rename(target, old)
      os.rename(tmp, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target
