"""Pilot for the inverted trigger's quality (docs/RESULTS.md, "Why the inverted triggers miss under DDPM-1000").
Gets a pattern g by one of
  * the stage-1 inversion of configs/fmnist_detect.py with --set overrides (default; --init NPY starts it from a
    given pattern),
  * `--elijah`: Elijah's distribution-shift inversion (config.detection.elijah, --set detection.elijah.num_noise=16;
    --init NPY starts it from a given pattern),
  * `--trigger NPY`: a given pattern,
then prints for each pattern (the main loop's best, the refined one), each transform (--transforms: none, blurS =
Gaussian blur sigma S px, clipC = clip to [-C, C]) and each scale s: the defender-side statistic (|T| of two
batches of 16 *fresh* noises + s*g through the inversion's sampler; no target needed) and the attacker-side
ASR/MSE (--asr_samples, default 16, samples from fresh noise + s*g, --asr_steps of DDPM (0 = all 1000), vs the
model's true target, MSE < 1e-3).

  python benchmarks/inversion_pilot.py MODEL_DIR [--set inversion.init_std=0.25 ...] [--trigger NPY | --init NPY]
      [--elijah] [--scales 1,2] [--transforms none,blur1,clip1] [--asr_steps 100] [--asr_samples 64] [--save DIR]
MODEL_DIR holds the model and the attack's target.npy (a zoo model folder, or examples/fmnist_box14_hat).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

import zoo  # noqa: E402
from diffcleanse_jax.defense import elijah  # noqa: E402
from diffcleanse_jax.defense import inversion as inv  # noqa: E402


def transform(g: np.ndarray, name: str) -> np.ndarray:
  if name == "none":
    return g
  if name.startswith("blur"):
    s = float(name[4:])
    return gaussian_filter(g, (s, s, 0)).astype(np.float32)
  if name.startswith("clip"):
    c = float(name[4:])
    return np.clip(g, -c, c)
  raise SystemExit(f"--transforms: unknown {name!r}; expected none, blurS or clipC")


def patterns_from_args(a, config, model, key) -> dict[str, np.ndarray]:
  init = None if a.init is None else np.load(a.init).astype(np.float32)
  if a.trigger:
    return {"given": np.load(a.trigger).astype(np.float32)}
  if a.elijah:
    ec = config.detection.elijah
    n = int(ec.num_noise) or elijah.default_num_noise(model.image_shape)
    noise = jax.random.normal(jax.random.fold_in(key, 7), (n, *model.image_shape), jnp.float32)
    tau0 = elijah.init_trigger(jax.random.fold_in(key, 8), model.image_shape) if init is None else jnp.asarray(init)
    t0 = time.time()
    tau, losses = elijah.invert_trigger(model.apply, model.params, tau0, noise, model.schedule.num_train_timesteps - 1,
                                        num_iters=int(ec.num_iters), lam=float(ec.lam), lr=float(ec.lr))
    print(f"elijah inversion: {n} noises, {int(ec.num_iters)} iterations, final loss {float(losses[-1]):.4f}, "
          f"{time.time() - t0:.0f}s", flush=True)
    return {"elijah": np.asarray(tau, np.float32)}
  st = inv.InversionSettings.from_config(config.inversion)
  p0 = None if init is None else (1.0 - init[None]) / 2.0
  res = inv.run_inversion(model.apply, model.params, model.image_shape, model.scheduler_config, st, p0=p0)[0]
  print(f"inversion: MSCR {res.best_mscr:.4f}, {res.epochs} epochs, {res.seconds:.0f}s; per epoch "
        f"{[round(x, 3) for x in res.mscr_per_epoch]}; refine {res.history.get('refine_mscr')}", flush=True)
  out = {"trigger": res.trigger}
  if res.unrefined_trigger is not None:
    out["unrefined"] = res.unrefined_trigger
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("model_dir")
  ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
  ap.add_argument("--trigger", default=None, help="evaluate this (H,W,C) .npy instead of inverting")
  ap.add_argument("--init", default=None, help="start the inversion from this (H,W,C) pattern g (.npy)")
  ap.add_argument("--elijah", action="store_true", help="Elijah's inversion instead of the stage-1 one")
  ap.add_argument("--scales", default="1")
  ap.add_argument("--transforms", default="none")
  ap.add_argument("--asr_steps", type=int, default=0, help="ASR sampler steps (0 = all 1000)")
  ap.add_argument("--asr_samples", type=int, default=16, help="ASR samples (fresh noises + the pattern)")
  ap.add_argument("--save", default=None, help="write the patterns as DIR/<name>.npy")
  a = ap.parse_args()
  config = zoo.load_eval_config("configs/fmnist_detect.py", a.set)
  model = zoo._default_load_fn(a.model_dir)
  y = zoo.true_target(a.model_dir)
  key = jax.random.key(0)
  t0 = time.time()
  patterns = patterns_from_args(a, config, model, key)
  eval_cfg = config.eval.to_dict()
  eval_cfg.update(num_samples=a.asr_samples, batch_size=min(a.asr_samples, 64), clean=False, num_steps=a.asr_steps)
  for name, g0 in patterns.items():
    if a.save:
      os.makedirs(a.save, exist_ok=True)
      np.save(os.path.join(a.save, f"{name}.npy"), g0)
    for tname in a.transforms.split(","):
      g = transform(g0, tname)
      for s in (float(x) for x in a.scales.split(",")):
        fresh = [inv.trigger_mscr(model, s * g, config.inversion, jax.random.fold_in(key, 1000 + k))["count"]
                 for k in range(2)]
        m = zoo._default_asr_fn(model, s * g, y, eval_cfg, jax.random.fold_in(key, 1))
        print(f"{name} {tname} x{s:g} (range [{s * g.min():.2f}, {s * g.max():.2f}]): fresh |T| {fresh} | "
              f"ASR@{a.asr_steps or 1000} {m['asr']:.3f} MSE {m['mse']:.4f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  main()
