"""Evaluation of (possibly backdoored) diffusion models: backdoor metrics and clean-sample quality.

  python launch.py --mode=evaluate --config=configs/fmnist_attack.py --model=runs/attack/model \
      --trigger=BOX_14 --target=HAT --workdir=runs/eval

What is measured (ALGORITHMS.md §2.6, §6), all from the `config.eval` section:

* **Backdoor** (needs `--trigger` and `--target`): `num_samples` images from triggered noise x_T = eps + g (g the
  full trigger, -1 background included, as `IBM/BadDiffusion`), sampled with `method`/`num_steps` (default:
  DDPM ancestral with every training step; `num_steps=0` = all for ddpm, 50 for ddim). Against the target y:
  `mse` (per-image mean over H, W, C, averaged), `ssim` (Gaussian window 11, sigma 1.5) and `asr` = fraction of
  samples with per-image MSE < `asr_threshold` (1e-3, VillanDiffusion's `mse_thres_batch`), all on images
  quantised to 8 bit as the reference's PNG round trip (`metrics.backdoor.backdoor_metrics`). A BadDiffusion
  (SDE) backdoor is measured with the DDPM sampler: it does not carry over to DDIM (an ODE sampler).
* **Clean samples** (`clean=True`): the same number of images from plain noise (the *same* noise draws as the
  triggered ones, so the two grids are paired). Their MSE/ASR against the target is reported as `clean_mse` /
  `clean_asr` (specificity: the backdoor should not fire without the trigger). For 32x32 grayscale models also
  `fd`: the Fréchet distance in the feature space of the committed Fashion-MNIST classifier
  (`metrics.classifier.fd_score`) against the Fashion-MNIST test set, over `fd_num_samples` clean samples
  (0 = `num_samples`). This is FD, not FID: comparable only with other FD numbers; with few samples it is
  biased upwards, so compare runs with the same sample count. Below the feature width (128) the covariance is
  rank-deficient and FD swings by 3x between disjoint 64-sample sets of one model (benchmarks/fd_spread.py).
  `fd_method`/`fd_num_steps` draw the FD samples with another sampler than the backdoor's (e.g. `ddim`/50: 20x
  fewer network calls per sample than DDPM-1000, so FD on 512 samples costs less than on 32), from the same
  noise; "" / 0 = the eval sampler. The grid and `clean_asr` always use the eval sampler.
* `--trigger` without `--target`: clean quality plus the triggered samples' grid and `triggered_pixel_std`
  (per-pixel std over the triggered samples, mean over pixels, [0, 1] units: close to 0 when the trigger makes
  every sample the same image); `asr`/`mse`/`ssim` are null.

**Inference-time clipping defence** (BadDiffusion §4.6.2, ALGORITHMS.md §7.4): `--config.eval.clip_sample=True`
clamps the predicted x0 to [-1, 1] at every sampler step (diffusers' `clip_sample`). No training is involved;
it weakens a BadDiffusion backdoor (MSE to the target rises) while clean quality barely changes. The flag is
recorded in `metrics.json` (`clip_sample`, `sampler`).

Outputs in the workdir: `metrics.json`, `samples_clean.png`, `samples_triggered.png`, `trigger.png`, `target.png`
and the resolved `config.json`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from diffcleanse_jax.attacks.targets import make_target
from diffcleanse_jax.attacks.triggers import make_trigger
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io.native import load_pretrained, load_training_checkpoint
from diffcleanse_jax.metrics.backdoor import backdoor_metrics
from diffcleanse_jax.metrics.protocol import eval_sampler_config, eval_settings
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.train import CHECKPOINT_DIR, write_json
from diffcleanse_jax.workflows import generate, need_flag, write_config


# ------------------------------------------------------------------------------------------------ inputs
def load_model(path: str) -> DiffusionModel:
  """Any model path: diffusers folder, native folder, or a training/attack workdir (newest checkpoint, EMA).

  A workdir also holds the run's resolved `config.json`, which `load_pretrained` mistakes for a diffusers model
  config; workdirs with a `checkpoints/` folder are therefore read as training checkpoints first.
  """
  path = os.fspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) and not os.path.isfile(
      os.path.join(path, "diffusion_pytorch_model.safetensors")):
    return load_training_checkpoint(path)
  return load_pretrained(path)


def describe_sampler(model: DiffusionModel, cfg: samplers.SamplerConfig) -> dict[str, Any]:
  T = model.schedule.num_train_timesteps
  steps = cfg.num_steps or (T if cfg.method == "ddpm" else 50)
  d = dict(method=cfg.method, num_steps=int(steps), clip_sample=bool(cfg.clip_sample),
           timestep_spacing=cfg.timestep_spacing)
  if cfg.method == "ddpm":
    d["variance_type"] = cfg.variance_type
  else:
    d["eta"] = float(cfg.eta)
  return d


def resolve_trigger(spec: str | None, image_shape, trigger_size: int | None = None) -> np.ndarray | None:
  """A built-in trigger name, an image file or a `.npy` (H, W, C) -> (H, W, C) float32, or None. A `.npy` may hold
  any finite values (an inverted trigger from `--mode=detect` is an offset of x_T, often outside [-1, 1])."""
  if not spec:
    return None
  h, _, c = image_shape
  return make_trigger(spec, h, c, trigger_size=trigger_size or None, bounded=False)


def resolve_target(spec: str | None, image_shape, trigger: np.ndarray | None = None,
                   fashion_mnist_path: str | None = None) -> np.ndarray | None:
  """A built-in target name, an image file or a `.npy` (H, W, C) in [-1, 1] -> (H, W, C) float32, or None.

  Targets built from the trigger (NOSHIFT/TRIGGER/SHIFT) get `trigger`.
  """
  if not spec:
    return None
  h, _, c = image_shape
  kw = {"fashion_mnist_path": fashion_mnist_path} if fashion_mnist_path else {}
  return make_target(spec, h, c, trigger=trigger, **kw)


# ------------------------------------------------------------------------------------------------ sampling
def _generate_logged(model, params, num, key, cfg, batch_size, x_T_offset, what, log) -> np.ndarray:
  """`workflows.generate` chunk by chunk (chunk b uses fold_in(key, b)) with a progress line per chunk."""
  bs = int(min(batch_size, num))
  chunks, t0, done = [], time.time(), 0
  for b in range((num + bs - 1) // bs):
    m = min(bs, num - done)
    chunks.append(generate(model, params, m, jax.random.fold_in(key, b), cfg, batch_size=bs, x_T_offset=x_T_offset))
    done += m
    el = time.time() - t0
    log(f"{what}: {done}/{num} samples ({el:.0f}s, ETA {el / done * (num - done):.0f}s)")
  return np.concatenate(chunks)[:num]


def _fd_applicable(model: DiffusionModel) -> bool:
  return tuple(model.image_shape) == (32, 32, 1)


def evaluate_model(model: DiffusionModel, trigger: np.ndarray | None, target: np.ndarray | None,
                   cfg_eval: Mapping[str, Any] | Any | None, key: jax.Array, *, params=None,
                   out_dir: str | None = None, fd_reference: Any = None, return_samples: bool = False,
                   log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Backdoor metrics and clean quality of `model` (see the module docstring).

  trigger, target: (H, W, C) in [-1, 1] or None (target needs a trigger). cfg_eval: the `config.eval` section
  (mapping or ConfigDict). key: PRNG key; the clean and triggered sets use the same noise. params: defaults to
  `model.params`. out_dir: if set, PNG grids `samples_clean.png` / `samples_triggered.png` go there.
  fd_reference: passed to `fd_score` (None = Fashion-MNIST test set statistics).
  Returns a JSON-ready dict: asr, mse, ssim (None without target), num_samples, mse_threshold, sampler,
  clip_sample, fd (None when not applicable), clean_asr/clean_mse (clean samples vs target), timings;
  with `return_samples`, also `clean_samples` / `triggered_samples` (N, H, W, C) in [-1, 1].
  """
  e = eval_settings(cfg_eval)
  params = model.params if params is None else params
  shape = tuple(model.image_shape)
  for name, arr in (("trigger", trigger), ("target", target)):
    if arr is not None and tuple(np.shape(arr)) != shape:
      raise ValueError(f"{name} has shape {tuple(np.shape(arr))} but the model makes {shape} images")
  if target is not None and trigger is None:
    raise ValueError("a backdoor target needs a trigger (triggered noise is what should reach the target)")
  cfg = eval_sampler_config(model, e)
  n, bs = int(e["num_samples"]), int(e["batch_size"])
  want_clean = bool(e["clean"])
  n_fd = int(e["fd_num_samples"]) or n
  fd_ok = want_clean and _fd_applicable(model)
  fd_cfg = eval_sampler_config(model, e, fd=True)
  fd_shared = fd_cfg == cfg  # FD from the clean grid's own samples
  fd_desc = describe_sampler(model, fd_cfg)
  fd_tag = f"{fd_desc['method']}-{fd_desc['num_steps']}"
  n_clean = max(n, n_fd) if fd_ok and fd_shared else n
  sampler = describe_sampler(model, cfg)
  out: dict[str, Any] = dict(asr=None, mse=None, ssim=None, num_samples=n, mse_threshold=float(e["asr_threshold"]),
                             sampler=sampler, clip_sample=bool(cfg.clip_sample), fd=None, fd_num_samples=None,
                             clean_asr=None, clean_mse=None, num_clean_samples=n_clean if want_clean else 0)
  tag = f"{sampler['method']}-{sampler['num_steps']}{' clip' if cfg.clip_sample else ''}"
  log(f"evaluating {model!r} with {tag}: {n} triggered and {out['num_clean_samples']} clean samples")
  samples = {}
  timings = {}
  if trigger is not None:
    t0 = time.time()
    x01 = _generate_logged(model, params, n, key, cfg, bs, np.asarray(trigger, np.float32), "triggered", log)
    timings["triggered_s"] = round(time.time() - t0, 2)
    samples["triggered"] = x01 * 2.0 - 1.0
    out["triggered_pixel_std"] = float(np.mean(np.std(x01, axis=0)))
    if target is not None:
      m = backdoor_metrics(samples["triggered"], target, threshold=float(e["asr_threshold"]))
      out.update(asr=m["asr"], mse=m["mse"], ssim=m["ssim"])
    if out_dir:
      image_io.save_grid(x01, os.path.join(out_dir, "samples_triggered.png"))
  if want_clean:
    t0 = time.time()
    x01 = _generate_logged(model, params, n_clean, key, cfg, bs, None, "clean", log)
    timings["clean_s"] = round(time.time() - t0, 2)
    samples["clean"] = x01 * 2.0 - 1.0
    if target is not None:
      m = backdoor_metrics(samples["clean"][:n], target, threshold=float(e["asr_threshold"]))
      out.update(clean_asr=m["asr"], clean_mse=m["mse"])
    if fd_ok:
      from diffcleanse_jax.metrics.classifier import fd_score
      fd_samples = samples["clean"][:n_fd]
      if not fd_shared:
        t0 = time.time()
        fd_samples = _generate_logged(model, params, n_fd, key, fd_cfg, bs, None, f"FD ({fd_tag})", log) * 2.0 - 1.0
        timings["fd_samples_s"] = round(time.time() - t0, 2)
      try:
        out["fd"] = float(fd_score(fd_samples, reference=fd_reference))
        out["fd_num_samples"] = n_fd
        out["fd_sampler"] = fd_desc
      except FileNotFoundError as err:  # no Fashion-MNIST on this machine: report, do not fail the evaluation
        out["fd_skipped"] = str(err)
        log(f"FD skipped: {err}")
    if out_dir:
      image_io.save_grid(x01[:n], os.path.join(out_dir, "samples_clean.png"))
  out["timings"] = timings
  summary = ", ".join(f"{k} {out[k]:.4g}" for k in ("asr", "mse", "ssim", "clean_asr", "fd")
                      if isinstance(out.get(k), float))
  log(f"evaluation ({tag}): {summary or 'no metrics (no target, no FD)'}")
  if return_samples:
    out["clean_samples"] = samples.get("clean")
    out["triggered_samples"] = samples.get("triggered")
  return out


# ------------------------------------------------------------------------------------------------ launch.py mode
def _section(config, name: str) -> dict[str, Any]:
  sec = getattr(config, name, None)
  if sec is None:
    return {}
  return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


def evaluate(config, workdir: str, model_path: str, trigger_spec: str | None = None,
             target_spec: str | None = None) -> dict[str, Any]:
  """Evaluates the model at `model_path`; writes metrics.json and grids into `workdir`; returns the metrics."""
  write_config(config, workdir)
  if target_spec and not trigger_spec:
    raise ValueError("--target needs --trigger (the backdoor is reached from triggered noise)")
  e = eval_settings(_section(config, "eval"))
  model = load_model(model_path)
  shape = tuple(model.image_shape)
  trigger_size = int(_section(config, "attack").get("trigger_size", 0) or 0)
  trigger = resolve_trigger(trigger_spec, shape, trigger_size)
  data = _section(config, "data")
  fm_path = data.get("path") if data.get("name") == "fashion_mnist" and data.get("path") else None
  target = resolve_target(target_spec, shape, trigger, fm_path)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    if trigger is not None:
      image_io.save_image_pm1(trigger, os.path.join(workdir, "trigger.png"))
    if target is not None:
      image_io.save_image_pm1(target, os.path.join(workdir, "target.png"))
  t0 = time.time()
  metrics = evaluate_model(model, trigger, target, e, jax.random.key(int(config.seed)),
                           out_dir=workdir if jax.process_index() == 0 else None)
  metrics.update(model=dict(path=os.path.abspath(model_path), description=repr(model), num_params=model.num_params,
                            image_shape=list(shape)),
                 trigger=trigger_spec or None, target=target_spec or None, seed=int(config.seed),
                 eval_config=e, wall_time_s=round(time.time() - t0, 2),
                 date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), devices=[str(d) for d in jax.devices()])
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "metrics.json"), metrics)
    logging.info("wrote %s", os.path.join(workdir, "metrics.json"))
  return metrics


def evaluate_mode(config, workdir: str, flags):
  """--mode=evaluate --model=PATH [--trigger=T [--target=Y]] --workdir=DIR."""
  return evaluate(config, workdir, need_flag(flags, "model"), getattr(flags, "trigger", None),
                  getattr(flags, "target", None))
