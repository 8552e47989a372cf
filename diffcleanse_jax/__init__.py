"""diffcleanse_jax: attack, audit and repair diffusion models in JAX/Flax.

Public API (diffusers-like names): `load_pretrained`, `save_pretrained`, `DiffusionModel`, `ddpm_sample`,
`ddim_sample`, `sample`, `SamplerConfig`, `to_images01`.
"""
from diffcleanse_jax.diffusion.samplers import SamplerConfig, ddim_sample, ddpm_sample, sample, to_images01
from diffcleanse_jax.io.native import load_pretrained, save_pretrained
from diffcleanse_jax.model import DiffusionModel

__all__ = ["DiffusionModel", "SamplerConfig", "ddim_sample", "ddpm_sample", "load_pretrained", "sample",
           "save_pretrained", "to_images01"]
