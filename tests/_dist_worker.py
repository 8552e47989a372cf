"""One process of the loopback multi-process test (tests/test_distributed.py); not a test module itself.

  python tests/_dist_worker.py --process_id=I --num_processes=N --port=P --workdir=W --out=RESULT.json
  python tests/_dist_worker.py --process_id=0 --num_processes=1 --workdir=W --out=RESULT.json   (reference)

Joins a jax.distributed job (coordinator 127.0.0.1:P) through `parallel.initialize_distributed`, checks with a
trial cross-process sum that this jax build has CPU collectives, then trains the `tiny` preset a few steps
through `run_training`, feeding only this process's rows of each global batch. Writes RESULT.json:
  {"ok": true, "losses": [...], "process_count": N, "device_count": D, "param_checksum": x}  or
  {"ok": false, "stage": "initialize" | "collectives", "error": "..."}  (the test skips on those)
The parent sets JAX_PLATFORMS=cpu and XLA_FLAGS (local fake-device count) for this process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Same training problem as the single-process reference in the test (keep the two in sync via these values).
NUM_EXAMPLES, IMAGE_SIZE, GLOBAL_BATCH, NUM_STEPS, SEED = 64, 16, 8, 3, 0


def settings():
  from diffcleanse_jax.train import TrainSettings
  return TrainSettings(batch_size=GLOBAL_BATCH, num_steps=NUM_STEPS, learning_rate=1e-3, warmup_steps=2,
                       log_every=1, checkpoint_every=100, keep_checkpoints=1)


def train(workdir: str, process_index: int, process_count: int, mesh=None) -> dict:
  """Trains `tiny` for NUM_STEPS on this process's shard; returns losses + a parameter checksum."""
  import jax
  import numpy as np

  from diffcleanse_jax.data import BatchIterator, synthetic
  from diffcleanse_jax.diffusion.objectives import make_ddpm_loss
  from diffcleanse_jax.model import DiffusionModel
  from diffcleanse_jax.models.presets import preset
  from diffcleanse_jax.models.unet import UNetSpec, abstract_params
  from diffcleanse_jax.train import run_training

  # Deterministic numpy initial weights on the abstract parameter tree: flax's eager init costs hundreds of
  # per-op compiles and a jitted one a 5-10 s compile; the test only needs identical starting points.
  spec = UNetSpec.from_config(preset("tiny"))
  rng = np.random.Generator(np.random.PCG64(SEED))

  def init_leaf(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name == "bias":
      return (0.01 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(init_leaf, abstract_params(spec))
  model = DiffusionModel(spec, params)
  images, _ = synthetic(NUM_EXAMPLES, image_size=IMAGE_SIZE, channels=1, seed=SEED)
  batches = BatchIterator(images, GLOBAL_BATCH, seed=SEED, process_index=process_index,
                          process_count=process_count)
  loss = make_ddpm_loss(model.apply, model.schedule.alphas_cumprod)
  out = run_training(model=model, loss_fn=loss, batches=batches, settings=settings(), workdir=workdir, seed=SEED,
                     meta={"kind": "dist-test"}, mesh=mesh, log=lambda s: None)
  with open(os.path.join(workdir, "loss_history.json")) as f:
    losses = json.load(f)["loss"]
  checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(out.params)))
  return {"losses": losses, "param_checksum": checksum}


_T0 = time.time()


def _log(msg: str) -> None:
  """Timestamped progress on stderr (the test shows it when a worker fails or hangs)."""
  print(f"[worker {os.getpid()} +{time.time() - _T0:.1f}s] {msg}", file=sys.stderr, flush=True)


def _write(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process_id", type=int, required=True)
  ap.add_argument("--num_processes", type=int, required=True)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  a = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from diffcleanse_jax import parallel

  if a.num_processes == 1:  # the single-process reference run (no jax.distributed)
    result = train(a.workdir, 0, 1, mesh=parallel.make_mesh())
    result.update(ok=True, process_count=jax.process_count(), device_count=jax.device_count(), process_index=0)
    _write(a.out, result)
    _log(f"trained (single process): losses {result['losses']}")
    return 0

  stage = "initialize"
  _log(f"process {a.process_id}/{a.num_processes}: initialising (coordinator 127.0.0.1:{a.port})")
  try:
    parallel.initialize_distributed(dict(coordinator_address=f"127.0.0.1:{a.port}", num_processes=a.num_processes,
                                         process_id=a.process_id))
    if jax.process_count() != a.num_processes:
      raise RuntimeError(f"jax.process_count()={jax.process_count()} after initialize, expected {a.num_processes}")
    _log(f"initialised: {jax.local_device_count()} local / {jax.device_count()} global devices")
    stage = "collectives"
    # Trial cross-process psum: every device contributes (process_index + 1); a jitted sum over the globally
    # sharded array needs a CPU all-reduce across the processes.
    mesh = parallel.make_mesh()
    local = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(parallel.DATA_AXIS)), local)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
    want = float(sum((p + 1) * jax.local_device_count() for p in range(a.num_processes)))
    if total != want:
      raise RuntimeError(f"cross-process sum gave {total}, expected {want}")
  except Exception as e:  # noqa: BLE001 - reported to the parent, which skips with this reason
    _write(a.out, {"ok": False, "stage": stage, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                   "traceback": traceback.format_exc()[-3000:]})
    return 0

  _log(f"trial cross-process sum ok ({total})")
  result = train(a.workdir, jax.process_index(), jax.process_count(), mesh=mesh)
  result.update(ok=True, process_count=jax.process_count(), device_count=jax.device_count(),
                process_index=jax.process_index())
  _write(a.out, result)
  _log(f"trained: losses {result['losses']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
