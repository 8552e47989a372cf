#!/usr/bin/env bash
# Set up (venv + test and parity extras + Fashion-MNIST) and run the whole test suite on the CPU.
# Two pytest-xdist workers by default (TEST_WORKERS=N to change, 0 = in-process): most of the suite's time is
# single-threaded XLA compilation, so two workers use both cores of a 2-core machine. --dist loadfile keeps each
# test file (and its module-scoped fixtures) on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,parity
export JAX_PLATFORMS=cpu
WORKERS="${TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
