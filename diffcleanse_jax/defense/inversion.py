"""Diff-Cleanse stage 1: trigger inversion (BBTI, black-box; and an exact white-box variant).

ALGORITHMS.md §4.1 (intended algorithm, the default here) and §4.2 (the released code's gradient bug, reproduced
with ``faithful_code_bug=True``).

Unknown: an additive trigger g (H,W,C) in x_T space, x_T = eps + g. Parameterisation: raw p, p_0 ~ N(0,1),
g = STE_round(255 q)/255 with q = 1 - 2p (STE: round forward, identity backward, so dg/dp = -2).

One *epoch* (one compiled call, `jax.jit` of a pure function of (p, Adam state, bookkeeping)):

1. I_b = clamp(x_0/2 + 1/2, 0, 1) from a short sampler (default DDPM-20) started at x_T,b = eps_b + g, with a
   fixed noise batch eps (B = 16) and fixed per-step sampler noise (common random numbers across epochs).
2. Bookkeeping (non-differentiable): images whose whole-image mean is <= 0.01 or >= 0.99 are excluded; every
   pair a < b of the rest with cos(v_a, v_b) > 0.999 (plain cosine, not mean-centred) is an edge; the target set
   T is the union of the edges' endpoints, R the rest; MSCR = |T|/B.
3. Loss on the outputs, given the sets: L = w_s L_s + w_e L_e + L_v (see `image_loss`), plus the pattern-entropy
   loss L_g = lambda_g [relu(H_g - 3) + relu(1 - H_g)] on g.
4. Gradient on p:
   * ``method='bbti'`` (black box): dL/dx_T,b ~ dL/dI_b (identity Jacobian), averaged over the batch, times
     grad_scale s and dg/dp = -2:  G_p = s (-2) mean_b dL/dI_b  +  dL_g/dp (autograd).
   * ``method='whitebox'``: G_p = d(L + L_g)/dp exactly, through the differentiable sampler (`jax.grad`; the
     sets are computed in the same forward pass and held fixed). The sampler is an unrolled python loop of
     `jax.checkpoint`-ed steps by default (backward passes in a `lax.scan` body are ~3x slower on XLA:CPU).
     `whitebox_backprop_steps` = K > 0 (our option, `sample_window`): the outputs, sets and loss are those of
     the whole N-step chain, but the gradient goes exactly through K of its steps only (`whitebox_window`
     'first': the K steps from x_T, where the trigger enters; 'last': the K steps to x_0) and through the other
     N-K as the identity (BBTI's transport). K = N is the exact gradient; the compiled program grows with K.
   * ``faithful_code_bug=True``: what the released code actually feeds Adam (§4.2): 0 for the image loss until
     the first update has happened, then a constant -2 on every element (plus dL_g/dp).
5. Adam(lr 0.1, betas 0.9/0.999) step on p, taken only when L_s != 0 and L_v != 0 (as the code).
6. Best-pattern tracking (largest |T|, first occurrence); a restart stops when |T| = B or L_s == 0 (as the code).

Restarts (different p_0, same noise) are `jax.vmap`-ed into one program; so are several models of one
architecture (`invert_many`, params stacked on a leading axis).

Documented deviations from the reference code: cosine and norms use a 1e-12 floor (the code divides 0/0 for an
all-zero image); the *best trigger* is the pattern g that produced the largest |T| (the code stores the
parameter after that epoch's update); when no epoch ever had |T| > 0 the trigger is the last evaluated g.
Options beyond the reference (defaults off): `init_mean`/`init_std` for p_0 (the reference's N(0,1) gives
g_0 ~ N(1, 4), which sends every output of the Fashion-MNIST models to black at epoch 0), `restarts`,
`stop_mscr` (a restart stops once |T|/B >= stop_mscr; 1.0 = the code's |T| = B), `stop_any` (every restart stops
once one reaches stop_mscr: the decision is made, the other restarts would only cost time) and `refine_epochs`.

Shift term (`shift_weight` = w > 0, our option): the BBTI losses only see the outputs of the short chain, and
their patterns need not be the additive noise shift a BadDiffusion model was trained on (docs/RESULTS.md,
session 6). w > 0 adds w * L_shift(g) to the pattern loss, with Elijah's L_shift(g) = mean_pix | mean_b
eps_theta(eps_b + g, T-1) - shift_lambda g | on the epoch's noise batch (defense/elijah.py), differentiated
exactly (one UNet input-gradient per epoch). It enters like L_g: added to the image-loss gradient, under the
same update rule. `shift_weight` applies to bbti epochs only; whitebox epochs (the main loop with
method='whitebox', or a refinement with refine_method='whitebox') use `whitebox_shift_weight` (default 0): the
exact image-loss gradient is on another scale, and shift_weight = 1e7 swamps it (docs/RESULTS.md, session 8).

Whitebox loss weights (`whitebox_value_weight` w_v, `whitebox_sim_scale` c; our options, default 1 = the
reference): a whitebox epoch's loss is c w_s L_s + w_e L_e + w_v L_v; bbti epochs keep the reference weights.
The exact gradient follows whichever term is largest (on Fashion-MNIST L_v, from the black backgrounds), and it
meets that term without a collapse; neither knob closed that gap on zoo user-shoe-p0.2 (docs/RESULTS.md,
"Session 20": w_v 0.1 trades L_v for L_e, c 100 drives the outputs to excluded black images).

Refinement (`refine_epochs` = K > 0): the main loop fits the pattern to one fixed noise batch, and a collapse of
those 16 noises does not always carry over to fresh noise and the model's own long chain. After the loop, every
restart that collapsed (best |T| > 0) continues from its best pattern for K more epochs with the same losses,
gradient and a fresh Adam (lr `refine_learning_rate`, default the main lr), but with a *fresh* noise batch and
fresh sampler noise every epoch (a stochastic optimisation of the same objective over the noise distribution). The refined trigger is the last refined pattern
(the best-by-|T| of noisy batches would be a selection-biased pick). Restarts without any collapse are left as
they are. The MSCR score is the main loop's, so detection does not depend on K; the per-epoch |T|/B of the
refinement is reported as history['refine_mscr'].
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffcleanse_jax.defense.elijah import elijah_loss
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.diffusion.schedules import Schedule, schedule_from_config

METHODS = ("bbti", "whitebox")
WINDOWS = ("first", "last")
_NORM_FLOOR = 1e-12


class InversionError(ValueError):
  """Bad inversion settings or inputs."""


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class InversionSettings:
  """All knobs of stage 1 (the `config.inversion` section). Defaults = §4.1 / the CIFAR-10 code defaults."""

  method: str = "bbti"              # 'bbti' (black-box, identity Jacobian) | 'whitebox' (exact gradient)
  batch_size: int = 16              # B: fixed noise batch
  sampler: str = "ddpm"             # short sampler: 'ddpm' | 'ddim'
  num_steps: int = 20
  eta: float = 0.0                  # ddim only
  clip_sample: bool = False
  max_epochs: int = 100
  learning_rate: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_scale: float = 1e3           # s: 1e3 for 32 px, 10 for 256 px (bbti only)
  lambda_g: float = 0.0             # pattern-entropy weight: 0 for 32 px, 0.1 for CelebA-HQ
  sim_threshold: float = 0.999      # cosine edge threshold
  black_threshold: float = 0.01     # whole-image mean <= this: excluded
  white_threshold: float = 0.99     # whole-image mean >= this: excluded
  faithful_code_bug: bool = False   # reproduce §4.2's constant -2 gradient drift
  restarts: int = 1                 # R: p_0 draws optimised together (vmap); the best is reported
  init_mean: float = 0.0            # p_0 ~ N(init_mean, init_std^2): the code's N(0,1) gives g_0 ~ N(1, 4);
  init_std: float = 1.0             # init_mean 0.5 centres g_0 on 0 (an option, not the reference)
  seed: int = 0                     # PRNG seed when no key is given
  stop_on_zero_similarity_loss: bool = True  # the code also stops when L_s == 0
  whitebox_unroll: bool = True      # whitebox: python-unrolled sampler (else lax.scan)
  whitebox_remat: bool = True       # whitebox: jax.checkpoint per sampler step
  whitebox_num_steps: int = 0       # whitebox: its own (shorter) chain, > 0 replaces num_steps; 0 = num_steps
  whitebox_backprop_steps: int = 0  # whitebox: exact through K steps of the chain only (0 = all; sample_window)
  whitebox_window: str = "first"    # whitebox with K > 0: the K steps from x_T ('first') or to x_0 ('last')
  log_every: int = 10               # log a progress line every N epochs (0 = never)
  stop_mscr: float = 1.0            # a restart stops once |T|/B >= this (1.0: |T| = B, the code)
  stop_any: bool = False            # True: all restarts (of a model) stop once one of them reaches stop_mscr
  refine_epochs: int = 0            # K fresh-noise epochs from the best pattern after the loop (module doc)
  refine_learning_rate: float = 0.0  # Adam lr of the refinement (0 = learning_rate)
  refine_num_steps: int = 0         # sampler steps of the refinement's chain (0 = the main loop's num_steps)
  refine_method: str = ""           # gradient of the refinement: bbti / whitebox ("" = method)
  shift_weight: float = 0.0         # w > 0 adds w * L_shift, Elijah's distribution-shift loss (module doc)
  whitebox_shift_weight: float = 0.0  # the shift weight of whitebox epochs (shift_weight is bbti's; module doc)
  whitebox_value_weight: float = 1.0  # w_v of whitebox epochs' L_v (bbti: 1, the reference; module doc)
  whitebox_sim_scale: float = 1.0   # whitebox epochs' L_s term is scaled by this (bbti: 1, the reference)
  whitebox_restarts: int = 0        # whitebox: R of the white-box inversion (0 = `restarts`); from_config applies it
  shift_lambda: float = 0.5         # lambda of L_shift (rho_T ~= 0.5, ALGORITHMS §2.1)

  def validate(self) -> "InversionSettings":
    if self.method not in METHODS:
      raise InversionError(f"inversion.method={self.method!r}; expected one of {', '.join(METHODS)}")
    if self.sampler not in samplers.SAMPLERS:
      raise InversionError(f"inversion.sampler={self.sampler!r}; expected one of {', '.join(samplers.SAMPLERS)}")
    if self.batch_size < 2:
      raise InversionError(f"inversion.batch_size={self.batch_size} must be >= 2 (pairs of samples)")
    if self.num_steps < 1 or self.max_epochs < 1 or self.restarts < 1:
      raise InversionError("inversion.num_steps, max_epochs and restarts must be >= 1")
    if not 0.0 < self.stop_mscr <= 1.0:
      raise InversionError(f"inversion.stop_mscr={self.stop_mscr} must be in (0, 1]")
    if self.refine_epochs < 0 or self.refine_learning_rate < 0 or self.refine_num_steps < 0:
      raise InversionError(f"inversion.refine_epochs={self.refine_epochs}, refine_learning_rate="
                           f"{self.refine_learning_rate} and refine_num_steps={self.refine_num_steps} must be >= 0")
    if self.shift_weight < 0 or self.whitebox_shift_weight < 0:
      raise InversionError(f"inversion.shift_weight={self.shift_weight} and whitebox_shift_weight="
                           f"{self.whitebox_shift_weight} must be >= 0")
    for name in ("whitebox_value_weight", "whitebox_sim_scale"):
      if getattr(self, name) < 0:
        raise InversionError(f"inversion.{name}={getattr(self, name)} must be >= 0")
    if self.whitebox_restarts < 0:
      raise InversionError(f"inversion.whitebox_restarts={self.whitebox_restarts} must be >= 0 (0 = restarts)")
    if self.whitebox_window not in WINDOWS:
      raise InversionError(f"inversion.whitebox_window={self.whitebox_window!r}; expected one of "
                           f"{', '.join(WINDOWS)}")
    if self.whitebox_backprop_steps < 0:
      raise InversionError(f"inversion.whitebox_backprop_steps={self.whitebox_backprop_steps} must be >= 0 "
                           "(0 = the whole chain)")
    if self.refine_method and self.refine_method not in METHODS:
      raise InversionError(f"inversion.refine_method={self.refine_method!r}; expected '' or one of "
                           f"{', '.join(METHODS)}")
    return self

  @property
  def epoch_shift_weight(self) -> float:
    """The weight of L_shift in an epoch with this gradient method (whitebox has its own, default 0)."""
    return self.whitebox_shift_weight if self.method == "whitebox" else self.shift_weight

  @classmethod
  def from_config(cls, cfg: Any = None, **overrides) -> "InversionSettings":
    """From a ConfigDict/dict: the `inversion` section itself, a full config (its `.inversion` is used), or a
    flat merge of inversion + detection fields (unknown keys are ignored). `overrides` win."""
    d = _to_dict(cfg)
    if isinstance(d.get("inversion"), Mapping):
      d = dict(d["inversion"])
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in list(kw.items()):
      t = types[k]
      if t == "int":
        kw[k] = int(v)
      elif t == "float":
        kw[k] = float(v)
      elif t == "bool":
        kw[k] = bool(v)
      else:
        kw[k] = str(v)
    s = cls(**kw)
    if s.method == "whitebox" and s.whitebox_num_steps > 0:
      s = dataclasses.replace(s, num_steps=s.whitebox_num_steps)
    if s.method == "whitebox" and s.whitebox_restarts > 0:
      s = dataclasses.replace(s, restarts=s.whitebox_restarts)
    return s.validate()

  def sampler_config(self, scheduler_config: Mapping[str, Any] | None) -> samplers.SamplerConfig:
    return samplers.SamplerConfig.from_scheduler_config(
        scheduler_config, method=self.sampler, num_steps=int(self.num_steps), eta=float(self.eta),
        clip_sample=bool(self.clip_sample))


def _to_dict(cfg: Any) -> dict[str, Any]:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


# ------------------------------------------------------------------------------------- differentiable pieces
def ste_round(x: jax.Array) -> jax.Array:
  """Round forward, identity backward (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def pattern_from_raw(p: jax.Array) -> jax.Array:
  """g = STE_round(255 (1 - 2p)) / 255: the trigger in x_T space, quantised to multiples of 1/255."""
  return ste_round(255.0 * (1.0 - 2.0 * p)) / 255.0


def softmax_entropy(logits: jax.Array, axis: int = -1) -> jax.Array:
  """The code's "entropy": -sum p log(p + 1e-9) with p = softmax(logits) along `axis`."""
  pr = jax.nn.softmax(logits, axis=axis)
  return -jnp.sum(pr * jnp.log(pr + 1e-9), axis=axis)


def image_entropy(images01: jax.Array) -> jax.Array:
  """H(v_b) per image (B,): softmax over all C*H*W STE-rounded intensities 255 v (NOT a histogram entropy)."""
  v = images01.reshape(images01.shape[0], -1)
  return softmax_entropy(ste_round(255.0 * v), axis=-1)


def pattern_entropy(g: jax.Array) -> jax.Array:
  """H_g: mean over (row, channel) of the entropy of softmax(STE_round(255 g)) along the width axis; g (H,W,C)."""
  return jnp.mean(softmax_entropy(ste_round(255.0 * g), axis=1))


def pattern_loss(g: jax.Array, lambda_g: float) -> jax.Array:
  h = pattern_entropy(g)
  return lambda_g * (jax.nn.relu(h - 3.0) + jax.nn.relu(1.0 - h))


def _norms(v):
  return jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1), _NORM_FLOOR ** 2))


def cosine_matrix(images01: jax.Array) -> jax.Array:
  """(B,B) plain cosine similarity of the flattened images (not mean-centred)."""
  v = images01.reshape(images01.shape[0], -1)
  n = _norms(v)
  return (v @ v.T) / jnp.maximum(n[:, None] * n[None, :], _NORM_FLOOR)


class TargetSets(NamedTuple):
  """Bookkeeping of one batch (all stop-gradient): boolean masks over the batch and the anchor index."""

  excluded: jax.Array   # (B,) near-black/white by whole-image mean
  pair_ok: jax.Array    # (B,B) a < b, neither excluded
  edges: jax.Array      # (B,B) pair_ok & cos > threshold
  in_t: jax.Array       # (B,) target set T
  anchor: jax.Array     # () min index of T (0 when T is empty)
  count: jax.Array      # () |T|
  max_cos: jax.Array    # () largest cosine over the considered pairs (-1 when none): the margin to the threshold


def target_sets(images01: jax.Array, sim_threshold: float = 0.999, black: float = 0.01,
                white: float = 0.99) -> TargetSets:
  """Similarity graph and target set T (union of pairs with cos > threshold), as in the code."""
  x = jax.lax.stop_gradient(images01)
  b = x.shape[0]
  m = jnp.mean(x.reshape(b, -1), axis=-1)
  excluded = (m <= black) | (m >= white)
  upper = jnp.triu(jnp.ones((b, b), bool), k=1)
  pair_ok = upper & ~excluded[:, None] & ~excluded[None, :]
  cos = cosine_matrix(x)
  edges = pair_ok & (cos > sim_threshold)
  in_t = jnp.any(edges | edges.T, axis=1)
  anchor = jnp.argmax(in_t)  # first True, 0 if none
  max_cos = jnp.max(jnp.where(pair_ok, cos, -1.0))
  return TargetSets(excluded, pair_ok, edges, in_t, anchor, jnp.sum(in_t).astype(jnp.int32), max_cos)


class LossParts(NamedTuple):
  total: jax.Array
  sim: jax.Array        # L_s
  sim_weight: jax.Array  # w_s
  ent: jax.Array        # L_e
  ent_weight: jax.Array  # w_e
  value: jax.Array      # L_v
  anchor_entropy: jax.Array


def image_loss(images01: jax.Array, sets: TargetSets, value_weight: float = 1.0,
               sim_scale: float = 1.0) -> tuple[jax.Array, LossParts]:
  """L_x0 = w_s L_s + w_e L_e + L_v for fixed sets; differentiable in the images (B,H,W,C) in [0,1].

  * L_s: T non-empty: sum_{r in R} (1 - cos(v_anchor, v_r)); T empty: sum over non-excluded pairs (1 - cos).
    w_s = B/|R| (1 if R is empty).
  * L_e: sum_{r in R} relu(H_r - hi) + relu(lo - H_r); [lo, hi] = [0.8, 6], w_e = 20 if T is empty or the
    anchor's entropy < 0.8, else [min_T H - 0.1, max_T H + 0.1], w_e = 10 (band ends stay differentiable, as
    in the code).
  * L_v: sum over R and pixels of relu(I - 0.95) + relu(0.05 - I).
  `value_weight` / `sim_scale` multiply the L_v / w_s L_s terms of the total (1, 1 = the reference); the parts
  are reported unweighted.
  """
  b = images01.shape[0]
  v = images01.reshape(b, -1)
  in_r = ~sets.in_t
  rf = in_r.astype(v.dtype)
  n_r = jnp.sum(rf)
  has_t = sets.count > 0
  cos = cosine_matrix(images01)
  ls_t = jnp.sum(rf * (1.0 - cos[sets.anchor]))
  ls_pairs = jnp.sum(jnp.where(sets.pair_ok, 1.0 - cos, 0.0))
  l_s = jnp.where(has_t, ls_t, ls_pairs)
  w_s = jnp.where(n_r > 0, b / jnp.maximum(n_r, 1.0), 1.0)

  h = image_entropy(images01)
  h_anchor = h[sets.anchor]
  low = (~has_t) | (h_anchor < 0.8)
  h_max_t = jnp.max(jnp.where(sets.in_t, h, -jnp.inf))
  h_min_t = jnp.min(jnp.where(sets.in_t, h, jnp.inf))
  hi = jnp.where(low, 6.0, jnp.where(has_t, h_max_t, 0.0) + 0.1)
  lo = jnp.where(low, 0.8, jnp.where(has_t, h_min_t, 0.0) - 0.1)
  w_e = jnp.where(low, 20.0, 10.0)
  l_e = jnp.sum(rf * (jax.nn.relu(h - hi) + jax.nn.relu(lo - h)))

  l_v = jnp.sum(rf[:, None] * (jax.nn.relu(v - 0.95) + jax.nn.relu(0.05 - v)))
  total = sim_scale * w_s * l_s + w_e * l_e + value_weight * l_v
  return total, LossParts(total, l_s, w_s, l_e, w_e, l_v, h_anchor)


def blackbox_pattern_grad(images01: jax.Array, sets: TargetSets, grad_scale: float) -> tuple[jax.Array, LossParts]:
  """BBTI gradient transport: G = s * (-2) * mean_b dL/dI_b, shape (H,W,C) (dL/dp without L_g)."""
  grads, parts = jax.grad(image_loss, has_aux=True)(images01, sets)
  return grad_scale * (-2.0) * jnp.mean(grads, axis=0), parts


# -------------------------------------------------------------------------------------------------- sampler
def sample_unrolled(eps_fn, params, x_T: jax.Array, key: jax.Array, schedule: Schedule,
                    cfg: samplers.SamplerConfig, remat: bool = True, start: int = 0,
                    stop: int | None = None) -> jax.Array:
  """`samplers.sample_loop` as a python-unrolled loop (same update rule and per-step noise fold_in(key, i)),
  each step optionally `jax.checkpoint`-ed: straight-line code, which XLA:CPU differentiates ~3x faster.
  `start`/`stop`: only the chain's steps [start, stop), as `sample_loop`."""
  cfg = cfg.validate()
  ts, a_t, a_prev = samplers.step_arrays(schedule, cfg)

  def step(x, i, t, at, ap):
    return samplers.denoise_step(eps_fn, params, cfg, key, x, i, t, at, ap)

  if remat:
    step = jax.checkpoint(step, static_argnums=(1,))
  x = x_T.astype(jnp.float32)
  for i in range(len(ts))[slice(int(start), None if stop is None else int(stop))]:
    x = step(x, i, jnp.int32(ts[i]), jnp.float32(a_t[i]), jnp.float32(a_prev[i]))
  return x


def sample_window(eps_fn, params, x_T: jax.Array, key: jax.Array, schedule: Schedule, cfg: samplers.SamplerConfig,
                  window: str, k: int, unroll: bool = True, remat: bool = True) -> jax.Array:
  """x_0 of the whole chain (the same value as `sample_loop`), differentiable through K of its N steps only.

  window='first': exact through the K steps from x_T; the remaining N-K steps run forward only and pass the
  cotangent on unchanged (identity Jacobian, BBTI's transport), so dx_0/dx_T := dx_{N-K}/dx_T.
  window='last': identity from x_T to the state before the last K steps, exact through those K steps.
  The differentiable part is unrolled (`sample_unrolled`) or a scan; the forward-only part is one scan, so the
  compiled program grows with K, not N (an unrolled DDPM-50 backward pass compiled for ~14 min on 2 CPU cores).
  K = 0 or K >= N: the exact gradient through the whole chain.
  """
  n = len(samplers.step_arrays(schedule, cfg)[0])
  k = int(k)
  exact = functools.partial(sample_unrolled, remat=remat) if unroll else functools.partial(
      samplers.sample_loop, remat=remat)
  if not 0 < k < n:
    return exact(eps_fn, params, x_T, key, schedule, cfg)

  def straight_through(value, carrier):  # value forward, d/d(carrier) = identity backward
    return jax.lax.stop_gradient(value) + carrier - jax.lax.stop_gradient(carrier)

  x_T = x_T.astype(jnp.float32)
  if window == "first":
    x_k = exact(eps_fn, params, x_T, key, schedule, cfg, start=0, stop=k)
    rest = samplers.sample_loop(eps_fn, params, jax.lax.stop_gradient(x_k), key, schedule, cfg, start=k)
    return straight_through(rest, x_k)
  if window == "last":
    head = samplers.sample_loop(eps_fn, params, jax.lax.stop_gradient(x_T), key, schedule, cfg, stop=n - k)
    return exact(eps_fn, params, straight_through(head, x_T), key, schedule, cfg, start=n - k)
  raise InversionError(f"inversion.whitebox_window={window!r}; expected one of {', '.join(WINDOWS)}")


# ---------------------------------------------------------------------------------------------- epoch step
class EpochState(NamedTuple):
  """Per-restart optimisation state (a pytree; vmapped over restarts / models)."""

  p: jax.Array            # (H,W,C) raw parameter
  opt: Any                # Adam state
  done: jax.Array         # () bool: stopped (|T| = B or L_s == 0)
  armed: jax.Array        # () bool: faithful_code_bug: an update has happened (the -2 drift is live)
  best_count: jax.Array   # () int32
  best_g: jax.Array       # (H,W,C) pattern with the largest |T|
  last_g: jax.Array       # (H,W,C) pattern of the last evaluated epoch
  epochs: jax.Array       # () int32: epochs evaluated


class EpochMetrics(NamedTuple):
  count: jax.Array
  loss: jax.Array
  sim: jax.Array
  ent: jax.Array
  value: jax.Array
  pattern_loss: jax.Array
  updated: jax.Array
  active: jax.Array       # this epoch was evaluated (restart was not done before it)
  num_excluded: jax.Array
  anchor_entropy: jax.Array
  grad_norm: jax.Array
  max_pair_cos: jax.Array  # largest pairwise cosine of the considered outputs (how close to a collapse)


def _adam(s: InversionSettings):
  return optax.adam(s.learning_rate, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps)


def init_state(p0: jax.Array, s: InversionSettings) -> EpochState:
  """State for one restart from its raw p_0 (H,W,C)."""
  p0 = jnp.asarray(p0, jnp.float32)
  g0 = pattern_from_raw(p0)
  return EpochState(p=p0, opt=_adam(s).init(p0), done=jnp.array(False), armed=jnp.array(False),
                    best_count=jnp.array(0, jnp.int32), best_g=g0, last_g=g0, epochs=jnp.array(0, jnp.int32))


def _pattern_grad(eps_fn, schedule: Schedule, scfg: samplers.SamplerConfig, s: InversionSettings, params,
                  noise, skey, p) -> tuple[jax.Array, LossParts, TargetSets, jax.Array]:
  """(dL_x0/dp by the configured method (without L_g), loss parts, sets, images) at raw pattern p."""
  sets_of = functools.partial(target_sets, sim_threshold=s.sim_threshold, black=s.black_threshold,
                              white=s.white_threshold)
  if s.method == "bbti":
    g = pattern_from_raw(p)
    x0 = samplers.sample_loop(eps_fn, params, noise + g[None], skey, schedule, scfg)
    images = jax.lax.stop_gradient(samplers.to_images01(x0))
    sets = sets_of(images)
    g_img, parts = blackbox_pattern_grad(images, sets, s.grad_scale)
    return g_img, parts, sets, images

  def full_loss(p_):
    g_ = pattern_from_raw(p_)
    x_T = noise + g_[None]
    x0_ = sample_window(eps_fn, params, x_T, skey, schedule, scfg, s.whitebox_window, s.whitebox_backprop_steps,
                        unroll=s.whitebox_unroll, remat=s.whitebox_remat)
    images_ = samplers.to_images01(x0_)
    sets_ = sets_of(images_)
    loss, parts_ = image_loss(images_, sets_, s.whitebox_value_weight, s.whitebox_sim_scale)
    return loss, (parts_, sets_, images_)

  g_img, (parts, sets, images) = jax.grad(full_loss, has_aux=True)(p)
  return g_img, parts, sets, images


def _epoch(eps_fn, schedule: Schedule, scfg: samplers.SamplerConfig, s: InversionSettings,
           params, noise, skey, state: EpochState) -> tuple[EpochState, EpochMetrics]:
  """One epoch for one restart of one model (pure; vmapped and jitted by the caller)."""
  bsz = noise.shape[0]
  p = state.p

  def lg_of(p_):
    g_ = pattern_from_raw(p_)
    loss = pattern_loss(g_, s.lambda_g)
    if s.epoch_shift_weight > 0:
      loss = loss + s.epoch_shift_weight * elijah_loss(eps_fn, params, g_, noise, schedule.num_train_timesteps - 1,
                                                 s.shift_lambda)
    return loss

  l_g, g_lg = jax.value_and_grad(lg_of)(p)
  g = pattern_from_raw(p)
  g_img, parts, sets, _ = _pattern_grad(eps_fn, schedule, scfg, s, params, noise, skey, p)

  if s.faithful_code_bug:
    g_img = jnp.where(state.armed, -2.0, 0.0) * jnp.ones_like(p)
  grad = g_img + g_lg

  update = (parts.sim != 0) & (parts.value != 0) & ~state.done
  upd, new_opt = _adam(s).update(grad, state.opt, p)
  new_p = jnp.where(update, optax.apply_updates(p, upd), p)
  new_opt = jax.tree.map(lambda a, b: jnp.where(update, a, b), new_opt, state.opt)

  better = (sets.count > state.best_count) & ~state.done
  stop = sets.count >= _stop_count(s.stop_mscr, bsz)
  if s.stop_on_zero_similarity_loss:
    stop = stop | (parts.sim == 0)

  def keep(new, old):
    return jnp.where(state.done, old, new)

  new_state = EpochState(
      p=new_p, opt=new_opt, done=state.done | stop, armed=state.armed | update,
      best_count=jnp.where(better, sets.count, state.best_count),
      best_g=jnp.where(better, g, state.best_g), last_g=keep(g, state.last_g),
      epochs=state.epochs + jnp.where(state.done, 0, 1).astype(jnp.int32))
  metrics = EpochMetrics(
      count=sets.count, loss=parts.total, sim=parts.sim, ent=parts.ent, value=parts.value, pattern_loss=l_g,
      updated=update, active=~state.done, num_excluded=jnp.sum(sets.excluded).astype(jnp.int32),
      anchor_entropy=parts.anchor_entropy, grad_norm=jnp.sqrt(jnp.sum(grad * grad)), max_pair_cos=sets.max_cos)
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule_key", "scfg", "s", "many_models"))
def _epoch_jit(eps_fn, schedule_key, scfg, s, many_models, params, noise, skey, state):
  schedule = Schedule(np.asarray(schedule_key, np.float64))
  fn = functools.partial(_epoch, eps_fn, schedule, scfg, s)
  fn = jax.vmap(fn, in_axes=(None, None, None, 0))          # restarts
  if many_models:
    fn = jax.vmap(fn, in_axes=(0, None, None, 0))           # models (stacked params)
  return fn(params, noise, skey, state)


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule_key", "scfg", "s"))
def _grad_jit(eps_fn, schedule_key, scfg, s, params, noise, skey, p):
  schedule = Schedule(np.asarray(schedule_key, np.float64))
  return _pattern_grad(eps_fn, schedule, scfg, s, params, noise, skey, p)


def pattern_gradient(eps_fn, params, scheduler_config, settings: InversionSettings, p: jax.Array,
                     noise: jax.Array, skey: jax.Array):
  """The image-loss gradient on raw p (H,W,C) that one epoch would use (bbti transport or exact whitebox;
  without L_g and without the code-bug substitution). Returns (grad, LossParts, TargetSets, images01)."""
  s = settings.validate()
  return _grad_jit(eps_fn, _schedule_key(scheduler_config), s.sampler_config(scheduler_config),
                   _step_settings(s), params, noise, skey, p)


def epoch_step(eps_fn, params, scheduler_config, settings: InversionSettings, noise: jax.Array, skey: jax.Array,
               state: EpochState, many_models: bool = False) -> tuple[EpochState, EpochMetrics]:
  """One compiled epoch for a batch of restarts (state leading axis R; (M, R) with `many_models`)."""
  s = settings.validate()
  return _epoch_jit(eps_fn, _schedule_key(scheduler_config), s.sampler_config(scheduler_config),
                    _step_settings(s), many_models, params, noise, skey, state)


def _step_settings(s: InversionSettings) -> InversionSettings:
  """The settings that shape the compiled epoch (loop-only fields normalised, so they do not recompile)."""
  return dataclasses.replace(s, max_epochs=1, restarts=1, seed=0, log_every=0, refine_epochs=0,
                             refine_learning_rate=0.0, refine_num_steps=0, refine_method="")


def _refine_settings(s: InversionSettings) -> InversionSettings:
  """The settings of the refinement's epochs: its chain length, gradient and learning rate."""
  return dataclasses.replace(s, num_steps=s.refine_num_steps or s.num_steps, method=s.refine_method or s.method,
                             learning_rate=s.refine_learning_rate or s.learning_rate)


def _stop_count(stop_mscr: float, batch_size: int) -> int:
  """Smallest |T| with |T|/B >= stop_mscr (at least 2: |T| is 0 or >= 2)."""
  return max(2, min(batch_size, int(np.ceil(stop_mscr * batch_size - 1e-9))))


# ------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class InversionResult:
  """Outcome of one inversion (one model; the best of its restarts)."""

  trigger: np.ndarray                 # (H,W,C) best inverted pattern g (x_T = eps + g)
  mscr_per_epoch: list[float]         # |T|/B per epoch of the chosen restart
  best_mscr: float                    # max over epochs and restarts (the model's MSCR score)
  epochs: int                         # epochs run by the chosen restart
  seconds: float
  method: str = "bbti"
  restart: int = 0                    # index of the chosen restart
  restart_best_mscr: list[float] = dataclasses.field(default_factory=list)
  history: dict[str, list] = dataclasses.field(default_factory=dict)  # per-epoch losses of the chosen restart
  triggers: np.ndarray | None = None  # (R,H,W,C) best pattern of every restart
  last_trigger: np.ndarray | None = None  # (H,W,C) pattern of the chosen restart's last epoch
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  unrefined_trigger: np.ndarray | None = None  # (H,W,C) the main loop's best pattern, when `trigger` is refined

  def to_json(self) -> dict[str, Any]:
    return dict(method=self.method, best_mscr=float(self.best_mscr), epochs=int(self.epochs),
                seconds=float(self.seconds), restart=int(self.restart),
                restart_best_mscr=[float(x) for x in self.restart_best_mscr],
                mscr_per_epoch=[float(x) for x in self.mscr_per_epoch], history=self.history,
                max_excluded_fraction=_max_excluded(self.history, self.settings),
                refined=self.unrefined_trigger is not None,
                trigger_mean=float(np.mean(self.trigger)), trigger_min=float(np.min(self.trigger)),
                trigger_max=float(np.max(self.trigger)), settings=self.settings)


def _max_excluded(history: Mapping[str, list], settings: Mapping[str, Any]) -> float | None:
  """Largest fraction of near-black/white (excluded) outputs over the epochs: a collapse that MSCR ignores."""
  n = history.get("num_excluded") or []
  b = settings.get("batch_size") or 0
  return float(max(n)) / b if n and b else None


def initial_patterns(key: jax.Array, restarts: int, image_shape: Sequence[int], mean: float = 0.0,
                     std: float = 1.0) -> jax.Array:
  """p_0 for each restart: N(mean, std^2) (R,H,W,C), N(0,1) by default; restart r uses fold_in(k_init, r), so
  restarts are reproducible one by one."""
  k_init = jax.random.fold_in(key, 2)
  return jnp.stack([mean + std * jax.random.normal(jax.random.fold_in(k_init, r), tuple(image_shape), jnp.float32)
                    for r in range(restarts)])


def fixed_noise(key: jax.Array, batch_size: int, image_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(noise batch eps (B,H,W,C), sampler key): drawn once, reused every epoch (common random numbers)."""
  noise = jax.random.normal(jax.random.fold_in(key, 0), (batch_size, *image_shape), jnp.float32)
  return noise, jax.random.fold_in(key, 1)


def _schedule_key(scheduler_config) -> tuple:
  return tuple(schedule_from_config(scheduler_config).betas.tolist())


def run_inversion(eps_fn, params, image_shape: Sequence[int], scheduler_config: Mapping[str, Any] | None,
                  settings: InversionSettings, key: jax.Array | None = None, p0: jax.Array | None = None,
                  many_models: bool = False, name: str = "model") -> list[InversionResult]:
  """The optimisation loop. `p0` (R,H,W,C) overrides the seeded initial patterns (R = settings.restarts when
  None). `many_models`: `params` is stacked on a leading axis of M models (same architecture); returns one
  result per model (a list of length 1 otherwise)."""
  s = settings.validate()
  key = jax.random.key(s.seed) if key is None else key
  image_shape = tuple(int(d) for d in image_shape)
  noise, skey = fixed_noise(key, s.batch_size, image_shape)
  p0 = (initial_patterns(key, s.restarts, image_shape, s.init_mean, s.init_std) if p0 is None
        else jnp.asarray(p0, jnp.float32))
  if p0.ndim != 4 or tuple(p0.shape[1:]) != image_shape:
    raise InversionError(f"p0 must be (R, {image_shape}), got {tuple(p0.shape)}")
  n_models = jax.tree.leaves(params)[0].shape[0] if many_models else 1
  state = jax.vmap(lambda p: init_state(p, s))(p0)
  if many_models:
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_models, *x.shape)), state)
  scfg = s.sampler_config(scheduler_config)
  step_s = _step_settings(s)
  sched_key = _schedule_key(scheduler_config)
  hist: list[dict[str, np.ndarray]] = []
  t0 = time.time()
  for epoch in range(s.max_epochs):
    state, m = _epoch_jit(eps_fn, sched_key, scfg, step_s, many_models, params, noise, skey, state)
    m = jax.device_get(m)
    hist.append({k: np.asarray(v) for k, v in m._asdict().items()})
    done = np.asarray(jax.device_get(state.done))
    if s.stop_any:  # a model is finished once one restart reached stop_mscr (done has shape (R,) or (M, R))
      reached = np.asarray(jax.device_get(state.best_count)) >= _stop_count(s.stop_mscr, s.batch_size)
      done = done | reached.any(axis=-1, keepdims=True)
    if s.log_every and (epoch % s.log_every == 0 or done.all()):
      logging.info("%s inversion (%s) epoch %d: MSCR %s loss %s (%.1fs)", name, s.method, epoch,
                   np.array2string(np.asarray(m.count).reshape(-1) / s.batch_size, precision=3),
                   np.array2string(np.asarray(m.loss).reshape(-1), precision=3), time.time() - t0)
    if done.all():
      break
  refined = refine_counts = None
  if s.refine_epochs > 0 and bool(jnp.any(state.best_count > 0)):  # nothing collapsed: nothing to refine
    rs = _refine_settings(s)
    refined, refine_counts = _refine(eps_fn, params, sched_key, rs.sampler_config(scheduler_config),
                                     _step_settings(rs), many_models, state, key, image_shape, s, name)
  jax.block_until_ready(state.p)
  seconds = time.time() - t0
  state = jax.device_get(state)
  if not many_models:
    state = jax.tree.map(lambda x: x[None], state)
    hist = [{k: v[None] for k, v in h.items()} for h in hist]
    if refined is not None:
      refined, refine_counts = refined[None], refine_counts[:, None]
  return [_collect(state, hist, mi, s, seconds / n_models, refined, refine_counts) for mi in range(n_models)]


def _init_states(p0: jax.Array, s: InversionSettings, lead: int) -> EpochState:
  """init_state over `lead` leading axes of p0 ((R,H,W,C) or (M,R,H,W,C))."""
  fn = functools.partial(init_state, s=s)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(p0)


def _refine(eps_fn, params, sched_key, scfg, step_s, many_models, state: EpochState, key: jax.Array,
            image_shape, s: InversionSettings, name: str) -> tuple[np.ndarray, np.ndarray]:
  """The fresh-noise refinement (module doc) of every restart that collapsed. Returns (patterns g with the
  leading axes of state.best_g: refined where best |T| > 0, else best_g unchanged; |T| per refinement epoch
  (K, *leading axes))."""
  has = state.best_count > 0
  rstate = _init_states((1.0 - state.best_g) / 2.0, step_s, has.ndim)
  k_noise, k_sampler = jax.random.fold_in(key, 3), jax.random.fold_in(key, 4)
  counts, t0 = [], time.time()
  for e in range(s.refine_epochs):
    noise = jax.random.normal(jax.random.fold_in(k_noise, e), (s.batch_size, *image_shape), jnp.float32)
    rstate = rstate._replace(done=~has)  # refine the collapsed restarts every epoch; hold the others
    rstate, m = _epoch_jit(eps_fn, sched_key, scfg, step_s, many_models, params, noise,
                           jax.random.fold_in(k_sampler, e), rstate)
    counts.append(np.asarray(jax.device_get(m.count)))
    if s.log_every and (e % s.log_every == 0 or e == s.refine_epochs - 1):
      logging.info("%s refinement (%s, fresh noise) epoch %d: MSCR %s (%.1fs)", name, s.method, e,
                   np.array2string(counts[-1].reshape(-1) / s.batch_size, precision=3), time.time() - t0)
  g = jnp.where(has[..., None, None, None], pattern_from_raw(rstate.p), state.best_g)
  return np.asarray(jax.device_get(g)), np.stack(counts)


def _collect(state, hist, mi: int, s: InversionSettings, seconds: float, refined=None,
             refine_counts=None) -> InversionResult:
  best_count = np.asarray(state.best_count[mi])          # (R,)
  r = int(np.argmax(best_count))
  active = np.stack([h["active"][mi, r] for h in hist])  # (epochs,)
  n_ep = int(active.sum())

  def series(name, scale=1.0):
    return [float(h[name][mi, r]) * scale for h, a in zip(hist, active) if a]

  mscr = series("count", 1.0 / s.batch_size)
  history = {k: series(k) for k in ("loss", "sim", "ent", "value", "pattern_loss", "num_excluded",
                                    "anchor_entropy", "grad_norm", "max_pair_cos")}
  history["updated"] = [bool(h["updated"][mi, r]) for h, a in zip(hist, active) if a]
  per_restart = [float(c) / s.batch_size for c in best_count]
  best = np.asarray(state.best_g[mi]) if refined is None else np.asarray(refined[mi])
  unrefined = None
  if refined is not None and best_count[r] > 0:
    unrefined = np.asarray(state.best_g[mi, r], np.float32)
    history["refine_mscr"] = [float(c) / s.batch_size for c in refine_counts[:, mi, r]]
  chosen = best[r] if best_count[r] > 0 else np.asarray(state.last_g[mi, r])
  triggers = np.where((best_count > 0)[:, None, None, None], best, np.asarray(state.last_g[mi]))
  return InversionResult(
      trigger=chosen.astype(np.float32), mscr_per_epoch=mscr, best_mscr=float(best_count[r]) / s.batch_size,
      epochs=n_ep, seconds=float(seconds), method=s.method + ("+code_bug" if s.faithful_code_bug else ""),
      restart=r, restart_best_mscr=per_restart, history=history, triggers=triggers.astype(np.float32),
      last_trigger=np.asarray(state.last_g[mi, r], np.float32), settings=dataclasses.asdict(s),
      unrefined_trigger=unrefined)


# ---------------------------------------------------------------------------------------------- public API
def invert_trigger(model, cfg: Any = None, key: jax.Array | None = None, **overrides) -> InversionResult:
  """Stage 1 trigger inversion on one `DiffusionModel` (`cfg`: the `config.inversion` section, a full config
  or a dict; `overrides` e.g. method='whitebox'). Returns the best restart's result."""
  s = InversionSettings.from_config(cfg, **overrides)
  return run_inversion(model.apply, model.params, model.image_shape, model.scheduler_config, s, key,
                       name=str(getattr(model, "source", None) or "model"))[0]


@functools.partial(jax.jit, static_argnames=("eps_fn", "schedule_key", "scfg", "s"))
def _sets_jit(eps_fn, schedule_key, scfg, s, params, noise, skey, g):
  schedule = Schedule(np.asarray(schedule_key, np.float64))
  x0 = samplers.sample_loop(eps_fn, params, noise + g[None], skey, schedule, scfg)
  images = samplers.to_images01(x0)
  return target_sets(images, s.sim_threshold, s.black_threshold, s.white_threshold), images


def trigger_mscr(model, trigger, cfg: Any = None, key: jax.Array | None = None, **overrides) -> dict[str, Any]:
  """The MSCR statistic of a *given* trigger (H,W,C) (e.g. the true one, as an upper reference): the inversion's
  fixed noise batch + trigger through its short sampler, then |T|/B. Returns mscr, count, num_excluded, images01."""
  s = InversionSettings.from_config(cfg, **overrides)
  key = jax.random.key(s.seed) if key is None else key
  noise, skey = fixed_noise(key, s.batch_size, model.image_shape)
  sets, images = _sets_jit(model.apply, _schedule_key(model.scheduler_config),
                           s.sampler_config(model.scheduler_config), _step_settings(s), model.params, noise, skey,
                           jnp.asarray(trigger, jnp.float32))
  return dict(mscr=float(sets.count) / s.batch_size, count=int(sets.count), num_excluded=int(jnp.sum(sets.excluded)),
              images01=np.asarray(images))


def stack_params(params_list: Sequence[Any]) -> Any:
  """Stacks the parameter pytrees of same-architecture models on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def invert_many(eps_fn, params_stacked, image_shape: Sequence[int], scheduler_config: Mapping[str, Any] | None,
                cfg: Any = None, key: jax.Array | None = None, **overrides) -> list[InversionResult]:
  """Inverts M models of one architecture in one compiled program (vmap over stacked params and restarts).
  Every model sees the same noise batch and the same p_0 draws. Returns M results."""
  s = InversionSettings.from_config(cfg, **overrides)
  return run_inversion(eps_fn, params_stacked, image_shape, scheduler_config, s, key, many_models=True)


def invert_models(models: Sequence[Any], cfg: Any = None, key: jax.Array | None = None,
                  **overrides) -> list[InversionResult]:
  """`invert_many` for a list of `DiffusionModel`s (they must share spec and scheduler)."""
  if not models:
    return []
  m0 = models[0]
  for m in models[1:]:
    if m.apply != m0.apply or dict(m.scheduler_config) != dict(m0.scheduler_config):
      raise InversionError("invert_models: every model must have the same architecture and scheduler")
  return invert_many(m0.apply, stack_params([m.params for m in models]), m0.image_shape, m0.scheduler_config,
                     cfg, key, **overrides)
