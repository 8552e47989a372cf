"""BadDiffusion / VillanDiffusion training objective (`IBM/BadDiffusion: loss.py`, `q_sample_diffuser`).

Poisoned forward process for a pair (target y, poisoned image r), t = 0..T-1:

  one-step kernel  q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1} + (1 - sqrt(alpha_t)) r, beta_t I),
  marginal         q(x_t | y)       = N(sqrt(abar_t) y + (1 - sqrt(abar_t)) r, (1 - abar_t) I).

Derivation of the epsilon target. In the shifted frame u = x - r the kernel reads
u_t = sqrt(alpha_t) u_{t-1} + sqrt(beta_t) z, i.e. a standard DDPM chain started at u_0 = y - r. So the
posterior mean is the standard one, shifted back:

  mu_tilde = r + c0 (y - r) + c1 (x_t - r),  c0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t),
                                             c1 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),

and, by the usual DDPM identity in the u frame with x_t = sqrt(abar_t) y + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps,
mu_tilde = r + (x_t - r - k eps) / sqrt(alpha_t) with k = beta_t / sqrt(1 - abar_t). The sampler keeps the
standard parameterisation mu_theta = (x_t - k eps_theta) / sqrt(alpha_t); equating gives
k eps_theta = k eps + (1 - sqrt(alpha_t)) r, i.e.

  eps_theta = eps + rho_t r,   rho_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t

(`R_coef_t` in the reference; rho_0 ~ 0.0050, rho_500 ~ 0.481, rho_999 ~ 0.5025 for the linear DDPM schedule).
Clean samples are r = 0, x0 = x (plain DDPM). VillanDiffusion (psi = 1) uses the same x_t and, for ODE
samplers (`solver="ode"`), the doubled target eps + 2 rho_t r.

All functions take numpy or jax arrays: with only numpy inputs they compute in numpy (float64 stays float64);
with any jax input they use jax.numpy (jit-safe). Schedule tables are cast to the dtype of the images.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SOLVERS = ("sde", "ode")


class ObjectiveError(ValueError):
  """Bad solver type or table."""


def _xp(*arrays):
  import jax
  import jax.numpy as jnp
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _gather(table: Any, t: Any, like: Any, xp) -> Any:
  """table[t] reshaped to broadcast against `like` (B, ...), in like's dtype."""
  dtype = like.dtype
  if xp is np:
    col = np.asarray(table)[np.asarray(t)].astype(dtype)
  else:
    col = xp.asarray(table, dtype=dtype)[t]
  return col.reshape(col.shape + (1,) * (like.ndim - col.ndim))


def rho(schedule) -> np.ndarray:
  """rho_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t, (T,) float64 (`Schedule.rho()`)."""
  return schedule.rho()


def baddiffusion_inputs(x0: Any, r: Any, eps: Any, t: Any, alphas_cumprod: Any) -> Any:
  """x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps.

  x0 (target y or clean x), r (poisoned image, 0 for clean), eps: (B, H, W, C); t: (B,) int in [0, T);
  alphas_cumprod: (T,). Returns (B, H, W, C).
  """
  xp = _xp(x0, r, eps, t, alphas_cumprod)
  if xp is np and isinstance(alphas_cumprod, np.ndarray):
    sa, s1 = np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)  # float64 on the host, then cast
  else:
    ac = xp.asarray(alphas_cumprod)
    sa, s1 = xp.sqrt(ac), xp.sqrt(1.0 - ac)
  sa_t = _gather(sa, t, x0, xp)
  s1_t = _gather(s1, t, x0, xp)
  return sa_t * x0 + (1 - sa_t) * r + s1_t * eps


def eps_coef_scale(solver: str) -> float:
  """Multiplier of rho_t in the epsilon target: 1 for "sde" (BadDiffusion), 2 for "ode" (VillanDiffusion)."""
  if solver not in SOLVERS:
    raise ObjectiveError(f"solver must be one of {SOLVERS}, got {solver!r}")
  return 1.0 if solver == "sde" else 2.0


def baddiffusion_eps_target(eps: Any, r: Any, t: Any, rho_table: Any, solver: str = "sde") -> Any:
  """eps + s rho_t r with s = 1 ("sde") or 2 ("ode"); eps, r (B, H, W, C), t (B,) int, rho_table (T,)."""
  scale = eps_coef_scale(solver)
  xp = _xp(eps, r, t, rho_table)
  rho_t = _gather(rho_table, t, eps, xp)
  return eps + (scale * rho_t) * r


def baddiffusion_loss(eps_pred: Any, eps_target: Any) -> Any:
  """MSE, mean over all elements (the reference's F.mse_loss)."""
  xp = _xp(eps_pred, eps_target)
  return xp.mean(xp.square(eps_pred - eps_target))
