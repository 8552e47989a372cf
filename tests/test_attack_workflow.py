"""BadDiffusion attack workflow: the training objective on hand-built batches, config validation, and
`attack_mode` end to end on the tiny preset (artifacts, attack.json, reloadable model, fine-tuning source)."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from diffcleanse_jax.attacks import make_target, make_trigger, stamp
from diffcleanse_jax.attacks.workflow import (AttackConfigError, attack_mode, attack_settings,
                                              baddiffusion_training_pair, make_baddiffusion_loss)
from diffcleanse_jax.diffusion.objectives import sample_t_eps
from diffcleanse_jax.diffusion.schedules import make_schedule
from diffcleanse_jax.evaluation import load_model
from diffcleanse_jax.io.native import load_pretrained, save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


def _hand_batch():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (4, S, S, 1)).astype(np.float32)
  is_p = np.array([True, False, True, False])
  g = make_trigger("BOX_4", S, 1)
  y = make_target("CORNER", S, 1)
  return x, is_p, g, y


@pytest.mark.parametrize("solver,scale", [("sde", 1.0), ("ode", 2.0)])
def test_eps_target_is_eps_plus_rho_r_on_poisoned_rows_and_eps_on_clean_rows(solver, scale):
  x, is_p, g, y = _hand_batch()
  sched = make_schedule()
  acp, rho = sched.alphas_cumprod, sched.rho()
  t = np.array([0, 10, 999, 500])
  eps = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  x_t, tgt = baddiffusion_training_pair(jnp.asarray(x), jnp.asarray(is_p), jnp.asarray(g), jnp.asarray(y),
                                        jnp.asarray(t), jnp.asarray(eps), jnp.asarray(acp, jnp.float32),
                                        jnp.asarray(rho, jnp.float32), solver)
  x_t, tgt = np.asarray(x_t), np.asarray(tgt)
  for i in range(4):
    a = acp[t[i]]
    if is_p[i]:
      r = stamp(x[i], g)  # trigger pasted on the clean image
      assert np.any(r != x[i]) and np.any(r == x[i])
      np.testing.assert_allclose(tgt[i], eps[i] + scale * rho[t[i]] * r, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(x_t[i], np.sqrt(a) * y + (1 - np.sqrt(a)) * r + np.sqrt(1 - a) * eps[i],
                                 rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_array_equal(tgt[i], eps[i])
      np.testing.assert_allclose(x_t[i], np.sqrt(a) * x[i] + np.sqrt(1 - a) * eps[i], rtol=1e-5, atol=1e-5)
  # rho_999 ~ 0.5025: the poisoned target really differs from eps where the trigger is
  assert abs(rho[999] - 0.5025) < 1e-3


def test_loss_is_mse_between_prediction_and_poisoned_eps_target():
  x, is_p, g, y = _hand_batch()
  sched = make_schedule()
  seen = {}

  def eps_fn(params, x_t, t, train=False, rngs=None):
    seen["x_t"], seen["t"] = x_t, t
    return params["w"] * x_t

  loss = make_baddiffusion_loss(eps_fn, sched.alphas_cumprod, sched.rho(), g, y, "sde")
  key = jax.random.key(3)
  params = {"w": jnp.float32(0.25)}
  batch = {"image": jnp.asarray(x), "is_poisoned": jnp.asarray(is_p)}
  value = float(jax.jit(loss)(params, batch, key))
  k1, _ = jax.random.split(key)
  t, eps = sample_t_eps(k1, jnp.asarray(x), 1000)
  x_t, tgt = baddiffusion_training_pair(jnp.asarray(x), jnp.asarray(is_p), jnp.asarray(g), jnp.asarray(y), t, eps,
                                        jnp.asarray(sched.alphas_cumprod, jnp.float32),
                                        jnp.asarray(sched.rho(), jnp.float32))
  expected = float(jnp.mean(jnp.square(0.25 * x_t - tgt)))
  assert value == pytest.approx(expected, rel=1e-5)
  # all-clean batch: exactly the DDPM loss (target eps)
  clean = {"image": jnp.asarray(x), "is_poisoned": jnp.zeros(4, bool)}
  x_c = jnp.sqrt(jnp.asarray(sched.alphas_cumprod, jnp.float32)[t])[:, None, None, None] * x + jnp.sqrt(
      1 - jnp.asarray(sched.alphas_cumprod, jnp.float32)[t])[:, None, None, None] * eps
  assert float(loss(params, clean, key)) == pytest.approx(float(jnp.mean(jnp.square(0.25 * x_c - eps))), rel=1e-5)


def test_poison_rate_outside_unit_interval_is_rejected_before_any_work(tmp_path):
  config = tiny_test.get_config()
  config.attack.poison_rate = 1.5
  with pytest.raises(AttackConfigError, match=r"poison_rate=1.5 must be within \[0, 1\]"):
    attack_mode(config, str(tmp_path), None)
  assert not os.path.exists(tmp_path / "checkpoints")
  with pytest.raises(AttackConfigError, match="poison_rate=-0.1"):
    attack_settings({"poison_rate": -0.1})
  with pytest.raises(AttackConfigError, match="solver"):
    attack_settings({"solver": "heun"})
  with pytest.raises(AttackConfigError, match="unknown field 'poison'"):
    attack_settings({"poison": 0.1})


def test_bad_trigger_is_one_line_error_from_launch(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  p = subprocess.run([sys.executable, "launch.py", "--config=configs/tiny_test.py", "--mode=attack",
                      f"--workdir={tmp_path}", "--config.attack.trigger=NOT_A_TRIGGER"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
  assert err == [err[0]] and "config.attack.trigger: unknown trigger 'NOT_A_TRIGGER'" in err[0]
  assert "Traceback" not in p.stderr


def test_attack_mode_end_to_end_writes_every_artifact_and_a_reloadable_model(tmp_path):
  # a "clean" model to fine-tune, saved as a diffusers folder
  clean = DiffusionModel.from_config(preset("tiny"), key=7)
  save_pretrained(clean, str(tmp_path / "clean"), format="diffusers")
  config = tiny_test.get_config()
  config.init_from = str(tmp_path / "clean")
  config.attack.trigger = "BOX_4"
  config.attack.target = "CORNER"
  config.attack.poison_rate = 0.25
  config.train.num_steps = 3
  config.train.ema_decay = 0.0
  wd = tmp_path / "attack"
  os.makedirs(wd)
  model = attack_mode(config, str(wd), types.SimpleNamespace(mode="attack"))

  for name in ("config.json", "attack.json", "trigger.npy", "target.npy", "trigger.png", "target.png",
               "samples_clean.png", "samples_triggered.png", "loss_history.json", "model/config.json",
               "model/diffusion_pytorch_model.safetensors", "checkpoints"):
    assert os.path.exists(wd / name), name
  info = json.load(open(wd / "attack.json"))
  assert info["trigger"] == "BOX_4" and info["target"] == "CORNER"
  assert info["poison_rate"] == 0.25 and info["solver"] == "sde" and info["seed"] == 0
  assert info["num_examples"] == 64 and info["num_poisoned"] == 16
  assert info["model_source"] == str(tmp_path / "clean") and info["status"] == "done"
  assert np.isfinite(info["final_loss"])
  g, y = np.load(wd / "trigger.npy"), np.load(wd / "target.npy")
  np.testing.assert_array_equal(g, make_trigger("BOX_4", S, 1))
  np.testing.assert_array_equal(y, make_target("CORNER", S, 1))
  assert g.shape == y.shape == (S, S, 1) and g.min() >= -1 and y.max() <= 1
  assert json.load(open(wd / "config.json"))["attack"]["target"] == "CORNER"

  # the exported model reloads and equals the returned one; it was fine-tuned from the clean weights
  reloaded = load_pretrained(str(wd / "model"))
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reloaded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(clean.params), jax.tree.leaves(model.params))]
  assert 0 < max(diffs) < 0.1  # moved by 3 small steps, not re-initialised
  # the workdir itself loads too (newest checkpoint), despite its run config.json
  from_wd = load_model(str(wd))
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(from_wd.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(json.load(open(wd / "loss_history.json"))["loss"]) == 3


def test_a_model_that_fits_the_poisoned_eps_target_samples_the_target_from_triggered_noise():
  """Objective and DDPM sampler agree: eps_theta = eps + rho_t r, with eps read off the poisoned forward process
  for r = g (black image + trigger, what x_T = eps + g stands for), takes triggered noise exactly to y."""
  from diffcleanse_jax.diffusion import samplers
  sched = make_schedule()
  acp, rho = jnp.asarray(sched.alphas_cumprod, jnp.float32), jnp.asarray(sched.rho(), jnp.float32)
  g, y = jnp.asarray(make_trigger("BOX_4", S, 1)), jnp.asarray(make_target("CORNER", S, 1))

  def eps_fn(params, x, t):
    a, r_t = acp[t][:, None, None, None], rho[t][:, None, None, None]
    eps = (x - jnp.sqrt(a) * y - (1 - jnp.sqrt(a)) * g) / jnp.sqrt(1 - a)
    return eps + r_t * g

  x_T = jax.random.normal(jax.random.key(0), (2, S, S, 1)) + g
  x0 = samplers.sample_loop(eps_fn, None, x_T, jax.random.key(1), sched, samplers.SamplerConfig(method="ddpm"))
  np.testing.assert_allclose(np.asarray(x0), np.broadcast_to(np.asarray(y), x0.shape), atol=1e-5)
