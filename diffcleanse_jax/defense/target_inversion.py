"""Trigger inversion towards the collapse target (our stage-1 option, `detection.trigger_from='target'`).

Why. A flagged model's BBTI pattern collapses the inversion's fixed noise batch onto one image under the short
chain it was fitted on, but it is fitted to those B noises and that chain: on fresh noise under DDPM-1000 it often
misses (zoo smbox-cat-p0.2: ASR 0.047, docs/RESULTS.md "Session 13"), and neither the BBTI losses on fresh noise nor
Elijah's shift objective fixed that. The collapsed image itself, however, is the backdoor target (smbox-cat: MSE
1e-3 to the true CAT). Given that estimate y_hat, the trigger is the r for which the frozen model's noise
prediction matches BadDiffusion's poisoned forward process at every timestep (ALGORITHMS §2.1):

    x_t(r) = sqrt(abar_t) y_hat + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps,
    L(r)   = E_{t ~ U{t_min..T-1}, eps ~ N(0, I)} mean_pix (eps_theta(x_t(r), t) - eps - rho_t r)^2,
    rho_t  = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t.

Elijah's objective is the t = T-1 term of this (abar_T ~ 0, rho_T ~ 0.5 = its lambda) with the mean over eps
taken inside; the other timesteps are what the target adds. Like Elijah, it assumes the BadDiffusion threat model
(an additive trigger on the noise). Only the model, y_hat (from the model's own samples) and fresh noise are used:
no training data, no true trigger or target.

`collapse_target(images01)`: y_hat = the mean of the anchor with the most neighbours and those neighbours in the
BBTI similarity graph (`inversion.target_sets`: cosine > sim_threshold, near-black/white images excluded; the
detector passes the inversion's own thresholds), in [-1, 1].
`invert_toward_target(model, y_hat, cfg, key)`: Adam on r from the constant r_0 = init_value, `num_iters` steps, each
on a fresh batch of `batch_size` (t, eps) pairs (python loop over one jitted step, as defense/elijah.py). Config
keys: `DEFAULTS`. r_0 = -1 (black) and not 0: a BadDiffusion trigger is -1 outside its stamp, and the poisoned
training inputs carry a clean image there, so the loss is flat in the background directions a clean image can take;
from r_0 = 0 (a uniform grey no clean image has) the zoo's box14-hat-p0.1 and stop14-corner-p0.1 did not converge
for 3 of 4 keys (final loss ~0.008, DDPM-1000 ASR 0-0.05), from r_0 = -1 every key tried did (loss ~0.004, ASR
0.94-1; docs/RESULTS.md "Session 13").

Refinement (`refine_rounds`, `refine_batch_size`; the loop is `detection.target_trigger`). A weak backdoor's MSCR
pattern may collapse only 2 of the 16 fixed noises, so y_hat is the mean of 2 samples (zoo box14-shoe-p0.05: MSE
3.7e-3 to the true shoe; its trigger reached DDPM-1000 ASR 0.55-0.72). The trigger inverted towards it collapses far
more of a fresh fixed batch (56 of 64 under the same DDPM-50 chain), and that cluster's mean is a much better
target (MSE 1.3e-4). One more inversion towards it raised the ASR to 0.95 (the true shoe as target: 0.97). A round is kept only when its cluster is
a larger share of its batch than the previous one (docs/RESULTS.md "Session 14"). For round 1 the previous share is,
by default, the MSCR pattern's share of the inversion's own batch, which the optimisation picked because it
collapsed there, so it may be biased upwards. `refine_compare = 'same_batch'` runs the pattern on the same fresh
batch as well and compares the two there. On zoo user-cat-p0.05 (pattern 12 of 16, first trigger 39 of 64, round
dropped, reported trigger's DDPM-1000 ASR 0.30) it decides the same way: the pattern collapses 48 of the 64 fresh
noises itself, so the inverted trigger is the weaker of the two there (docs/RESULTS.md "Session 21").
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffcleanse_jax.diffusion.schedules import schedule_from_config

DEFAULTS: dict[str, Any] = dict(
    num_iters=200,      # Adam steps
    lr=0.05,            # Adam learning rate on r (pixel units, [-1, 1] images)
    batch_size=32,      # fresh (t, eps) pairs per step
    t_min=0,            # t ~ U{t_min..T-1}
    init_value=-1.0,    # r_0: a constant image; -1 = black, the background of BadDiffusion's triggers (module doc)
    cosine_decay=False,  # Adam lr decays to 0 along a cosine over num_iters
    refine_rounds=1,    # detection.target_trigger: re-estimate y_hat from the inverted trigger's own collapse
    refine_batch_size=64,  # fixed noises of each refinement pass (the inversion's chain)
    refine_compare="pattern",  # round 1 is kept if its share beats: 'pattern' the MSCR pattern's share of its own
                               # (optimised) batch (session 14); 'same_batch' the pattern's share of the same fresh
                               # refine batch (one more sampling pass; later rounds compare on that batch anyway)
)
REFINE_COMPARE = ("pattern", "same_batch")


class TargetInversionError(ValueError):
  """Bad settings or inputs of the target inversion."""


class NoCollapseError(TargetInversionError):
  """No two images of the batch agree: there is no target to invert towards."""


def settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """DEFAULTS updated with the known keys of `cfg` (a mapping or ConfigDict; None = defaults), validated."""
  d = dict(DEFAULTS)
  if cfg is not None:
    src = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d.update({k: v for k, v in src.items() if k in DEFAULTS and v is not None})
  if int(d["num_iters"]) < 1 or int(d["batch_size"]) < 1 or float(d["lr"]) <= 0:
    raise TargetInversionError(f"detection.target_trigger: num_iters={d['num_iters']}, batch_size="
                               f"{d['batch_size']} must be >= 1 and lr={d['lr']} > 0")
  if int(d["refine_rounds"]) < 0 or int(d["refine_batch_size"]) < 2:
    raise TargetInversionError(f"detection.target_trigger: refine_rounds={d['refine_rounds']} must be >= 0 and "
                               f"refine_batch_size={d['refine_batch_size']} >= 2")
  if d["refine_compare"] not in REFINE_COMPARE:
    raise TargetInversionError(f"detection.target_trigger: refine_compare={d['refine_compare']!r}; expected one of "
                               f"{', '.join(REFINE_COMPARE)}")
  return d


def collapse_target(images01: np.ndarray, sim_threshold: float = 0.999, black_threshold: float = 0.01,
                    white_threshold: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
  """The image a batch collapsed onto. images01: (B,H,W,C) in [0,1]. Returns (y_hat (H,W,C) in [-1,1], members
  (B,) bool: the anchor with the most neighbours (cosine > sim_threshold) and those neighbours). Raises
  NoCollapseError when no two usable images agree."""
  from diffcleanse_jax.defense.inversion import target_sets

  im = np.asarray(images01, np.float64)
  edges = np.asarray(target_sets(jnp.asarray(im, jnp.float32), sim_threshold, black_threshold,
                                 white_threshold).edges)
  linked = edges | edges.T
  anchor = int(np.argmax(linked.sum(axis=1)))
  if not linked[anchor].any():
    raise NoCollapseError(f"no two of the {im.shape[0]} images agree to cosine > {sim_threshold}: "
                          "there is no collapse to take a target from")
  members = linked[anchor].copy()
  members[anchor] = True
  return (im[members].mean(axis=0) * 2.0 - 1.0).astype(np.float32), members


def target_loss(eps_fn: Callable, params, r: jax.Array, y: jax.Array, eps: jax.Array, t: jax.Array,
                abar: jax.Array, rho: jax.Array) -> jax.Array:
  """L(r) of the module doc on one batch: r, y (H,W,C); eps (N,H,W,C); t (N,) int; abar, rho (T,)."""
  a = abar[t][:, None, None, None]
  x = jnp.sqrt(a) * y[None] + (1.0 - jnp.sqrt(a)) * r[None] + jnp.sqrt(1.0 - a) * eps
  out = eps_fn(params, x, t).astype(jnp.float32)
  return jnp.mean((out - eps - rho[t][:, None, None, None] * r[None]) ** 2)


@functools.partial(jax.jit, static_argnames=("eps_fn", "batch_size", "t_min"))
def _step(eps_fn, params, r, opt_state, y, abar, rho, key, lr, batch_size, t_min):
  kt, ke = jax.random.split(key)
  t = jax.random.randint(kt, (batch_size,), t_min, abar.shape[0])
  eps = jax.random.normal(ke, (batch_size, *r.shape), jnp.float32)
  loss, grad = jax.value_and_grad(lambda z: target_loss(eps_fn, params, z, y, eps, t, abar, rho))(r)
  upd, opt_state = optax.adam(lr).update(grad, opt_state, r)
  return optax.apply_updates(r, upd), opt_state, loss


def invert_toward_target(model, y_hat: np.ndarray, cfg: Mapping[str, Any] | None, key: jax.Array
                         ) -> tuple[np.ndarray, dict[str, Any]]:
  """Adam on the trigger r (H,W,C) from the constant init_value against L(r) (module doc) for the target y_hat (H,W,C) in [-1,1].
  `model`: apply(params, x (N,H,W,C), t (N,)) -> eps, params, image_shape, scheduler_config.
  Returns (r float32, details: losses (num_iters,), final_loss (mean of the last 10), seconds, settings)."""
  s = settings(cfg)
  shape = tuple(int(d) for d in model.image_shape)
  y = jnp.asarray(y_hat, jnp.float32)
  if tuple(y.shape) != shape:
    raise TargetInversionError(f"target estimate has shape {tuple(y.shape)}, the model makes {shape} images")
  sched = schedule_from_config(model.scheduler_config)
  t_min = int(s["t_min"])
  if not 0 <= t_min < sched.num_train_timesteps:
    raise TargetInversionError(f"detection.target_trigger.t_min={t_min} must be in [0, "
                               f"{sched.num_train_timesteps - 1}]")
  abar = jnp.asarray(sched.alphas_cumprod, jnp.float32)
  rho = jnp.asarray(sched.rho(), jnp.float32)
  r = jnp.full(shape, float(s["init_value"]), jnp.float32)
  opt_state = optax.adam(float(s["lr"])).init(r)
  t0 = time.time()
  losses = []
  n = int(s["num_iters"])
  for i in range(n):
    lr = float(s["lr"]) * (0.5 * (1 + np.cos(np.pi * i / n)) if s["cosine_decay"] else 1.0)
    r, opt_state, loss = _step(model.apply, model.params, r, opt_state, y, abar, rho, jax.random.fold_in(key, i),
                               jnp.float32(lr), int(s["batch_size"]), t_min)
    losses.append(loss)
  losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
  return np.asarray(r, np.float32), dict(losses=losses.tolist(), final_loss=float(losses[-10:].mean()),
                                         seconds=time.time() - t0, settings=s)
