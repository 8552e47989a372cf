"""UNet forward and sampling throughput on the CPU: ours (jitted flax) vs diffusers + torch, same weights and inputs.

  python benchmarks/unet_throughput.py                                  # fmnist-cpu and ddpm-cifar10-32, batch 8
  python benchmarks/unet_throughput.py --presets fmnist-cpu --batch 16 --repeats 7 --steps 20
  python benchmarks/unet_throughput.py --variants default,xnnpack       # also try XLA:CPU flag sets (ours only)
  python benchmarks/unet_throughput.py --bf16                           # extra row: ours in bfloat16 (not parity)
  python benchmarks/unet_throughput.py --profile                        # per-layer micro-benchmarks (conv, norm)
  python benchmarks/unet_throughput.py --torch-threads 1 --rounds 3     # + torch with 1 thread; 3 interleaved rounds

What is measured, per preset (random weights, saved once as a diffusers folder that both sides load):
  forward   eps = UNet(x, t) for one batch; ours = jax.jit(model.apply) (params already on device), torch =
            diffusers UNet2DModel(**config).eval() under torch.no_grad(), torch.set_num_threads(os.cpu_count()).
  ddim/ddpm K denoising steps for one batch; ours = samplers.sample (the whole chain is one jitted lax.scan),
            torch = a DDIMScheduler/DDPMScheduler.step loop (diffusers pipeline style) with the same K.
Each number: warm-up excluded (forward: the first call, which compiles ours, and one more; sampling: the first
chain), then --repeats (--sample-repeats) timed measurements, each of `inner` calls chosen so a forward measurement
lasts >= --min-time s; we report the median (min/max and every time are in the JSON).
Every implementation/variant runs in its own subprocess (no shared thread pools); the 1-minute load average is
recorded before and after each one, since on a shared machine it is the main source of error. --rounds N repeats
the whole set N times, interleaved (torch, ours, torch, ours, ...), and reports the median over rounds, so that
load drift during the run does not favour whichever implementation ran last.
Parity: max |ours - torch| on the forward output and on the DDIM (eta=0, deterministic) samples.
Caveat: torch's OpenMP threads spin-wait at barriers, so on an oversubscribed machine (load average above the
core count) torch with os.cpu_count() threads can be 10-100x slower than with 1; --torch-threads 1 shows this.

Results: a table on stdout and JSON (--out, default benchmarks/results/unet_throughput.json) with machine info.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "unet_throughput.json")
# XLA:CPU flag sets tried for ours ("default" = none). All keep float32 math (no fast-math); their forward
# outputs are still checked against torch.
XLA_VARIANTS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusions": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fusions": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "1thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


def load1() -> float:
  return round(os.getloadavg()[0], 2)


def bench(fn, repeats: int, min_time: float, warmups: int = 2) -> dict:
  """Median seconds per call of `fn` (which must block until its result is ready). The first `warmups` calls
  (the first one compiles, for ours) are not timed into the result."""
  t0 = time.perf_counter()
  fn()
  first = warm = time.perf_counter() - t0
  for _ in range(warmups - 1):
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
  inner = max(1, int(math.ceil(min_time / max(warm, 1e-6))))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      last = fn()
    times.append((time.perf_counter() - t0) / inner)
  bench.last = last  # the output of the last timed call (parity checks reuse it instead of running again)
  return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), first_call_s=first,
              inner=inner, repeats=repeats, times_s=times)


# ------------------------------------------------------------------------------------------------ workers
def worker_torch(job: dict) -> dict:
  import torch
  import diffusers
  from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

  from diffcleanse_jax.models.presets import preset

  torch.set_num_threads(int(job.get("threads") or os.cpu_count()))
  cfg = preset(job["preset"])
  folder = job["weights"]
  if not os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.safetensors")):
    torch.manual_seed(0)
    UNet2DModel(**cfg).save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
      json.dump(dict(SCHEDULER, _class_name="DDPMScheduler", variance_type="fixed_small"), f)
  model = UNet2DModel.from_pretrained(folder).eval()
  inputs = np.load(job["inputs"])
  x = torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2)))
  t = torch.from_numpy(inputs["t"].astype(np.int64))
  x_T = torch.from_numpy(np.ascontiguousarray(inputs["x_T"].transpose(0, 3, 1, 2)))
  out: dict = dict(impl="torch", variant=job["variant"], threads=torch.get_num_threads(), torch=torch.__version__,
                   diffusers=diffusers.__version__, mkldnn=bool(torch.backends.mkldnn.is_available()),
                   num_params=int(sum(p.numel() for p in model.parameters())))
  arrays = {}
  with torch.no_grad():
    def fwd():
      return model(x, t).sample

    out["load_before"] = load1()
    out["forward"] = bench(fwd, job["repeats"], job["min_time"])
    arrays["forward"] = fwd().numpy().transpose(0, 2, 3, 1)
    for method in job["samplers"]:
      kw = dict(SCHEDULER)
      sched = (DDIMScheduler(**kw, set_alpha_to_one=True) if method == "ddim"
               else DDPMScheduler(**kw, variance_type="fixed_small"))
      sched.set_timesteps(job["steps"])
      gen = torch.Generator().manual_seed(0)

      def chain(sched=sched, method=method, gen=gen):
        s = x_T
        for ts in sched.timesteps:
          eps = model(s, ts).sample
          s = (sched.step(eps, ts, s, eta=0.0) if method == "ddim" else sched.step(eps, ts, s, generator=gen)).prev_sample
        return s

      out[method] = bench(chain, job["sample_repeats"], 0.0, warmups=1)
      if method == "ddim":
        arrays["ddim"] = bench.last.numpy().transpose(0, 2, 3, 1)
    out["load_after"] = load1()
  np.savez(job["arrays"], **arrays)
  return out


def worker_ours(job: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import jaxlib

  from diffcleanse_jax.diffusion import samplers
  from diffcleanse_jax.io.native import load_pretrained

  model = load_pretrained(job["weights"])
  bf16 = job["variant"] == "bf16"
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), model.params))
  inputs = np.load(job["inputs"])
  x = jax.device_put(jnp.asarray(inputs["x"], dtype))
  t = jax.device_put(jnp.asarray(inputs["t"], jnp.int32))
  x_T = jax.device_put(jnp.asarray(inputs["x_T"], jnp.float32))
  key = jax.random.key(0)
  apply = model.apply
  f = jax.jit(lambda p, x, t: apply(p, x, t))
  out: dict = dict(impl="ours", variant=job["variant"], xla_flags=os.environ.get("XLA_FLAGS", ""),
                   jax=jax.__version__, jaxlib=jaxlib.__version__, devices=str(jax.devices()),
                   num_params=int(model.num_params))
  try:
    cost = f.lower(params, x, t).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["forward_gflop_per_call"] = float(cost.get("flops", float("nan"))) / 1e9
  except Exception as e:  # noqa: BLE001 - informational only
    out["forward_gflop_per_call"] = None
    out["cost_analysis_error"] = str(e)[:200]
  arrays = {}
  out["load_before"] = load1()
  out["forward"] = bench(lambda: f(params, x, t).block_until_ready(), job["repeats"], job["min_time"])
  arrays["forward"] = np.asarray(f(params, x, t), np.float32)
  if not bf16:
    for method in job["samplers"]:
      cfg = samplers.SamplerConfig(method=method, num_steps=job["steps"], eta=0.0, clip_sample=False)

      def chain(cfg=cfg):
        return samplers.sample(model, params, x_T, key, cfg).block_until_ready()

      out[method] = bench(chain, job["sample_repeats"], 0.0, warmups=1)
      if method == "ddim":
        arrays["ddim"] = np.asarray(bench.last)
  out["load_after"] = load1()
  np.savez(job["arrays"], **arrays)
  return out


def worker_profile(job: dict) -> dict:
  """Micro-benchmarks of the layers that dominate: 3x3 conv, GroupNorm+SiLU, attention, at the preset's shapes."""
  impl = job["impl"]
  shapes = job["shapes"]  # list of (name, B, H, W, C)
  res = {"impl": impl, "variant": job["variant"], "load_before": load1(), "layers": {}}
  rng = np.random.default_rng(0)
  if impl == "torch":
    import torch
    torch.set_num_threads(int(job.get("threads") or os.cpu_count()))
    res["threads"] = torch.get_num_threads()
    for name, b, h, w, c in shapes:
      x = torch.from_numpy(rng.standard_normal((b, c, h, w), np.float32))
      conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
      gn = torch.nn.GroupNorm(job["groups"], c, eps=1e-6).eval()
      with torch.no_grad():
        res["layers"][f"conv3x3 {name}"] = bench(lambda: conv(x), job["repeats"], job["min_time"])
        res["layers"][f"groupnorm+silu {name}"] = bench(lambda: torch.nn.functional.silu(gn(x)), job["repeats"],
                                                        job["min_time"])
  else:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    for name, b, h, w, c in shapes:
      x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
      conv = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)))
      pc = conv.init(jax.random.key(0), x)
      fc = jax.jit(conv.apply)
      gn = nn.GroupNorm(num_groups=job["groups"], epsilon=1e-6, use_fast_variance=False)
      pg = gn.init(jax.random.key(0), x)
      fg = jax.jit(lambda p, x: nn.silu(gn.apply(p, x)))
      res["layers"][f"conv3x3 {name}"] = bench(lambda: fc(pc, x).block_until_ready(), job["repeats"], job["min_time"])
      res["layers"][f"groupnorm+silu {name}"] = bench(lambda: fg(pg, x).block_until_ready(), job["repeats"],
                                                      job["min_time"])
  res["load_after"] = load1()
  return res


# ------------------------------------------------------------------------------------------------ driver
def run_worker(kind: str, job: dict, xla_flags: str, timeout: float) -> dict:
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(job, f)
    job_path = f.name
  res_path = job_path + ".result"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  t0 = time.time()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_worker={kind}", f"--_job={job_path}",
                         f"--_result={res_path}"], env=env, capture_output=True, text=True, timeout=timeout)
  try:
    if proc.returncode != 0 or not os.path.exists(res_path):
      tail = (proc.stderr or "").strip().splitlines()[-3:]
      return {"error": f"worker {kind} ({xla_flags or 'no XLA flags'}) exited {proc.returncode}: {' | '.join(tail)}"}
    with open(res_path) as f:
      res = json.load(f)
    res["wall_s"] = round(time.time() - t0, 1)
    return res
  finally:
    for p in (job_path, res_path):
      if os.path.exists(p):
        os.remove(p)


def machine_info() -> dict:
  info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
              loadavg_start=[round(v, 2) for v in os.getloadavg()])
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    info["cpu_model"] = names[0] if names else None
    with open("/proc/cpuinfo") as f:
      flags = next((ln for ln in f if ln.startswith("flags")), "")
    info["avx512"] = "avx512f" in flags
    info["avx2"] = "avx2" in flags
  except OSError:
    pass
  try:
    info["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except Exception:  # noqa: BLE001
    pass
  vers = subprocess.run([sys.executable, "-c", "import jax, jaxlib, flax, torch, diffusers; print(jax.__version__, "
                         "jaxlib.__version__, flax.__version__, torch.__version__, diffusers.__version__)"],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  parts = vers.stdout.split()
  if len(parts) == 5:
    info.update(zip(("jax", "jaxlib", "flax", "torch", "diffusers"), parts))
  return info


def fmt_rate(r):
  return "-" if r is None else (f"{r:,.1f}" if r < 1000 else f"{r:,.0f}")


def summarize(rows: list[dict], batch: int, steps: int, samplers_: list[str]) -> str:
  head = (f"{'preset':16} {'impl':6} {'variant':14} {'fwd img/s':>10} {'fwd ms':>8} {'GFLOP/s':>7} {'vs torch':>8} "
          + "".join(f"{m + ' img/s':>11} {'vs torch':>8} " for m in samplers_)
          + f"{'max|d| fwd':>11} {'max|d| ddim':>11}  load1 (min before..max after)")
  lines = [f"batch {batch}, {steps} sampling steps; img/s = images per second (forward: batch/median call time)",
           head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['preset']:16} {r.get('impl', '?'):6} {r.get('variant', '?'):14} ERROR {r['error']}")
      continue
    cells = [f"{r['preset']:16} {r['impl']:6} {r['variant']:14}", f"{fmt_rate(r.get('forward_img_s')):>10}",
             f"{r['forward']['median_s'] * 1e3:8.2f}", f"{_f(r.get('forward_gflop_s')):>7}",
             f"{_x(r.get('forward_speedup')):>8}"]
    for m in samplers_:
      cells += [f"{fmt_rate(r.get(m + '_img_s')):>11}", f"{_x(r.get(m + '_speedup')):>8}"]
    cells += [f"{_e(r.get('forward_max_abs_diff')):>11}", f"{_e(r.get('ddim_max_abs_diff')):>11}",
              f" {r.get('load_before')}..{r.get('load_after')}"]
    lines.append(" ".join(cells))
  return "\n".join(lines)


def _x(v):
  return "-" if v is None else f"{v:.2f}x"


def _f(v):
  return "-" if v is None else f"{v:.1f}"


def _e(v):
  return "-" if v is None else f"{v:.1e}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default="fmnist-cpu,ddpm-cifar10-32")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5, help="timed measurements per forward number (median)")
  ap.add_argument("--sample-repeats", type=int, default=0, help="timed full chains per sampler (0: --repeats)")
  ap.add_argument("--steps", type=int, default=20, help="sampling steps K for DDIM and DDPM")
  ap.add_argument("--samplers", default="ddim,ddpm")
  ap.add_argument("--min-time", type=float, default=0.5, help="seconds per forward measurement (>= 1 call)")
  ap.add_argument("--variants", default="default", help=f"XLA flag sets for ours: {','.join(XLA_VARIANTS)}")
  ap.add_argument("--bf16", action="store_true", help="extra row: ours with bfloat16 params/activations (forward)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--torch-threads", default="",
                  help="extra torch rows with these thread counts, e.g. 1 (the reference row uses os.cpu_count())")
  ap.add_argument("--profile", action="store_true", help="also time conv3x3 / GroupNorm+SiLU alone, both sides")
  ap.add_argument("--rounds", type=int, default=1,
                  help="run every implementation this many times, interleaved; report the median over rounds")
  ap.add_argument("--timeout", type=float, default=3600, help="per worker subprocess")
  ap.add_argument("--out", default=DEFAULT_OUT)
  ap.add_argument("--_worker", help=argparse.SUPPRESS)
  ap.add_argument("--_job", help=argparse.SUPPRESS)
  ap.add_argument("--_result", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)

  if a._worker:
    with open(a._job) as f:
      job = json.load(f)
    res = {"torch": worker_torch, "ours": worker_ours, "profile": worker_profile}[a._worker](job)
    with open(a._result, "w") as f:
      json.dump(res, f)
    return 0

  presets = [p for p in a.presets.split(",") if p]
  samplers_ = [s for s in a.samplers.split(",") if s]
  variants = [v for v in a.variants.split(",") if v]
  bad = [v for v in variants if v not in XLA_VARIANTS]
  if bad:
    ap.error(f"unknown --variants {bad}; choose from {', '.join(XLA_VARIANTS)}")
  from diffcleanse_jax.models.presets import PRESETS
  bad = [p for p in presets if p not in PRESETS]
  if bad:
    ap.error(f"unknown --presets {bad}; choose from {', '.join(PRESETS)}")

  info = machine_info()
  print(f"# {info.get('date')}  {info.get('cpu_count')} CPUs ({info.get('cpu_model')})  jax {info.get('jax')}  "
        f"torch {info.get('torch')}  diffusers {info.get('diffusers')}", flush=True)
  print(f"# {info.get('uptime')}", flush=True)
  rows: list[dict] = []
  profiles: list[dict] = []
  with tempfile.TemporaryDirectory(prefix="unet_bench_") as tmp:
    for name in presets:
      from diffcleanse_jax.models.presets import preset
      cfg = preset(name)
      size, ch = cfg["sample_size"], cfg["in_channels"]
      rng = np.random.default_rng(0)
      inputs = os.path.join(tmp, f"{name}_inputs.npz")
      np.savez(inputs, x=rng.standard_normal((a.batch, size, size, ch)).astype(np.float32),
               t=rng.integers(0, 1000, a.batch).astype(np.int32),
               x_T=rng.standard_normal((a.batch, size, size, ch)).astype(np.float32))
      job = dict(preset=name, weights=os.path.join(tmp, name), inputs=inputs, repeats=a.repeats,
                 sample_repeats=a.sample_repeats or a.repeats, min_time=a.min_time, steps=a.steps,
                 samplers=samplers_)
      runs = []
      # torch first: it also writes the shared weights folder.
      if not a.no_torch:
        runs.append(("torch", dict(job, variant="diffusers", threads=0), ""))
      elif not os.path.isdir(job["weights"]):
        runs.append(("torch", dict(job, variant="diffusers", repeats=1, sample_repeats=1, samplers=[],
                                   min_time=0.0, threads=0), ""))
      runs += [("torch", dict(job, variant=f"threads={n}", threads=int(n)), "")
               for n in a.torch_threads.split(",") if n and not a.no_torch]
      runs += [("ours", dict(job, variant=v), XLA_VARIANTS[v]) for v in variants]
      if a.bf16:
        runs.append(("ours", dict(job, variant="bf16"), ""))
      arrays = {}
      per_run: dict = {}
      for rnd in range(a.rounds):  # rounds interleave the implementations, so load drift hits all of them alike
        for kind, j, flags in runs:
          if rnd and kind == "torch" and a.no_torch:
            continue
          j["arrays"] = os.path.join(tmp, f"{name}_{kind}_{j['variant']}.npz")
          print(f"  [round {rnd + 1}/{a.rounds}] {name} {kind} {j['variant']} (load1 {load1()}) ...", flush=True)
          res = run_worker(kind, j, flags, a.timeout)
          res.update(preset=name, impl=res.get("impl", kind), variant=res.get("variant", j["variant"]),
                     batch=a.batch, steps=a.steps)
          if "error" not in res:
            arrays[(kind, j["variant"])] = dict(np.load(j["arrays"]))
          per_run.setdefault((kind, j["variant"]), []).append(res)
          print(f"    done in {res.get('wall_s')} s: " + (res["error"] if "error" in res else
                f"forward {fmt_rate(a.batch / res['forward']['median_s'])} img/s" + "".join(
                    f", {m} {fmt_rate(a.batch / res[m]['median_s'])} img/s" for m in samplers_ if m in res)),
                flush=True)
      for (kind, variant), results in per_run.items():
        if kind == "torch" and a.no_torch:
          continue
        ok = [r for r in results if "error" not in r]
        if not ok:
          rows.append(results[0])
          continue
        res = dict(ok[0], rounds=len(ok), per_round=ok, load_before=min(r["load_before"] for r in ok),
                   load_after=max(r["load_after"] for r in ok))
        for m in ["forward"] + samplers_:
          if m in res:  # median over rounds of each round's median
            res[m] = dict(ok[0][m], median_s=statistics.median(r[m]["median_s"] for r in ok),
                          round_medians_s=[r[m]["median_s"] for r in ok])
            res[("forward" if m == "forward" else m) + "_img_s"] = a.batch / res[m]["median_s"]
        rows.append(res)
      gflop = next((r.get("forward_gflop_per_call") for r in rows if r["preset"] == name and r["impl"] == "ours"
                    and r.get("forward_gflop_per_call")), None)
      for r in rows:
        if r["preset"] == name and "error" not in r:
          if gflop:  # XLA's count of the same forward (per call = per batch), used for every row
            r["forward_gflop_s"] = gflop / r["forward"]["median_s"]
          for m in samplers_:  # per-step cost of the sampling chain relative to a bare forward call
            if m in r:
              r[m + "_step_over_forward"] = r[m]["median_s"] / a.steps / r["forward"]["median_s"]
      ref = next((r for r in rows if r["preset"] == name and r["impl"] == "torch" and r["variant"] == "diffusers"
                  and "error" not in r), None)
      ref_arr = arrays.get(("torch", "diffusers"))
      for r in rows:
        if r["preset"] != name or r is ref or "error" in r or ref is None:
          continue
        r["forward_speedup"] = r["forward_img_s"] / ref["forward_img_s"]
        for m in samplers_:
          if m + "_img_s" in r and m + "_img_s" in ref:
            r[m + "_speedup"] = r[m + "_img_s"] / ref[m + "_img_s"]
        mine = arrays[(r["impl"], r["variant"])]
        r["forward_max_abs_diff"] = float(np.max(np.abs(mine["forward"].astype(np.float64) - ref_arr["forward"])))
        if "ddim" in mine and "ddim" in ref_arr:
          r["ddim_max_abs_diff"] = float(np.max(np.abs(mine["ddim"].astype(np.float64) - ref_arr["ddim"])))
      if a.profile:
        ch0 = cfg["block_out_channels"]
        shapes = [(f"{c}ch {size // 2 ** i}x{size // 2 ** i}", a.batch, size // 2 ** i, size // 2 ** i, c)
                  for i, c in enumerate(ch0)]
        pjob = dict(shapes=shapes, groups=cfg["norm_num_groups"], repeats=a.repeats, min_time=a.min_time)
        todo = [] if a.no_torch else [("torch", "diffusers", 0)] + [
            ("torch", f"threads={n}", int(n)) for n in a.torch_threads.split(",") if n]
        todo += [("ours", v, 0) for v in variants]
        for impl, v, threads in todo:
          p = run_worker("profile", dict(pjob, impl=impl, variant=v, threads=threads), XLA_VARIANTS.get(v, ""),
                         a.timeout)
          p.update(preset=name, impl=impl, variant=v)
          profiles.append(p)

  info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
  table = summarize(rows, a.batch, a.steps, samplers_)
  print()
  print(table)
  if profiles:
    print("\nper-layer micro-benchmarks (median ms per call; load1 before->after):")
    for p in profiles:
      if "error" in p:
        print(f"  {p['preset']} {p['impl']} {p['variant']}: ERROR {p['error']}")
        continue
      layer_s = ", ".join(f"{k} {v['median_s'] * 1e3:.2f}" for k, v in p["layers"].items())
      print(f"  {p['preset']:16} {p['impl']:5} {p['variant']:14} {layer_s}  ({p['load_before']}->{p['load_after']})")
  print(f"\n# load average at end: {info['loadavg_end']} (start {info['loadavg_start']}) on {info['cpu_count']} CPUs")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(dict(machine=info, args={k: v for k, v in vars(a).items() if not k.startswith("_")}, rows=rows,
                   profiles=profiles, table=table), f, indent=2)
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
