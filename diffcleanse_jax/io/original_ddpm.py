"""Checkpoints in the original DDPM UNet layout (Ho et al.'s network as ported to torch by pesser/pytorch_diffusion
and ermongroup/ddim; TrojDiff and other ddim-based attack codebases save this layout), loaded torch-free.

The network is the same as diffusers' `UNet2DModel` with google/ddpm-* settings (one attention head,
asymmetric downsample padding, [sin, cos] timestep features with frequency shift 1, GroupNorm(32, eps 1e-6),
SiLU), so loading is a renaming of the state dict plus a config inferred from it:

  temb.dense.{0,1}                -> time_embedding.linear_{1,2}
  down.L.block.j / .attn.j        -> down_blocks.L.resnets.j / .attentions.j   (norm1, conv1, temb_proj,
  down.L.downsample.conv          -> down_blocks.L.downsamplers.0.conv          norm2, conv2, nin_shortcut;
  mid.block_1 / attn_1 / block_2  -> mid_block.resnets.0 / attentions.0 / resnets.1      norm, q, k, v, proj_out)
  up.L.block.j (L = resolution level, 0 = full size) -> up_blocks.(num_levels - 1 - L).resnets.j
  norm_out / conv_out             -> conv_norm_out / conv_out

Accepted files: a plain state dict, or ddim's training checkpoint `ckpt.pth` = [model state, optimizer state,
epoch, step(, EMA shadow)] (the EMA weights are used when present and `use_ema`). ddim's `config.yml` next to
the checkpoint (if any) gives the image size and the diffusion schedule; it is read with a YAML loader that
builds only plain data (its `argparse.Namespace` tags become dicts, any other python tag is refused).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffcleanse_jax.io import CheckpointError
from diffcleanse_jax.io.diffusers import torch_to_flax
from diffcleanse_jax.io.torch_pickle import load_torch_object
from diffcleanse_jax.models.unet import UNetSpec

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
CONFIG_NAMES = ("config.yml", "config.yaml")
# ddim's `diffusion.beta_schedule` -> diffusers beta_schedule (the others are passed as trained_betas).
_BETA_SCHEDULES = {"linear": "linear", "quad": "scaled_linear"}
_VAR_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def is_original_state_dict(state: Mapping[str, Any]) -> bool:
  """True for a state dict in this layout (optionally `module.`-prefixed, as saved from DataParallel)."""
  names = {_strip(n) for n in state}
  return "temb.dense.0.weight" in names and "conv_in.weight" in names


def _strip(name: str) -> str:
  return name[len("module."):] if name.startswith("module.") else name


def _pick_state(obj: Any, path: str, use_ema: bool) -> dict[str, np.ndarray]:
  """The model's state dict out of what the file holds (a state dict or ddim's [model, optim, epoch, step,
  ema] list)."""
  def tensors(d):
    return isinstance(d, Mapping) and d and all(isinstance(v, np.ndarray) for v in d.values())

  if tensors(obj):
    return {str(k): v for k, v in obj.items()}
  if isinstance(obj, (list, tuple)) and obj and tensors(obj[0]):
    if use_ema and len(obj) >= 5 and tensors(obj[-1]):
      return {str(k): v for k, v in obj[-1].items()}
    if use_ema:
      log.info("%s: no EMA weights in the checkpoint; using the model weights", path)
    return {str(k): v for k, v in obj[0].items()}
  raise CheckpointError(f"{path}: expected a state dict or ddim's [model state, optimizer state, epoch, step, "
                        f"ema] list, found a pickled {type(obj).__name__}")


def _read_ddim_config(path: Path) -> dict[str, Any]:
  import yaml  # PyYAML comes with ml-collections

  class _Loader(yaml.SafeLoader):
    pass

  def namespace(loader, node):
    return loader.construct_mapping(node, deep=True)

  def refuse(loader, suffix, node):
    raise CheckpointError(f"{path}: refusing the YAML python tag {suffix!r} (only argparse.Namespace is read)")

  _Loader.add_constructor("tag:yaml.org,2002:python/object:argparse.Namespace", namespace)
  _Loader.add_multi_constructor("tag:yaml.org,2002:python/", refuse)
  try:
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506  (restricted loader)
  except yaml.YAMLError as e:
    raise CheckpointError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{path}: expected a ddim config (a mapping with model/data/diffusion sections)")
  return cfg


def ddim_betas(schedule: str, beta_start: float, beta_end: float, n: int, source: str) -> np.ndarray:
  """ddim's `get_beta_schedule` (float64), for the schedules diffusers has no name for."""
  if schedule == "const":
    return beta_end * np.ones(n, dtype=np.float64)
  if schedule == "jsd":
    return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
  if schedule == "sigmoid":
    x = np.linspace(-6, 6, n)
    return (1 / (np.exp(-x) + 1)) * (beta_end - beta_start) + beta_start
  raise CheckpointError(f"{source}: diffusion.beta_schedule={schedule!r} is not one of linear, quad, const, jsd, "
                        "sigmoid")


def _scheduler_config(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
  diff = dict(cfg.get("diffusion") or {})
  n = int(diff.get("num_diffusion_timesteps", 1000))
  start, end = float(diff.get("beta_start", 1e-4)), float(diff.get("beta_end", 0.02))
  schedule = str(diff.get("beta_schedule", "linear"))
  var = str((cfg.get("model") or {}).get("var_type", "fixedlarge"))
  if var not in _VAR_TYPES:
    raise CheckpointError(f"{source}: model.var_type={var!r}; expected fixedlarge or fixedsmall")
  sc: dict[str, Any] = dict(_class_name="DDPMScheduler", num_train_timesteps=n, beta_start=start, beta_end=end,
                            variance_type=_VAR_TYPES[var], clip_sample=False, prediction_type="epsilon",
                            timestep_spacing="leading", steps_offset=0)
  if schedule in _BETA_SCHEDULES:
    sc["beta_schedule"] = _BETA_SCHEDULES[schedule]
  else:
    sc["beta_schedule"] = "linear"
    sc["trained_betas"] = ddim_betas(schedule, start, end, n, source).tolist()
  return sc


def _levels(names, prefix: str) -> int:
  found = [int(m.group(1)) for n in names if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", n))]
  return max(found) + 1 if found else 0


def convert_state_dict(state: Mapping[str, np.ndarray], sample_size: int = 32, dropout: float = 0.0,
                       source: str = "state dict") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(diffusers-named state dict, diffusers UNet2DModel config) for a state dict in the original layout."""
  sd = {_strip(k): np.asarray(v) for k, v in state.items()}
  sd.pop("logvar", None)  # ddim's 'bayesian' model type: a learned log-variance table, unused for sampling
  names = list(sd)
  n_levels = _levels(names, "down")
  if n_levels == 0 or _levels(names, "up") != n_levels:
    raise CheckpointError(f"{source}: not an original-DDPM UNet state dict (down.N / up.N levels not found)")
  ch = int(sd["conv_in.weight"].shape[0])
  if sd["temb.dense.0.weight"].shape[1] != ch:
    raise CheckpointError(f"{source}: temb.dense.0.weight has {sd['temb.dense.0.weight'].shape[1]} inputs but "
                          f"conv_in has {ch} outputs; expected them equal (ddim's Model)")
  widths, attn = [], []
  n_blocks = _levels(names, "down.0.block")
  for lvl in range(n_levels):
    if _levels(names, f"down.{lvl}.block") != n_blocks or _levels(names, f"up.{lvl}.block") != n_blocks + 1:
      raise CheckpointError(f"{source}: level {lvl} has {_levels(names, f'down.{lvl}.block')} down / "
                            f"{_levels(names, f'up.{lvl}.block')} up resnet blocks; expected {n_blocks} / "
                            f"{n_blocks + 1} (num_res_blocks is the same at every level)")
    widths.append(int(sd[f"down.{lvl}.block.0.conv1.weight"].shape[0]))
    attn.append(f"down.{lvl}.attn.0.q.weight" in sd)
    if lvl < n_levels - 1 and f"down.{lvl}.downsample.conv.weight" not in sd:
      raise CheckpointError(f"{source}: down.{lvl}.downsample has no conv (resamp_with_conv=False: average-pool "
                            "resampling); only resamp_with_conv=True models are supported")
  if widths[0] != ch:
    raise CheckpointError(f"{source}: ch_mult[0] = {widths[0] / ch:g}; only ch_mult starting with 1 maps onto "
                          "diffusers' UNet2DModel")
  config = dict(
      _class_name="UNet2DModel", sample_size=int(sample_size), in_channels=int(sd["conv_in.weight"].shape[1]),
      out_channels=int(sd["conv_out.weight"].shape[0]), block_out_channels=widths, layers_per_block=n_blocks,
      down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
      norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1, time_embedding_type="positional",
      center_input_sample=False, dropout=float(dropout))
  out: dict[str, np.ndarray] = {}
  unknown = []
  for name, value in sd.items():
    new = _rename(name, n_levels)
    if new is None:
      unknown.append(name)
      continue
    if new.split(".")[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in new:
      value = value.reshape(value.shape[:2]) if value.ndim == 4 else value  # 1x1 conv -> linear
    out[new] = value
  if unknown:
    raise CheckpointError(f"{source}: {len(unknown)} tensors have no place in the original DDPM UNet layout, "
                          f"e.g. {', '.join(unknown[:5])}")
  return out, config


def _rename(name: str, n_levels: int) -> str | None:
  simple = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
            "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
  stem, _, leaf = name.rpartition(".")
  if stem in simple:
    return f"{simple[stem]}.{leaf}"
  m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", stem)
  if m:
    kind, lvl, part, j, layer = m.groups()
    block = f"down_blocks.{lvl}" if kind == "down" else f"up_blocks.{n_levels - 1 - int(lvl)}"
    table = _RESNET if part == "block" else _ATTN
    if layer not in table:
      return None
    return f"{block}.{'resnets' if part == 'block' else 'attentions'}.{j}.{table[layer]}.{leaf}"
  m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv", stem)
  if m:
    kind, lvl, _ = m.groups()
    if kind == "down":
      return f"down_blocks.{lvl}.downsamplers.0.conv.{leaf}"
    return f"up_blocks.{n_levels - 1 - int(lvl)}.upsamplers.0.conv.{leaf}"
  m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)", stem)
  if m:
    part, layer = m.groups()
    if part == "attn_1":
      return f"mid_block.attentions.0.{_ATTN[layer]}.{leaf}" if layer in _ATTN else None
    if layer not in _RESNET:
      return None
    return f"mid_block.resnets.{0 if part == 'block_1' else 1}.{_RESNET[layer]}.{leaf}"
  return None


def find_original_checkpoint(path: str | os.PathLike) -> Path | None:
  """The checkpoint file for `path`: the file itself (.pth/.pt/.ckpt), or a folder's `ckpt.pth` (ddim's log
  folder); None if neither."""
  p = Path(os.fspath(path))
  if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES:
    return p
  if p.is_dir() and (p / "ckpt.pth").is_file():
    return p / "ckpt.pth"
  return None


def load_original_checkpoint(path: str | os.PathLike, use_ema: bool = True, sample_size: int | None = None):
  """(spec, flax params, scheduler_config, diffusers config) for an original-layout checkpoint file or ddim log
  folder. The image size comes from `sample_size`, else the folder's config.yml (`data.image_size`), else 32
  (with a warning); the schedule from config.yml's `diffusion` section, else DDPM's linear 1e-4..0.02 x 1000."""
  ckpt = find_original_checkpoint(path)
  if ckpt is None:
    raise CheckpointError(f"{path}: expected a {'/'.join(CHECKPOINT_SUFFIXES)} checkpoint or a folder with ckpt.pth")
  state = _pick_state(load_torch_object(str(ckpt)), str(ckpt), use_ema)
  if not is_original_state_dict(state):
    raise CheckpointError(f"{ckpt}: not an original-DDPM (ddim / pytorch_diffusion) UNet state dict (no "
                          "temb.dense.0.weight / conv_in.weight); diffusers models are folders with config.json")
  cfg: dict[str, Any] = {}
  cfg_path = next((ckpt.parent / n for n in CONFIG_NAMES if (ckpt.parent / n).is_file()), None)
  if cfg_path is not None:
    cfg = _read_ddim_config(cfg_path)
  size = sample_size or (cfg.get("data") or {}).get("image_size")
  if size is None:
    log.warning("%s: no config.yml beside the checkpoint; assuming 32x32 images and DDPM's linear schedule "
                "(pass sample_size=... for other sizes)", ckpt)
    size = 32
  source = str(cfg_path or ckpt)
  dropout = float((cfg.get("model") or {}).get("dropout", 0.0))
  sd, config = convert_state_dict(state, int(size), dropout, source=str(ckpt))
  spec = UNetSpec.from_config(config, source=f"{ckpt} (inferred config)")
  params = torch_to_flax(sd, spec, source=str(ckpt))
  return spec, params, _scheduler_config(cfg, source), config
