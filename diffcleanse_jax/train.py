"""Data-parallel training loop shared by DDPM training, BadDiffusion attacks and defence fine-tuning.

The loop is generic over `loss_fn(params, batch, key) -> scalar`; what it owns: optax Adam with linear warm-up +
cosine decay and grad-norm clipping, optional EMA, a ('data',) mesh with batches sharded and state replicated,
several steps per compiled call, orbax checkpoints (params, opt state, EMA, step, RNG, and JSON
metadata holding the model config + widths table), exact resumption (the batch and the PRNG key at step k are
pure functions of (seed, k)), progress lines and sample grids.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from diffcleanse_jax import parallel
from diffcleanse_jax.data.pipeline import shard_batch
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io.files import json_default, write_json  # noqa: F401 (write_json: re-exported)
from diffcleanse_jax.model import DiffusionModel

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], jax.Array]
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The `train` config section (all fields have defaults; see configs/*.py)."""

  batch_size: int = 64
  num_steps: int = 1000
  learning_rate: float = 2e-4
  warmup_steps: int = 500
  lr_schedule: str = "cosine"  # cosine | constant
  grad_clip: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 0.0
  ema_decay: float = 0.0  # 0 disables EMA
  ema_warmup: bool = True  # decay_k = min((1+k)/(10+k), ema_decay), diffusers EMAModel without use_ema_warmup
  steps_per_call: int = 1
  log_every: int = 50
  checkpoint_every: int = 500
  sample_every: int = 0  # 0: only at the end
  keep_checkpoints: int = 2
  flip: bool = False

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
    cfg = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(cfg) - names)
    if bad:
      raise ValueError(f"config.train: unknown field {bad[0]!r}; valid fields: {', '.join(sorted(names))}")
    s = cls(**cfg)
    for f in ("batch_size", "num_steps", "steps_per_call", "log_every", "checkpoint_every", "keep_checkpoints"):
      if int(getattr(s, f)) < 1:
        raise ValueError(f"config.train.{f}={getattr(s, f)} must be >= 1")
    if s.lr_schedule not in ("cosine", "constant"):
      raise ValueError(f"config.train.lr_schedule={s.lr_schedule!r}; expected 'cosine' or 'constant'")
    if not 0.0 <= s.ema_decay < 1.0:
      raise ValueError(f"config.train.ema_decay={s.ema_decay} must be in [0, 1)")
    return s


def learning_rate_schedule(s: TrainSettings) -> optax.Schedule | float:
  """Linear warm-up from 0 over warmup_steps, then cosine to 0 at num_steps (diffusers
  get_cosine_schedule_with_warmup), or constant after the warm-up. Without warm-up the cosine starts at step 0
  (optax's warm-up variant would log an INFO line about a zero-length warm-up on every fine-tune)."""
  if s.lr_schedule == "cosine":
    warm = max(0, min(s.warmup_steps, s.num_steps - 1))
    if warm == 0:
      return optax.cosine_decay_schedule(s.learning_rate, max(s.num_steps, 1), alpha=0.0)
    return optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, warm, s.num_steps, end_value=0.0)  # warm < num_steps
  return optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps) if s.warmup_steps > 0 else s.learning_rate


def make_optimizer(s: TrainSettings) -> optax.GradientTransformation:
  """Adam + global-norm clip, with learning_rate_schedule(s)."""
  lr = learning_rate_schedule(s)
  parts = []
  if s.grad_clip and s.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(s.grad_clip))
  if s.weight_decay:
    parts.append(optax.adamw(lr, s.adam_b1, s.adam_b2, s.adam_eps, weight_decay=s.weight_decay))
  else:
    parts.append(optax.adam(lr, s.adam_b1, s.adam_b2, s.adam_eps))
  return optax.chain(*parts)


def ema_decay_at(step: jax.Array, s: TrainSettings) -> jax.Array:
  step = step.astype(jnp.float32)
  if s.ema_warmup:
    return jnp.minimum((1.0 + step) / (10.0 + step), s.ema_decay)
  return jnp.asarray(s.ema_decay, jnp.float32)


def init_state(params, tx, s: TrainSettings, seed: int) -> dict:
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.key_data(jax.random.key(seed))}
  if s.ema_decay > 0:
    state["ema_params"] = jax.tree.map(jnp.copy, params)
  return state


def make_train_step(loss_fn: LossFn, tx, s: TrainSettings):
  """(state, stacked batches (k, B, ...)) -> (state, metrics (k,)); k steps in one compiled call."""

  def one(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if "ema_params" in state:
      d = ema_decay_at(state["step"], s)
      new["ema_params"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
    return new, {"loss": loss, "grad_norm": _tree_norm(grads)}

  def multi(state, batches):
    # Unrolled rather than lax.scan: on XLA:CPU, backward passes inside a while-loop body run several times
    # slower than the same ops in straight-line code (measured 15x for the fmnist-cpu UNet; docs/RESULTS.md).
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
      state, m = one(state, jax.tree.map(lambda x: x[i], batches))
      metrics.append(m)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

  return multi


def _tree_norm(tree):
  return optax.tree.norm(tree) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(tree)


def _fmt_time(sec: float) -> str:
  sec = int(max(sec, 0))
  h, rem = divmod(sec, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def checkpoint_manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=opts,
                               item_names=("state", "meta"))


def save_sample_grid(model: DiffusionModel, params, path: str, num_images: int, seed: int,
                     sampler_cfg: samplers.SamplerConfig, x_T_offset=None) -> np.ndarray:
  """Samples `num_images` from fixed noise (seed) [+ offset, e.g. a trigger], writes a PNG grid; returns [0,1]."""
  key = jax.random.key(seed)
  k_noise, k_sample = jax.random.split(key)
  x_T = jax.random.normal(k_noise, (num_images, *model.image_shape), jnp.float32)
  if x_T_offset is not None:
    x_T = x_T + jnp.asarray(x_T_offset, jnp.float32)
  x0 = samplers.sample(model, params, x_T, k_sample, sampler_cfg)
  imgs = np.asarray(samplers.to_images01(x0))
  image_io.save_grid(imgs, path)
  return imgs


def run_training(*, model: DiffusionModel, loss_fn: LossFn, batches, settings: TrainSettings, workdir: str,
                 seed: int, meta: Mapping[str, Any], mesh=None, sampler_cfg: samplers.SamplerConfig | None = None,
                 num_sample_images: int = 16, sample_hook: Callable[[DiffusionModel, int], None] | None = None,
                 log: Callable[[str], None] = logging.info) -> DiffusionModel:
  """Trains `model.params` with `loss_fn` on `batches` (an object with `batch_at(step)` -> host-local dict).

  Resumes from the newest checkpoint in `workdir/checkpoints` if there is one. Returns the trained model (EMA
  weights when EMA is on). `meta` (JSON) is stored with every checkpoint; it must hold what is needed to rebuild
  the model (model_config with widths, scheduler_config) and the run config.
  """
  s = settings
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_divisible(s.batch_size, mesh)
  tx = make_optimizer(s)
  repl = parallel.replicated(mesh)
  state = init_state(model.params, tx, s, seed)
  state = jax.device_put(state, repl)
  mngr = checkpoint_manager(workdir, s.keep_checkpoints)
  meta = dict(meta, model_config=model.config, scheduler_config=model.scheduler_config)
  latest = mngr.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
    old = restored["meta"] or {}
    if old.get("model_config") != json.loads(json.dumps(meta["model_config"])):
      raise ValueError(f"{workdir}: the checkpoint at step {latest} was made for a different model config; use a "
                       "fresh --workdir")
    state = jax.device_put(restored["state"], repl)
    log(f"resumed from {mngr.directory}/{latest} (step {int(state['step'])})")
  step_fn = jax.jit(make_train_step(loss_fn, tx, s), donate_argnums=(0,))
  batch_sharding = parallel.data_sharded(mesh, leading=1)
  sampler_cfg = sampler_cfg or samplers.SamplerConfig(method="ddim", num_steps=50)

  def ckpt(step):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(json.loads(json.dumps(
                                                dict(meta, step=step), default=json_default)))))
    mngr.wait_until_finished()

  def current_model(st):
    return model.replace(params=jax.device_get(st.get("ema_params", st["params"])))

  step = int(state["step"])
  t_start, step_start = time.time(), step
  losses: list[float] = []
  while step < s.num_steps:
    events = [s.num_steps, (step // s.checkpoint_every + 1) * s.checkpoint_every,
              (step // s.log_every + 1) * s.log_every]
    if s.sample_every:
      events.append((step // s.sample_every + 1) * s.sample_every)
    k = min(s.steps_per_call, min(events) - step)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[batches.batch_at(step + i) for i in range(k)])
    state, metrics = step_fn(state, shard_batch(stacked, batch_sharding))
    step += k
    losses.extend(np.asarray(metrics["loss"]).tolist())
    if not np.all(np.isfinite(losses[-k:])):
      raise FloatingPointError(f"loss became {losses[-1]} at step {step}; lower config.train.learning_rate")
    if step % s.log_every == 0 or step == s.num_steps:
      el = time.time() - t_start
      rate = (step - step_start) / max(el, 1e-9)
      log(f"step {step}/{s.num_steps} loss {np.mean(losses[-s.log_every:]):.5f} | {rate:.2f} steps/s | "
          f"ETA {_fmt_time((s.num_steps - step) / max(rate, 1e-9))}")
    if step % s.checkpoint_every == 0 or step == s.num_steps:
      ckpt(step)
    if jax.process_index() == 0 and (s.sample_every and step % s.sample_every == 0 and step != s.num_steps):
      m = current_model(state)
      save_sample_grid(m, m.params, os.path.join(workdir, "samples", f"step_{step:07d}.png"), num_sample_images,
                       seed, sampler_cfg)
      if sample_hook:
        sample_hook(m, step)
  if mngr.latest_step() != step:
    ckpt(step)
  mngr.close()
  write_json(os.path.join(workdir, "loss_history.json"), {"start_step": step_start, "loss": losses})
  return current_model(state)


def latest_checkpoint_dir(workdir: str) -> str | None:
  d = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(d):
    return None
  steps = [int(n) for n in os.listdir(d) if n.isdigit()]
  return os.path.join(d, str(max(steps))) if steps else None
