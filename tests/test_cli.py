"""End to end through `python launch.py` (a subprocess, as a user runs it): train -> sample -> import -> export with
configs/tiny_test.py, checking the artifacts; and bad inputs, which must give exit status 2 and one `error:` line on
stderr (absl's own `I.../W...` log lines aside), never a traceback.

One training run is shared by the whole module. The subprocesses use one CPU device, fast-compile XLA flags and a
persistent compilation cache (per module run), so the later modes reuse the programs training compiled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jax

from diffcleanse_jax.io.native import NATIVE_META, load_pretrained, load_training_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny_test.py"
# absl log lines ("I1123 17:31:21.227126 140072682965888 launch.py:48] ...") are progress, not error output.
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
TIMEOUT_S = float(os.environ.get("CLI_TEST_TIMEOUT", "300"))  # per subprocess; a hang guard only


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """run(mode, workdir, *flags) -> CompletedProcess of `python launch.py --config=configs/tiny_test.py ...`."""
  cache = tmp_path_factory.mktemp("jax_cache")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
             # not conftest's 8 fake devices: one device, and fast compiles for these compile-bound tiny programs
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def run(mode: str, workdir, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", f"--config={CONFIG}", f"--workdir={workdir}", f"--mode={mode}", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)

  return run


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert r.returncode == 0, f"{' '.join(r.args)} exited {r.returncode}\n{r.stderr[-3000:]}"
  return r


def _error_line(r: subprocess.CompletedProcess) -> str:
  """Asserts exit status 2, no traceback and exactly one non-log stderr line `error: ...`; returns that line."""
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ABSL_LOG_LINE.match(ln)]
  assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{r.stderr}"
  assert r.returncode == 2, f"exit status {r.returncode}\n{r.stderr}"
  return lines[0]


def _same_params(a, b) -> None:
  la, lb = jax.tree_util.tree_leaves_with_path(a.params), jax.tree_util.tree_leaves_with_path(b.params)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory):
  """One `--mode=train` run (4 steps of the tiny UNet) with a --config override; its workdir."""
  workdir = tmp_path_factory.mktemp("cli") / "train"
  _ok(cli("train", workdir, "--config.train.learning_rate=0.002"))
  return workdir


# ------------------------------------------------------------------------------------------------ artifacts
def test_train_writes_resolved_config_checkpoints_samples_and_model(trained):
  cfg = json.loads((trained / "config.json").read_text())
  assert cfg["train"]["learning_rate"] == 0.002  # the command-line override, resolved into the file
  assert cfg["train"]["num_steps"] == 4 and cfg["data"]["name"] == "synthetic"
  assert cfg["model"]["block_out_channels"] == [8, 16]

  ckpts = sorted(int(n) for n in os.listdir(trained / "checkpoints") if n.isdigit())
  assert ckpts == [2, 4]  # checkpoint_every=2, keep_checkpoints=2
  losses = json.loads((trained / "loss_history.json").read_text())["loss"]
  assert len(losses) == 4 and np.all(np.isfinite(losses))

  from PIL import Image
  with Image.open(trained / "samples" / "final.png") as im:
    assert im.format == "PNG" and im.size == (38, 38)  # 4 samples of 16x16 in a 2x2 grid, 2 px padding

  exported = load_pretrained(str(trained / "model"))  # diffusers folder
  assert (trained / "model" / "config.json").is_file()
  assert exported.image_shape == (16, 16, 1) and exported.config["block_out_channels"] == [8, 16]
  assert exported.num_params == 44969
  from_ckpt = load_training_checkpoint(str(trained))  # the training workdir -> newest checkpoint (step 4)
  assert from_ckpt.metadata["checkpoint"].endswith(os.path.join("checkpoints", "4"))
  _same_params(exported, from_ckpt)


def test_a_training_workdir_loads_with_load_pretrained(trained):
  model = load_pretrained(str(trained))
  assert model.metadata["checkpoint"].endswith(os.path.join("checkpoints", "4"))


def test_sample_mode_writes_a_png_grid_and_its_config(cli, trained, tmp_path):
  workdir = tmp_path / "sample"
  _ok(cli("sample", workdir, f"--model={trained}", "--config.seed=3"))  # a training workdir: newest checkpoint
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3
  from PIL import Image
  with Image.open(workdir / "samples.png") as im:
    assert im.format == "PNG" and im.size == (38, 38)
    assert np.asarray(im).std() > 0  # not a blank image


def test_compile_cache_is_filled_and_does_not_change_results(cli, trained, tmp_path):
  cache = tmp_path / "xla_cache"
  a, b = tmp_path / "a", tmp_path / "b"
  _ok(cli("sample", a, f"--model={trained}", f"--compile_cache={cache}"))
  assert cache.is_dir() and any(cache.iterdir())
  n = len(list(cache.iterdir()))
  _ok(cli("sample", b, f"--model={trained}", f"--compile_cache={cache}"))  # reads the cache
  assert len(list(cache.iterdir())) == n  # nothing new to compile
  assert (a / "samples.png").read_bytes() == (b / "samples.png").read_bytes()


def test_import_then_export_round_trips_the_weights(cli, trained, tmp_path):
  imp, exp = tmp_path / "imported", tmp_path / "exported"
  _ok(cli("import", imp, f"--model={trained / 'model'}"))
  assert (imp / "model" / NATIVE_META).is_file() and (imp / "model" / "params").is_dir()
  assert json.loads((imp / "import.json").read_text())["num_params"] == 44969
  assert (imp / "config.json").is_file()

  _ok(cli("export", exp, f"--model={imp / 'model'}"))
  assert (exp / "diffusers" / "config.json").is_file()
  assert (exp / "diffusers" / "diffusion_pytorch_model.safetensors").is_file()
  assert (exp / "config.json").is_file()

  original = load_pretrained(str(trained / "model"))
  native = load_pretrained(str(imp / "model"))
  back = load_pretrained(str(exp / "diffusers"))
  assert native.config == original.config == back.config
  assert native.scheduler_config == original.scheduler_config
  _same_params(original, native)
  _same_params(original, back)


# ----------------------------------------------------------------------------------------------- bad inputs
def test_missing_dataset_dir_is_one_clear_line(cli, trained, tmp_path):
  # Depends on `trained` only so that the model init reuses its compiled programs (compilation cache).
  r = cli("train", tmp_path / "w", "--config.data.name=fashion_mnist", "--config.data.path=/nonexistent")
  line = _error_line(r)
  assert "DatasetError" in line and "/nonexistent" in line and "--config.data.path" in line


def test_sample_without_model_is_one_clear_line(cli, tmp_path):
  line = _error_line(cli("sample", tmp_path / "w"))
  assert "--mode=sample needs --model" in line


def test_corrupt_safetensors_model_folder_is_one_clear_line(cli, trained, tmp_path):
  bad = tmp_path / "corrupt"
  shutil.copytree(trained / "model", bad)
  weights = bad / "diffusion_pytorch_model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])  # an interrupted download: valid header, data cut short
  line = _error_line(cli("import", tmp_path / "w", f"--model={bad}"))
  assert "CheckpointError" in line and str(weights) in line
  assert not (tmp_path / "w" / "model").exists()


@pytest.mark.parametrize("edit, expect", [
    # a typo'd key is ignored with a warning naming it (diffusers compatibility), then the default it leaves in
    # place (norm_num_groups=32) fails validation
    (lambda c: c.__setitem__("norm_num_group", c.pop("norm_num_groups")), "norm_num_groups=32"),
    (lambda c: c["down_block_types"].__setitem__(1, "AttnDownBlok2D"), "'AttnDownBlok2D' is not a supported"),
], ids=["key_typo", "value_typo"])
def test_typo_in_a_diffusers_config_json_is_one_clear_line(cli, trained, tmp_path, edit, expect):
  bad = tmp_path / "typo"
  shutil.copytree(trained / "model", bad)
  cfg = json.loads((bad / "config.json").read_text())
  edit(cfg)
  (bad / "config.json").write_text(json.dumps(cfg))
  r = cli("sample", tmp_path / "w", f"--model={bad}")
  line = _error_line(r)
  assert "ConfigError" in line and str(bad / "config.json") in line and expect in line
  if "norm_num_group" in cfg:
    assert "norm_num_group" in r.stderr.replace("norm_num_groups", "")  # the warning names the ignored key


def test_config_override_of_an_unknown_field_is_one_clear_line(cli, tmp_path):
  line = _error_line(cli("train", tmp_path / "w", "--config.train.learning_rte=1"))
  assert "learning_rte" in line and "learning_rate" in line
