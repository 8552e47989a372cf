"""Which inversion chain fires a backdoor? The MSCR statistic of a *given* pattern (the attack's true trigger, or
plain noise as the clean control) on the inversion's fixed noise batch, for several chain lengths and seeds.

A BBTI inversion can only flag a model whose backdoor fires under the inversion's short sampler, and its cost grows
linearly with the chain: the table shows which chain lengths still collapse the batch, the evidence behind
`inversion.num_steps` in configs/fmnist_detect.py (docs/RESULTS.md, "Session 11").

  python benchmarks/chain_mscr.py examples/fmnist_box14_hat                        # its trigger.npy + plain noise
  python benchmarks/chain_mscr.py runs/zoo/models/smbox-cat-p0.2 --steps 25,50,100 --seeds 0,1,2
  python benchmarks/chain_mscr.py runs/zoo/models/clean-s1 --trigger none          # plain noise only

MODEL_DIR is a model folder (diffusers/native) or a train/attack workdir; its `trigger.npy` (written by the attack)
is the default pattern. Sampler settings other than num_steps come from --config (default configs/fmnist_detect.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zoo  # noqa: E402  (benchmarks/ is not a package)
from diffcleanse_jax.defense.inversion import trigger_mscr  # noqa: E402
from diffcleanse_jax.defense.workflow import load_model_dir  # noqa: E402


def chain_rows(model, patterns: dict[str, np.ndarray], inversion_cfg, steps: list[int], seeds: list[int]):
  """One dict per (pattern, num_steps, seed): mscr, num_excluded, seconds."""
  rows = []
  for name, g in patterns.items():
    for n in steps:
      for seed in seeds:
        t0 = time.time()
        r = trigger_mscr(model, g, inversion_cfg, key=jax.random.key(seed), num_steps=n)
        rows.append(dict(pattern=name, num_steps=n, seed=seed, mscr=r["mscr"], num_excluded=r["num_excluded"],
                         seconds=round(time.time() - t0, 1)))
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("model_dir")
  ap.add_argument("--trigger", default="", help="pattern .npy (H,W,C); default MODEL_DIR/trigger.npy; 'none': skip")
  ap.add_argument("--steps", default="20,25,50,100", help="comma-separated chain lengths")
  ap.add_argument("--seeds", default="0,1", help="comma-separated noise seeds")
  ap.add_argument("--config", default=os.path.join(_ROOT, "configs", "fmnist_detect.py"))
  ap.add_argument("--set", action="append", default=[], help="config override section.field=value")
  a = ap.parse_args(argv)
  config = zoo.load_eval_config(a.config, a.set)
  model = load_model_dir(a.model_dir)
  patterns = {"plain noise": np.zeros(model.image_shape, np.float32)}
  tpath = a.trigger or os.path.join(a.model_dir, "trigger.npy")
  if a.trigger != "none":
    if not os.path.isfile(tpath):
      raise SystemExit(f"{tpath}: no trigger file (pass --trigger NPY, or --trigger none for plain noise only)")
    patterns = {os.path.basename(tpath): np.load(tpath).astype(np.float32), **patterns}
  rows = chain_rows(model, patterns, config.inversion, [int(s) for s in a.steps.split(",")],
                    [int(s) for s in a.seeds.split(",")])
  print(f"| pattern | {config.inversion.sampler} steps | seed | MSCR | excluded | seconds |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pattern']} | {r['num_steps']} | {r['seed']} | {r['mscr']:.3f} | {r['num_excluded']} | {r['seconds']} |")


if __name__ == "__main__":
  main()
