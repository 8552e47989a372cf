"""`launch.py --mode=detect` and `--mode=scan`: backdoor detection of one model or of a folder of models.

  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/fmnist --workdir=runs/detect_clean \
      --config.detection.method=whitebox
  python launch.py --config=configs/fmnist_detect.py --mode=scan --models_dir=runs/zoo/models --workdir=runs/scan

`config.detection.method` picks the detector from `DETECTORS` ('bbti', 'whitebox', 'elijah', 'terd'); BBTI and
white-box read `config.inversion`, Elijah/TERD read `config.detection.elijah` / `config.detection.terd`.

detect writes to the workdir: `detection.json` (method, backdoored, score, threshold, seconds, model, details),
`trigger.npy` (H,W,C inverted trigger, x_T = eps + trigger), `trigger.png`, `samples_clean.png` (from eps) and
`samples_inverted.png` (from eps + trigger, the same eps), sampled with the inversion's short sampler. With
`detection.trigger_from='shift'` / `'target'` a flagged model's trigger.npy is the distribution-shift estimate / the
trigger inverted towards its collapse target, and the MSCR inversion's pattern is also written, as `mscr_trigger.npy`
('target' also writes `target_estimate.npy`, (H,W,C) in [-1,1]; detection.json lists such extra arrays in "arrays").

scan treats every sub-folder of --models_dir as a model (a training/attack workdir, a diffusers folder or a native
folder); it writes one row per model to `scan.csv` and `scan.md` (name, method, score, threshold, backdoored,
seconds, error) after every model, plus `models/<name>/detection.json` and `trigger.npy`. A folder that fails
to load or to run becomes an error row and the scan goes on.

This module never imports `diffcleanse_jax.attacks` (a defence must not see the true trigger).
"""
from __future__ import annotations

import csv
import io
import importlib
import logging
import os
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np

from diffcleanse_jax.defense.detection import (DetectionResult, detect_bbti, detect_whitebox, detection_settings,
                                               section)
from diffcleanse_jax.io import images as image_io
from diffcleanse_jax.io import original_ddpm
from diffcleanse_jax.io.native import load_pretrained, load_training_checkpoint
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.io.files import write_json, write_text_atomic


class DetectorUnavailable(ImportError):
  """A registered detector whose module is not installed."""


def _lazy(module: str, name: str) -> Callable:
  """A detector that imports `diffcleanse_jax.defense.<module>` on first use and calls its `detect` with the
  `config.detection.<name>` sub-section (or the flat cfg)."""

  def detector(model, cfg, key):
    try:
      mod = importlib.import_module(f"diffcleanse_jax.defense.{module}")
    except ModuleNotFoundError as err:
      if err.name and err.name.endswith(module):
        raise DetectorUnavailable(f"detector {name!r} needs diffcleanse_jax/defense/{module}.py, which is not "
                                  "installed in this checkout") from err
      raise
    if not hasattr(mod, "detect"):
      raise DetectorUnavailable(f"diffcleanse_jax.defense.{module} has no detect(model, cfg, key)")
    return mod.detect(model, section(section(cfg, "detection"), name), key)

  detector.__name__ = f"detect_{name}"
  detector.__doc__ = f"Lazily imported diffcleanse_jax.defense.{module}.detect."
  return detector


DETECTORS: dict[str, Callable[..., DetectionResult]] = {
    "bbti": detect_bbti,
    "whitebox": detect_whitebox,
    "elijah": _lazy("elijah", "elijah"),
    "terd": _lazy("terd", "terd"),
}


def get_detector(method: str) -> Callable[..., DetectionResult]:
  if method not in DETECTORS:
    raise ValueError(f"config.detection.method={method!r}; expected one of {', '.join(DETECTORS)}")
  return DETECTORS[method]


# ------------------------------------------------------------------------------------------------- helpers
def load_model_dir(path: str) -> DiffusionModel:
  """A model from a folder: `<path>/model` if present (train/attack workdirs export it there), else a
  training checkpoint folder (`checkpoints/`), else whatever `load_pretrained` reads (which also takes an
  original-DDPM/ddim checkpoint file)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return load_pretrained(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model folder or checkpoint file")
  sub = os.path.join(path, "model")
  if os.path.isdir(sub):
    return load_pretrained(sub)
  if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.isfile(
      os.path.join(path, "diffusion_pytorch_model.safetensors")):
    return load_training_checkpoint(path)
  return load_pretrained(path)


def _config_dict(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _seed(config) -> int:
  d = _config_dict(config)
  return int(d.get("seed", 0) or 0)


def run_detector(model: DiffusionModel, config, key: jax.Array | None = None) -> DetectionResult:
  """`DETECTORS[config.detection.method](model, config, key)`; key defaults to PRNGKey(config.seed)."""
  method = str(detection_settings(config).get("method", "bbti"))
  key = jax.random.key(_seed(config)) if key is None else key
  t0 = time.time()
  res = get_detector(method)(model, config, key)
  if not res.seconds:
    res.seconds = time.time() - t0
  return res


def preview_sampler(config, model: DiffusionModel):
  """The inversion's short sampler (default DDPM-20) for the PNG grids."""
  from diffcleanse_jax.defense.inversion import InversionSettings

  return InversionSettings.from_config(section(config, "inversion")).sampler_config(model.scheduler_config)


def write_detection(res: DetectionResult, out_dir: str, model_path: str | None = None) -> dict[str, Any]:
  """detection.json (+ trigger.npy when the detector returned a trigger). Returns the JSON dict."""
  os.makedirs(out_dir, exist_ok=True)
  d = res.to_json()
  d = dict(method=d["method"], backdoored=d["backdoored"], score=d["score"], threshold=d["threshold"],
           seconds=d["seconds"], model=model_path, has_trigger=res.trigger is not None, details=d["details"])
  if res.trigger is not None:
    np.save(os.path.join(out_dir, "trigger.npy"), np.asarray(res.trigger, np.float32))
  arrays = getattr(res, "arrays", None) or {}
  for name, arr in arrays.items():
    np.save(os.path.join(out_dir, f"{name}.npy"), np.asarray(arr, np.float32))
  d["arrays"] = sorted(arrays)
  write_json(os.path.join(out_dir, "detection.json"), d)
  return d


# ---------------------------------------------------------------------------------------------------- detect
def detect(config, workdir: str, model_path: str) -> DetectionResult:
  """--mode=detect on one model (see the module docstring)."""
  from diffcleanse_jax.workflows import generate, write_config

  write_config(config, workdir)
  model = load_model_dir(model_path)
  det = detection_settings(config)
  logging.info("detect (%s) on %r", det.get("method"), model)
  res = run_detector(model, config)
  write_detection(res, workdir, os.path.abspath(model_path))
  if res.trigger is not None:
    image_io.save_image_pm1(np.asarray(res.trigger), os.path.join(workdir, "trigger.png"))
  if "target_estimate" in (res.arrays or {}):  # what the backdoor emits, as the defender sees it
    image_io.save_image_pm1(np.asarray(res.arrays["target_estimate"]), os.path.join(workdir, "target_estimate.png"))
  n = int(det.get("num_images", 16) or 0)
  if n > 0:
    scfg = preview_sampler(config, model)
    key = jax.random.fold_in(jax.random.key(_seed(config)), 7)
    bs = int(det.get("image_batch_size", 16) or 16)
    clean = generate(model, model.params, n, key, scfg, batch_size=bs)
    image_io.save_grid(clean, os.path.join(workdir, "samples_clean.png"), scale=2)
    if res.trigger is not None:
      inv = generate(model, model.params, n, key, scfg, batch_size=bs, x_T_offset=np.asarray(res.trigger))
      image_io.save_grid(inv, os.path.join(workdir, "samples_inverted.png"), scale=2)
  logging.info("detection (%s): backdoored=%s score=%.4g threshold=%.4g (%.1fs) -> %s", res.method,
               res.backdoored, res.score if res.score is not None else float("nan"),
               res.threshold if res.threshold is not None else float("nan"), res.seconds,
               os.path.join(workdir, "detection.json"))
  return res


def detect_mode(config, workdir: str, flags):
  from diffcleanse_jax.workflows import need_flag

  return detect(config, workdir, need_flag(flags, "model"))


# ------------------------------------------------------------------------------------------------------ scan
SCAN_COLUMNS = ("name", "method", "score", "threshold", "backdoored", "seconds", "error")


def list_model_dirs(models_dir: str) -> list[str]:
  if not os.path.isdir(models_dir):
    raise FileNotFoundError(f"--models_dir={models_dir}: no such folder")
  return sorted(n for n in os.listdir(models_dir)
                if not n.startswith(".") and (os.path.isdir(os.path.join(models_dir, n))
                                              or n.endswith(original_ddpm.CHECKPOINT_SUFFIXES)))


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_scan_tables(rows: list[dict[str, Any]], workdir: str) -> tuple[str, str]:
  csv_path = os.path.join(workdir, "scan.csv")
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=SCAN_COLUMNS)
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SCAN_COLUMNS})
  write_text_atomic(csv_path, buf.getvalue())
  md_path = os.path.join(workdir, "scan.md")
  n_flag = sum(1 for r in rows if r.get("backdoored") is True)
  n_err = sum(1 for r in rows if r.get("error"))
  lines = [f"# Backdoor scan: {len(rows)} models, {n_flag} flagged backdoored, {n_err} errors", "",
           "| " + " | ".join(SCAN_COLUMNS) + " |", "|" + "---|" * len(SCAN_COLUMNS)]
  for r in rows:
    cells = [_fmt(r.get(k)).replace("|", "\\|").replace("\n", " ") for k in SCAN_COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  write_text_atomic(md_path, "\n".join(lines) + "\n")
  return csv_path, md_path


def scan(config, workdir: str, models_dir: str) -> list[dict[str, Any]]:
  """--mode=scan: one detection per sub-folder of `models_dir`; errors become rows."""
  from diffcleanse_jax.workflows import write_config

  write_config(config, workdir)
  method = str(detection_settings(config).get("method", "bbti"))
  get_detector(method)  # an unknown method is a configuration error, not a per-model one
  names = list_model_dirs(models_dir)
  logging.info("scan (%s): %d model folders in %s", method, len(names), models_dir)
  rows: list[dict[str, Any]] = []
  for i, name in enumerate(names):
    t0 = time.time()
    row: dict[str, Any] = dict(name=name, method=method, score=None, threshold=None, backdoored=None,
                               seconds=None, error=None)
    try:
      model = load_model_dir(os.path.join(models_dir, name))
      res = run_detector(model, config)
      write_detection(res, os.path.join(workdir, "models", name), os.path.abspath(os.path.join(models_dir, name)))
      row.update(method=res.method, score=None if res.score is None else float(res.score),
                 threshold=None if res.threshold is None else float(res.threshold),
                 backdoored=None if res.backdoored is None else bool(res.backdoored),
                 seconds=round(float(res.seconds), 2))
    except Exception as err:  # noqa: BLE001 - a broken model folder must not stop the scan
      row.update(error=f"{type(err).__name__}: {err}".strip()[:500], seconds=round(time.time() - t0, 2))
      logging.warning("scan: %s failed: %s", name, row["error"])
      logging.debug("%s", traceback.format_exc())
    rows.append(row)
    write_scan_tables(rows, workdir)
    logging.info("scan %d/%d %s: %s", i + 1, len(names), name,
                 row["error"] or f"score {_fmt(row['score'])} backdoored={row['backdoored']}")
  csv_path, md_path = write_scan_tables(rows, workdir)
  logging.info("wrote %s and %s", csv_path, md_path)
  return rows


def scan_mode(config, workdir: str, flags):
  from diffcleanse_jax.workflows import need_flag

  return scan(config, workdir, need_flag(flags, "models_dir"))
