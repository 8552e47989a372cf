"""Diff-Cleanse of a backdoored Fashion-MNIST CPU-preset model, data-free, on a 2-core CPU (well under 15 minutes).

  python launch.py --config=configs/fmnist_cleanse.py --mode=cleanse --model=runs/attack/model --workdir=runs/cleanse

detect (BBTI, DDPM-20, 16 samples, <= 30 epochs) -> score (Taylor, t = 901, 903, ..., 999: every 2nd step of
[900, 999], on 16 self-generated images) -> prune (ratio 0.02: only the GroupNorm-free groups shrink, 13
channels, 686,769 -> 682,855 parameters) -> dual-loss fine-tune (200 steps x 32 on 256 DDIM-25 samples of the
original model) -> before/after evaluation (DDPM-50, 32 samples per set; FD in classifier space, few samples).
The true trigger/target are picked up from runs/attack/attack.json if present (evaluation only).
Measured with --config.cleanse.force=True: 608 s end to end on the shared 2-core development machine (load ~5):
detect 45, eval before 54, data 60, score 80, prune 2, fine-tune 317, eval after 50.

Ablations: --config.cleanse.method=finetune|prune|elijah|clip|anp, --config.prune.score_mode=bd_minus_clean,
--config.prune.use_true_trigger=True, --config.finetune.w_kd=0 (DDPM loss only), --config.cleanse.force=True.
"""
from configs.common import base_config


def get_config():
  c = base_config("fmnist-cpu")

  # Stage 1: BBTI with the defaults (B = 16, DDPM-20), fewer epochs: a backdoored model collapses within a few.
  c.inversion.max_epochs = 30

  # Taylor importance over every 2nd timestep of [900, 999] on one batch of 16 generated images.
  c.prune.ratio = 0.02
  c.prune.batch_size = 16
  c.prune.t_threshold = 900
  c.prune.t_stride = 2
  c.prune.t_chunk = 4

  # Data-free dual-loss fine-tuning: 256 DDIM-25 samples of the original model (cached in the workdir).
  c.finetune.data = "generated"
  c.finetune.num_images = 256
  c.finetune.sample_method = "ddim"
  c.finetune.sample_steps = 25
  c.finetune.sample_batch_size = 64
  c.finetune.batch_size = 32
  c.finetune.num_steps = 200
  c.finetune.learning_rate = 5e-4
  c.finetune.warmup_steps = 0
  c.finetune.ema_decay = 0.999
  c.finetune.checkpoint_every = 100
  c.finetune.log_every = 25

  # Before/after evaluation: DDPM ancestral (the sampler BadDiffusion backdoors respond to), 50 steps.
  c.eval.num_samples = 32
  c.eval.method = "ddpm"
  c.eval.num_steps = 50
  c.eval.batch_size = 32
  c.eval.fd_num_samples = 0

  return c
