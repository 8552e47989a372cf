#!/usr/bin/env bash
# Produces the shipped demo model examples/fmnist_box14_hat/ that the README's main job (scripts/demo.sh) cleanses:
#   1. trains the clean Fashion-MNIST CPU model (configs/fashion_mnist_cpu.py, 1,500 steps, ~6 min on 2 cores);
#   2. BadDiffusion fine-tunes it with trigger BOX_14 -> target HAT at poison rate 0.1 (configs/fmnist_attack.py,
#      12,000 steps, ~45 min on 2 cores);
#   3. copies the backdoored diffusers folder and the attack's metadata (attack.json, true trigger/target arrays,
#      PNGs, the resolved attack config) into examples/fmnist_box14_hat/.
# Both runs resume from their checkpoints if interrupted. Usage: bash scripts/make_demo_model.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
R="${1:-runs}"
PY=.venv/bin/python
OUT=examples/fmnist_box14_hat

[ -f "$R/fmnist/model/config.json" ] || \
  $PY launch.py --config=configs/fashion_mnist_cpu.py --workdir="$R/fmnist" --mode=train
[ -f "$R/attack_box_hat/model/config.json" ] || \
  $PY launch.py --config=configs/fmnist_attack.py --mode=attack --workdir="$R/attack_box_hat" \
      --config.init_from="$R/fmnist" --config.attack.trigger=BOX_14 --config.attack.target=HAT \
      --config.attack.poison_rate=0.1

A="$R/attack_box_hat"
rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
cp "$A"/model/* "$OUT.tmp/"
cp "$A"/attack.json "$A"/trigger.npy "$A"/target.npy "$A"/trigger.png "$A"/target.png \
   "$A"/samples_clean.png "$A"/samples_triggered.png "$OUT.tmp/"
cp "$A"/config.json "$OUT.tmp/attack_config.json"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
du -sh "$OUT"
echo "wrote $OUT"
