"""End-to-end cleansing of a (possibly) backdoored diffusion model (Diff-Cleanse, ALGORITHMS §4-§5.8, and baselines).

    cleanse(model, config, workdir, key, true_trigger=None, true_target=None) -> report dict

1. detect   DETECTORS[config.detection.method](model, config, key) -> DetectionResult (cached: detection.json).
2. trigger  the detection's trigger (or `invert_trigger`), or the true one with config.prune.use_true_trigger.
3. remove   config.cleanse.method, only if backdoored or config.cleanse.force:
              diffcleanse  Taylor scores (clean + backdoor passes) -> prune -> dual-loss fine-tune (default)
              prune        the same without fine-tuning (ablation)
              finetune     dual-loss fine-tuning without pruning (ablation)
              elijah       Elijah's removal loss (defense/elijah.py) with the inverted trigger
              clip         inference-time clipping: no training, scheduler_config gets clip_sample=True
              anp          BadDiffusion's ANP probe: the cleansed folder holds the ANP-perturbed model
4. evaluate before/after with the same noise: MSCR-style collapse of samples from noise + inverted trigger
            (the defender's ASR), ASR/MSE/SSIM with the true trigger/target when the glue supplies them
            (`evaluation.evaluate_model`), FD of clean samples for 32x32x1 models, parameters, FLOPs.
5. write    DIR/cleansed/ (diffusers folder, pruned widths in config.json), DIR/report.json, DIR/report.md,
            DIR/images/*.png.

Every stage leaves its result in the workdir (detection.json, finetune_data.npy, pruned/, finetune/checkpoints,
eval_before.json), so rerunning the same command resumes where it stopped; a workdir made with other
detection/inversion/prune/finetune/cleanse settings is refused (cleanse_settings.json).

This module never imports diffcleanse_jax.attacks: true triggers/targets arrive as arrays.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from diffcleanse_jax import parallel
from diffcleanse_jax.defense import anp as anp_lib
from diffcleanse_jax.defense import finetune as ft
from diffcleanse_jax.defense import pruning
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io.native import load_pretrained, save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.io.files import write_json, write_text_atomic
from diffcleanse_jax.metrics.protocol import eval_sampler_config, eval_settings

METHODS = ("diffcleanse", "prune", "finetune", "elijah", "clip", "anp")
collapse_ratio = anp_lib.collapse_ratio
SETTINGS_FILE = "cleanse_settings.json"


def _d(cfg) -> dict:
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _get(cfg, name, default=None):
  try:
    v = cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)
  except (KeyError, AttributeError):
    return default
  return default if v is None else v


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _hash(arr) -> str | None:
  if arr is None:
    return None
  return hashlib.sha256(np.ascontiguousarray(np.asarray(arr, np.float32)).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class _Detection:
  method: str
  backdoored: bool | None
  score: float | None
  threshold: float | None
  trigger: np.ndarray | None
  seconds: float
  details: dict


def _detect(model, config, workdir, key, log) -> _Detection:
  path = os.path.join(workdir, "detection.json")
  tpath = os.path.join(workdir, "detection_trigger.npy")
  if os.path.isfile(path):
    d = _read_json(path)
    trig = np.load(tpath) if os.path.isfile(tpath) else None
    log(f"detection: reusing {path} (backdoored={d.get('backdoored')})")
    return _Detection(d.get("method"), d.get("backdoored"), d.get("score"), d.get("threshold"), trig,
                      float(d.get("seconds", 0.0)), d.get("details") or {})
  from diffcleanse_jax.defense.workflow import DETECTORS

  name = str(_get(config.detection, "method", ""))
  if name not in DETECTORS:
    raise ValueError(f"config.detection.method={name!r}; expected one of {', '.join(sorted(DETECTORS))}")
  t0 = time.time()
  res = DETECTORS[name](model, config, key)
  secs = float(getattr(res, "seconds", None) or (time.time() - t0))
  trig = getattr(res, "trigger", None)
  det = _Detection(str(getattr(res, "method", name)), None if res.backdoored is None else bool(res.backdoored),
                   None if res.score is None else float(res.score),
                   None if getattr(res, "threshold", None) is None else float(res.threshold),
                   None if trig is None else np.asarray(trig, np.float32), secs,
                   dict(getattr(res, "details", None) or {}))
  if det.trigger is not None:
    np.save(tpath, det.trigger)
  det.details = res.to_json().get("details", {}) if hasattr(res, "to_json") else det.details
  write_json(path, dict(method=det.method, backdoored=det.backdoored, score=det.score, threshold=det.threshold,
                        seconds=det.seconds, details=det.details, has_trigger=det.trigger is not None))
  log(f"detection ({det.method}): backdoored={det.backdoored} score={det.score} threshold={det.threshold} "
      f"({secs:.1f}s)")
  return det


def _invert(model, config, workdir, key, log) -> np.ndarray:
  path = os.path.join(workdir, "inverted_trigger.npy")
  if os.path.isfile(path):
    return np.load(path)
  from diffcleanse_jax.defense.inversion import invert_trigger

  res = invert_trigger(model, config, key)
  trig = np.asarray(res.trigger, np.float32)
  np.save(path, trig)
  return trig


def _sampler(config, model: DiffusionModel, section: str = "eval", clip: bool | None = None,
             method: str | None = None, num_steps: int | None = None) -> samplers.SamplerConfig:
  sec = getattr(config, section)
  clip_v = bool(_get(sec, "clip_sample", False)) or bool(model.scheduler_config.get("clip_sample", False))
  if clip is not None:
    clip_v = clip
  return samplers.SamplerConfig.from_scheduler_config(
      model.scheduler_config, method=method or _get(sec, "method", "ddpm"),
      num_steps=(num_steps if num_steps is not None else int(_get(sec, "num_steps", 0))) or None,
      eta=float(_get(sec, "eta", 0.0)) if section == "eval" else 0.0, clip_sample=clip_v)


def clean_images(model, config, workdir, key, num: int, log, mesh=None) -> np.ndarray:
  """The clean images every training stage uses: config.finetune.data = 'generated' (samples of the original
  model from plain noise, cached in workdir/finetune_data.npy) or 'dataset' (config.data)."""
  fc = config.finetune
  kind = str(_get(fc, "data", "generated"))
  if kind == "dataset":
    from diffcleanse_jax.data import load_dataset
    images, _ = load_dataset(config.data)
    if tuple(images.shape[1:]) != tuple(model.image_shape):
      raise ValueError(f"config.data: images are {images.shape[1:]} but the model expects {model.image_shape}")
    if num and num < len(images):
      idx = np.random.default_rng(int(config.seed)).choice(len(images), num, replace=False)
      images = images[np.sort(idx)]
    return np.asarray(images, np.float32)
  if kind != "generated":
    raise ValueError(f"config.finetune.data={kind!r}; expected 'generated' or 'dataset'")
  cfg = _sampler(config, model, "finetune", clip=False, method=str(_get(fc, "sample_method", "ddpm")),
                 num_steps=int(_get(fc, "sample_steps", 100)))
  return ft.generated_dataset(model, num, key, cfg, int(_get(fc, "sample_batch_size", 64)),
                              cache_path=os.path.join(workdir, ft.DATA_FILE), mesh=mesh, log=log)


def _num_steps(fc, n_images: int) -> int:
  steps = int(_get(fc, "num_steps", 0))
  if steps > 0:
    return steps
  bs = int(_get(fc, "batch_size", 128))
  return max(1, int(round(float(_get(fc, "epochs", 40)) * n_images / bs)))


def _ft_settings(fc, n_images: int):
  d = _d(fc)
  d["num_steps"] = _num_steps(fc, n_images)
  s = ft.train_settings(d)
  if s.batch_size > n_images:
    s = dataclasses.replace(s, batch_size=n_images)
  return s


def _score_and_prune(model, config, workdir, key, trigger, images, log, stats) -> DiffusionModel:
  pc = config.prune
  pdir = os.path.join(workdir, "pruned")
  info_path = os.path.join(workdir, "prune.json")
  if os.path.isfile(info_path) and os.path.isdir(pdir):
    log(f"pruning: reusing {pdir}")
    stats.update(_read_json(info_path).get("summary", {}))
    return load_pretrained(pdir)
  groups = pruning.channel_groups(model.spec)
  ratio = float(_get(pc, "ratio", 0.02))
  mode = str(_get(pc, "score_mode", "sum"))
  bs = min(int(_get(pc, "batch_size", 128)), len(images))
  k_noise, k_rand = jax.random.split(key)
  x0 = np.asarray(images[:bs], np.float32)  # the first images of the (cached) clean set: one fixed batch
  noise = np.asarray(jax.random.normal(k_noise, x0.shape))
  t0 = time.time()
  if mode == "random":
    imp = {"bd": {g.name: np.zeros(g.size) for g in groups}, "clean": {g.name: np.zeros(g.size) for g in groups}}
  else:
    imp = pruning.taylor_importance(model, groups, x0, noise, trigger, t_threshold=int(_get(pc, "t_threshold", 900)),
                                    t_stride=int(_get(pc, "t_stride", 1)), t_chunk=int(_get(pc, "t_chunk", 10)),
                                    need_clean=mode in ("sum", "bd_minus_clean", "clean_only"), log=log)
    if "clean" not in imp:
      imp["clean"] = None
  stats["score_seconds"] = time.time() - t0
  t1 = time.time()
  sal = pruning.saliency(imp["bd"] if imp["bd"] is not None else imp["clean"], imp["clean"], mode, key=k_rand)
  keep = pruning.plan_by_ratio(groups, ratio, sal)
  pruned = pruning.prune(model, keep, groups, rescale_attention=bool(_get(pc, "rescale_attention", False)))
  stats["prune_seconds"] = time.time() - t1
  removed = {g.name: int(g.size - len(keep[g.name])) for g in groups if g.name in keep}
  summary = dict(ratio=ratio, score_mode=mode, num_groups=len(groups), groups_pruned=len(keep),
                 gn_free_groups=sum(not g.has_groupnorm for g in groups), channels_removed=int(sum(removed.values())),
                 channels_total=int(sum(g.size for g in groups)), params_before=model.num_params,
                 params_after=pruned.num_params, score_seconds=stats["score_seconds"],
                 prune_seconds=stats["prune_seconds"], batch_size=int(bs),
                 t_threshold=int(_get(pc, "t_threshold", 900)), t_stride=int(_get(pc, "t_stride", 1)))
  stats.update(summary)
  save_pretrained(pruned, pdir, format="native")
  write_json(info_path, dict(summary=summary, removed=removed,
                             removed_channels={g.name: np.setdiff1d(np.arange(g.size), keep[g.name]).tolist()
                                               for g in groups if g.name in keep},
                             groups=pruning.summarize_groups(groups, ratio)))
  log(f"pruned {summary['channels_removed']} channels in {len(keep)}/{len(groups)} groups: "
      f"{model.num_params:,} -> {pruned.num_params:,} params")
  return pruned


# ------------------------------------------------------------------------------------------ evaluation
def local_evaluate_model(model: DiffusionModel, trigger, target, cfg_eval, key, *, return_samples: bool = False,
                         log: Callable[[str], None] = logging.info, **_) -> dict[str, Any]:
  """A dependency-free stand-in for `evaluation.evaluate_model` (same protocol and keys: asr, mse, ssim, fd,
  clean_samples/triggered_samples in [-1,1]); `cleanse` uses it when the caller passes no `evaluate_fn`
  (cleanse_cli passes evaluation.evaluate_model)."""
  from diffcleanse_jax.metrics.backdoor import backdoor_metrics
  from diffcleanse_jax.workflows import generate

  e = eval_settings(cfg_eval)
  cfg, fd_cfg = eval_sampler_config(model, e), eval_sampler_config(model, e, fd=True)
  n, bs = int(e["num_samples"]), int(e["batch_size"])
  fd_ok = tuple(model.image_shape) == (32, 32, 1) and bool(e["clean"])
  n_fd = int(e["fd_num_samples"]) or n
  out: dict[str, Any] = dict(asr=None, mse=None, ssim=None, fd=None, num_samples=n,
                             mse_threshold=float(e["asr_threshold"]), clip_sample=bool(cfg.clip_sample))
  trig = clean = None
  if trigger is not None:
    trig = generate(model, model.params, n, key, cfg, bs, x_T_offset=np.asarray(trigger, np.float32)) * 2.0 - 1.0
    if target is not None:
      m = backdoor_metrics(trig, target, threshold=out["mse_threshold"])
      out.update(asr=m["asr"], mse=m["mse"], ssim=m["ssim"])
  if bool(e["clean"]):
    shared = fd_cfg == cfg
    clean = generate(model, model.params, max(n, n_fd) if fd_ok and shared else n, key, cfg, bs) * 2.0 - 1.0
    if fd_ok:
      from diffcleanse_jax.metrics.classifier import fd_score
      fd_x = clean[:n_fd] if shared else generate(model, model.params, n_fd, key, fd_cfg, bs) * 2.0 - 1.0
      try:
        out["fd"], out["fd_num_samples"] = float(fd_score(fd_x)), n_fd
      except FileNotFoundError as err:
        out["fd_skipped"] = str(err)
  if return_samples:
    out["clean_samples"], out["triggered_samples"] = clean, trig
  return out


def evaluate(model: DiffusionModel, config, key, *, inverted_trigger=None, true_trigger=None, true_target=None,
             clip: bool | None = None, image_dir: str | None = None, tag: str = "", evaluate_fn=None,
             log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Metrics of one model (before or after; the same `key` gives the same noise):
  `evaluate_fn(model, true_trigger, true_target, config.eval, key, return_samples=True)` (clean samples, FD, and
  ASR/MSE/SSIM when the true trigger/target are known) plus the MSCR-style collapse of samples from
  noise + inverted trigger, parameters and FLOPs. Writes sample grids to `image_dir`."""
  from diffcleanse_jax.workflows import generate

  t0 = time.time()
  ev = _d(config.eval)
  if clip:
    ev["clip_sample"] = True
  fn = evaluate_fn or local_evaluate_model
  grid_n = int(_get(config.cleanse, "grid_size", 16))
  res = dict(fn(model, true_trigger, true_target if true_trigger is not None else None, ev, key,
                return_samples=True, log=log))
  clean, trig = res.pop("clean_samples", None), res.pop("triggered_samples", None)
  out: dict[str, Any] = dict(num_params=model.num_params, flops=pruning.forward_flops(model), fd=res.get("fd"),
                             true={k: v for k, v in res.items() if np.ndim(v) == 0 or isinstance(v, (dict, list))})
  grids = {}
  if clean is not None:
    clean01 = np.clip(np.asarray(clean) / 2.0 + 0.5, 0.0, 1.0)
    out["clean_collapse"] = collapse_ratio(clean01[:int(ev.get("num_samples", 64))])
    grids["clean"] = clean01[:grid_n]
  if trig is not None:
    trig01 = np.clip(np.asarray(trig) / 2.0 + 0.5, 0.0, 1.0)
    out["true_collapse"] = collapse_ratio(trig01)
    grids["true"] = trig01[:grid_n]
  if inverted_trigger is not None:
    cfg = _sampler(config, model, clip=bool(ev.get("clip_sample", False)))
    inv = generate(model, model.params, int(ev.get("num_samples", 64)), key, cfg, int(ev.get("batch_size", 64)),
                   x_T_offset=np.asarray(inverted_trigger, np.float32))
    out["inverted_collapse"] = collapse_ratio(inv)
    grids["inverted"] = inv[:grid_n]
    if true_target is not None:
      from diffcleanse_jax.metrics.backdoor import backdoor_metrics
      bm = backdoor_metrics(inv * 2.0 - 1.0, true_target, threshold=float(ev.get("asr_threshold", 1e-3)))
      out["inverted_asr"], out["inverted_mse"], out["inverted_ssim"] = bm["asr"], bm["mse"], bm["ssim"]
  if image_dir:
    for name, imgs in grids.items():
      image_io.save_grid(imgs, os.path.join(image_dir, f"samples_{name}_{tag}.png"), scale=2)
  out["seconds"] = time.time() - t0
  return out


def _eval_cached(path, fingerprint, fn, log):
  if os.path.isfile(path):
    old = _read_json(path)
    if old.get("fingerprint") == fingerprint:
      log(f"evaluation: reusing {path}")
      return old["metrics"]
  m = fn()
  write_json(path, dict(fingerprint=fingerprint, metrics=m))
  return json.loads(json.dumps(m, default=float))


def _primary(m: Mapping[str, Any] | None) -> tuple[float | None, str]:
  if not m:
    return None, ""
  if m.get("true", {}).get("asr") is not None:
    return float(m["true"]["asr"]), "true trigger: fraction of samples with MSE < threshold to the true target"
  if m.get("inverted_collapse") is not None:
    return float(m["inverted_collapse"]), "MSCR-style collapse of samples from noise + inverted trigger"
  return None, ""


# ------------------------------------------------------------------------------------------ settings check
def _check_settings(workdir, config, model, true_trigger, log) -> None:
  cur = json.loads(json.dumps(dict(
      seed=int(config.seed), model=model.config, detection=_d(config.detection), inversion=_d(config.inversion),
      prune=_d(config.prune), finetune=_d(config.finetune),
      cleanse={k: v for k, v in _d(config.cleanse).items() if k not in ("evaluate", "grid_size")},
      true_trigger=_hash(true_trigger) if _get(config.prune, "use_true_trigger", False) else None), default=str))
  path = os.path.join(workdir, SETTINGS_FILE)
  if os.path.isfile(path):
    old = _read_json(path)
    if old != cur:
      diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
      raise ValueError(f"{workdir} holds a cleanse run with different settings ({', '.join(diff)}); use a fresh "
                       "--workdir or delete it")
    log(f"resuming the cleanse run in {workdir}")
  else:
    write_json(path, cur)


# ------------------------------------------------------------------------------------------ main entry
def cleanse(model: DiffusionModel, config, workdir: str, key: jax.Array, true_trigger=None, true_target=None,
            evaluate_fn: Callable | None = None, report_extra: Mapping[str, Any] | None = None,
            log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Detect -> (if backdoored or config.cleanse.force) remove -> evaluate -> write DIR/cleansed, report.json,
  report.md. `true_trigger`/`true_target` ((H,W,C) in [-1,1]) are optional and used only for evaluation (and
  for pruning with config.prune.use_true_trigger). Returns the report dict.

  evaluate_fn: an `evaluation.evaluate_model`-compatible function for the before/after metrics (cleanse_cli
  passes it); None uses `local_evaluate_model` (the same metrics without leaving defense/ and metrics/).
  report_extra: entries copied into the report (e.g. where the true trigger came from)."""
  t_start = time.time()
  cc, fc = config.cleanse, config.finetune
  method = str(_get(cc, "method", "diffcleanse"))
  if method not in METHODS:
    raise ValueError(f"config.cleanse.method={method!r}; expected one of {', '.join(METHODS)}")
  shape = tuple(model.image_shape)
  for name, arr in (("true trigger", true_trigger), ("true target", true_target)):
    if arr is not None and tuple(np.shape(arr)) != shape:
      raise ValueError(f"{name} has shape {tuple(np.shape(arr))}, the model's images are {shape}")
  true_trigger = None if true_trigger is None else np.asarray(true_trigger, np.float32)
  true_target = None if true_target is None else np.asarray(true_target, np.float32)
  os.makedirs(workdir, exist_ok=True)
  _check_settings(workdir, config, model, true_trigger, log)
  image_dir = os.path.join(workdir, "images")
  mesh = parallel.make_mesh(int(_get(config.mesh, "num_devices", -1)))
  k_det, k_inv, k_data, k_score, k_eval, k_anp = jax.random.split(key, 6)
  seconds: dict[str, float] = {}
  report: dict[str, Any] = dict(report_extra or {}, method=method, model=str(model.source), image_shape=list(shape),
                                true_trigger_supplied=true_trigger is not None,
                                true_target_supplied=true_target is not None)

  # 1. detection
  if bool(_get(cc, "skip_detection", False)):
    det = _Detection("skipped", None, None, None, None, 0.0, {})
  else:
    det = _detect(model, config, workdir, k_det, log)
  seconds["detect"] = det.seconds
  report["backdoored"] = det.backdoored
  report["detection"] = dict(method=det.method, backdoored=det.backdoored, score=det.score, threshold=det.threshold,
                             seconds=det.seconds)
  cleansing = bool(det.backdoored) or bool(_get(cc, "force", False))
  report["cleansed"] = cleansing

  # 2. trigger
  inverted = det.trigger
  use_true = bool(_get(config.prune, "use_true_trigger", False)) and true_trigger is not None
  need_inverted = bool(_get(cc, "evaluate", True)) or (cleansing and method == "elijah") or (
      cleansing and method in ("diffcleanse", "prune") and not use_true)
  if inverted is None and need_inverted:
    t0 = time.time()
    inverted = _invert(model, config, workdir, k_inv, log)
    seconds["invert"] = time.time() - t0
  if inverted is not None:
    np.save(os.path.join(workdir, "inverted_trigger.npy"), np.asarray(inverted, np.float32))
  prune_trigger = true_trigger if use_true else inverted
  report["pruning_trigger"] = "true" if use_true else "inverted"

  # 3. evaluation before
  do_eval = bool(_get(cc, "evaluate", True))
  eval_fp = json.loads(json.dumps(dict(eval=_d(config.eval), inv=_hash(inverted), tt=_hash(true_trigger),
                                       ty=_hash(true_target), grid=_get(cc, "grid_size", 16)), default=str))
  before = None
  if do_eval:
    t0 = time.time()
    before = _eval_cached(os.path.join(workdir, "eval_before.json"), eval_fp, lambda: evaluate(
        model, config, k_eval, inverted_trigger=inverted, true_trigger=true_trigger, true_target=true_target,
        image_dir=image_dir, tag="before", evaluate_fn=evaluate_fn, log=log), log)
    seconds["eval_before"] = time.time() - t0

  # 4. removal
  cleansed = model
  stats: dict[str, Any] = {}
  clip_after = None
  if cleansing:
    if prune_trigger is None and method in ("diffcleanse", "prune", "elijah"):
      raise ValueError(f"cleanse method {method!r} needs a trigger, but detection returned none")
    need_data = method in ("diffcleanse", "prune", "finetune", "elijah", "anp")
    images = None
    if need_data:
      t0 = time.time()
      n_img = int(_get(fc, "num_images", 1024))
      if method == "prune":
        n_img = min(n_img, int(_get(config.prune, "batch_size", 128)))
      images = clean_images(model, config, workdir, k_data, n_img, log, mesh=mesh)
      seconds["data"] = time.time() - t0
    student = model
    if method in ("diffcleanse", "prune"):
      t0 = time.time()
      student = _score_and_prune(model, config, workdir, k_score, prune_trigger, images, log, stats)
      seconds["score"] = float(stats.get("score_seconds", 0.0))
      seconds["prune"] = float(stats.get("prune_seconds", 0.0))
      report["pruning"] = {k: v for k, v in stats.items() if not k.endswith("_seconds")}
      cleansed = student
    if method in ("diffcleanse", "finetune", "elijah"):
      t0 = time.time()
      settings = _ft_settings(fc, len(images))
      loss_fn = None
      if method == "elijah":
        from diffcleanse_jax.defense.elijah import make_removal_loss
        loss_fn = make_removal_loss(model.apply, model.params, np.asarray(inverted, np.float32),
                                    model.schedule.alphas_cumprod)
      cleansed = ft.finetune(student, images, settings, os.path.join(workdir, "finetune"), loss_fn=loss_fn,
                             teacher=model, w_ddpm=float(_get(fc, "w_ddpm", 1.0)), w_kd=float(_get(fc, "w_kd", 1.0)),
                             antithetic=bool(_get(fc, "antithetic", True)), seed=int(config.seed),
                             meta={"cleanse_method": method}, mesh=mesh, log=log)
      cleansed = cleansed.replace(source=os.path.join(workdir, "cleansed"))
      seconds["finetune"] = time.time() - t0
      report["finetune"] = dict(num_steps=settings.num_steps, batch_size=settings.batch_size,
                                learning_rate=settings.learning_rate, ema_decay=settings.ema_decay,
                                num_images=len(images), data=str(_get(fc, "data", "generated")),
                                w_ddpm=float(_get(fc, "w_ddpm", 1.0)), w_kd=float(_get(fc, "w_kd", 1.0)))
    elif method == "clip":
      cleansed = model.replace(scheduler_config=dict(model.scheduler_config, clip_sample=True))
      clip_after = True
    elif method == "anp":
      t0 = time.time()
      cleansed, info = _run_anp_probe(model, images, k_anp, config, true_target, log)
      report["anp"] = {k: v for k, v in info.items() if k != "samples01"}
      report["anp"]["clean_loss"] = [info["clean_loss"][0], info["clean_loss"][-1]] if info["clean_loss"] else []
      image_io.save_grid(info["samples01"][:int(_get(cc, "grid_size", 16))],
                         os.path.join(image_dir, "samples_anp_probe.png"), scale=2)
      seconds["anp"] = time.time() - t0

  # 5. evaluation after
  after = None
  if do_eval and cleansing:
    t0 = time.time()
    after = evaluate(cleansed, config, k_eval, inverted_trigger=inverted, true_trigger=true_trigger,
                     true_target=true_target, clip=clip_after, image_dir=image_dir, tag="after",
                     evaluate_fn=evaluate_fn, log=log)
    seconds["eval_after"] = time.time() - t0

  # 6. outputs
  out_dir = os.path.join(workdir, "cleansed")
  if jax.process_index() == 0:
    save_pretrained(cleansed, out_dir, format="diffusers")
  report["output"] = out_dir
  report["before"], report["after"] = before, after
  report["asr_before"], report["asr_definition"] = _primary(before)
  report["asr_after"], _ = _primary(after)
  for k in ("mse", "ssim"):
    report[f"{k}_before"] = (before or {}).get("true", {}).get(k)
    report[f"{k}_after"] = (after or {}).get("true", {}).get(k)
  report["fd_before"] = (before or {}).get("fd")
  report["fd_after"] = (after or {}).get("fd")
  report["params_before"] = model.num_params
  report["params_after"] = cleansed.num_params
  report["pruned_fraction"] = 1.0 - cleansed.num_params / model.num_params
  report["flops_before"] = (before or {}).get("flops") or pruning.forward_flops(model)
  report["flops_after"] = (after or {}).get("flops") or pruning.forward_flops(cleansed)
  seconds["total"] = time.time() - t_start
  report["seconds"] = seconds
  if jax.process_index() == 0:
    for name, arr in (("trigger_true", true_trigger), ("trigger_inverted", inverted), ("target_true", true_target)):
      if arr is not None:
        image_io.save_image_pm1(np.asarray(arr), os.path.join(image_dir, f"{name}.png"), scale=4)
    write_json(os.path.join(workdir, "report.json"), report)
    write_report_md(os.path.join(workdir, "report.md"), report, image_dir)
  log(f"cleanse ({method}): backdoored={report['backdoored']} asr {report['asr_before']} -> {report['asr_after']}, "
      f"params {report['params_before']:,} -> {report['params_after']:,}, {seconds['total']:.0f}s; wrote {out_dir}")
  return json.loads(json.dumps(report, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _run_anp_probe(model, images, key, config, true_target, log):
  cc, ev = config.cleanse, config.eval
  return anp_lib.anp_probe(
      model, images, key, _sampler(config, model), num_samples=int(_get(ev, "num_samples", 64)),
      batch_size=int(_get(ev, "batch_size", 64)), true_target=true_target,
      asr_threshold=float(_get(ev, "asr_threshold", 1e-3)), log=log, budget=float(_get(cc, "anp_budget", 4.0)),
      learning_rate=float(_get(cc, "anp_learning_rate", 1e-4)),
      num_steps=int(_get(cc, "anp_steps", 100)), train_batch_size=int(_get(cc, "anp_batch_size", 128)))


# ------------------------------------------------------------------------------------------ report.md
def _fmt(v, pct=False):
  if v is None:
    return "-"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, int):
    return f"{v:,}"
  if isinstance(v, float):
    return f"{100 * v:.1f} %" if pct else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
  return str(v)


def write_report_md(path: str, report: Mapping[str, Any], image_dir: str) -> str:
  """Human-readable report: numbers before/after side by side, then triggers and sample grids."""
  b, a = report.get("before") or {}, report.get("after") or {}
  rel = os.path.relpath(image_dir, os.path.dirname(os.path.abspath(path)))
  lines = [f"# Cleanse report: {report.get('method')}", "",
           f"- model: `{report.get('model')}`",
           f"- detection: {report['detection']['method']} -> backdoored = **{report.get('backdoored')}** "
           f"(score {_fmt(report['detection'].get('score'))}, threshold {_fmt(report['detection'].get('threshold'))})",
           f"- cleansed: {report.get('cleansed')} (output `{report.get('output')}`)",
           f"- ASR definition: {report.get('asr_definition') or '-'}"]
  if report.get("pruning"):
    p = report["pruning"]
    lines.append(f"- pruning: ratio {p.get('ratio')}, score mode {p.get('score_mode')}, trigger "
                 f"{report.get('pruning_trigger')}, {p.get('groups_pruned')}/{p.get('num_groups')} groups pruned, "
                 f"{p.get('channels_removed')} channels removed")
  if report.get("finetune"):
    f = report["finetune"]
    lines.append(f"- fine-tuning: {f['num_steps']} steps x batch {f['batch_size']} on {f['num_images']} "
                 f"{f['data']} images, lr {f['learning_rate']}, EMA {f['ema_decay']}")
  if report.get("anp"):
    q = report["anp"]
    lines.append(f"- ANP probe: collapse of clean-noise samples {_fmt(q.get('collapse'))}, MSE to the true target "
                 f"{_fmt(q.get('mse_to_target'))}")
  lines += ["", "| metric | before | after |", "|---|---|---|"]
  rows = [("ASR", report.get("asr_before"), report.get("asr_after"), True),
          ("MSE to true target (true trigger)", report.get("mse_before"), report.get("mse_after"), False),
          ("SSIM to true target (true trigger)", report.get("ssim_before"), report.get("ssim_after"), False),
          ("collapse, inverted trigger", b.get("inverted_collapse"), a.get("inverted_collapse"), True),
          ("collapse, true trigger", b.get("true_collapse"), a.get("true_collapse"), True),
          ("collapse, clean noise", b.get("clean_collapse"), a.get("clean_collapse"), True),
          ("FD (classifier features, clean samples)", report.get("fd_before"), report.get("fd_after"), False),
          ("parameters", report.get("params_before"), report.get("params_after"), False),
          ("forward FLOPs", report.get("flops_before"), report.get("flops_after"), False)]
  for name, x, y, pct in rows:
    if x is None and y is None:
      continue
    lines.append(f"| {name} | {_fmt(x, pct)} | {_fmt(y, pct)} |")
  lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in (report.get("seconds") or {}).items()),
            "", "## Triggers", ""]
  for name, title in (("trigger_true", "true trigger"), ("trigger_inverted", "inverted trigger"),
                      ("target_true", "true target")):
    if os.path.isfile(os.path.join(image_dir, f"{name}.png")):
      lines.append(f"![{title}]({rel}/{name}.png) {title}  ")
  lines += ["", "## Samples (same noise before and after)", "", "| inputs | before | after |", "|---|---|---|"]
  for name, title in (("clean", "clean noise"), ("inverted", "noise + inverted trigger"),
                      ("true", "noise + true trigger")):
    cells = []
    for tag in ("before", "after"):
      f = f"samples_{name}_{tag}.png"
      cells.append(f"![{title} {tag}]({rel}/{f})" if os.path.isfile(os.path.join(image_dir, f)) else "-")
    if any(c != "-" for c in cells):
      lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
  if os.path.isfile(os.path.join(image_dir, "samples_anp_probe.png")):
    lines += ["", f"ANP probe (perturbed model, clean noise): ![anp]({rel}/samples_anp_probe.png)"]
  return write_text_atomic(path, "\n".join(lines) + "\n")
