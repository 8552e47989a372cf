"""How noisy is the removal benchmark's FD?  FD of N clean samples, and of its N/k disjoint k-sample subsets.

  python benchmarks/fd_spread.py --model runs/zoo/models/M/model --model runs/zoo/cleanse/diffcleanse/M/cleansed \
      --num_samples 256 --subset 64 --seed 1 --out runs/fd_spread/M.json

Each model gets the same N noises (common random numbers, as the cleanse's before/after evaluation), sampled with
the config's `eval` sampler (configs/fmnist_cleanse.py: DDPM with all 1000 steps) unless --method/--num_steps
name another (`--method ddim --num_steps 50`: 20x fewer network calls per sample). Reported per model: FD of all N
samples, FD of each disjoint `subset`-sample slice (the zoo removal table uses 64), their mean/min/max; for a
pair of models, the relative change of each (all-N, and slice by slice on the same noises). Samples are kept as
OUT_samples_<i>.npy (N, H, W, C) in [-1, 1]; the JSON carries the settings (docs/RESULTS.md, "Session 15").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffcleanse_jax.evaluation import eval_sampler_config, eval_settings, load_model  # noqa: E402
from diffcleanse_jax.metrics.classifier import fd_score  # noqa: E402
from diffcleanse_jax.workflows import generate  # noqa: E402


def subset_fds(samples: np.ndarray, subset: int, fd_fn=fd_score) -> list[float]:
  """FD of each disjoint `subset`-sized slice of samples (N, H, W, C) in [-1, 1] (a trailing remainder is dropped)."""
  if subset < 2:
    raise ValueError(f"--subset={subset}: an FD needs at least 2 samples per slice")
  n = len(samples) // subset
  if n == 0:
    raise ValueError(f"{len(samples)} samples make no slice of {subset}")
  return [float(fd_fn(samples[i * subset:(i + 1) * subset])) for i in range(n)]


def relative_changes(before: list[float], after: list[float]) -> list[float]:
  """(after - before) / before, element by element (slices on the same noises)."""
  return [(a - b) / b for b, a in zip(before, after)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", action="append", required=True, help="model folder (repeat; 2 = before, after)")
  ap.add_argument("--config", default="configs/fmnist_cleanse.py", help="config file whose `eval` section is used")
  ap.add_argument("--method", default="", help="sampler for the FD samples (default: the config's eval.method)")
  ap.add_argument("--num_steps", type=int, default=-1, help="its steps (default: the config's eval.num_steps)")
  ap.add_argument("--num_samples", type=int, default=256)
  ap.add_argument("--subset", type=int, default=64)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--out", required=True, help="JSON file to write")
  args = ap.parse_args(argv)
  from benchmarks.zoo import load_eval_config  # the zoo's config loader (file path -> ConfigDict)
  config = load_eval_config(args.config)
  ev = eval_settings(config.eval.to_dict())
  if args.method:
    ev["method"] = args.method
  if args.num_steps >= 0:
    ev["num_steps"] = args.num_steps
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  key = jax.random.key(args.seed)
  res = dict(settings=dict(vars(args), eval=ev), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), models=[])
  for i, path in enumerate(args.model):
    model = load_model(path)
    cfg = eval_sampler_config(model, ev)
    t0 = time.time()
    x = np.asarray(generate(model, model.params, args.num_samples, key, cfg, args.batch_size)) * 2.0 - 1.0
    secs = time.time() - t0
    np.save(os.path.splitext(args.out)[0] + f"_samples_{i}.npy", x.astype(np.float32))
    subs = subset_fds(x, args.subset)
    row = dict(model=path, fd_all=float(fd_score(x)), fd_subsets=subs, fd_subset_mean=float(np.mean(subs)),
               fd_subset_min=float(np.min(subs)), fd_subset_max=float(np.max(subs)), sample_seconds=round(secs, 1))
    res["models"].append(row)
    print(json.dumps(row), flush=True)
  if len(res["models"]) == 2:
    b, a = res["models"]
    res["change_all"] = (a["fd_all"] - b["fd_all"]) / b["fd_all"]
    res["change_subsets"] = relative_changes(b["fd_subsets"], a["fd_subsets"])
    print("change all", round(res["change_all"], 4), "per slice", [round(c, 4) for c in res["change_subsets"]])
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
