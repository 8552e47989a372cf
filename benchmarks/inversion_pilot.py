"""Pilot for the inverted trigger's quality: runs the stage-1 inversion of configs/fmnist_detect.py (with --set
overrides) on one backdoored model, or loads a given trigger, and prints for each pattern (the main loop's best,
the refined one) and each scale s of it: the defender-side statistic (|T| of two batches of 16 *fresh* noises +
s*g through the inversion's sampler; no target needed) and the attacker-side ASR/MSE (16 DDPM-1000 samples from
fresh noise + s*g vs the model's true target, MSE < 1e-3).

  python benchmarks/inversion_pilot.py MODEL_DIR [--set inversion.init_std=0.25 ...] [--trigger NPY | --init NPY]
      [--scales 1,2] [--save DIR]
MODEL_DIR holds the model and the attack's target.npy (a zoo model folder, or examples/fmnist_box14_hat).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import numpy as np  # noqa: E402

import zoo  # noqa: E402
from diffcleanse_jax.defense import inversion as inv  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("model_dir")
  ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
  ap.add_argument("--trigger", default=None, help="evaluate this (H,W,C) .npy instead of inverting")
  ap.add_argument("--init", default=None, help="start the inversion from this (H,W,C) pattern g (.npy)")
  ap.add_argument("--scales", default="1")
  ap.add_argument("--asr_steps", type=int, default=0, help="ASR sampler steps (0 = all 1000)")
  ap.add_argument("--save", default=None, help="write the patterns as DIR/<name>.npy")
  a = ap.parse_args()
  config = zoo.load_eval_config("configs/fmnist_detect.py", a.set)
  model = zoo._default_load_fn(a.model_dir)
  y = zoo.true_target(a.model_dir)
  key = jax.random.key(0)
  t0 = time.time()
  if a.trigger:
    patterns = {"given": np.load(a.trigger).astype(np.float32)}
  else:
    st = inv.InversionSettings.from_config(config.inversion)
    p0 = None if a.init is None else (1.0 - np.load(a.init).astype(np.float32)[None]) / 2.0
    res = inv.run_inversion(model.apply, model.params, model.image_shape, model.scheduler_config, st, p0=p0)[0]
    print(f"inversion: MSCR {res.best_mscr:.4f}, {res.epochs} epochs, {res.seconds:.0f}s; per epoch "
          f"{[round(x, 3) for x in res.mscr_per_epoch]}; refine {res.history.get('refine_mscr')}", flush=True)
    patterns = {"trigger": res.trigger}
    if res.unrefined_trigger is not None:
      patterns["unrefined"] = res.unrefined_trigger
  eval_cfg = config.eval.to_dict()
  eval_cfg.update(num_samples=16, batch_size=16, clean=False, num_steps=a.asr_steps)
  for name, g in patterns.items():
    if a.save:
      os.makedirs(a.save, exist_ok=True)
      np.save(os.path.join(a.save, f"{name}.npy"), g)
    for s in (float(x) for x in a.scales.split(",")):
      fresh = [inv.trigger_mscr(model, s * g, config.inversion, jax.random.fold_in(key, 1000 + k))["count"]
               for k in range(2)]
      m = zoo._default_asr_fn(model, s * g, y, eval_cfg, jax.random.fold_in(key, 1))
      print(f"{name} x{s:g} (range [{s * g.min():.2f}, {s * g.max():.2f}]): fresh |T| {fresh} | ASR {m['asr']:.3f} "
            f"MSE {m['mse']:.4f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  main()
