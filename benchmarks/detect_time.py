"""Wall time of one detection, as a user runs it: `launch.py --mode=detect` in a fresh process.

  python benchmarks/detect_time.py                                    # BBTI on the shipped demo model
  python benchmarks/detect_time.py --methods bbti,whitebox --model runs/zoo/models/box14-hat-p0.1/model
  python benchmarks/detect_time.py --set inversion.max_epochs=30      # extra --config.* overrides
  python benchmarks/detect_time.py --methods whitebox --compile_cache runs/xla_cache --repeat 2  # cold, then warm

Each (method, model) runs `python launch.py --config=CONFIG --mode=detect --model=M --workdir=TMP
--config.detection.method=METHOD` in its own subprocess and is timed from process start to exit: Python and JAX
start-up, loading the model, compilation, the inversion and the PNG/JSON report all count (the issue's target: one
CPU-preset model in under 2 minutes on 2 cores). Also reported: the detector's own `seconds` from detection.json
(inversion only), its score and decision, and the 1-minute load average before and after (on a shared machine the
main source of error). Output: a table on stdout and JSON (--out, default benchmarks/results/detect_time.json)
with the machine, date and exact commands. `--compile_cache DIR` passes launch.py's persistent compilation cache
(an empty DIR: the first run compiles and fills it, `--repeat` runs after it read it); `decision_seconds` is the
detector's time up to its decision (before a detection.trigger_from='shift'/'target' re-estimate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_throughput import load1, machine_info  # noqa: E402  (benchmarks/ is not a package)
from diffcleanse_jax.io.files import write_json  # noqa: E402  (the package is installed by scripts/setup.sh)


def time_detection(model: str, method: str, config: str, overrides: list[str], python: str = sys.executable,
                   compile_cache: str = "") -> dict:
  """Runs one detection in a subprocess; returns wall seconds, the report's numbers and the command."""
  with tempfile.TemporaryDirectory(prefix="detect_time_") as work:
    cmd = [python, os.path.join(_ROOT, "launch.py"), f"--config={config}", "--mode=detect", f"--model={model}",
           f"--workdir={work}", f"--config.detection.method={method}"] + [f"--config.{o}" for o in overrides]
    if compile_cache:
      cmd.append(f"--compile_cache={os.path.abspath(compile_cache)}")
    load0 = load1()
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    row = dict(model=model, method=method, wall_seconds=round(wall, 1), load_before=load0, load_after=load1(),
               command=" ".join(cmd[1:]).replace(work, "TMP"), returncode=proc.returncode)
    report = os.path.join(work, "detection.json")
    if proc.returncode != 0 or not os.path.isfile(report):
      row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      return row
    with open(report) as f:
      d = json.load(f)
    dsec = (d.get("details") or {}).get("decision_seconds")
    row.update(detector_seconds=round(float(d.get("seconds", float("nan"))), 1),
               decision_seconds=None if dsec is None else round(float(dsec), 1), score=d.get("score"),
               threshold=d.get("threshold"), backdoored=d.get("backdoored"))
    return row


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="examples/fmnist_box14_hat", help="model folder (diffusers or our workdir)")
  ap.add_argument("--methods", default="bbti", help="comma-separated: bbti, whitebox, elijah, terd")
  ap.add_argument("--config", default="configs/fmnist_detect.py")
  ap.add_argument("--set", action="append", default=[], metavar="section.field=value",
                  help="extra config override (repeatable), passed as --config.section.field=value")
  ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results", "detect_time.json"))
  ap.add_argument("--compile_cache", default="", help="launch.py --compile_cache folder ('' = off)")
  ap.add_argument("--repeat", type=int, default=1, help="runs per method (with --compile_cache: cold, then warm)")
  args = ap.parse_args(argv)
  rows = [dict(time_detection(args.model, m, args.config, args.set, compile_cache=args.compile_cache), run=i)
          for m in args.methods.split(",") if m for i in range(args.repeat)]
  print(f"{'method':10s} {'wall s':>8s} {'detector s':>11s} {'score':>7s} {'flagged':>8s} {'load':>11s}")
  for r in rows:
    if "error" in r:
      print(f"{r['method']:10s} failed: {r['error']}")
      continue
    print(f"{r['method']:10s} {r['wall_seconds']:8.1f} {r['detector_seconds']:11.1f} {r['score']:7.4g} "
          f"{str(r['backdoored']):>8s} {r['load_before']}->{r['load_after']}")
  write_json(args.out, dict(machine=machine_info(), rows=rows), sort_keys=False)  # atomic, creates the folder
  print(f"wrote {args.out}")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
