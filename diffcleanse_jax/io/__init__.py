"""Checkpoint I/O without torch: torch zip pickles, safetensors, and diffusers UNet2DModel folders.

- `load_torch_state_dict(path)`: a torch `.bin`/`.pth`/`.pt` checkpoint (zip format, or the pre-1.6
  magic-number format) -> {name: np.ndarray}, through a restricted unpickler (no code in the file ever runs).
- `load_safetensors(path)` / `save_safetensors(tensors, path, metadata)`: numpy safetensors (BF16 included),
  atomic writes.
- `load_diffusers_folder(path)` / `save_diffusers_folder(...)`: a diffusers `UNet2DModel` folder (or a
  `DDPMPipeline` folder with `unet/` and `scheduler/`) <-> (UNetSpec, flax params, scheduler config).
- `torch_to_flax` / `flax_to_torch`: the name and layout map between the two.

Every unreadable, corrupt, refused or mismatching file raises `CheckpointError` (a `ValueError`) naming the file.
"""
from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the file and the problem."""


# Submodules import CheckpointError from here, so it must be defined before these imports.
from diffcleanse_jax.io.safetensors_io import (  # noqa: E402
    load_safetensors, read_safetensors_metadata, save_safetensors)
from diffcleanse_jax.io.torch_pickle import load_torch_state_dict  # noqa: E402
from diffcleanse_jax.io.diffusers import (  # noqa: E402
    flax_to_torch, load_diffusers_folder, load_state_dict, save_diffusers_folder, torch_to_flax)

__all__ = [
    "CheckpointError", "load_torch_state_dict", "load_safetensors", "save_safetensors", "read_safetensors_metadata",
    "load_state_dict",
    "torch_to_flax", "flax_to_torch", "load_diffusers_folder", "save_diffusers_folder",
]
