"""CelebA-HQ 256x256: the google/ddpm-ema-celebahq-256 architecture (113.7M parameters), lr 8e-5 (BadDiffusion).

  python launch.py --config=configs/celebahq.py --config.data.path=/path/to/celeba_hq_256 --workdir=runs/chq
"""
from configs.common import base_config


def get_config():
  c = base_config("ddpm-ema-celebahq-256")
  c.data.name = "image_folder"
  c.data.path = "./data/celeba_hq_256"
  c.data.image_size = 256
  c.data.channels = 3
  c.train.batch_size = 64
  c.train.num_steps = 500_000
  c.train.learning_rate = 8e-5
  c.train.warmup_steps = 500
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.train.sample_every = 10_000
  c.train.flip = True
  c.sample.num_images = 16
  c.sample.batch_size = 8
  return c
