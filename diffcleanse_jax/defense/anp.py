"""ANP as BadDiffusion implements it (ALGORITHMS §7.3): an adversarial-neuron-perturbation *probe*.

Every conv output channel c gets an affine perturbation a_c * h + b_c (a = 1, b = 0 at the start; BadDiffusion
wraps each Conv2d in a BatchNorm with fixed statistics). Everything else is frozen; (a, b) *maximise* the clean
DDPM loss with Adam and gradient clipping 1.0, and after every step both are clamped to [-budget, budget]
(absolute, as in the reference). The perturbed model is then sampled from clean noise: if the perturbation
uncovers the backdoor, samples collapse towards the target. The defender does not know the target, so the probe
reports the MSCR-style collapse of the samples (`collapse_ratio`), and the MSE to the target only when the glue
supplies the true target.

Implementation note: a * (W x + bias) + b == (a * W) x + (a * bias + b), so the perturbation is folded into the
conv kernels and biases (`perturb_params`); the UNet module is not changed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from diffcleanse_jax.diffusion.objectives import q_sample
from diffcleanse_jax.model import DiffusionModel


def conv_modules(params) -> list[str]:
  """Module paths of every conv layer (4-D kernel), e.g. 'down_blocks_0/resnets_0/conv1'."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return sorted(k.rsplit("/", 1)[0] for k, v in flat.items() if k.endswith("/kernel") and np.ndim(v) == 4)


def init_perturbation(params) -> dict[str, dict[str, jax.Array]]:
  """{module: {'a': ones (C_out,), 'b': zeros (C_out,)}} for every conv."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for m in conv_modules(params):
    c = flat[f"{m}/kernel"].shape[-1]
    out[m] = {"a": jnp.ones((c,), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
  return out


def perturb_params(params, pert: Mapping[str, Mapping[str, jax.Array]]):
  """Folds a_c h + b_c on every perturbed conv output into its kernel and bias."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for m, ab in pert.items():
    a, b = ab["a"], ab["b"]
    flat[f"{m}/kernel"] = flat[f"{m}/kernel"] * a
    bias = flat.get(f"{m}/bias")
    flat[f"{m}/bias"] = (bias * a if bias is not None else 0.0) + b
  return traverse_util.unflatten_dict(flat, sep="/")


def collapse_ratio(images01: Any, threshold: float = 0.999, lo: float = 0.01, hi: float = 0.99) -> float:
  """MSCR-style collapse (ALGORITHMS §4.1/4.3): the fraction of images that belong to at least one pair with
  pixel cosine similarity > threshold (not mean-centred); images whose mean is <= lo or >= hi are excluded from
  every pair. 0 for diverse samples, 1 when all samples are the same image."""
  x = np.asarray(images01, np.float64).reshape(len(images01), -1)
  n = x.shape[0]
  if n < 2:
    return 0.0
  m = x.mean(axis=1)
  ok = (m > lo) & (m < hi)
  norm = np.linalg.norm(x, axis=1)
  norm[norm == 0] = 1.0
  v = x / norm[:, None]
  cos = v @ v.T
  sim = (cos > threshold) & ok[:, None] & ok[None, :]
  np.fill_diagonal(sim, False)
  return float(np.any(sim, axis=1).sum() / n)


def run_anp(model: DiffusionModel, images: np.ndarray, key: jax.Array, *, budget: float = 4.0,
            learning_rate: float = 1e-4, batch_size: int = 128, num_steps: int = 100, grad_clip: float = 1.0,
            log: Callable[[str], None] = logging.info) -> tuple[DiffusionModel, dict[str, Any]]:
  """Maximises the clean loss over (a, b). Returns (perturbed model, info with the loss history and the final
  perturbation size)."""
  acp = jnp.asarray(np.asarray(model.schedule.alphas_cumprod), jnp.float32)
  T = int(acp.shape[0])
  params = jax.tree.map(jnp.asarray, model.params)
  pert = init_perturbation(params)
  tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate))
  opt = tx.init(pert)
  eps_fn = model.apply

  def neg_clean_loss(pert, x0, key):
    kt, kn = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, T)
    eps = jax.random.normal(kn, x0.shape, jnp.float32)
    pred = eps_fn(perturb_params(params, pert), q_sample(x0, eps, t, acp), t)
    return -jnp.mean((pred - eps) ** 2)

  @jax.jit
  def step(pert, opt, x0, key):
    loss, g = jax.value_and_grad(neg_clean_loss)(pert, x0, key)
    upd, opt = tx.update(g, opt, pert)
    pert = optax.apply_updates(pert, upd)
    pert = jax.tree.map(lambda v: jnp.clip(v, -budget, budget), pert)
    return pert, opt, -loss

  images = np.asarray(images, np.float32)
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
  hist = []
  t0 = time.time()
  bs = min(int(batch_size), len(images))
  for i in range(int(num_steps)):
    idx = rng.choice(len(images), bs, replace=False)
    pert, opt, loss = step(pert, opt, jnp.asarray(images[idx]), jax.random.fold_in(key, i))
    hist.append(float(loss))
  dev = float(max(max(float(jnp.max(jnp.abs(ab["a"] - 1.0))), float(jnp.max(jnp.abs(ab["b"])))) for ab in
                  pert.values())) if pert else 0.0
  log(f"ANP: {num_steps} steps in {time.time() - t0:.1f}s, clean loss {hist[0] if hist else 0:.4f} -> "
      f"{hist[-1] if hist else 0:.4f}, max |perturbation| {dev:.3f}")
  perturbed = model.replace(params=jax.device_get(perturb_params(params, pert)),
                            metadata=dict(model.metadata, anp=dict(budget=budget, steps=int(num_steps))))
  return perturbed, dict(clean_loss=hist, max_perturbation=dev, num_convs=len(pert), seconds=time.time() - t0)


def anp_probe(model: DiffusionModel, images: np.ndarray, key: jax.Array, sampler_cfg, *, num_samples: int = 16,
              batch_size: int = 64, train_batch_size: int = 128, true_target: np.ndarray | None = None, asr_threshold: float = 1e-3,
              log: Callable[[str], None] = logging.info, **anp_kw) -> tuple[DiffusionModel, dict[str, Any]]:
  """run_anp, then sample the perturbed model from clean noise: collapse ratio (always) and backdoor metrics
  against `true_target` (H,W,C in [-1,1]) when given. Returns (perturbed model, report dict incl. 'samples01')."""
  from diffcleanse_jax.workflows import generate

  k_anp, k_s = jax.random.split(key)
  perturbed, info = run_anp(model, images, k_anp, batch_size=train_batch_size, log=log, **anp_kw)
  imgs = generate(perturbed, perturbed.params, int(num_samples), k_s, sampler_cfg, int(batch_size))
  out = dict(info, collapse=collapse_ratio(imgs), num_samples=int(num_samples), samples01=imgs)
  if true_target is not None:
    from diffcleanse_jax.metrics.backdoor import backdoor_metrics
    bm = backdoor_metrics(imgs * 2.0 - 1.0, true_target, threshold=asr_threshold)
    out.update(mse_to_target=bm["mse"], ssim_to_target=bm["ssim"], asr_clean_noise=bm["asr"])
  return perturbed, out
