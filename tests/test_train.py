"""Training loop: resumption is exact, 8 sharded devices == 1 device, EMA, end-to-end train mode."""
import json
import logging
import os
import shutil

import numpy as np
import pytest

import jax

from diffcleanse_jax import parallel
from diffcleanse_jax.data import BatchIterator, synthetic
from diffcleanse_jax.diffusion.objectives import make_ddpm_loss
from diffcleanse_jax.io.native import load_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import preset
from diffcleanse_jax.train import TrainSettings, learning_rate_schedule, run_training


def _setup(num_steps, **kw):
  model = DiffusionModel.from_config(preset("tiny"), key=0)
  images, _ = synthetic(64, image_size=16, channels=1, seed=0)
  s = TrainSettings(batch_size=8, num_steps=num_steps, learning_rate=1e-3, warmup_steps=2, log_every=1,
                    checkpoint_every=2, **kw)
  return model, images, s


def _train(workdir, num_steps, mesh=None, **kw):
  model, images, s = _setup(num_steps, **kw)
  batches = BatchIterator(images, s.batch_size, seed=0, flip=True)
  loss = make_ddpm_loss(model.apply, model.schedule.alphas_cumprod)
  out = run_training(model=model, loss_fn=loss, batches=batches, settings=s, workdir=str(workdir), seed=0,
                     meta={"kind": "test"}, mesh=mesh)
  hist = json.load(open(os.path.join(workdir, "loss_history.json")))
  return out, hist


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
  full, _ = _train(tmp_path / "a", 4, ema_decay=0.9)
  partial_dir = tmp_path / "c"
  _train(partial_dir, 4, ema_decay=0.9)
  shutil.rmtree(partial_dir / "checkpoints" / "4")  # as if killed right after the step-2 checkpoint
  resumed, hist = _train(partial_dir, 4, ema_decay=0.9)
  assert hist["start_step"] == 2
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eight_sharded_devices_give_the_same_loss_curve_as_one(tmp_path):
  assert jax.device_count() == 8
  _, h1 = _train(tmp_path / "one", 3, mesh=parallel.make_mesh(1))
  _, h8 = _train(tmp_path / "eight", 3, mesh=parallel.make_mesh(8))
  np.testing.assert_allclose(h1["loss"], h8["loss"], rtol=2e-5, atol=1e-6)
  assert len(h1["loss"]) == 3


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  model, images, s = _setup(2)
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    run_training(model=model, loss_fn=make_ddpm_loss(model.apply, model.schedule.alphas_cumprod),
                 batches=BatchIterator(images, 6, seed=0), settings=TrainSettings(batch_size=6, num_steps=1),
                 workdir=str(tmp_path), seed=0, meta={}, mesh=parallel.make_mesh(8))


def test_train_settings_reject_typos():
  with pytest.raises(ValueError, match="unknown field 'learning_rte'"):
    TrainSettings.from_config({"learning_rte": 1e-3})


def test_learning_rate_schedule_warmup_then_cosine_and_no_warmup_without_a_log_line(caplog):
  caplog.set_level(logging.DEBUG)
  lr, n = 1e-3, 600
  cosine = lambda i, w: lr * 0.5 * (1 + np.cos(np.pi * (i - w) / (n - w)))
  no_warm = learning_rate_schedule(TrainSettings(learning_rate=lr, num_steps=n, warmup_steps=0))
  for i in (0, 1, 150, 300, 599, 600):
    np.testing.assert_allclose(float(no_warm(i)), cosine(i, 0), rtol=1e-5, atol=1e-12)
  assert not [r for r in caplog.records if "schedule" in r.getMessage()], caplog.text
  warm = learning_rate_schedule(TrainSettings(learning_rate=lr, num_steps=n, warmup_steps=100))
  np.testing.assert_allclose([float(warm(i)) for i in (0, 50, 100, 350)], [0.0, lr / 2, lr, cosine(350, 100)], rtol=1e-5)
  const = learning_rate_schedule(TrainSettings(learning_rate=lr, num_steps=n, warmup_steps=0, lr_schedule="constant"))
  assert const == lr


def test_checkpoint_loads_as_a_model_with_ema_weights(tmp_path):
  trained, _ = _train(tmp_path / "w", 2, ema_decay=0.5)
  loaded = load_pretrained(str(tmp_path / "w"))
  assert loaded.metadata["weights"] == "ema_params"
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
