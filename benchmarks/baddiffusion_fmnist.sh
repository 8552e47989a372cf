#!/usr/bin/env bash
# Issue 3 acceptance runs (docs/RESULTS.md, "BadDiffusion on the Fashion-MNIST CPU model"): fine-tune the clean
# Fashion-MNIST CPU model with BOX_14 -> HAT and STOP_SIGN_14 -> CORNER at poison rate 0.1, then evaluate every
# model (DDPM, all 1000 steps, 64 triggered + 64 clean samples, FD over the 64 clean ones) with and without
# inference-time clipping, and the clean model with both triggers.
#
#   bash benchmarks/baddiffusion_fmnist.sh [RUNS_DIR]      # default RUNS_DIR=runs; CLEAN=path to the clean model
#
# Resumable: an attack resumes from its newest checkpoint, a finished step (its output file exists) is skipped.
# About 2 hours on 2 CPU cores (two 12,000-step attacks ~40 min each, ~5 min per evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
R="${1:-runs}"
CLEAN="${CLEAN:-$R/fmnist}"
PY=".venv/bin/python"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

if [ ! -d "$CLEAN/checkpoints" ] && [ ! -f "$CLEAN/config.json" ]; then
  echo "training the clean model into $CLEAN (the README's former main job)"
  $PY launch.py --config=configs/fashion_mnist_cpu.py --workdir="$CLEAN" --mode=train
fi

attack() {  # name trigger target
  local wd="$R/attack_$1"
  [ -f "$wd/model/config.json" ] && return 0
  $PY launch.py --config=configs/fmnist_attack.py --mode=attack --workdir="$wd" --config.init_from="$CLEAN" \
      --config.attack.trigger="$2" --config.attack.target="$3" --config.attack.poison_rate=0.1
}

evaluate() {  # model_dir out_dir trigger target clip [extra flags]
  local model="$1" out="$2" trig="$3" targ="$4" clip="$5"; shift 5
  [ -f "$out/metrics.json" ] && return 0
  $PY launch.py --config=configs/fmnist_attack.py --mode=evaluate --model="$model" --workdir="$out" \
      --trigger="$trig" --target="$targ" --config.eval.clip_sample="$clip" "$@"
}

attack box_hat BOX_14 HAT
evaluate "$R/attack_box_hat/model" "$R/eval/box_hat" BOX_14 HAT False
attack stop_corner STOP_SIGN_14 CORNER
evaluate "$R/attack_stop_corner/model" "$R/eval/stop_corner" STOP_SIGN_14 CORNER False
evaluate "$CLEAN" "$R/eval/clean_box_hat" BOX_14 HAT False
evaluate "$CLEAN" "$R/eval/clean_stop_corner" STOP_SIGN_14 CORNER False --config.eval.clean=False
evaluate "$R/attack_box_hat/model" "$R/eval/box_hat_clip" BOX_14 HAT True
evaluate "$R/attack_stop_corner/model" "$R/eval/stop_corner_clip" STOP_SIGN_14 CORNER True
evaluate "$CLEAN" "$R/eval/clean_box_hat_clip" BOX_14 HAT True

$PY - "$R/eval" <<'EOF'
import json, os, sys
root = sys.argv[1]
print("| run | ASR | MSE | SSIM | clean ASR | FD (64) | sampler |")
print("|---|---|---|---|---|---|---|")
for name in sorted(os.listdir(root)):
  p = os.path.join(root, name, "metrics.json")
  if not os.path.isfile(p):
    continue
  m = json.load(open(p))
  f = lambda v: "-" if v is None else f"{v:.4g}"
  s = m["sampler"]
  print(f"| {name} | {f(m['asr'])} | {f(m['mse'])} | {f(m['ssim'])} | {f(m.get('clean_asr'))} | {f(m.get('fd'))} "
        f"| {s['method']}-{s['num_steps']}{' clip' if s['clip_sample'] else ''} |")
EOF
