"""A seconds-long config for tests: tiny UNet, 16x16 synthetic shapes, a few steps."""
from configs.common import base_config


def get_config():
  c = base_config("tiny")
  c.data.name = "synthetic"
  c.data.path = ""
  c.data.image_size = 16
  c.data.num_examples = 64
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.sample.method = "ddim"
  c.sample.num_steps = 5
  c.sample.num_images = 4
  c.sample.batch_size = 4
  return c
