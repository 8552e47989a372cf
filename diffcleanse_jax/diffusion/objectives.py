"""Forward process and the DDPM epsilon-prediction objective (diffusers style: MSE, mean over all elements)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def q_sample(x0: jax.Array, eps: jax.Array, t: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, eps (B,H,W,C), t (B,) int."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)[t][:, None, None, None]
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def sample_t_eps(key: jax.Array, x0: jax.Array, num_train_timesteps: int):
  """Uniform t ~ U{0..T-1} (B,) and eps ~ N(0, I) shaped like x0."""
  kt, kn = jax.random.split(key)
  t = jax.random.randint(kt, (x0.shape[0],), 0, num_train_timesteps)
  return t, jax.random.normal(kn, x0.shape, jnp.float32)


def make_ddpm_loss(eps_fn, alphas_cumprod):
  """loss(params, batch, key) = mean (eps_theta(x_t, t) - eps)^2 for clean images batch['image'] in [-1,1]."""
  acp = jnp.asarray(alphas_cumprod, jnp.float32)
  T = int(acp.shape[0])

  def loss(params, batch, key):
    x0 = batch["image"]
    k1, k2 = jax.random.split(key)
    t, eps = sample_t_eps(k1, x0, T)
    pred = eps_fn(params, q_sample(x0, eps, t, acp), t, train=True, rngs={"dropout": k2})
    return jnp.mean((pred - eps) ** 2)

  return loss
