"""Fashion-MNIST 32x32 DDPM on a laptop CPU: the README's default job (about 15 minutes on 2 cores).

  python launch.py --config=configs/fashion_mnist_cpu.py --workdir=runs/fmnist --mode=train
"""
from configs.common import base_config


def get_config():
  c = base_config("fmnist-cpu")
  c.train.batch_size = 32
  c.train.num_steps = 1500
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.995
  c.train.checkpoint_every = 250
  c.train.log_every = 25
  c.train.flip = True
  # Grids: DDPM ancestral sampling, 500 "leading" steps, x0-hat clipped to [-1,1] (google/ddpm-* scheduler
  # configs clip too). A model this small and this briefly trained gives saturated samples without clipping.
  c.sample.method = "ddpm"
  c.sample.num_steps = 500
  c.sample.clip_sample = True
  c.sample.num_images = 64
  return c
