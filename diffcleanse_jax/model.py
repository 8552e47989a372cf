"""The user-facing model object: a UNet spec, its parameters and its scheduler config.

`model.apply(params, x, t)` -> predicted epsilon, x NHWC float32 in [-1,1], t integer timesteps (B,).
`model.apply` is a hashable value (equal for equal specs), so jitted samplers are compiled once per architecture.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from diffcleanse_jax.diffusion.schedules import Schedule, schedule_from_config, validate_scheduler_config
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER
from diffcleanse_jax.models.unet import ConfigError, UNet2DModel, UNetSpec, count_params, init_params


@dataclasses.dataclass(frozen=True)
class EpsFn:
  """epsilon_theta as a pure, hashable function of (params, x (B,H,W,C), t (B,)) -> (B,H,W,out_channels)."""

  spec: UNetSpec

  def __call__(self, params, x, t, *, train: bool = False, rngs=None):
    return UNet2DModel(self.spec).apply({"params": params}, x, t, train, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _jitted(fn: EpsFn):
  """One compiled forward per architecture (EpsFn hashes by spec)."""
  return jax.jit(fn)


class DiffusionModel:
  """A diffusion model: `.config` (diffusers dict), `.params` (pytree), `.scheduler_config` (dict), `.apply`.

  Only epsilon predictors on a beta schedule: out_channels == in_channels, and a scheduler config that
  `validate_scheduler_config` accepts (else ConfigError / SchedulerConfigError naming `source`)."""

  def __init__(self, spec: UNetSpec, params, scheduler_config: Mapping[str, Any] | None = None,
               source: str | None = None, metadata: Mapping[str, Any] | None = None):
    where = source or "model"
    if spec.out_channels != spec.in_channels:
      raise ConfigError(f"{where}: out_channels={spec.out_channels} but in_channels={spec.in_channels}; the UNet "
                        "must predict epsilon (out_channels == in_channels; learned-variance UNets are not "
                        "supported)")
    validate_scheduler_config(scheduler_config, f"{where} (scheduler config)")
    self.spec = spec
    self.params = params
    self.scheduler_config = dict(scheduler_config if scheduler_config is not None else DEFAULT_SCHEDULER)
    self.source = source
    self.metadata = dict(metadata or {})

  @classmethod
  def from_config(cls, config: Mapping[str, Any], key: jax.Array | int = 0,
                  scheduler_config: Mapping[str, Any] | None = None, source: str = "model config"):
    """A randomly initialised model for a diffusers-style config dict (strict: typos are errors)."""
    spec = UNetSpec.from_config(config, source=source)
    key = jax.random.key(key) if isinstance(key, int) else key
    return cls(spec, init_params(spec, key), scheduler_config)

  @property
  def config(self) -> dict[str, Any]:
    return self.spec.to_config()

  @property
  def apply(self) -> EpsFn:
    return EpsFn(self.spec)

  @property
  def module(self) -> UNet2DModel:
    return UNet2DModel(self.spec)

  @property
  def schedule(self) -> Schedule:
    return schedule_from_config(self.scheduler_config)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    s = self.spec.sample_size or 32
    return (s, s, self.spec.in_channels)

  @property
  def num_params(self) -> int:
    return count_params(self.params)

  def replace(self, **kw) -> "DiffusionModel":
    d = dict(spec=self.spec, params=self.params, scheduler_config=self.scheduler_config, source=self.source,
             metadata=self.metadata)
    d.update(kw)
    return DiffusionModel(**d)

  def __call__(self, x, t):
    """epsilon_theta(x (B,H,W,C) in [-1,1] scale, t (B,) ints), as one compiled program per architecture."""
    return _jitted(self.apply)(self.params, jnp.asarray(x), jnp.asarray(t))

  def __repr__(self):
    return (f"DiffusionModel({self.num_params:,} params, image {self.image_shape}, widths "
            f"{'pruned' if self.spec.widths else 'default'}, source={self.source!r})")
