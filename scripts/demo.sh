#!/usr/bin/env bash
# The main job on the built-in default: set up, then Diff-Cleanse the shipped backdoored demo model
# examples/fmnist_box14_hat/ (a Fashion-MNIST CPU-preset DDPM that BadDiffusion backdoored with BOX_14 -> HAT; made
# by scripts/make_demo_model.sh), data-free: detect by trigger inversion, Taylor-score pruning, dual-loss
# fine-tuning on the model's own samples, evaluation before/after (the true trigger/target in the example's
# attack.json are used for evaluation only). Writes runs/demo/report.md, report.json and the cleansed model
# runs/demo/cleansed/ (a diffusers folder). Rerunning resumes. Extra arguments go to launch.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WD="${WORKDIR:-runs/demo}"
.venv/bin/python launch.py --config=configs/fmnist_cleanse.py --mode=cleanse --model=examples/fmnist_box14_hat \
    --workdir="$WD" "$@"
echo "report: $WD/report.md   cleansed model: $WD/cleansed"
