"""CIFAR-10 at paper scale: the google/ddpm-cifar10-32 architecture (35.7M parameters), BadDiffusion settings.

  python launch.py --config=configs/cifar10.py --config.data.path=/path/to/cifar-10-batches-py --workdir=runs/c10
"""
from configs.common import base_config


def get_config():
  c = base_config("ddpm-cifar10-32")
  c.data.name = "cifar10"
  c.data.path = "./data/cifar-10-batches-py"
  c.data.channels = 3
  c.train.batch_size = 128
  c.train.num_steps = 800_000
  c.train.learning_rate = 2e-4
  c.train.warmup_steps = 500
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 5000
  c.train.log_every = 100
  c.train.sample_every = 20_000
  c.train.flip = True
  c.sample.num_images = 64
  return c
