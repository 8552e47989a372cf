"""UNet config validation, presets, widths table."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffcleanse_jax.models.presets import preset
from diffcleanse_jax.models.unet import (ConfigError, UNet2DModel, UNetSpec, abstract_params, count_params,
                                         default_widths, init_params)


def test_reference_architectures_have_the_published_parameter_counts():
  assert count_params(abstract_params(UNetSpec.from_config(preset("ddpm-cifar10-32")))) == 35_746_307
  assert count_params(abstract_params(UNetSpec.from_config(preset("ddpm-ema-celebahq-256")))) == 113_673_219


def test_config_typo_is_a_one_line_error_with_a_hint():
  cfg = preset("tiny")
  cfg["block_out_channel"] = cfg.pop("block_out_channels")
  with pytest.raises(ConfigError, match=r"unknown key 'block_out_channel' \(did you mean 'block_out_channels'\?\)"):
    UNetSpec.from_config(cfg)
  # diffusers folders from other versions may carry extra keys: allowed when not strict.
  cfg = preset("tiny")
  cfg["some_future_key"] = 1
  assert UNetSpec.from_config(cfg, strict=False).block_out_channels == (8, 16)


def test_unknown_block_type_names_the_field_and_the_valid_types():
  cfg = preset("tiny")
  cfg["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock2D"]
  with pytest.raises(ConfigError) as e:
    UNetSpec.from_config(cfg, source="x/config.json")
  msg = str(e.value)
  assert "x/config.json" in msg and "down_block_types[1]='CrossAttnDownBlock2D'" in msg and "AttnDownBlock2D" in msg
  assert "\n" not in msg


@pytest.mark.parametrize("field,value,needle", [
    ("norm_num_groups", 3, "not divisible by norm_num_groups"),
    ("block_out_channels", [8], "one entry per block_out_channels"),
    ("act_fn", "tanh", "act_fn"),
    ("time_embedding_type", "rope", "time_embedding_type"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("sample_size", 0, r"sample_size=0 must be a positive integer"),
    ("sample_size", 12.5, r"sample_size=12.5 must be a positive integer"),
    ("sample_size", 15, r"sample_size=15 is not divisible by 2\*\*1"),
    ("sample_size", [16, 32], r"must be square"),
])
def test_invalid_values_are_rejected(field, value, needle):
  cfg = preset("tiny")
  cfg[field] = value
  with pytest.raises(ConfigError, match=needle):
    UNetSpec.from_config(cfg)


def test_forward_shapes_and_input_check():
  spec = UNetSpec.from_config(preset("tiny"))
  params = init_params(spec, jax.random.key(0))
  x = jnp.zeros((2, 16, 16, 1))
  out = UNet2DModel(spec).apply({"params": params}, x, jnp.array([0, 999]))
  assert out.shape == (2, 16, 16, 1)
  with pytest.raises(ConfigError, match="NHWC"):
    UNet2DModel(spec).apply({"params": params}, jnp.zeros((2, 1, 16, 16)), jnp.array([0, 1]))


def test_widths_table_rebuilds_a_pruned_model_from_its_config():
  spec = UNetSpec.from_config(preset("tiny"))
  widths = default_widths(spec)
  assert widths["time_embedding/linear_1"] == 32 and widths["conv_out"] == 1
  pruned = spec.with_widths({"time_embedding/linear_1": 30, "up_blocks_0/attentions_0/to_q": 12,
                             "up_blocks_0/attentions_0/to_k": 12, "up_blocks_0/attentions_0/to_v": 12})
  cfg = pruned.to_config()
  assert cfg["_pruned_widths"]["time_embedding/linear_1"] == 30
  again = UNetSpec.from_config(cfg)
  assert again == pruned
  p = abstract_params(again)
  assert p["time_embedding"]["linear_1"]["kernel"].shape == (8, 30)
  assert p["time_embedding"]["linear_2"]["kernel"].shape == (30, 32)
  assert p["up_blocks_0"]["attentions_0"]["to_out_0"]["kernel"].shape == (12, 16)
  with pytest.raises(ConfigError, match="unknown layer"):
    spec.with_widths({"nope/conv": 3})


def test_pruned_model_runs_and_keep_all_widths_is_identity():
  spec = UNetSpec.from_config(preset("tiny"))
  assert spec.with_widths(default_widths(spec)) == spec
  pruned = spec.with_widths({"down_blocks_0/resnets_0/conv1": 4, "down_blocks_0/resnets_0/time_emb_proj": 4})
  params = init_params(pruned, jax.random.key(1))
  out = jax.jit(UNet2DModel(pruned).apply)({"params": params}, jnp.ones((1, 16, 16, 1)), jnp.array([3]))
  assert np.isfinite(np.asarray(out)).all()
