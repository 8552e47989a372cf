"""Library entry points behind `launch.py` for the substrate modes: train, sample, import, export.

Each takes the resolved ConfigDict and a workdir and writes its artifacts there, next to `config.json`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax import parallel
from diffcleanse_jax.data import BatchIterator, load_dataset
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.diffusion.objectives import make_ddpm_loss
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io.native import load_pretrained, save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.train import TrainSettings, run_training, write_json


def config_to_dict(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def write_config(config, workdir: str, name: str = "config.json") -> str:
  """Writes the resolved config next to the artifacts (every mode calls this first)."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    write_json(path, config_to_dict(config))
  return path


def sampler_config(config, model: DiffusionModel | None = None, **overrides) -> samplers.SamplerConfig:
  """SamplerConfig from `config.sample` (+ the model's scheduler_config for variance/spacing defaults)."""
  s = config.sample
  kw = dict(method=s.method, num_steps=int(s.num_steps) or None, eta=float(s.eta), clip_sample=bool(s.clip_sample))
  kw.update({k: v for k, v in overrides.items() if v is not None})
  return samplers.SamplerConfig.from_scheduler_config(model.scheduler_config if model else None, **kw)


def build_model(config) -> DiffusionModel:
  """`config.init_from` if set (fine-tuning), else a fresh model from `config.model` + `config.scheduler`."""
  if config.init_from:
    model = load_pretrained(config.init_from)
    logging.info("initialised from %s: %r", config.init_from, model)
    return model
  model = DiffusionModel.from_config(config_to_dict(config.model), key=jax.random.key(config.seed),
                                     scheduler_config=dict(config_to_dict(config.scheduler),
                                                           _class_name="DDPMScheduler"),
                                     source="config.model")
  return model


def check_data_matches_model(images: np.ndarray, model: DiffusionModel, what: str = "config.data") -> None:
  h, w, c = images.shape[1:]
  if (h, w, c) != tuple(model.image_shape):
    raise ValueError(f"{what}: images are {h}x{w}x{c} but the model expects {model.image_shape[0]}x"
                     f"{model.image_shape[1]}x{model.image_shape[2]} (set data.image_size / data.channels)")


def generate(model: DiffusionModel, params, num: int, key: jax.Array, cfg: samplers.SamplerConfig,
             batch_size: int = 64, x_T_offset=None, mesh=None) -> np.ndarray:
  """`num` samples in [0,1] (num,H,W,C), in batches sharded over the data mesh. Noise for sample i depends only
  on (key, i // batch_size) so results do not depend on the device count."""
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.shape[parallel.DATA_AXIS]
  bs = max(n_dev, (min(batch_size, num) + n_dev - 1) // n_dev * n_dev)
  out = []
  for b in range((num + bs - 1) // bs):
    kb = jax.random.fold_in(key, b)
    k_noise, k_sample = jax.random.split(kb)
    x_T = jax.random.normal(k_noise, (bs, *model.image_shape), jnp.float32)
    if x_T_offset is not None:
      x_T = x_T + jnp.asarray(x_T_offset, jnp.float32)
    x_T = jax.device_put(x_T, parallel.data_sharded(mesh))
    x0 = samplers.sample(model, params, x_T, k_sample, cfg)
    out.append(np.asarray(samplers.to_images01(x0)))
  return np.concatenate(out)[:num]


def train(config, workdir: str) -> DiffusionModel:
  """DDPM training (or clean fine-tuning with init_from): checkpoints, final grid, exported diffusers folder."""
  write_config(config, workdir)
  mesh = parallel.make_mesh(config.mesh.num_devices)
  images, _ = load_dataset(config.data)  # first: a missing dataset is reported before the model is built
  model = build_model(config)
  check_data_matches_model(images, model)
  settings = TrainSettings.from_config(config_to_dict(config.train))
  batches = BatchIterator(images, settings.batch_size, seed=config.seed, flip=settings.flip,
                          process_index=jax.process_index(), process_count=jax.process_count())
  loss = make_ddpm_loss(model.apply, model.schedule.alphas_cumprod)
  meta = {"kind": "train", "config": config_to_dict(config)}
  logging.info("training %r on %d images, batch %d, %d steps, %d devices", model, len(images),
               settings.batch_size, settings.num_steps, mesh.size)
  trained = run_training(model=model, loss_fn=loss, batches=batches, settings=settings, workdir=workdir,
                         seed=config.seed, meta=meta, mesh=mesh, sampler_cfg=sampler_config(config, model),
                         num_sample_images=min(16, config.sample.num_images))
  if jax.process_index() == 0:
    save_pretrained(trained, os.path.join(workdir, "model"), format="diffusers")
    grid = sample_grid(config, trained, os.path.join(workdir, "samples", "final.png"), mesh=mesh)
    logging.info("wrote %s (%d samples) and the model to %s", grid, config.sample.num_images,
                 os.path.join(workdir, "model"))
  return trained


def sample_grid(config, model: DiffusionModel, path: str, mesh=None, x_T_offset=None, seed_offset: int = 0) -> str:
  cfg = sampler_config(config, model)
  imgs = generate(model, model.params, int(config.sample.num_images), jax.random.key(config.seed + seed_offset),
                  cfg, int(config.sample.batch_size), x_T_offset=x_T_offset, mesh=mesh)
  image_io.save_grid(imgs, path)
  return path


def sample(config, workdir: str, model_path: str) -> str:
  """--mode=sample: a PNG grid of config.sample.num_images samples from the model at `model_path`."""
  write_config(config, workdir)
  model = load_pretrained(model_path)
  path = sample_grid(config, model, os.path.join(workdir, "samples.png"))
  logging.info("wrote %s", path)
  return path


def import_model(config, workdir: str, model_path: str) -> str:
  """--mode=import: a diffusers folder (or any loadable model) -> native folder `workdir/model`."""
  write_config(config, workdir)
  model = load_pretrained(model_path)
  out = save_pretrained(model, os.path.join(workdir, "model"), format="native")
  write_json(os.path.join(workdir, "import.json"), {"source": model_path, "num_params": model.num_params,
                                                   "model_config": model.config})
  logging.info("imported %r -> %s", model, out)
  return out


def export_model(config, workdir: str, model_path: str, out: str | None = None) -> str:
  """--mode=export: any loadable model -> diffusers folder (default `workdir/diffusers`)."""
  write_config(config, workdir)
  model = load_pretrained(model_path)
  out = out or os.path.join(workdir, "diffusers")
  save_pretrained(model, out, format="diffusers")
  logging.info("exported %r -> %s", model, out)
  return out


# ------------------------------------------------------------------------------------------ launch.py modes
def need_flag(flags, name: str):
  """The value of --name, or a one-line error saying the mode needs it."""
  value = getattr(flags, name, None)
  if not value:
    raise ValueError(f"--mode={getattr(flags, 'mode', '?')} needs --{name}")
  return value


def train_mode(config, workdir: str, flags=None):
  return train(config, workdir)


def sample_mode(config, workdir: str, flags):
  return sample(config, workdir, need_flag(flags, "model"))


def import_mode(config, workdir: str, flags):
  return import_model(config, workdir, need_flag(flags, "model"))


def export_mode(config, workdir: str, flags):
  return export_model(config, workdir, need_flag(flags, "model"), getattr(flags, "out", None))
