"""Noise schedules (betas, alphas, cumulative products) as used by diffusers' DDPM/DDIM schedulers.

All arrays are float64 numpy on the host (exact, and cheap to index); samplers cast them to float32
device arrays once per compiled program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
# diffusers schedulers over the same discrete-time (variance-preserving) beta schedule: a checkpoint saved with
# any of them is sampled here with DDPM/DDIM over the betas its config defines.
BETA_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "DDIMInverseScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "FlaxDDPMScheduler", "FlaxDDIMScheduler", "FlaxPNDMScheduler")
# Schedulers of other diffusion families (variance-exploding, continuous-time, flow matching, consistency): a
# UNet trained for them does not predict the epsilon of the beta schedule above.
OTHER_FAMILY_SCHEDULERS = (
    "ScoreSdeVeScheduler", "ScoreSdeVpScheduler", "KarrasVeScheduler", "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler", "CMStochasticIterativeScheduler", "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler", "FlaxScoreSdeVeScheduler", "FlaxKarrasVeScheduler")


class SchedulerConfigError(ValueError):
  """A scheduler config this toolkit cannot honour (names the source, the field and what was expected)."""


def validate_scheduler_config(cfg: Mapping[str, Any] | None, source: str = "scheduler config") -> None:
  """Rejects scheduler settings that the samplers, inversion and fine-tuning here would silently get wrong.

  Everything in this toolkit treats the UNet as an epsilon predictor on a discrete beta schedule, so: the
  scheduler family must be a beta-schedule one, `prediction_type` must be 'epsilon', the betas must be
  buildable, and options that change them or the x0 estimate (`rescale_betas_zero_snr`, `thresholding`) are
  refused. Raises SchedulerConfigError naming `source` and the field.
  """
  cfg = dict(cfg or {})

  def fail(field, msg):
    raise SchedulerConfigError(f"{source}: {field} {msg}")

  cls = cfg.get("_class_name")
  if cls is not None and cls not in BETA_SCHEDULERS:
    if cls in OTHER_FAMILY_SCHEDULERS or not any(k in cfg for k in ("beta_schedule", "trained_betas")):
      fail("_class_name", f"is {cls!r}, not a beta-schedule (DDPM-family) scheduler; expected one of "
                          f"{', '.join(BETA_SCHEDULERS[:6])}, ...")
  pred = cfg.get("prediction_type", "epsilon")
  if pred not in (None, "epsilon"):
    fail("prediction_type", f"is {pred!r}; only epsilon-prediction models are supported (expected 'epsilon')")
  for key in ("rescale_betas_zero_snr", "thresholding"):
    if cfg.get(key):
      fail(key, "is true; not supported (expected false or absent)")
  n = cfg.get("num_train_timesteps", 1000)
  if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or int(n) < 2:
    fail("num_train_timesteps", f"is {n!r}; expected an integer >= 2")
  trained = cfg.get("trained_betas")
  if trained is not None:
    try:
      b = np.asarray(trained, dtype=np.float64)
    except (TypeError, ValueError):
      fail("trained_betas", "is not a list of numbers")
    if b.ndim != 1 or b.shape[0] != int(n):
      fail("trained_betas", f"has shape {b.shape}; expected ({int(n)},) = num_train_timesteps")
    if not np.all((b > 0) & (b < 1)):
      fail("trained_betas", "has values outside (0, 1)")
  else:
    sched = cfg.get("beta_schedule", "linear")
    if sched not in BETA_SCHEDULES:
      fail("beta_schedule", f"is {sched!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    for key, default in (("beta_start", 1e-4), ("beta_end", 0.02)):
      v = cfg.get(key, default)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        fail(key, f"is {v!r}; expected a number in (0, 1)")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete diffusion schedule with T = len(betas) training steps (t = 0..T-1)."""

  betas: np.ndarray  # (T,)

  @property
  def num_train_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.betas

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """Cumulative product computed in float32 like diffusers (matters near t = T-1, where abar ~ 4e-5)."""
    return np.cumprod((1.0 - self.betas.astype(np.float32)).astype(np.float32), dtype=np.float32).astype(np.float64)

  def rho(self) -> np.ndarray:
    """BadDiffusion's epsilon-target coefficient rho_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t, shape (T,)."""
    a = self.alphas
    return (1.0 - np.sqrt(a)) * np.sqrt(1.0 - self.alphas_cumprod) / self.betas


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  # diffusers betas_for_alpha_bar(alpha_transform_type="cosine")
  def abar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array(
      [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)],
      dtype=np.float64)


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: Any = None) -> np.ndarray:
  """Betas exactly as diffusers builds them (float32 arithmetic, then widened)."""
  if trained_betas is not None:
    return np.asarray(trained_betas, dtype=np.float32).astype(np.float64)
  if beta_schedule == "linear":
    b = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
  elif beta_schedule == "scaled_linear":
    b = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
  elif beta_schedule in ("squaredcos_cap_v2", "cosine"):
    b = _cosine_betas(num_train_timesteps).astype(np.float32)
  else:
    raise ValueError(f"scheduler beta_schedule={beta_schedule!r} is not supported; expected one of {BETA_SCHEDULES}")
  return b.astype(np.float64)


def make_schedule(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, trained_betas: Any = None) -> Schedule:
  """Builds a `Schedule`; defaults are the DDPM paper's (linear 1e-4 -> 0.02, 1000 steps)."""
  if int(num_train_timesteps) < 2:
    raise ValueError(f"scheduler num_train_timesteps must be >= 2, got {num_train_timesteps}")
  return Schedule(make_betas(beta_schedule, int(num_train_timesteps), beta_start, beta_end, trained_betas))


def schedule_from_config(cfg: Mapping[str, Any] | None) -> Schedule:
  """`Schedule` from a diffusers `scheduler_config.json` dict (or our config's `scheduler` section)."""
  cfg = dict(cfg or {})
  return make_schedule(
      beta_schedule=cfg.get("beta_schedule", "linear"),
      num_train_timesteps=cfg.get("num_train_timesteps", 1000),
      beta_start=cfg.get("beta_start", 1e-4),
      beta_end=cfg.get("beta_end", 0.02),
      trained_betas=cfg.get("trained_betas"),
  )
