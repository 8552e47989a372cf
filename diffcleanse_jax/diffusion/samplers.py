"""DDPM ancestral and DDIM samplers as one `lax.scan` (bit-for-bit the update rules of diffusers'
`DDPMScheduler.step` / `DDIMScheduler.step`).

A sampler maps an explicit x_T (B,H,W,C) — plain noise, or noise + trigger — and a PRNG key to x_0 in
[-1,1]-ish space (not clamped; `to_images01` clamps for display/metrics). Everything is a pure function of its
inputs, jit-able and differentiable (`remat=True` wraps the step in `jax.checkpoint` so `jax.grad` through a
short sampler keeps memory at one step's activations).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax.diffusion.schedules import Schedule, schedule_from_config

EpsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, x (B,H,W,C), t (B,)) -> eps
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
SAMPLERS = ("ddpm", "ddim")


class SamplerError(ValueError):
  """Bad sampler settings (names the setting and what was expected)."""


def inference_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> np.ndarray:
  """diffusers `set_timesteps`: descending int timesteps, e.g. 1000/20 leading -> 950, 900, ..., 0."""
  T = int(num_train_timesteps)
  if not 1 <= int(num_steps) <= T:
    raise SamplerError(f"sampler num_steps={num_steps} must be in [1, {T}]")
  n = int(num_steps)
  if spacing == "leading":
    ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
  elif spacing == "linspace":
    ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
  else:
    raise SamplerError(f"scheduler timestep_spacing={spacing!r} is not supported; expected leading, trailing "
                       "or linspace")
  return ts


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample. `clip_sample=True` clamps x0-hat to [-1,1] each step (= inference-time clipping defence)."""

  method: str = "ddpm"
  num_steps: int | None = None  # None: all training steps for ddpm, 50 for ddim
  eta: float = 0.0  # ddim only
  clip_sample: bool = False
  variance_type: str = "fixed_small"  # ddpm only
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  clip_sample_range: float = 1.0  # clip_sample clamps x0-hat to [-range, range]
  set_alpha_to_one: bool = True  # ddim only: abar before the last step is 1 (else abar_0), diffusers' DDIM flag

  def validate(self) -> "SamplerConfig":
    if self.method not in SAMPLERS:
      raise SamplerError(f"sampler method={self.method!r} is not supported; expected one of {', '.join(SAMPLERS)}")
    if self.variance_type not in VARIANCE_TYPES:
      raise SamplerError(f"sampler variance_type={self.variance_type!r} is not supported; expected one of "
                         f"{', '.join(VARIANCE_TYPES)}")
    if not 0.0 <= float(self.eta) <= 1.0:
      raise SamplerError(f"sampler eta={self.eta} must be in [0, 1]")
    if not float(self.clip_sample_range) > 0:
      raise SamplerError(f"sampler clip_sample_range={self.clip_sample_range} must be > 0")
    return self

  @classmethod
  def from_scheduler_config(cls, scheduler_config: Mapping[str, Any] | None, **overrides) -> "SamplerConfig":
    """Defaults from a diffusers scheduler_config.json; `overrides` that are not None win."""
    sc = dict(scheduler_config or {})
    kw: dict[str, Any] = {}
    if "DDIM" in str(sc.get("_class_name", "")):
      kw["method"] = "ddim"
    for k in ("clip_sample", "variance_type", "timestep_spacing", "steps_offset", "clip_sample_range",
              "set_alpha_to_one"):
      if k in sc and sc[k] is not None:
        kw[k] = sc[k]
    if kw.get("variance_type") not in (None, *VARIANCE_TYPES):
      kw.pop("variance_type")  # learned variances etc. are not produced by epsilon-only UNet2DModels
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw).validate()


def step_arrays(schedule: Schedule, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The chain's (timesteps, abar_t, abar_prev), each (num_steps,), in sampling order (t descending)."""
  T = schedule.num_train_timesteps
  n = cfg.num_steps or (T if cfg.method == "ddpm" else 50)
  ts = inference_timesteps(T, n, cfg.timestep_spacing, cfg.steps_offset)
  prev = ts - T // n
  acp = schedule.alphas_cumprod
  a_t = acp[ts]
  final = 1.0 if cfg.method == "ddpm" or cfg.set_alpha_to_one else acp[0]
  a_prev = np.where(prev >= 0, acp[np.clip(prev, 0, T - 1)], final)
  return ts, a_t, a_prev


def _ddpm_update(x, eps, noise, t, a_t, a_prev, clip, variance_type, clip_range=1.0):
  b_t, b_prev = 1 - a_t, 1 - a_prev
  cur_a = a_t / a_prev
  cur_b = 1 - cur_a
  x0 = (x - jnp.sqrt(b_t) * eps) / jnp.sqrt(a_t)
  if clip:
    x0 = jnp.clip(x0, -clip_range, clip_range)
  mean = (jnp.sqrt(a_prev) * cur_b / b_t) * x0 + (jnp.sqrt(cur_a) * b_prev / b_t) * x
  var_small = jnp.maximum(b_prev / b_t * cur_b, 1e-20)
  if variance_type in ("fixed_small", "fixed_small_log"):
    std = jnp.sqrt(var_small)
  else:
    std = jnp.sqrt(cur_b)
  return mean + jnp.where(t > 0, std, 0.0) * noise, x0


def _ddim_update(x, eps, noise, t, a_t, a_prev, clip, eta, clip_range=1.0):
  b_t = 1 - a_t
  x0 = (x - jnp.sqrt(b_t) * eps) / jnp.sqrt(a_t)
  if clip:
    x0 = jnp.clip(x0, -clip_range, clip_range)
  var = (1 - a_prev) / b_t * (1 - a_t / a_prev)
  std = eta * jnp.sqrt(var)
  direction = jnp.sqrt(jnp.maximum(1 - a_prev - std ** 2, 0.0)) * eps
  out = jnp.sqrt(a_prev) * x0 + direction
  return out + std * noise, x0


def denoise_step(eps_fn: EpsFn, params, cfg: SamplerConfig, key: jax.Array, x: jax.Array, i, t, a_t, a_prev):
  """One reverse step x_t -> x_prev (B,H,W,C) of the chain: step index i (its noise is normal(fold_in(key, i))),
  integer timestep t, abar_t and abar_prev (from `step_arrays`)."""
  eps = eps_fn(params, x, jnp.full((x.shape[0],), t, jnp.int32)).astype(jnp.float32)
  stochastic = cfg.method == "ddpm" or cfg.eta > 0
  noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) if stochastic else jnp.zeros_like(x)
  if cfg.method == "ddpm":
    x_new, _ = _ddpm_update(x, eps, noise, t, a_t, a_prev, cfg.clip_sample, cfg.variance_type,
                            float(cfg.clip_sample_range))
  else:
    x_new, _ = _ddim_update(x, eps, noise, t, a_t, a_prev, cfg.clip_sample, cfg.eta, float(cfg.clip_sample_range))
  return x_new


def sample_loop(eps_fn: EpsFn, params, x_T: jax.Array, key: jax.Array, schedule: Schedule,
                cfg: SamplerConfig, *, return_trajectory: bool = False, remat: bool = False, start: int = 0,
                stop: int | None = None):
  """Runs the whole reverse chain in one `lax.scan`.

  Returns x_0 (B,H,W,C) float32, or (x_0, trajectory (num_steps+1, B,H,W,C): x_T first, x_0 last) when
  `return_trajectory`. Per-step noise comes from `fold_in(key, step index)`, so it is the same for every x_T of
  the same shape (common random numbers, used by trigger inversion). `start`/`stop`: run only the chain's steps
  [start, stop) from x_T = the state before step `start` (same timesteps and noise as inside the whole chain).
  """
  cfg = cfg.validate()
  ts, a_t, a_prev = step_arrays(schedule, cfg)
  sl = slice(int(start), None if stop is None else int(stop))
  xs = (jnp.arange(len(ts))[sl], jnp.asarray(ts, jnp.int32)[sl], jnp.asarray(a_t, jnp.float32)[sl],
        jnp.asarray(a_prev, jnp.float32)[sl])

  def step(x, inp):
    x_new = denoise_step(eps_fn, params, cfg, key, x, *inp)
    return x_new, (x_new if return_trajectory else None)

  if remat:
    step = jax.checkpoint(step)
  x0, traj = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
  if return_trajectory:
    return x0, jnp.concatenate([x_T[None].astype(jnp.float32), traj], axis=0)
  return x0


def to_images01(x: jax.Array) -> jax.Array:
  """Pipeline output convention: clamp(x/2 + 1/2, 0, 1)."""
  return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------- model-level API
def _resolve(model, method, num_steps, clip_sample, **kw) -> tuple[Schedule, SamplerConfig]:
  sc = getattr(model, "scheduler_config", None)
  cfg = SamplerConfig.from_scheduler_config(sc, method=method, num_steps=num_steps, clip_sample=clip_sample, **kw)
  return schedule_from_config(sc), cfg


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule_key", "cfg", "return_trajectory", "remat"))
def _jitted_loop(eps_fn, params, x_T, key, schedule_key, cfg, return_trajectory, remat):
  schedule = Schedule(np.asarray(schedule_key, np.float64))
  return sample_loop(eps_fn, params, x_T, key, schedule, cfg, return_trajectory=return_trajectory, remat=remat)


def _run(model, params, x_T, key, schedule, cfg, return_trajectory):
  return _jitted_loop(model.apply, params, x_T, key, tuple(schedule.betas.tolist()), cfg, return_trajectory, False)


def ddpm_sample(model, params, x_T, key, num_steps: int | None = None, *, clip_sample: bool | None = None,
                variance_type: str | None = None, return_trajectory: bool = False):
  """DDPM ancestral sampling from an explicit x_T (B,H,W,C); `model` has `.apply(params, x, t)` and
  `.scheduler_config`. num_steps None = every training step. Returns x_0 (unclamped) [, trajectory]."""
  schedule, cfg = _resolve(model, "ddpm", num_steps, clip_sample, variance_type=variance_type)
  return _run(model, params, x_T, key, schedule, cfg, return_trajectory)


def ddim_sample(model, params, x_T, key, num_steps: int = 50, *, eta: float = 0.0, clip_sample: bool | None = None,
                return_trajectory: bool = False):
  """DDIM sampling (eta=0: deterministic) from x_T (B,H,W,C). Returns x_0 (unclamped) [, trajectory]."""
  schedule, cfg = _resolve(model, "ddim", num_steps, clip_sample, eta=eta)
  return _run(model, params, x_T, key, schedule, cfg, return_trajectory)


def sample(model, params, x_T, key, cfg: SamplerConfig, *, return_trajectory: bool = False):
  """Samples with an explicit `SamplerConfig` (the schedule comes from `model.scheduler_config`)."""
  schedule = schedule_from_config(getattr(model, "scheduler_config", None))
  return _run(model, params, x_T, key, schedule, cfg.validate(), return_trajectory)
