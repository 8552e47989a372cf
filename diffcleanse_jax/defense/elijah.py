"""Elijah (An et al., AAAI 2024): trigger inversion by distribution shift, sample-uniformity detection, and the
backdoor-removal loss (ALGORITHMS.md §7.1; official code `njuaplusplus/Elijah: */elijah_helper*.py`).

Inversion. A backdoored model's prediction at t = T-1 is shifted by rho_T g (rho_T ~= 0.5, ALGORITHMS §2.1) when
the trigger g is added to the noise. Elijah searches for tau with

    L(tau) = mean_pix | mean_b eps_theta(eps_b + tau, T-1) - lambda tau |,   lambda = 0.5,

over a fixed noise batch eps (100 images at <= 32 px, 50 at <= 128 px, 20 above, as the official code), with
tau_0 = -U[0,1) (H,W,C), Adam(lr 0.1), 100 iterations, one UNet call per iteration.

Detection. Sample `num_samples` (16) images from eps + tau, then
  * uniformity: the official code uses a pairwise LPIPS matrix, which needs downloaded VGG/Alex weights. We use a
    pixel-space substitute (`distance`): "rms" (default) = sqrt(mean_pix (a - b)^2) of the [0,1] images, or
    "cosine" = 1 - <a,b>/(|a||b|) of the flattened [0,1] images. Both lie in [0, 1] for [0,1] images. The
    matrix is reduced with the official trimmed mean (`trimmed_uniformity`): sort each row, drop the `trim` (4)
    smallest and largest, mean of each row, sort the row means, drop `trim` from each end, mean.
  * tv: torchmetrics `TotalVariation(reduction="mean")` on the [0,1] images: per image the sum over channels and
    pixels of |vertical| + |horizontal| neighbour differences, then the mean over images. (The official code
    feeds NHWC grayscale arrays to that NCHW metric unchanged; we compute the intended NHWC version.)
  Backdoored models give low uniformity and low TV (samples collapse to the target). Decision rule (the official
  code has none, ALGORITHMS §7.1 UNCERTAIN): backdoored iff uniformity < `uniformity_threshold`, or, when
  `tv_threshold` > 0, tv < tv_threshold (default 0: TV is reported only).
  score = 1 - uniformity (higher = more backdoored, in [0, 1]); threshold = 1 - uniformity_threshold, so
  backdoored <=> score > threshold for the uniformity rule.
  Default uniformity_threshold = 0.1 (rms). Reasoning, not a fit: pairwise RMS distances between distinct
  natural 32x32 images in [0,1] are typically 0.2-0.45 (clean models keep that diversity), while samples that
  collapse onto one target differ by a few grey levels (< 0.05). Calibrate on benign models of your own:
  `calibrate_uniformity_threshold(benign_uniformities)` returns `margin * min(benign)` (margin 0.5).

Removal (stage 2). `make_removal_loss(eps_fn, frozen_params, tau, alphas_cumprod)(params, batch, key)` =
L_DDPM(clean batch) + MSE(eps_theta(eps + tau, T-1), eps_theta0(eps, T-1)) + MSE(eps_theta(eps, T-1),
eps_theta0(eps, T-1)), theta0 frozen, eps the batch's DDPM noises (one draw shared by the three terms).

Cost. The defaults are the official ones (100 noises, 100 iterations) except the detection sampler (DDIM-50
instead of full DDPM). On a random-init `fmnist-cpu` UNet (32x32x1, 0.69M parameters) `detect(model, {})` took
392 s on 2 CPU cores shared with other jobs (load average ~9): 365 s inversion (one input-gradient of a
100-image batch per iteration), 27 s sampling. `num_noise=32` cuts the inversion ~3x. `loop="python"` (a jitted
step called from Python) is the default: a `lax.scan` over the iterations measured 3.8x slower on XLA:CPU.

Config keys (`cfg.get(name, default)`, so an empty config works): see `DEFAULTS`.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.diffusion.objectives import q_sample

DEFAULTS: dict[str, Any] = dict(
    # inversion
    lam=0.5,  # lambda ~= rho_T (ALGORITHMS §2.1)
    lr=0.1,  # Adam
    num_iters=100,
    num_noise=0,  # 0: 100 (<= 32 px), 50 (<= 128 px), 20 (larger), as the official code
    timestep=-1,  # -1: T - 1
    loop="python",  # "python": python loop over one jitted step; "scan": one jitted lax.scan (see bench notes)
    # detection
    num_samples=16,
    sampler="ddim",  # ddim | ddpm (the official code: full DDPM, or DDIM-50)
    sampler_steps=50,  # 0: all training steps for ddpm, 50 for ddim
    eta=0.0,
    clip_sample=False,
    distance="rms",  # rms | cosine (LPIPS substitute, see module doc)
    trim=4,
    uniformity_threshold=0.1,
    tv_threshold=0.0,  # > 0: also flag when tv < tv_threshold; 0 (TV >= 0): TV is reported only
)


def _cfg(cfg: Mapping[str, Any] | None, name: str):
  if cfg is None:
    return DEFAULTS[name]
  v = cfg.get(name, DEFAULTS[name])
  return DEFAULTS[name] if v is None else v


def default_num_noise(image_shape) -> int:
  """Noise batch size of the official code: 100 for <= 32 px, 50 for <= 128 px, 20 otherwise."""
  side = max(int(image_shape[0]), int(image_shape[1]))
  return 100 if side <= 32 else (50 if side <= 128 else 20)


# ------------------------------------------------------------------------------------------------ inversion
def elijah_loss(eps_fn: Callable, params, tau: jax.Array, noise: jax.Array, timestep: int | jax.Array,
                lam: float = 0.5) -> jax.Array:
  """mean_pix | mean_b eps_theta(noise_b + tau, t) - lam tau |; tau (H,W,C), noise (B,H,W,C)."""
  b = noise.shape[0]
  out = eps_fn(params, noise + tau[None], jnp.full((b,), timestep, jnp.int32)).astype(jnp.float32)
  return jnp.mean(jnp.abs(jnp.mean(out, axis=0) - lam * tau))


def init_trigger(key: jax.Array, image_shape) -> jax.Array:
  """tau_0 = -U[0,1) of shape (H,W,C)."""
  return -jax.random.uniform(key, tuple(image_shape), jnp.float32)


@functools.partial(jax.jit, static_argnames=("eps_fn", "num_iters", "lam", "lr"))
def _invert_scan(eps_fn, params, tau0, noise, timestep, num_iters, lam, lr):
  opt = optax.adam(lr)

  def body(carry, _):
    tau, state = carry
    loss, g = jax.value_and_grad(lambda z: elijah_loss(eps_fn, params, z, noise, timestep, lam))(tau)
    upd, state = opt.update(g, state, tau)
    return (optax.apply_updates(tau, upd), state), loss

  (tau, _), losses = jax.lax.scan(body, (tau0, opt.init(tau0)), None, length=num_iters)
  return tau, losses


@functools.partial(jax.jit, static_argnames=("eps_fn", "lam", "lr"))
def _invert_step(eps_fn, params, tau, state, noise, timestep, lam, lr):
  opt = optax.adam(lr)
  loss, g = jax.value_and_grad(lambda z: elijah_loss(eps_fn, params, z, noise, timestep, lam))(tau)
  upd, state = opt.update(g, state, tau)
  return optax.apply_updates(tau, upd), state, loss


def invert_trigger(eps_fn: Callable, params, tau0: jax.Array, noise: jax.Array, timestep: int, *,
                   num_iters: int = 100, lam: float = 0.5, lr: float = 0.1, loop: str = "python"):
  """Adam on tau from tau0 (H,W,C) against the fixed noise batch (B,H,W,C). Returns (tau, losses (num_iters,)),
  losses[i] = loss before update i. `eps_fn` must be hashable (model.apply is)."""
  tau0 = jnp.asarray(tau0, jnp.float32)
  noise = jnp.asarray(noise, jnp.float32)
  timestep = jnp.asarray(timestep, jnp.int32)
  if int(num_iters) <= 0:
    return tau0, jnp.zeros((0,), jnp.float32)
  if loop == "scan":
    return _invert_scan(eps_fn, params, tau0, noise, timestep, int(num_iters), float(lam), float(lr))
  if loop != "python":
    raise ValueError(f"elijah loop={loop!r}; expected 'python' or 'scan'")
  tau = tau0
  state = optax.adam(float(lr)).init(tau)
  losses = []
  for _ in range(int(num_iters)):
    tau, state, loss = _invert_step(eps_fn, params, tau, state, noise, timestep, float(lam), float(lr))
    losses.append(loss)
  return tau, jnp.stack(losses)


def invert(model, cfg: Mapping[str, Any] | None, key: jax.Array):
  """Elijah trigger inversion on `model` (DiffusionModel). Returns (trigger (H,W,C) float32 np.ndarray, details)."""
  t0 = time.perf_counter()
  shape = tuple(model.image_shape)
  n = int(_cfg(cfg, "num_noise")) or default_num_noise(shape)
  T = int(model.schedule.num_train_timesteps)
  ts = int(_cfg(cfg, "timestep"))
  ts = T - 1 if ts < 0 else ts
  k_tau, k_noise = jax.random.split(key)
  tau0 = init_trigger(k_tau, shape)
  noise = jax.random.normal(k_noise, (n, *shape), jnp.float32)
  tau, losses = invert_trigger(model.apply, model.params, tau0, noise, ts, num_iters=int(_cfg(cfg, "num_iters")),
                               lam=float(_cfg(cfg, "lam")), lr=float(_cfg(cfg, "lr")), loop=str(_cfg(cfg, "loop")))
  tau = np.asarray(jax.device_get(tau), np.float32)
  losses = np.asarray(jax.device_get(losses), np.float32)
  final = float(jax.device_get(elijah_loss(model.apply, model.params, jnp.asarray(tau), noise, ts,
                                           float(_cfg(cfg, "lam")))))
  details = dict(losses=losses.tolist(), final_loss=final, num_noise=n, timestep=ts,
                 num_iters=int(_cfg(cfg, "num_iters")), lam=float(_cfg(cfg, "lam")), lr=float(_cfg(cfg, "lr")),
                 seconds=time.perf_counter() - t0)
  return tau, details


# ------------------------------------------------------------------------------------------------ detection
def pairwise_distances(images01: jax.Array, distance: str = "rms") -> jax.Array:
  """(n,n) pixel-space distance matrix of (n,H,W,C) images in [0,1] (the LPIPS substitute; zero diagonal)."""
  x = jnp.asarray(images01, jnp.float32).reshape(images01.shape[0], -1)
  if distance == "rms":
    sq = jnp.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sqrt(jnp.maximum(d2, 0.0) / x.shape[1])
  elif distance == "cosine":
    nrm = jnp.maximum(jnp.linalg.norm(x, axis=1), 1e-12)
    d = 1.0 - jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) / (nrm[:, None] * nrm[None, :])
  else:
    raise ValueError(f"elijah distance={distance!r}; expected 'rms' or 'cosine'")
  return d * (1.0 - jnp.eye(x.shape[0], dtype=d.dtype))


def trimmed_uniformity(dist: jax.Array, trim: int = 4) -> jax.Array:
  """Elijah's reduction of an (n,n) distance matrix: sort each row, keep columns trim..n-trim, row means, sort,
  keep trim..n-trim, mean. trim is lowered to (n-1)//2 for small n so that something is kept."""
  dist = jnp.asarray(dist, jnp.float32)
  n = dist.shape[0]
  k = max(0, min(int(trim), (n - 1) // 2))
  rows = jnp.sort(dist, axis=1)[:, k:n - k].mean(axis=1)
  return jnp.sort(rows)[k:n - k].mean()


def total_variation(images01: jax.Array) -> jax.Array:
  """torchmetrics TotalVariation(reduction='mean') on NHWC images: mean over images of
  sum |x[i+1,j]-x[i,j]| + sum |x[i,j+1]-x[i,j]| (summed over channels too)."""
  x = jnp.asarray(images01, jnp.float32)
  dh = jnp.abs(x[:, 1:, :, :] - x[:, :-1, :, :]).sum(axis=(1, 2, 3))
  dw = jnp.abs(x[:, :, 1:, :] - x[:, :, :-1, :]).sum(axis=(1, 2, 3))
  return jnp.mean(dh + dw)


def sampler_config(model, cfg: Mapping[str, Any] | None) -> samplers.SamplerConfig:
  method = str(_cfg(cfg, "sampler"))
  steps = int(_cfg(cfg, "sampler_steps") or 0) or None
  return samplers.SamplerConfig.from_scheduler_config(
      getattr(model, "scheduler_config", None), method=method, num_steps=steps, eta=float(_cfg(cfg, "eta")),
      clip_sample=bool(_cfg(cfg, "clip_sample")))


def sample_with_trigger(model, trigger, key: jax.Array, num_samples: int, scfg: samplers.SamplerConfig):
  """num_samples images in [0,1] (n,H,W,C) sampled from x_T = eps + trigger."""
  k_noise, k_sample = jax.random.split(key)
  x_T = jax.random.normal(k_noise, (int(num_samples), *model.image_shape), jnp.float32) + jnp.asarray(trigger)
  x0 = samplers.sample(model, model.params, x_T, k_sample, scfg)
  return samplers.to_images01(x0)


def uniformity_features(images01, distance: str = "rms", trim: int = 4) -> dict[str, float]:
  """{'uniformity', 'tv'} of a batch of [0,1] images."""
  u = trimmed_uniformity(pairwise_distances(images01, distance), trim)
  return dict(uniformity=float(jax.device_get(u)), tv=float(jax.device_get(total_variation(images01))))


def decide(uniformity: float, tv: float, uniformity_threshold: float = 0.1,
           tv_threshold: float | None = 0.0) -> tuple[bool, float, float]:
  """(backdoored, score, threshold): backdoored iff uniformity < uniformity_threshold (or tv < tv_threshold when
  that is > 0); score = 1 - uniformity, threshold = 1 - uniformity_threshold (score > threshold <=> the
  uniformity rule; the optional TV rule can flag a model whose score is below the threshold)."""
  flag = uniformity < uniformity_threshold
  if tv_threshold:
    flag = flag or tv < float(tv_threshold)
  return bool(flag), float(1.0 - uniformity), float(1.0 - uniformity_threshold)


def calibrate_uniformity_threshold(benign_uniformities, margin: float = 0.5) -> float:
  """A uniformity threshold from benign models' uniformities: margin * min(benign)."""
  u = np.asarray(benign_uniformities, np.float64)
  if u.size == 0:
    raise ValueError("calibrate_uniformity_threshold needs at least one benign uniformity")
  return float(margin * u.min())


def detect(model, cfg: Mapping[str, Any] | None, key: jax.Array):
  """Elijah detection: invert, sample from eps + tau, uniformity/TV, threshold. Returns a DetectionResult."""
  from diffcleanse_jax.defense.detection import DetectionResult  # shared type (defense/detection.py)

  t0 = time.perf_counter()
  k_inv, k_sample = jax.random.split(key)
  tau, inv = invert(model, cfg, k_inv)
  scfg = sampler_config(model, cfg)
  imgs = sample_with_trigger(model, tau, k_sample, int(_cfg(cfg, "num_samples")), scfg)
  feats = uniformity_features(imgs, str(_cfg(cfg, "distance")), int(_cfg(cfg, "trim")))
  u_thr = float(_cfg(cfg, "uniformity_threshold"))
  tv_thr = _cfg(cfg, "tv_threshold")
  flag, score, thr = decide(feats["uniformity"], feats["tv"], u_thr, tv_thr)
  details = dict(feats, inversion=inv, uniformity_threshold=u_thr, tv_threshold=tv_thr,
                 distance=str(_cfg(cfg, "distance")), num_samples=int(_cfg(cfg, "num_samples")),
                 sampler=dict(method=scfg.method, num_steps=scfg.num_steps, eta=scfg.eta, clip_sample=scfg.clip_sample),
                 samples01=np.asarray(jax.device_get(imgs), np.float32))
  return DetectionResult(method="elijah", backdoored=flag, score=score, threshold=thr, trigger=tau,
                         seconds=time.perf_counter() - t0, details=details)


# ------------------------------------------------------------------------------------------------ removal
def removal_loss_terms(eps_fn: Callable, params, frozen_params, batch_images: jax.Array, key: jax.Array,
                       tau: jax.Array, alphas_cumprod) -> dict[str, jax.Array]:
  """The three terms of Elijah's removal loss (ALGORITHMS §7.1), each a scalar:
  ddpm = MSE(eps_theta(x_t, t), eps) on the clean batch (t ~ U{0..T-1}, diffusers-style mean),
  trigger = MSE(eps_theta(eps + tau, T-1), eps_theta0(eps, T-1)), clean = MSE(eps_theta(eps, T-1), eps_theta0(eps, T-1)),
  with eps the same noise draw as the DDPM term and theta0 = frozen_params (no gradient)."""
  acp = jnp.asarray(alphas_cumprod, jnp.float32)
  T = int(acp.shape[0])
  x0 = jnp.asarray(batch_images, jnp.float32)
  b = x0.shape[0]
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (b,), 0, T)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  tT = jnp.full((b,), T - 1, jnp.int32)
  ddpm = jnp.mean((eps_fn(params, q_sample(x0, eps, t, acp), t) - eps) ** 2)
  ref = jax.lax.stop_gradient(eps_fn(frozen_params, eps, tT))
  trig = jnp.mean((eps_fn(params, eps + jnp.asarray(tau, jnp.float32), tT) - ref) ** 2)
  clean = jnp.mean((eps_fn(params, eps, tT) - ref) ** 2)
  return dict(ddpm=ddpm, trigger=trig, clean=clean)


def removal_loss(eps_fn: Callable, params, frozen_params, batch_images: jax.Array, key: jax.Array, tau: jax.Array,
                 alphas_cumprod) -> jax.Array:
  """L_DDPM(clean) + MSE(eps_theta(eps+tau, T-1), eps_theta0(eps, T-1)) + MSE(eps_theta(eps, T-1), eps_theta0(eps, T-1))."""
  terms = removal_loss_terms(eps_fn, params, frozen_params, batch_images, key, tau, alphas_cumprod)
  return terms["ddpm"] + terms["trigger"] + terms["clean"]


def make_removal_loss(eps_fn: Callable, frozen_params, tau, alphas_cumprod):
  """loss_fn(params, batch, key) for a training loop; batch is {'image': (B,H,W,C) in [-1,1]} or the array."""
  tau = jnp.asarray(tau, jnp.float32)
  acp = jnp.asarray(alphas_cumprod, jnp.float32)

  def loss_fn(params, batch, key):
    x0 = batch["image"] if isinstance(batch, Mapping) else batch
    return removal_loss(eps_fn, params, frozen_params, x0, key, tau, acp)

  return loss_fn
