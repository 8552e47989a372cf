"""Named UNet2DModel configs (diffusers keys) and their schedulers.

`ddpm-cifar10-32` and `ddpm-ema-celebahq-256` are the architectures of the public google/* checkpoints
(ALGORITHMS.md §9); `fmnist-cpu` is a small model for 32x32 grayscale work on a laptop CPU; `tiny` is for tests.
"""
from __future__ import annotations

import copy
from typing import Any

_LEGACY = dict(center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
               mid_block_scale_factor=1, downsample_padding=0, act_fn="silu", attention_head_dim=None,
               norm_num_groups=32, norm_eps=1e-6, layers_per_block=2, dropout=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "ddpm-cifar10-32": dict(
        _LEGACY, sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    "ddpm-ema-celebahq-256": dict(
        _LEGACY, sample_size=256, in_channels=3, out_channels=3, block_out_channels=[128, 128, 256, 256, 512, 512],
        down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4),
    # ~0.69M parameters, 0.18 GFLOP per forward: 32x32x1, attention at 8x8, trains in minutes on 2 CPU cores.
    "fmnist-cpu": dict(
        _LEGACY, sample_size=32, in_channels=1, out_channels=1, block_out_channels=[16, 32, 64],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8),
    # For unit tests: a few thousand parameters, attention at both levels.
    "tiny": dict(
        _LEGACY, sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1, norm_num_groups=4),
}

# diffusers DDPMScheduler settings used by BadDiffusion/Diff-Cleanse runs (`-sc DDPM-SCHED --fclip o`).
DEFAULT_SCHEDULER: dict[str, Any] = dict(
    _class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
    variance_type="fixed_small", clip_sample=False, prediction_type="epsilon", timestep_spacing="leading",
    steps_offset=0)


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of a preset's diffusers config dict."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
  return copy.deepcopy(PRESETS[name])
