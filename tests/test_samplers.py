"""Samplers: update rules vs diffusers' schedulers, timesteps, scan/jit, gradients through the chain."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.diffusion.schedules import make_schedule, schedule_from_config
from diffcleanse_jax.diffusion.samplers import SamplerConfig, SamplerError, inference_timesteps, sample_loop


def toy_eps(params, x, t):
  """A smooth stand-in for a UNet: depends on x, t and a parameter."""
  return params["w"] * jnp.tanh(x) + 0.01 * jnp.sin(t.astype(jnp.float32))[:, None, None, None]


def test_leading_timesteps():
  np.testing.assert_array_equal(inference_timesteps(1000, 20)[:3], [950, 900, 850])
  assert inference_timesteps(1000, 20)[-1] == 0
  np.testing.assert_array_equal(inference_timesteps(1000, 1000), np.arange(999, -1, -1))
  assert inference_timesteps(1000, 50)[:2].tolist() == [980, 960]
  with pytest.raises(SamplerError, match="num_steps"):
    inference_timesteps(1000, 0)


def test_sampler_config_validation():
  with pytest.raises(SamplerError, match="method"):
    SamplerConfig(method="euler").validate()
  with pytest.raises(SamplerError, match="variance_type"):
    SamplerConfig(variance_type="learned_range").validate()
  c = SamplerConfig.from_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": True})
  assert c.method == "ddim" and c.clip_sample
  assert SamplerConfig.from_scheduler_config({"clip_sample": True}, clip_sample=False).clip_sample is False


def test_cosine_and_scaled_linear_schedules_match_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  for name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    ours = schedule_from_config({"beta_schedule": name, "beta_start": 1e-4, "beta_end": 0.02})
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
  del torch


@pytest.mark.parity
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("num_steps", [1000, 20])
def test_ddpm_steps_match_diffusers(variance_type, clip, num_steps):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule="linear", variance_type=variance_type, clip_sample=clip,
                                  clip_sample_range=0.5 if clip else 1.0)
  sched.set_timesteps(num_steps)
  ours = make_schedule()
  ts, a_t, a_prev = samplers.step_arrays(ours, SamplerConfig(method="ddpm", num_steps=num_steps))
  np.testing.assert_array_equal(ts, sched.timesteps.numpy())
  rng = np.random.RandomState(0)
  idx = sorted(set([0, 1, len(ts) // 2, len(ts) - 2, len(ts) - 1]))
  for i in idx:
    t = int(ts[i])
    x = rng.randn(2, 1, 4, 4).astype(np.float32) * 2
    eps = rng.randn(2, 1, 4, 4).astype(np.float32)
    gen = torch.Generator().manual_seed(i)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).numpy()
    ref = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x), generator=gen).prev_sample.numpy()
    got, _ = samplers._ddpm_update(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(noise), t, jnp.float32(a_t[i]),
                                   jnp.float32(a_prev[i]), clip, variance_type, 0.5 if clip else 1.0)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("alpha_one,clip_range", [(True, 1.0), (False, 0.5)])
def test_ddim_steps_match_diffusers(eta, clip, alpha_one, clip_range):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                  beta_schedule="linear", clip_sample=clip, set_alpha_to_one=alpha_one,
                                  clip_sample_range=clip_range)
  sched.set_timesteps(50)
  cfg = SamplerConfig.from_scheduler_config(dict(sched.config, _class_name="DDIMScheduler"), num_steps=50)
  assert cfg.method == "ddim" and cfg.set_alpha_to_one == alpha_one and cfg.clip_sample_range == clip_range
  ts, a_t, a_prev = samplers.step_arrays(make_schedule(), cfg)
  np.testing.assert_array_equal(ts, sched.timesteps.numpy())
  rng = np.random.RandomState(1)
  for i in (0, 10, 48, 49):
    x = rng.randn(2, 1, 4, 4).astype(np.float32)
    eps = rng.randn(2, 1, 4, 4).astype(np.float32)
    noise = rng.randn(2, 1, 4, 4).astype(np.float32)
    ref = sched.step(torch.from_numpy(eps), int(ts[i]), torch.from_numpy(x), eta=eta,
                     variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    got, _ = samplers._ddim_update(jnp.asarray(x), jnp.asarray(eps), jnp.asarray(noise), int(ts[i]),
                                   jnp.float32(a_t[i]), jnp.float32(a_prev[i]), clip, eta, clip_range)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parity
def test_whole_ddim_chain_matches_diffusers_loop():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, clip_sample=False)
  sched.set_timesteps(10)
  x_T = np.random.RandomState(2).randn(2, 4, 4, 1).astype(np.float32)
  x = torch.from_numpy(x_T.transpose(0, 3, 1, 2))
  for t in sched.timesteps:
    e = 0.5 * torch.tanh(x) + 0.01 * torch.sin(t.float())
    x = sched.step(e, t, x).prev_sample
  got = sample_loop(toy_eps, {"w": jnp.float32(0.5)}, jnp.asarray(x_T), jax.random.key(0), make_schedule(),
                    SamplerConfig(method="ddim", num_steps=10))
  np.testing.assert_allclose(np.asarray(got), x.numpy().transpose(0, 2, 3, 1), atol=5e-5, rtol=1e-4)


def test_trajectory_and_determinism():
  params = {"w": jnp.float32(0.3)}
  x_T = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
  cfg = SamplerConfig(method="ddpm", num_steps=10)
  x0, traj = sample_loop(toy_eps, params, x_T, jax.random.key(5), make_schedule(), cfg, return_trajectory=True)
  assert traj.shape == (11, 3, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(x_T))
  np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x0))
  again = sample_loop(toy_eps, params, x_T, jax.random.key(5), make_schedule(), cfg)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(x0))
  other = sample_loop(toy_eps, params, x_T, jax.random.key(6), make_schedule(), cfg)
  assert not np.allclose(np.asarray(other), np.asarray(x0))


def test_clipping_changes_outputs_and_bounds_x0_hat():
  params = {"w": jnp.float32(-3.0)}  # a model that pushes x0-hat far outside [-1, 1]
  x_T = 3 * jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  out_clip = sample_loop(toy_eps, params, x_T, jax.random.key(0), make_schedule(),
                         SamplerConfig(method="ddim", num_steps=5, clip_sample=True))
  out_free = sample_loop(toy_eps, params, x_T, jax.random.key(0), make_schedule(),
                         SamplerConfig(method="ddim", num_steps=5, clip_sample=False))
  assert np.abs(np.asarray(out_clip)).max() <= 1.0 + 1e-5
  assert np.abs(np.asarray(out_free)).max() > 1.5


def test_grad_through_short_sampler_matches_finite_differences():
  x_T = jax.random.normal(jax.random.key(3), (2, 4, 4, 1))
  cfg = SamplerConfig(method="ddim", num_steps=4)

  def loss(w, remat):
    x0 = sample_loop(toy_eps, {"w": w}, x_T, jax.random.key(0), make_schedule(), cfg, remat=remat)
    return jnp.mean(x0 ** 2)

  g = jax.grad(loss)(jnp.float32(0.4), True)
  g_plain = jax.grad(loss)(jnp.float32(0.4), False)
  h = 1e-3
  fd = (loss(jnp.float32(0.4 + h), False) - loss(jnp.float32(0.4 - h), False)) / (2 * h)
  np.testing.assert_allclose(float(g), float(g_plain), rtol=1e-5)
  np.testing.assert_allclose(float(g), float(fd), rtol=2e-2)
  # gradient w.r.t. x_T (what white-box trigger inversion uses)
  gx = jax.grad(lambda x: jnp.mean(sample_loop(toy_eps, {"w": 0.4}, x, jax.random.key(0), make_schedule(), cfg,
                                               remat=True) ** 2))(x_T)
  assert gx.shape == x_T.shape and np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).sum() > 0
