"""Diff-Cleanse of a backdoored Fashion-MNIST CPU-preset model, data-free, on a 2-core CPU (under 15 minutes).
The README's main job (scripts/demo.sh) runs it on the shipped demo model:

  python launch.py --config=configs/fmnist_cleanse.py --mode=cleanse --model=examples/fmnist_box14_hat \
      --workdir=runs/demo

detect (BBTI with configs/fmnist_detect.py's settings: B = 16, DDPM-50, p_0 ~ N(0.5, 1), stop at
MSCR 0.75, 3 restarts of <= 25 epochs, all stopping with the first to collapse) ->
score (Taylor, t = 901, 903, ..., 999: every 2nd step of [900, 999], on 16 self-generated images) -> prune
(ratio 0.02: only the GroupNorm-free groups shrink, 13 channels, 686,769 -> 682,855 parameters) -> dual-loss
fine-tune (600 steps x 32 at lr 1e-3 on 256 DDPM-100 samples of the original model; 200 steps at 5e-4 left the
hat behind the true trigger, on a grey instead of a white background, docs/RESULTS.md) -> before/after evaluation with the
sampler the BadDiffusion (SDE) backdoor was trained for: DDPM with all 1000 steps (a short DDPM/DDIM chain does not
carry the backdoor, docs/RESULTS.md), 16 triggered and 16 clean samples; the FD (classifier features) on 256 clean
DDIM-50 samples from the same noise (eval.fd_method/fd_num_steps; 3x fewer network calls than the 32 DDPM-1000
samples it replaces). FD on 64 samples or fewer is rank-deficient (128-d features): disjoint 64-sample sets of one
model gave FD 40-115 (docs/RESULTS.md, "Session 15"); DDIM-50 FD-512 and DDPM-1000 FD-256 agreed (51.0 vs 50.3). The true trigger/target are picked up from the model folder's attack.json
if present (evaluation only; the defence itself never sees them). Timings: docs/RESULTS.md.

Ablations: --config.cleanse.method=finetune|prune|elijah|clip|anp, --config.prune.score_mode=bd_minus_clean,
--config.prune.use_true_trigger=True, --config.finetune.w_kd=0 (DDPM loss only), --config.cleanse.force=True.
"""
from configs import fmnist_detect


def get_config():
  c = fmnist_detect.get_config()

  # Stage 1: BBTI as configs/fmnist_detect.py, but the trigger for pruning and the inverted-trigger rows is the
  # inversion's own pattern: the shift re-estimate (fmnist_detect's trigger_from='shift') costs 100-200 s on
  # 2 cores, which the 15-minute main job has not been timed with (--config.detection.trigger_from=shift).
  c.detection.trigger_from = "inversion"

  # Taylor importance over every 2nd timestep of [900, 999] on one batch of 16 generated images.
  c.prune.ratio = 0.02
  c.prune.batch_size = 16
  c.prune.t_threshold = 900
  c.prune.t_stride = 2
  c.prune.t_chunk = 4

  # Data-free dual-loss fine-tuning: 256 DDPM-100 (ancestral) samples of the original model (cached in the
  # workdir). With deterministic DDIM-25 samples the demo's clean FD rose +41 %, with DDPM-100 +10.6 / +16.8 %
  # in two runs (docs/RESULTS.md, the demo section).
  c.finetune.data = "generated"
  c.finetune.num_images = 256
  c.finetune.sample_method = "ddpm"
  c.finetune.sample_steps = 100
  c.finetune.sample_batch_size = 64
  c.finetune.batch_size = 32
  c.finetune.num_steps = 600
  c.finetune.learning_rate = 1e-3
  c.finetune.warmup_steps = 0
  c.finetune.ema_decay = 0.999
  c.finetune.checkpoint_every = 100
  c.finetune.log_every = 25

  # Before/after evaluation: DDPM ancestral with all 1000 steps (the sampler the backdoor was trained for).
  c.eval.num_samples = 16
  c.eval.method = "ddpm"
  c.eval.num_steps = 0
  c.eval.batch_size = 16
  c.eval.fd_num_samples = 256  # >= 2x the classifier's 128 features
  c.eval.fd_method = "ddim"
  c.eval.fd_num_steps = 50

  return c
