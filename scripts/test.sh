#!/usr/bin/env bash
# Set up (venv + test and parity extras + Fashion-MNIST) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,parity
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
