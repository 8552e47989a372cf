"""Diff-Cleanse stage 1 (BBTI detection) for the Fashion-MNIST 32x32 CPU models.

  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/fmnist --workdir=runs/detect_clean
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect_wb \
      --config.detection.method=whitebox
  python launch.py --config=configs/fmnist_detect.py --mode=scan --models_dir=runs/zoo/models --workdir=runs/scan

Defaults are the paper/code ones (ALGORITHMS §4.1, §10): B = 16 fixed noises, DDPM-20, Adam lr 0.1 on p, grad
scale 1e3 (32 px), lambda_g = 0, at most 100 epochs, backdoored iff MSCR > 0.5. `--config.inversion.faithful_code_bug`
reproduces the released code's gradient bug (§4.2); `--config.inversion.restarts=R` optimises R p_0 draws at once.
"""
from configs.common import base_config


def get_config():
  c = base_config("fmnist-cpu")
  c.inversion.log_every = 5
  return c
