"""diffcleanse-jax command line. Thin by design: the logic lives in importable modules.

  python launch.py --config=configs/fashion_mnist_cpu.py --workdir=runs/fmnist --mode=train
  python launch.py --config=configs/fashion_mnist_cpu.py --workdir=runs/s --mode=sample --model=runs/fmnist
  python launch.py --config=... --mode=import --model=path/to/diffusers_folder --workdir=runs/imported
  python launch.py --config=... --mode=export --model=runs/fmnist --workdir=runs/exported

Config fields are overridden with --config.section.field=value; the resolved config is written into the workdir.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "sample", "import", "export", "attack", "evaluate", "detect", "scan", "cleanse")

def _bad_flag(e: BaseException) -> None:
  msg = str(e).strip().strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
  print(f"error: bad command-line flag: {msg or type(e).__name__}", file=sys.stderr)
  sys.exit(2)


try:  # ml_collections applies --config.x.y overrides while defining the flag: a typo raises right here.
  config_flags.DEFINE_config_file("config", "configs/fashion_mnist_cpu.py", "Experiment config file.",
                                  lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as _e:
  _bad_flag(_e)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, samples, reports, resolved config).")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_string("model", None, "Input model: diffusers folder, native model folder or training workdir.")
flags.DEFINE_string("out", None, "export: output folder (default WORKDIR/diffusers).")
flags.DEFINE_string("trigger", None, "evaluate/cleanse: trigger name, image file or .npy (H,W,C) in [-1,1].")
flags.DEFINE_string("target", None, "evaluate/cleanse: target name, image file or .npy (H,W,C) in [-1,1].")
flags.DEFINE_string("models_dir", None, "scan: directory whose sub-folders are models.")
flags.DEFINE_string("compile_cache", os.environ.get("DIFFCLEANSE_COMPILE_CACHE", ""),
                    "Persistent XLA compilation cache folder ('' = off; default $DIFFCLEANSE_COMPILE_CACHE): a "
                    "later run of the same programs skips their compilation. Results do not depend on it.")
FLAGS = flags.FLAGS


class UsageError(ValueError):
  pass


def enable_compile_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` (created), for every compiled program however small."""
  import jax

  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    raise UsageError("--workdir is required")
  import jax

  from diffcleanse_jax import parallel

  if FLAGS.compile_cache:
    enable_compile_cache(FLAGS.compile_cache)
  config = FLAGS.config
  parallel.initialize_distributed(config.distributed.to_dict())
  os.makedirs(FLAGS.workdir, exist_ok=True)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  mode = FLAGS.mode
  entry = MODE_ENTRY_POINTS[mode]
  module_name, func_name = entry.rsplit(":", 1)
  import importlib
  func = getattr(importlib.import_module(module_name), func_name)
  func(config, FLAGS.workdir, FLAGS)


# Each mode is a library function `f(config, workdir, flags)`; the glue that wires attacks (true triggers) to
# defences lives outside diffcleanse_jax/defense/ (which never imports diffcleanse_jax/attacks/).
MODE_ENTRY_POINTS = {
    "train": "diffcleanse_jax.workflows:train_mode",
    "sample": "diffcleanse_jax.workflows:sample_mode",
    "import": "diffcleanse_jax.workflows:import_mode",
    "export": "diffcleanse_jax.workflows:export_mode",
    "attack": "diffcleanse_jax.attacks.workflow:attack_mode",
    "evaluate": "diffcleanse_jax.evaluation:evaluate_mode",
    "detect": "diffcleanse_jax.defense.workflow:detect_mode",
    "scan": "diffcleanse_jax.defense.workflow:scan_mode",
    "cleanse": "diffcleanse_jax.cleanse_cli:cleanse_mode",
}


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter from orbax/jax internals so progress lines stay readable."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        s in record.pathname for s in ("/orbax/", "/jax/", "/etils/", "/absl/"))


def main(argv) -> None:
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  try:
    run(argv)
  except (ValueError, FileNotFoundError, KeyError) as e:
    # User errors get one clear line, not a traceback; --verbosity=1 shows the traceback.
    if flags.FLAGS.verbosity >= 1:
      raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl flag parsing where a bad --config override (unknown field, wrong type) is one line, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    _bad_flag(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
