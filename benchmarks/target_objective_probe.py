"""Probe: is the target-inversion objective minimised by the model's true trigger? (oracle diagnostic)

  python benchmarks/target_objective_probe.py runs/zoo/models/user-cat-p0.05 [--t_min 0,500] [--asr_samples 32]

For one zoo model (a workdir with model/, trigger.npy and target.npy): L(r) of defense/target_inversion.py towards
the TRUE target, evaluated on one fixed set of 256 (t ~ U{0..T-1}, eps) pairs, for the true trigger, for the constant
r = -1 (the inversion's start), and for the trigger `invert_toward_target` finds from -1 with the detection defaults
of configs/fmnist_detect.py (one run per `--t_min`). For each inverted trigger it prints that fixed-pair loss, its
MSE to the true trigger and (with --asr_samples > 0) its ASR on the eval sampler (DDPM-1000). If the inverted
trigger's loss is below the true trigger's while its ASR is lower, the objective's minimiser is not the trigger:
a weak inverted trigger is then a limit of the objective, not of the target estimate (docs/RESULTS.md, "Session 25").
The true trigger and target are read here only because this is an evaluation script, not a defence.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.fmnist_detect import get_config  # noqa: E402
from diffcleanse_jax.defense import target_inversion as ti  # noqa: E402
from diffcleanse_jax.defense.workflow import load_model_dir  # noqa: E402
from diffcleanse_jax.diffusion.schedules import schedule_from_config  # noqa: E402
from diffcleanse_jax.evaluation import evaluate_model  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("model_dir", help="zoo model workdir: model/, trigger.npy, target.npy")
  ap.add_argument("--t_min", default="0", help="comma-separated t_min values of the inversions to run")
  ap.add_argument("--asr_samples", type=int, default=32, help="DDPM-1000 ASR samples per trigger (0 = skip)")
  ap.add_argument("--pairs", type=int, default=256, help="fixed (t, eps) pairs of the loss comparison")
  a = ap.parse_args(argv)
  for f in ("trigger.npy", "target.npy"):
    if not os.path.isfile(os.path.join(a.model_dir, f)):
      sys.exit(f"{a.model_dir}: no {f} (expected a backdoored zoo model workdir)")
  model = load_model_dir(os.path.join(a.model_dir, "model"))
  cfg = get_config()
  y = np.load(os.path.join(a.model_dir, "target.npy")).astype(np.float32)
  g = np.load(os.path.join(a.model_dir, "trigger.npy")).astype(np.float32)
  sched = schedule_from_config(model.scheduler_config)
  abar = jnp.asarray(sched.alphas_cumprod, jnp.float32)
  rho = jnp.asarray(sched.rho(), jnp.float32)
  k = jax.random.key(77)
  t = jax.random.randint(jax.random.fold_in(k, 1), (a.pairs,), 0, sched.num_train_timesteps)
  eps = jax.random.normal(jax.random.fold_in(k, 2), (a.pairs, *y.shape), jnp.float32)
  fixed_loss = jax.jit(lambda r: ti.target_loss(model.apply, model.params, r, jnp.asarray(y), eps, t, abar, rho))
  print(f"fixed-pair L: true trigger {float(fixed_loss(jnp.asarray(g))):.5f}, "
        f"r = -1 {float(fixed_loss(jnp.full(y.shape, -1.0))):.5f}", flush=True)
  ev = dict(cfg.eval.to_dict(), num_samples=a.asr_samples, batch_size=a.asr_samples, clean=False)
  for t_min in (int(v) for v in a.t_min.split(",")):
    c = dict(cfg.detection.target_trigger.to_dict(), t_min=t_min)
    t0 = time.time()
    r, d = ti.invert_toward_target(model, y, c, jax.random.key(9))
    line = (f"t_min {t_min}: final training loss {d['final_loss']:.5f}, fixed-pair L {float(fixed_loss(r)):.5f}, "
            f"MSE to the true trigger {float(((r - g) ** 2).mean()):.4f}, {time.time() - t0:.0f} s")
    if a.asr_samples > 0:
      line += f", ASR ({a.asr_samples}) {evaluate_model(model, r, y, ev, jax.random.key(5), log=lambda s: None)['asr']:.3f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
