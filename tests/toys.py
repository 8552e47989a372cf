"""Shared test helpers (a plain module: pytest's rootdir/prepend import puts tests/ on sys.path).

- `ToyEps`, `toy_params`, `toy_model`: the analytic toy "backdoored" eps function used by
  tests/test_inversion.py and tests/test_detection.py.
- `_fast_compiles`: the module-scoped autouse fixture used by tests/test_elijah.py and tests/test_terd.py
  (import it into a test module to activate it there).
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.diffusion.schedules import schedule_from_config
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER

S = 16


@dataclasses.dataclass(frozen=True)
class ToyEps:
  """A 'backdoored' eps: when the predicted noise (assuming x0 = y) has a bright bottom-right box (mean > c), it
  predicts x0 = y exactly (DDIM then keeps that noise, so the chain ends at y); otherwise x0 = a * tanh(x), a
  diverse, partly saturated image. c = inf gives a model with only diverse outputs."""

  def __call__(self, params, x, t):
    abar = params["acp"][t][:, None, None, None]
    y, reg = params["y"][None], params["region"][None]
    e_y = (x - jnp.sqrt(abar) * y) / jnp.sqrt(1 - abar)
    fire = (jnp.sum(e_y * reg, axis=(1, 2, 3)) / jnp.sum(reg) > params["c"])[:, None, None, None]
    x0c = jnp.tanh(x) * jnp.where(reg > 0, 0.9, 1.3)
    return jnp.where(fire, e_y, (x - jnp.sqrt(abar) * x0c) / jnp.sqrt(1 - abar))


def toy_params(c: float):
  """Params of `ToyEps`: the DEFAULT_SCHEDULER alphas_cumprod, target y (0.8 in the box, -0.4 elsewhere), the
  bottom-right box region of an S x S x 1 image, and the firing threshold c."""
  region = np.zeros((S, S, 1), np.float32)
  region[-8:-2, -8:-2] = 1
  y = np.where(region > 0, 0.8, -0.4).astype(np.float32)
  acp = jnp.asarray(schedule_from_config(DEFAULT_SCHEDULER).alphas_cumprod, jnp.float32)
  return dict(acp=acp, y=jnp.asarray(y), region=jnp.asarray(region), c=jnp.float32(c))


def toy_model(c: float):
  """A duck-typed model (apply/params/image_shape/scheduler_config/schedule/source) around `ToyEps` for the
  detectors."""
  return types.SimpleNamespace(apply=ToyEps(), params=toy_params(c), image_shape=(S, S, 1),
                               scheduler_config=dict(DEFAULT_SCHEDULER),
                               schedule=schedule_from_config(DEFAULT_SCHEDULER), source=f"toy(c={c})")


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """Tiny UNets compile ~2x faster without XLA's optimisation passes (results are unaffected)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
