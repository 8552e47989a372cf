"""Diff-Cleanse stage 1 (BBTI detection) for the Fashion-MNIST 32x32 CPU models.

  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/fmnist --workdir=runs/detect_clean
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect_wb \
      --config.detection.method=whitebox
  python launch.py --config=configs/fmnist_detect.py --mode=scan --models_dir=runs/zoo/models --workdir=runs/scan

Defaults are the paper/code ones (ALGORITHMS §4.1, §10): B = 16 fixed noises, DDPM-20, Adam lr 0.1 on p, grad
scale 1e3 (32 px), lambda_g = 0, at most 100 epochs, backdoored iff MSCR > 0.5. `--config.inversion.faithful_code_bug`
reproduces the released code's gradient bug (§4.2); `--config.inversion.restarts=R` optimises R p_0 draws at once.

White-box gradient through DDPM-20 on this 0.69M-parameter UNet (B = 16, 2 shared CPU cores, load ~5; first
call = compile + one epoch, then seconds per epoch): unrolled, no remat 112 s / 4.1 s; unrolled + jax.checkpoint
160 s / 6.5 s; lax.scan + checkpoint 44 s / 23 s; lax.scan 44 s / 24 s. BBTI (forward scan) 10 s / 1.3 s.
Activations of 20 unrolled steps are small at this size, so remat is off here (keep it on for big UNets).
"""
from configs.common import base_config


def get_config():
  c = base_config("fmnist-cpu")
  c.inversion.log_every = 5
  c.inversion.whitebox_remat = False
  return c
