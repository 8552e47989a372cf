#!/usr/bin/env bash
# The main job on the built-in default: set up, then train a small Fashion-MNIST DDPM on the CPU and write a
# sample grid (runs/fmnist/samples/final.png) and the model (runs/fmnist/model, a diffusers folder).
# Extra arguments are passed to launch.py (e.g. --config.train.num_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python launch.py --config=configs/fashion_mnist_cpu.py --workdir="${WORKDIR:-runs/fmnist}" --mode=train "$@"
echo "samples: ${WORKDIR:-runs/fmnist}/samples/final.png   model: ${WORKDIR:-runs/fmnist}/model"
