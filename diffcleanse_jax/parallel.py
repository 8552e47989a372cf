"""Device meshes and multi-host start-up. One code path for 1 CPU, N GPUs, or a TPU pod slice.

Data parallelism is a 1-D ('data',) mesh: batches are sharded along their leading axis, parameters and optimizer
state are replicated, and XLA inserts the gradient all-reduce (no pmap, no explicit pmean).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
_initialized = False


def initialize_distributed(cfg: Mapping[str, Any] | None = None) -> None:
  """Calls `jax.distributed.initialize` when this is a multi-process run.

  `cfg` keys (all optional): coordinator_address ('host:port'), num_processes, process_id, local_device_ids,
  auto (bool: let JAX detect the cluster, e.g. on Cloud TPU, SLURM or Open MPI). Nothing happens for a
  single-process run with no settings. Safe to call twice.
  """
  global _initialized
  cfg = dict(cfg or {})
  addr = cfg.get("coordinator_address") or None
  nproc = cfg.get("num_processes")
  pid = cfg.get("process_id")
  auto = bool(cfg.get("auto", False))
  if _initialized or not (addr or auto):
    return
  if addr and (nproc is None or pid is None or int(nproc) < 1 or not 0 <= int(pid) < int(nproc)):
    raise ValueError(f"distributed: coordinator_address={addr!r} needs num_processes >= 1 and "
                     f"0 <= process_id < num_processes (got {nproc}, {pid})")
  # Nothing here may touch jax.devices()/jax.default_backend(): that initialises the backends, after which
  # jax.distributed.initialize refuses to run. The CPU client always exists, so enabling gloo (CPU collectives
  # across processes) is harmless on GPU/TPU hosts; a choice the user made (e.g. 'mpi') is kept.
  if str(getattr(jax.config, "jax_cpu_collectives_implementation", "none") or "none").lower() == "none":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # pragma: no cover - depends on the jax build
      logging.warning("CPU collectives unavailable: %s", e)
  kwargs: dict[str, Any] = {}
  if addr:
    kwargs.update(coordinator_address=addr, num_processes=int(nproc), process_id=int(pid))
  if cfg.get("local_device_ids") is not None:
    kwargs["local_device_ids"] = list(cfg["local_device_ids"])
  jax.distributed.initialize(**kwargs)
  _initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `num_devices` devices (-1 = all, across every process)."""
  n = jax.device_count() if num_devices in (-1, 0, None) else int(num_devices)
  if n > jax.device_count():
    raise ValueError(f"mesh asks for {n} devices but only {jax.device_count()} are visible")
  devices = jax.devices()[:n]
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh, leading: int = 0) -> NamedSharding:
  """Shards axis `leading` of an array over the data axis (leading=1 for stacked (steps, batch, ...) arrays)."""
  return NamedSharding(mesh, P(*([None] * leading), DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh, what: str = "batch_size") -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} must be divisible by the number of devices in the data mesh ({n})")
  if global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} must be divisible by the number of processes ({jax.process_count()})")
