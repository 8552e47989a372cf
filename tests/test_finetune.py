"""Dual-loss fine-tuning, antithetic timesteps, the generated-data cache and the ANP probe."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffcleanse_jax.defense import anp
from diffcleanse_jax.defense import finetune as ft
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import preset


@pytest.mark.parametrize("b", [1, 6, 7])
def test_antithetic_timesteps_pair_t_with_T_minus_1_minus_t(b):
  t = np.asarray(ft.antithetic_timesteps(jax.random.key(0), b, 1000))
  h = (b + 1) // 2
  assert t.shape == (b,) and t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
  np.testing.assert_array_equal(t[h:], 999 - t[:b - h])


def test_dual_loss_value_on_a_toy_eps_fn():
  def eps_fn(params, x, t, train=False, rngs=None):
    return params["w"] * x + params["b"] * t[:, None, None, None].astype(jnp.float32) / 1000.0

  acp = np.linspace(0.99, 0.01, 1000)
  student = {"w": jnp.float32(0.3), "b": jnp.float32(0.2)}
  teacher = {"w": jnp.float32(-0.5), "b": jnp.float32(0.0)}
  x0 = jax.random.uniform(jax.random.key(1), (5, 4, 4, 2), minval=-1, maxval=1)
  key = jax.random.key(2)
  got = float(ft.make_dual_loss(eps_fn, teacher, acp, w_ddpm=1.0, w_kd=0.5)(student, {"image": x0}, key))
  # by hand, with the loss's own key usage
  kt, kn, _ = jax.random.split(key, 3)
  t = np.asarray(ft.antithetic_timesteps(kt, 5, 1000))
  eps = np.asarray(jax.random.normal(kn, x0.shape))
  a = acp.astype(np.float32)[t][:, None, None, None]
  xt = np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * eps
  ps = 0.3 * xt + 0.2 * t[:, None, None, None] / 1000.0
  pt = -0.5 * xt
  want = np.mean(np.sum((eps - ps) ** 2, axis=(1, 2, 3))) + 0.5 * np.mean(np.sum((pt - ps) ** 2, axis=(1, 2, 3)))
  assert got == pytest.approx(want, rel=1e-5)
  # the distillation term has no gradient into the teacher and vanishes when student == teacher
  kd_only = ft.make_dual_loss(eps_fn, teacher, acp, w_ddpm=0.0, w_kd=1.0)
  assert float(kd_only(teacher, {"image": x0}, key)) == pytest.approx(0.0, abs=1e-9)


def test_generated_data_is_cached_and_reused(tmp_path, monkeypatch):
  m = DiffusionModel.from_config(preset("tiny"), key=0)
  cfg = samplers.SamplerConfig(method="ddim", num_steps=2)
  path = str(tmp_path / "data.npy")
  a = ft.generated_dataset(m, 5, jax.random.key(0), cfg, batch_size=8, cache_path=path)
  assert a.shape == (5, 16, 16, 1) and a.min() >= -1 and a.max() <= 1
  np.testing.assert_allclose(np.round((a + 1) / 2 * 255), (a + 1) / 2 * 255, atol=1e-3)  # 8-bit levels

  def boom(*args, **kw):
    raise AssertionError("regenerated instead of reusing the cache")

  monkeypatch.setattr("diffcleanse_jax.workflows.generate", boom)
  b = ft.generated_dataset(m, 5, jax.random.key(0), cfg, batch_size=8, cache_path=path)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(AssertionError, match="regenerated"):  # other settings -> regenerate
    ft.generated_dataset(m, 6, jax.random.key(0), cfg, batch_size=8, cache_path=path)


def test_anp_perturbation_folds_into_conv_kernels_and_respects_the_budget():
  m = DiffusionModel.from_config(preset("tiny"), key=0)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  t = jnp.array([5, 500])
  pert = anp.init_perturbation(m.params)
  assert "conv_in" in pert and "down_blocks_0/resnets_0/conv1" in pert and "conv_out" in pert
  perturbed = m.replace(params=anp.perturb_params(m.params, pert))
  np.testing.assert_allclose(np.asarray(perturbed(x, t)), np.asarray(m(x, t)), rtol=1e-6, atol=1e-6)
  # a * conv(x) + b on conv_in's output equals the folded kernel/bias
  k = m.params["conv_in"]
  a, b = jnp.arange(1.0, 9.0), jnp.arange(8.0) / 10
  conv = lambda p, x: jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  folded = anp.perturb_params({"conv_in": k}, {"conv_in": {"a": a, "b": b}})["conv_in"]
  np.testing.assert_allclose(np.asarray(conv(folded, x)), np.asarray(a * conv(k, x) + b), rtol=1e-5, atol=1e-5)
  images = np.asarray(jax.random.uniform(jax.random.key(2), (8, 16, 16, 1), minval=-1, maxval=1))
  pm, info = anp.run_anp(m, images, jax.random.key(3), budget=1.5, learning_rate=0.5, batch_size=4, num_steps=3)
  assert info["max_perturbation"] > 0 and len(info["clean_loss"]) == 3
  assert pm.params["conv_in"]["kernel"].shape == k["kernel"].shape


def test_collapse_ratio():
  rng = np.random.default_rng(0)
  diverse = rng.random((8, 8, 8, 1))
  assert anp.collapse_ratio(diverse) == 0.0
  same = np.repeat(diverse[:1], 8, axis=0)
  assert anp.collapse_ratio(same) == 1.0
  half = np.concatenate([same[:4], diverse[4:]])
  assert anp.collapse_ratio(half) == 0.5
  assert anp.collapse_ratio(np.zeros((4, 8, 8, 1))) == 0.0  # near-black images take part in no pair
