#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: Python venv in .venv with the package and its extras,
# and Debian's Fashion-MNIST package. Usage: bash scripts/setup.sh [extras]   (default extras: none)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] WARNING: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi

# jax>=0.10 needs Python >= 3.11; torch 2.13 (parity extra) has a CPU wheel for 3.11 on this image.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "[setup] need Python >= 3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-${EXTRAS:-core}-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing diffcleanse-jax${EXTRAS:+[$EXTRAS]} (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  SPEC="."; [ -n "$EXTRAS" ] && SPEC=".[$EXTRAS]"
  .venv/bin/python -m pip install -q -e "$SPEC" > .venv/pip-install.log 2>&1 || {
    tail -n 40 .venv/pip-install.log >&2; echo "[setup] pip install -e '$SPEC' failed (log: .venv/pip-install.log)" >&2; exit 1; }
  .venv/bin/python -c "import diffcleanse_jax, jax, flax, optax, orbax.checkpoint" || { echo "[setup] install failed" >&2; exit 1; }
  touch "$STAMP"
fi
