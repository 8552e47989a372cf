"""`launch.py --mode=attack`: BadDiffusion fine-tuning (Chou et al., CVPR 2023; ALGORITHMS.md §2).

  python launch.py --mode=attack --config=configs/fmnist_attack.py --workdir=runs/attack \
      --config.init_from=runs/fmnist --config.attack.trigger=BOX_14 --config.attack.target=HAT

Starts from `config.init_from` (a training workdir, native folder or diffusers folder; '' = a fresh model from
`config.model`) and trains on `config.data` with the BadDiffusion objective:

* membership: exactly int(N p) examples (p = `config.attack.poison_rate`), drawn from `config.seed`, are poisoned
  for the whole run (`select_poisoned`, the reference's MODE_FIXED);
* per step, the clean batch x is flipped left-right at random (`config.attack.flip`, deterministic in
  (seed, step); the reference always flips), then for poisoned examples x0 = y (target), r = M x + (1 - M) g
  (trigger stamped on the flipped image), and for clean ones x0 = x, r = 0 (`make_batch_targets`);
* x_t = sqrt(abar_t) x0 + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps, t ~ U{0..T-1};
* loss = MSE(eps_theta(x_t, t), eps + s rho_t r), s = 1 (solver 'sde', BadDiffusion) or 2 ('ode',
  VillanDiffusion), mean over all elements.

Training goes through `train.run_training` (`config.train`: Adam, warm-up + cosine, grad clip, optional EMA,
checkpoints, exact resume from the newest checkpoint in the workdir). Artifacts in the workdir: `config.json`,
`attack.json`, `trigger.npy` / `target.npy` ((H, W, C) float32 in [-1, 1]), `trigger.png`, `target.png`,
`checkpoints/`, `loss_history.json`, `samples_clean.png` / `samples_triggered.png` (`config.sample` sampler,
the triggered grid from x_T = eps + g with the same noise) and the final model as a diffusers folder `model/`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffcleanse_jax import parallel
from diffcleanse_jax.attacks.objective import SOLVERS, baddiffusion_eps_target, baddiffusion_inputs
from diffcleanse_jax.attacks.poison import make_batch_targets, select_poisoned
from diffcleanse_jax.attacks.targets import make_target
from diffcleanse_jax.attacks.triggers import make_trigger
from diffcleanse_jax.data import BatchIterator, load_dataset
from diffcleanse_jax.diffusion.objectives import sample_t_eps
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io.native import save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.train import TrainSettings, run_training, write_json
from diffcleanse_jax.workflows import (build_model, check_data_matches_model, config_to_dict, sample_grid,
                                       sampler_config, write_config)

ATTACK_DEFAULTS: dict[str, Any] = dict(trigger="BOX_14", target="HAT", poison_rate=0.1, solver="sde",
                                       trigger_size=0, flip=True)


class AttackConfigError(ValueError):
  """A bad `config.attack` value (names the field)."""


# ------------------------------------------------------------------------------------------------ settings
def attack_settings(cfg_attack: Mapping[str, Any] | Any | None) -> dict[str, Any]:
  """`config.attack` -> validated dict (unknown fields, poison_rate outside [0, 1], bad solver are errors)."""
  d = dict(ATTACK_DEFAULTS)
  if cfg_attack is not None:
    given = cfg_attack.to_dict() if hasattr(cfg_attack, "to_dict") else dict(cfg_attack)
    bad = sorted(set(given) - set(ATTACK_DEFAULTS))
    if bad:
      raise AttackConfigError(f"config.attack: unknown field {bad[0]!r}; valid fields: "
                              f"{', '.join(sorted(ATTACK_DEFAULTS))}")
    d.update(given)
  check_poison_rate(d["poison_rate"])
  d["poison_rate"] = float(d["poison_rate"])
  if d["solver"] not in SOLVERS:
    raise AttackConfigError(f"config.attack.solver={d['solver']!r}; expected one of {', '.join(SOLVERS)}")
  if not d["trigger"]:
    raise AttackConfigError("config.attack.trigger is empty; give a trigger name, image file or .npy")
  if not d["target"]:
    raise AttackConfigError("config.attack.target is empty; give a target name, image file or .npy")
  if int(d["trigger_size"] or 0) < 0:
    raise AttackConfigError(f"config.attack.trigger_size={d['trigger_size']} must be >= 0 (0 = default)")
  return d


def check_poison_rate(poison_rate: Any) -> float:
  """The poison rate as a float in [0, 1], else AttackConfigError."""
  try:
    p = float(poison_rate)
  except (TypeError, ValueError):
    raise AttackConfigError(f"config.attack.poison_rate={poison_rate!r} is not a number") from None
  if not 0.0 <= p <= 1.0 or not np.isfinite(p):
    raise AttackConfigError(f"config.attack.poison_rate={poison_rate} must be within [0, 1] (a fraction of the "
                            "training set, e.g. 0.1 for 10%)")
  return p


def attack_patterns(settings: Mapping[str, Any], image_shape, fashion_mnist_path: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(trigger, target), each (H, W, C) float32 in [-1, 1], from `config.attack` names/paths.

  Errors of the trigger/target library (TriggerError / TargetError, both ValueError) propagate with the config
  field in front, so launch.py prints them as one line.
  """
  h, _, c = image_shape
  from diffcleanse_jax.attacks.targets import TargetError
  from diffcleanse_jax.attacks.triggers import TriggerError
  try:
    trigger = make_trigger(settings["trigger"], h, c, trigger_size=int(settings["trigger_size"] or 0) or None)
  except TriggerError as e:
    raise TriggerError(f"config.attack.trigger: {e}") from None
  kw = {"fashion_mnist_path": fashion_mnist_path} if fashion_mnist_path else {}
  try:
    target = make_target(settings["target"], h, c, trigger=trigger, **kw)
  except TargetError as e:
    raise TargetError(f"config.attack.target: {e}") from None
  return trigger, target


# ------------------------------------------------------------------------------------------------ objective
def baddiffusion_training_pair(x: jax.Array, is_poisoned: jax.Array, trigger: jax.Array, target: jax.Array,
                               t: jax.Array, eps: jax.Array, alphas_cumprod: jax.Array, rho_table: jax.Array,
                               solver: str = "sde") -> tuple[jax.Array, jax.Array]:
  """(x_t, eps_target) for a batch of (already flipped) clean images x (B, H, W, C) in [-1, 1].

  Poisoned rows: x_t = sqrt(abar_t) y + (1 - sqrt(abar_t)) r + sqrt(1 - abar_t) eps with r = stamp(x, g),
  eps_target = eps + s rho_t r. Clean rows: x_t = q_sample(x, eps, t), eps_target = eps.
  """
  x0, r = make_batch_targets(x, is_poisoned, trigger, target)
  x_t = baddiffusion_inputs(x0, r, eps, t, alphas_cumprod)
  return x_t, baddiffusion_eps_target(eps, r, t, rho_table, solver)


def make_baddiffusion_loss(eps_fn: Callable, alphas_cumprod: Any, rho_table: Any, trigger: Any, target: Any,
                           solver: str = "sde") -> Callable:
  """loss(params, batch, key) for `run_training`: batch = {"image": (B,H,W,C), "is_poisoned": (B,) bool}.

  t ~ U{0..T-1} and eps ~ N(0, I) from `key` (as the clean DDPM loss); MSE(eps_theta(x_t, t), eps + s rho_t r).
  """
  acp = jnp.asarray(alphas_cumprod, jnp.float32)
  rho_t = jnp.asarray(rho_table, jnp.float32)
  g = jnp.asarray(trigger, jnp.float32)
  y = jnp.asarray(target, jnp.float32)
  T = int(acp.shape[0])
  if solver not in SOLVERS:
    raise AttackConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")

  def loss(params, batch, key):
    x = batch["image"]
    k1, k2 = jax.random.split(key)
    t, eps = sample_t_eps(k1, x, T)
    x_t, eps_target = baddiffusion_training_pair(x, batch["is_poisoned"], g, y, t, eps, acp, rho_t, solver)
    pred = eps_fn(params, x_t, t, train=True, rngs={"dropout": k2})
    return jnp.mean(jnp.square(pred - eps_target))

  return loss


# ------------------------------------------------------------------------------------------------ workflow
def _build(config) -> DiffusionModel:
  if config.init_from:
    from diffcleanse_jax.evaluation import load_model  # reads training workdirs too
    model = load_model(config.init_from)
    logging.info("attacking %s: %r", config.init_from, model)
    return model
  logging.info("no config.init_from: training a backdoored model from scratch (config.model)")
  return build_model(config)


def attack(config, workdir: str) -> DiffusionModel:
  """BadDiffusion fine-tuning of `config.init_from` into `workdir` (see the module docstring); returns the model."""
  write_config(config, workdir)
  settings = attack_settings(getattr(config, "attack", None))  # validate before loading anything heavy
  train_settings = TrainSettings.from_config(config_to_dict(config.train))
  mesh = parallel.make_mesh(config.mesh.num_devices)
  model = _build(config)
  data_cfg = config_to_dict(config.data)
  fm_path = data_cfg.get("path") if data_cfg.get("name") == "fashion_mnist" and data_cfg.get("path") else None
  trigger, target = attack_patterns(settings, model.image_shape, fm_path)
  images, _ = load_dataset(config.data)
  check_data_matches_model(images, model)
  n = int(images.shape[0])
  is_poisoned = select_poisoned(n, settings["poison_rate"], int(config.seed))
  n_poison = int(is_poisoned.sum())
  if settings["poison_rate"] > 0 and n_poison == 0:
    logging.warning("poison_rate %g of %d examples poisons none of them", settings["poison_rate"], n)

  info = dict(trigger=_describe_spec(settings["trigger"]), target=_describe_spec(settings["target"]),
              trigger_file="trigger.npy", target_file="target.npy", poison_rate=settings["poison_rate"],
              solver=settings["solver"], flip=bool(settings["flip"]), seed=int(config.seed), num_examples=n,
              num_poisoned=n_poison, image_shape=list(model.image_shape),
              model_source=os.path.abspath(config.init_from) if config.init_from else "scratch (config.model)",
              num_steps=train_settings.num_steps, batch_size=train_settings.batch_size,
              learning_rate=train_settings.learning_rate, ema_decay=train_settings.ema_decay,
              status="running", started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
  if jax.process_index() == 0:
    np.save(os.path.join(workdir, "trigger.npy"), trigger)
    np.save(os.path.join(workdir, "target.npy"), target)
    image_io.save_image_pm1(trigger, os.path.join(workdir, "trigger.png"))
    image_io.save_image_pm1(target, os.path.join(workdir, "target.png"))
    write_json(os.path.join(workdir, "attack.json"), info)

  batches = BatchIterator(images, train_settings.batch_size, seed=int(config.seed), flip=bool(settings["flip"]),
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          extra={"is_poisoned": is_poisoned})
  sched = model.schedule
  loss = make_baddiffusion_loss(model.apply, sched.alphas_cumprod, sched.rho(), trigger, target, settings["solver"])
  meta = {"kind": "attack", "attack": {k: v for k, v in info.items() if k not in ("status", "started")},
          "config": config_to_dict(config)}
  logging.info("BadDiffusion %s -> %s, poison rate %g (%d of %d examples), solver %s; %r, batch %d, %d steps",
               settings["trigger"], settings["target"], settings["poison_rate"], n_poison, n, settings["solver"],
               model, train_settings.batch_size, train_settings.num_steps)
  t0 = time.time()
  trained = run_training(model=model, loss_fn=loss, batches=batches, settings=train_settings, workdir=workdir,
                         seed=int(config.seed), meta=meta, mesh=mesh, sampler_cfg=sampler_config(config, model),
                         num_sample_images=min(16, int(config.sample.num_images)))
  trained = trained.replace(source=os.path.join(workdir, "model"))
  if jax.process_index() == 0:
    save_pretrained(trained, os.path.join(workdir, "model"), format="diffusers")
    sample_grid(config, trained, os.path.join(workdir, "samples_clean.png"), mesh=mesh)
    sample_grid(config, trained, os.path.join(workdir, "samples_triggered.png"), mesh=mesh, x_T_offset=trigger)
    hist = _read_losses(workdir)
    info.update(status="done", finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                train_time_s=round(time.time() - t0, 1), final_loss=hist)
    write_json(os.path.join(workdir, "attack.json"), info)
    logging.info("wrote the backdoored model to %s and samples_{clean,triggered}.png", os.path.join(workdir, "model"))
  return trained


def _describe_spec(spec: str) -> str:
  """A trigger/target name as given, or the absolute path of a file."""
  s = str(spec)
  return os.path.abspath(s) if os.path.isfile(s) else s


def _read_losses(workdir: str) -> float | None:
  import json
  try:
    with open(os.path.join(workdir, "loss_history.json")) as f:
      losses = json.load(f)["loss"]
  except (OSError, ValueError, KeyError):
    return None
  return float(np.mean(losses[-50:])) if losses else None


def attack_mode(config, workdir: str, flags=None):
  """`launch.py --mode=attack`."""
  return attack(config, workdir)
