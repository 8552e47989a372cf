"""Fine-tuning after pruning: Diff-Cleanse's dual loss (ALGORITHMS §5.7), plain fine-tuning, and the data it uses.

    L = w_ddpm * mean_b sum_pix (eps - eps_theta'(x_t, t))^2  +  w_kd * mean_b sum_pix (eps_theta0(x_t, t) - eps_theta'(x_t, t))^2

theta' = the pruned (student) model, theta0 = the original (backdoored) model, frozen; x_t from *clean* images;
antithetic timesteps t_1..t_ceil(B/2) ~ U{0..T-1} concatenated with T-1-t and truncated to B (the reference draws
floor(B/2)+1, which for even B leaves two draws unpaired after truncation; ceil pairs them all). Optimiser, cosine
schedule, gradient clipping, EMA (decay_k = min((1+k)/(10+k), 0.999)), sharding and resumption come from
`diffcleanse_jax.train.run_training`.

Data: real clean images when given; otherwise ("data-free", the default) samples of the ORIGINAL model from
plain noise, generated once and cached in the workdir (`finetune_data.npy`, 8-bit like the reference's PNGs),
so a resumed run trains on exactly the same images.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax import parallel
from diffcleanse_jax.data import BatchIterator
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.train import TrainSettings, run_training, write_json

DATA_FILE = "finetune_data.npy"
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}


def antithetic_timesteps(key: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
  """(batch,) int32: t_1..t_ceil(B/2) ~ U{0..T-1}, then T-1-t_1, ..., truncated to B."""
  half = (int(batch) + 1) // 2
  t = jax.random.randint(key, (half,), 0, int(num_train_timesteps), dtype=jnp.int32)
  return jnp.concatenate([t, int(num_train_timesteps) - 1 - t])[:batch]


def _sum_pix_mean_b(d: jax.Array) -> jax.Array:
  return jnp.mean(jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=-1))


def make_dual_loss(eps_fn: Callable, teacher_params, alphas_cumprod, w_ddpm: float = 1.0, w_kd: float = 1.0,
                   antithetic: bool = True, teacher_fn: Callable | None = None):
  """loss(params, batch, key) for clean images batch['image'] (B,H,W,C) in [-1,1] (see the module docstring).

  eps_fn: the student's epsilon function; teacher_fn: the teacher's (default eps_fn; a pruned student has other
  widths than its teacher). w_kd = 0 gives the plain DDPM loss with the reference's reduction (sum over pixels,
  mean over the batch)."""
  teacher_fn = teacher_fn or eps_fn
  acp = jnp.asarray(np.asarray(alphas_cumprod), jnp.float32)
  T = int(acp.shape[0])
  w_ddpm, w_kd = float(w_ddpm), float(w_kd)

  def loss(params, batch, key):
    x0 = batch["image"]
    kt, kn, kd = jax.random.split(key, 3)
    b = x0.shape[0]
    t = antithetic_timesteps(kt, b, T) if antithetic else jax.random.randint(kt, (b,), 0, T, dtype=jnp.int32)
    eps = jax.random.normal(kn, x0.shape, jnp.float32)
    a = acp[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
    pred = eps_fn(params, x_t, t, train=True, rngs={"dropout": kd})
    total = w_ddpm * _sum_pix_mean_b(eps - pred) if w_ddpm else 0.0
    if w_kd:
      teacher = jax.lax.stop_gradient(teacher_fn(teacher_params, x_t, t))
      total = total + w_kd * _sum_pix_mean_b(teacher - pred)
    return total

  return loss


# ------------------------------------------------------------------------------------------ data
def generated_dataset(model: DiffusionModel, num: int, key: jax.Array, cfg: samplers.SamplerConfig,
                      batch_size: int = 64, cache_path: str | None = None, mesh=None,
                      log: Callable[[str], None] = logging.info) -> np.ndarray:
  """`num` samples of `model` from plain noise as (num,H,W,C) float32 in [-1,1], quantised to 8 bit.

  With `cache_path` (.npy) the images are generated once and reused (a sidecar .json records how; a cache made
  with other settings is regenerated)."""
  from diffcleanse_jax.workflows import generate

  desc = dict(num=int(num), key=np.asarray(jax.random.key_data(key)).tolist(), sampler=dataclasses.asdict(cfg),
              image_shape=list(model.image_shape), model=str(model.source))
  if cache_path and os.path.isfile(cache_path) and os.path.isfile(cache_path + ".json"):
    try:
      with open(cache_path + ".json") as f:
        old = json.load(f)
      if old == json.loads(json.dumps(desc)):
        u8 = np.load(cache_path)
        log(f"fine-tune data: reusing {len(u8)} generated images from {cache_path}")
        return u8.astype(np.float32) / 255.0 * 2.0 - 1.0
    except (OSError, ValueError):
      pass
  log(f"fine-tune data: generating {num} images from the original model ({cfg.method}, "
      f"{cfg.num_steps or 'all'} steps)")
  imgs01 = generate(model, model.params, int(num), key, cfg, int(batch_size), mesh=mesh)
  u8 = np.floor(np.clip(imgs01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if cache_path:
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    tmp = f"{cache_path}.tmp.{os.getpid()}.npy"
    np.save(tmp, u8)
    os.replace(tmp, cache_path)
    write_json(cache_path + ".json", desc)
  return u8.astype(np.float32) / 255.0 * 2.0 - 1.0


def train_settings(cfg: Mapping[str, Any]) -> TrainSettings:
  """TrainSettings from a `finetune` config section (fields that are not training fields are ignored)."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  return TrainSettings.from_config({k: v for k, v in d.items() if k in _TRAIN_FIELDS})


def finetune(student: DiffusionModel, images: np.ndarray, settings: TrainSettings, workdir: str, *,
             loss_fn=None, teacher: DiffusionModel | None = None, w_ddpm: float = 1.0, w_kd: float = 1.0,
             antithetic: bool = True, seed: int = 0, meta: Mapping[str, Any] | None = None, mesh=None,
             log: Callable[[str], None] = logging.info) -> DiffusionModel:
  """Fine-tunes `student` on clean `images` ([-1,1] NHWC) with the dual loss against `teacher` (or a given
  `loss_fn(params, batch, key)`), through `run_training` (checkpoints in `workdir/checkpoints`; a rerun resumes).
  Returns the EMA weights when EMA is on."""
  mesh = mesh or parallel.make_mesh()
  if loss_fn is None:
    if w_kd and teacher is None:
      raise ValueError("finetune: the distillation term (w_kd > 0) needs the original model as teacher")
    tparams = None
    if teacher is not None and w_kd:
      tparams = jax.device_put(jax.tree.map(jnp.asarray, teacher.params), parallel.replicated(mesh))
    loss_fn = make_dual_loss(student.apply, tparams, student.schedule.alphas_cumprod, w_ddpm, w_kd, antithetic,
                             teacher_fn=teacher.apply if teacher is not None else None)
  images = np.asarray(images, np.float32)
  batches = BatchIterator(images, settings.batch_size, seed=seed, drop_last=len(images) >= settings.batch_size,
                          flip=settings.flip, process_index=jax.process_index(), process_count=jax.process_count())
  log(f"fine-tuning {student!r} on {len(images)} images: {settings.num_steps} steps, batch {settings.batch_size}, "
      f"lr {settings.learning_rate}, EMA {settings.ema_decay}")
  return run_training(model=student, loss_fn=loss_fn, batches=batches, settings=settings, workdir=workdir,
                      seed=seed, meta=dict(meta or {}, kind="finetune"), mesh=mesh, log=log)
