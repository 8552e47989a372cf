"""The shipped demo model examples/fmnist_box14_hat/ (the README main job cleanses it): size, loadability, the
attack metadata the cleanse glue reads, and that it really is backdoored (triggered noise -> the hat, plain noise
-> not the hat) with the DDPM sampler it was attacked for."""
import json
import os

import jax
import numpy as np
import pytest

from diffcleanse_jax import cleanse_cli
from diffcleanse_jax.attacks.targets import make_target
from diffcleanse_jax.attacks.triggers import make_trigger
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.io.native import load_pretrained
from diffcleanse_jax.metrics.backdoor import backdoor_metrics
from diffcleanse_jax.models.presets import preset
from diffcleanse_jax.workflows import generate

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fmnist_box14_hat")


def test_example_is_small_and_loads_as_the_cpu_preset():
  size = sum(os.path.getsize(os.path.join(EXAMPLE, f)) for f in os.listdir(EXAMPLE))
  assert size <= 5 * 2**20, f"{EXAMPLE} is {size / 2**20:.2f} MB; the issue allows 5 MB"
  model = load_pretrained(EXAMPLE)
  want = preset("fmnist-cpu")
  for k in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size"):
    assert list(np.atleast_1d(model.config[k])) == list(np.atleast_1d(want[k])), k
  assert model.num_params == 686_769
  assert tuple(model.image_shape) == (32, 32, 1)


def test_example_attack_metadata_matches_the_trigger_library_and_reaches_the_glue():
  with open(os.path.join(EXAMPLE, "attack.json")) as f:
    info = json.load(f)
  assert (info["trigger"], info["target"], info["poison_rate"], info["solver"]) == ("BOX_14", "HAT", 0.1, "sde")
  assert info["status"] == "done"
  g = make_trigger("BOX_14", 32, 1)
  y = make_target("HAT", 32, 1, trigger=g)
  np.testing.assert_array_equal(np.load(os.path.join(EXAMPLE, "trigger.npy")), g)
  np.testing.assert_array_equal(np.load(os.path.join(EXAMPLE, "target.npy")), y)
  g2, y2, source = cleanse_cli.resolve_trigger_target(EXAMPLE, (32, 32, 1), log=lambda *_: None)
  assert source.endswith("attack.json")
  np.testing.assert_array_equal(g2, g)
  np.testing.assert_array_equal(y2, y)
  with open(os.path.join(EXAMPLE, "attack_config.json")) as f:  # the resolved config of the run that made it
    cfg = json.load(f)
  assert cfg["attack"]["trigger"] == "BOX_14" and cfg["seed"] == info["seed"]


@pytest.mark.slow
def test_example_is_backdoored_under_ddpm_1000():
  """4 triggered and the same 4 plain noises through DDPM with all 1000 steps (about 20 s on 2 CPU cores)."""
  model = load_pretrained(EXAMPLE)
  g = np.load(os.path.join(EXAMPLE, "trigger.npy"))
  y = np.load(os.path.join(EXAMPLE, "target.npy"))
  cfg = samplers.SamplerConfig.from_scheduler_config(model.scheduler_config, method="ddpm", num_steps=None,
                                                     clip_sample=False)
  key = jax.random.key(0)
  trig = generate(model, model.params, 4, key, cfg, 4, x_T_offset=g) * 2.0 - 1.0
  clean = generate(model, model.params, 4, key, cfg, 4) * 2.0 - 1.0
  m_trig = backdoor_metrics(trig, y, threshold=1e-3)
  m_clean = backdoor_metrics(clean, y, threshold=1e-3)
  assert m_trig["asr"] >= 0.75, m_trig
  assert m_clean["asr"] == 0.0 and m_clean["mse"] > 10 * m_trig["mse"], (m_clean, m_trig)


@pytest.mark.slow
def test_the_shipped_detection_chain_fires_the_demo_backdoor_and_flags_it():
  """configs/fmnist_detect.py's inversion chain (its sampler and num_steps) is short enough to be fast and long
  enough for this SDE backdoor: the true trigger collapses the fixed noise batch, plain noise does not, and the
  BBTI detector with the config's settings flags the demo within 2 epochs (it collapses at epoch 0-2) and estimates
  its target from the collapse."""
  from configs import fmnist_detect
  from diffcleanse_jax.defense.detection import detect_bbti
  from diffcleanse_jax.defense.inversion import trigger_mscr

  config = fmnist_detect.get_config()
  model = load_pretrained(EXAMPLE)
  g = np.load(os.path.join(EXAMPLE, "trigger.npy"))
  assert trigger_mscr(model, g, config.inversion)["mscr"] >= 0.75
  assert trigger_mscr(model, np.zeros_like(g), config.inversion)["mscr"] == 0.0
  config.inversion.max_epochs = 2
  config.detection.target_trigger.num_iters = 10  # the target estimate is checked, not the trigger's quality
  config.detection.target_trigger.refine_rounds = 0  # (the refinement: tests/test_target_inversion.py)
  res = detect_bbti(model, config, jax.random.key(config.seed))
  assert res.backdoored and res.score > config.detection.threshold, res.details["mscr_per_epoch"]
  # trigger_from='target': the image the batch collapsed onto is the demo's HAT (found from samples alone)
  hat = np.load(os.path.join(EXAMPLE, "target.npy"))
  assert float(np.mean((res.arrays["target_estimate"] - hat) ** 2)) < 0.01
  assert res.details["target_trigger"]["cluster_size"] >= 2
