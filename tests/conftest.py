"""Test setup: CPU JAX with 8 fake devices (sharding tests), fast compiles.

Most of the suite's time is XLA compilation of the same few tiny programs (a train step, a sampler, a loss
gradient) in test after test. JAX's persistent compilation cache compiles each such program once per test
process: the controller makes a fresh folder (removed at the end) and hands it to its pytest-xdist workers
through DIFFCLEANSE_TEST_XLA_CACHE; each process writes its own sub-folder (JAX's cache has no atomic writes,
and its file lock costs more than sharing saves). The cache only skips recompiling an identical program (JAX
keys it on the program, the compile options and the backend), so no result depends on it.
DIFFCLEANSE_TEST_XLA_CACHE=off disables it; a folder given by hand is used (and kept).
"""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

_CACHE_ENV = "DIFFCLEANSE_TEST_XLA_CACHE"
_made_cache = None
if not os.environ.get(_CACHE_ENV) and "PYTEST_XDIST_WORKER" not in os.environ:
  _made_cache = tempfile.mkdtemp(prefix="diffcleanse-test-xla-cache-")
  os.environ[_CACHE_ENV] = _made_cache  # inherited by the xdist workers this process starts

if os.environ.get(_CACHE_ENV, "off") != "off":
  import jax

  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.environ[_CACHE_ENV], os.environ.get("PYTEST_XDIST_WORKER", "main")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # the rest compile fast anyway
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _made_cache and not hasattr(config, "workerinput"):
    shutil.rmtree(_made_cache, ignore_errors=True)
