"""Checkpoint I/O without torch: safetensors, torch zip pickles (hand-built), diffusers folders."""
import json
import logging
import os
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest

from diffcleanse_jax.io import (CheckpointError, flax_to_torch, load_diffusers_folder, load_safetensors,
                                load_torch_state_dict, save_diffusers_folder, save_safetensors, torch_to_flax)
from diffcleanse_jax.diffusion.schedules import SchedulerConfigError
from diffcleanse_jax.io.diffusers import WEIGHTS_BIN, WEIGHTS_SAFETENSORS
from diffcleanse_jax.io.native import load_pretrained
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER, preset
from diffcleanse_jax.models.unet import ConfigError, UNetSpec, abstract_params, default_widths, param_paths


# ------------------------------------------------------------------------------------------ helpers
def _random_params(spec, seed=0):
  """Random float32 params with the model's tree (no init compile: cheap)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_params(spec, 2))


@pytest.fixture(scope="module")
def tiny():
  spec = UNetSpec.from_config(preset("tiny"))
  return spec, _random_params(spec)


def _leaves(tree):
  return dict(param_paths(tree))


def _assert_same_tree(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert sorted(la) == sorted(lb)
  for k in la:
    x, y = np.asarray(la[k]), np.asarray(lb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x, y), k


def _write_folder(folder, spec, state_dict, config=None, safetensors=True):
  os.makedirs(folder, exist_ok=True)
  cfg = {"_class_name": "UNet2DModel", **spec.to_config()} if config is None else config
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  if safetensors:
    save_safetensors(state_dict, os.path.join(folder, WEIGHTS_SAFETENSORS))
  else:
    _write_torch_zip(os.path.join(folder, WEIGHTS_BIN), state_dict)
  return folder


# A torch zip checkpoint written by hand (pickle opcodes as torch.save emits them), so no torch is needed.
_STORAGE_NAMES = {"float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage",
                  "int64": "LongStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


def _u(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _i(v):
  return b"J" + struct.pack("<i", v)


def _tuple(vals):
  return b"(" + b"".join(_i(v) for v in vals) + b"t"


def _tensor_pickle(key, storage, numel, offset, shape, stride, legacy=False):
  return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"(" + _u("storage") + f"ctorch\n{storage}\n".encode()
          + _u(key) + _u("cpu") + _i(numel) + (b"N" if legacy else b"") + b"tQ" + _i(offset) + _tuple(shape)
          + _tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR")


def _write_torch_zip(path, tensors, bf16=(), raw_pickle=None, prefix="archive"):
  """tensors: {name: array}; names in `bf16` are stored as BFloat16Storage (upper 16 bits of float32)."""
  body, blobs = b"", {}
  for n, (name, arr) in enumerate(tensors.items()):
    arr = np.ascontiguousarray(arr)
    if name in bf16:
      storage, data = "BFloat16Storage", (arr.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
      storage, data = _STORAGE_NAMES[arr.dtype.name], arr.tobytes()
    stride = [int(np.prod(arr.shape[i + 1:])) for i in range(arr.ndim)]
    body += _u(name) + _tensor_pickle(str(n), storage, arr.size, 0, arr.shape, stride)
    blobs[str(n)] = data
  pkl = raw_pickle if raw_pickle is not None else (
      b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u.")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}/data.pkl", pkl)
    z.writestr(f"{prefix}/byteorder", "little")
    for k, v in blobs.items():
      z.writestr(f"{prefix}/data/{k}", v)
    z.writestr(f"{prefix}/version", "3\n")
  return path


# ------------------------------------------------------------------------------------------ folders
def test_folder_roundtrip_bit_identical(tiny, tmp_path):
  spec, params = tiny
  sched = dict(DEFAULT_SCHEDULER, variance_type="fixed_large")
  out = save_diffusers_folder(tmp_path / "m", spec, params, sched,
                              extra_files={"notes/defense.json": {"method": "diff-cleanse"}, "README.md": "hi"})
  assert sorted(os.listdir(out)) == ["README.md", "config.json", WEIGHTS_SAFETENSORS, "notes",
                                     "scheduler_config.json"]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp leftovers
  spec2, params2, sched2, config = load_diffusers_folder(out)
  assert spec2 == spec
  _assert_same_tree(params, params2)
  assert sched2["variance_type"] == "fixed_large" and sched2["_class_name"] == "DDPMScheduler"
  assert config["_class_name"] == "UNet2DModel" and config["_diffusers_version"] == "0.42.1"
  assert "_pruned_widths" not in config
  assert json.load(open(out / "notes" / "defense.json")) == {"method": "diff-cleanse"}
  # Overwriting an existing model folder replaces it atomically.
  params3 = _random_params(spec, seed=1)
  save_diffusers_folder(out, spec, params3)
  _assert_same_tree(params3, load_diffusers_folder(out)[1])
  assert not (out / "README.md").exists()


def test_pruned_widths_roundtrip(tmp_path):
  spec = UNetSpec.from_config(preset("tiny"))
  layer = "down_blocks_0/resnets_0/conv1"
  assert default_widths(spec)[layer] == 8
  pruned = spec.with_widths({layer: 4, "down_blocks_0/resnets_0/time_emb_proj": 4})
  params = _random_params(pruned)
  save_diffusers_folder(tmp_path / "p", pruned, params)
  config = json.load(open(tmp_path / "p" / "config.json"))
  assert config["_pruned_widths"] == {layer: 4, "down_blocks_0/resnets_0/time_emb_proj": 4}
  spec2, params2, _, _ = load_diffusers_folder(tmp_path / "p")
  assert spec2 == pruned and spec2.width(layer) == 4
  _assert_same_tree(params, params2)
  # The pruned weights against the unpruned config: shape mismatch, reported in torch names and layouts.
  with pytest.raises(CheckpointError, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight: expected \(8, 8, 3, 3\), "
                                            r"found \(4, 8, 3, 3\)"):
    torch_to_flax(flax_to_torch(params), spec)


def test_refuses_to_replace_foreign_folder(tiny, tmp_path):
  spec, params = tiny
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "precious.txt").write_text("x")
  with pytest.raises(CheckpointError, match="refusing to replace"):
    save_diffusers_folder(tmp_path / "data", spec, params)
  assert (tmp_path / "data" / "precious.txt").exists()
  with pytest.raises(CheckpointError, match="reserved"):
    save_diffusers_folder(tmp_path / "m", spec, params, extra_files={"../evil": "x"})
  assert not (tmp_path / "m").exists()


def test_export_checks_params_against_spec(tiny, tmp_path):
  spec, params = tiny
  bad = jax.tree.map(lambda x: x, params)
  del bad["conv_out"]["bias"]
  with pytest.raises(CheckpointError, match=r"missing key\(s\): conv_out\.bias \(1,\)"):
    save_diffusers_folder(tmp_path / "m", spec, bad)
  assert not os.listdir(tmp_path)


def test_pipeline_layout_and_default_scheduler(tiny, tmp_path, caplog):
  spec, params = tiny
  save_diffusers_folder(tmp_path / "pipe" / "unet", spec, params)
  os.remove(tmp_path / "pipe" / "unet" / "scheduler_config.json")
  with caplog.at_level(logging.WARNING, logger="diffcleanse_jax.io.diffusers"):
    _, _, sched, _ = load_diffusers_folder(tmp_path / "pipe")
  assert sched == DEFAULT_SCHEDULER
  assert "no scheduler_config.json" in caplog.text
  (tmp_path / "pipe" / "scheduler").mkdir()
  (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}))
  spec2, params2, sched2, _ = load_diffusers_folder(tmp_path / "pipe")
  assert sched2["variance_type"] == "fixed_large" and spec2 == spec
  _assert_same_tree(params, params2)
  # Given the unet/ subfolder itself, the sibling scheduler/ is found too.
  assert load_diffusers_folder(tmp_path / "pipe" / "unet")[2]["variance_type"] == "fixed_large"
  # model_index.json: a DDPMPipeline loads; a latent pipeline (a VQ-VAE besides the UNet) is refused by name.
  index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
           "unet": ["diffusers", "UNet2DModel"]}
  (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
  assert load_diffusers_folder(tmp_path / "pipe")[0] == spec
  (tmp_path / "pipe" / "model_index.json").write_text(
      json.dumps(dict(index, _class_name="LDMPipeline", vqvae=["diffusers", "VQModel"])))
  with pytest.raises(CheckpointError, match=r"model_index.json: pipeline LDMPipeline has components vqvae "
                                            r"besides unet and scheduler"):
    load_diffusers_folder(tmp_path / "pipe")


def test_bin_weights_without_torch(tiny, tmp_path):
  spec, params = tiny
  sd = flax_to_torch(params)
  sd_fp16 = {k: v.astype(np.float16) for k, v in sd.items()}
  _write_folder(tmp_path / "m", spec, sd_fp16, safetensors=False)
  _, params2, _, _ = load_diffusers_folder(tmp_path / "m")
  want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params)
  _assert_same_tree(want, params2)
  # safetensors is preferred when both exist
  save_safetensors(sd, tmp_path / "m" / WEIGHTS_SAFETENSORS)
  _assert_same_tree(params, load_diffusers_folder(tmp_path / "m")[1])


def test_legacy_attention_names_accepted(tiny, tmp_path):
  spec, params = tiny
  sd = flax_to_torch(params)
  legacy, n_renamed = {}, 0
  for k, v in sd.items():
    new = k
    for cur, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
      if cur in k:
        new = k.replace(cur, old)
        n_renamed += 1
        if v.ndim == 2 and cur == ".to_v.":  # some old dumps store the projections as 1x1 convs
          v = v[:, :, None, None]
    legacy[new] = v
  assert n_renamed == 4 * 4 * 2  # 4 attention blocks (1 down, 1 mid, 2 up) x 4 projections x weight/bias
  assert "mid_block.attentions.0.proj_attn.weight" in legacy
  _write_folder(tmp_path / "m", spec, legacy)
  _assert_same_tree(params, load_diffusers_folder(tmp_path / "m")[1])


def test_missing_and_unexpected_keys(tiny, tmp_path):
  spec, params = tiny
  sd = flax_to_torch(params)
  del sd["mid_block.resnets.1.conv2.weight"]
  sd["mid_block.resnets.1.extra.weight"] = np.zeros(3, np.float32)
  _write_folder(tmp_path / "m", spec, sd)
  with pytest.raises(CheckpointError) as ei:
    load_diffusers_folder(tmp_path / "m")
  msg = str(ei.value)
  assert "\n" not in msg and WEIGHTS_SAFETENSORS in msg
  assert "1 missing key(s): mid_block.resnets.1.conv2.weight (16, 16, 3, 3)" in msg
  assert "1 unexpected key(s): mid_block.resnets.1.extra.weight (3,)" in msg


def test_wrong_shape_names_key_and_shapes(tiny, tmp_path):
  spec, params = tiny
  sd = flax_to_torch(params)
  sd["up_blocks.0.attentions.1.to_k.weight"] = np.zeros((16, 12), np.float32)
  _write_folder(tmp_path / "m", spec, sd)
  with pytest.raises(CheckpointError, match=r"up_blocks\.0\.attentions\.1\.to_k\.weight: expected \(16, 16\), "
                                            r"found \(16, 12\)"):
    load_diffusers_folder(tmp_path / "m")


def test_config_errors(tiny, tmp_path, caplog):
  spec, params = tiny
  sd = flax_to_torch(params)
  cfg = {"_class_name": "UNet2DModel", **spec.to_config()}
  bad = dict(cfg, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"])
  _write_folder(tmp_path / "a", spec, sd, config=bad)
  with pytest.raises(ConfigError, match=r"down_block_types\[1\]='CrossAttnDownBlock2D' is not a supported") as ei:
    load_diffusers_folder(tmp_path / "a")
  assert "\n" not in str(ei.value) and "config.json" in str(ei.value)
  _write_folder(tmp_path / "b", spec, sd, config=dict(cfg, _class_name="UNet2DConditionModel"))
  with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
    load_diffusers_folder(tmp_path / "b")
  (tmp_path / "b" / "config.json").write_text('{"in_channels": 1,')
  with pytest.raises(CheckpointError, match=r"invalid JSON .*line 1"):
    load_diffusers_folder(tmp_path / "b")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_diffusers_folder(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no such folder"):
    load_diffusers_folder(tmp_path / "nope")
  _write_folder(tmp_path / "c", spec, sd, config=dict(cfg, some_future_option=3))
  with caplog.at_level(logging.WARNING, logger="diffcleanse_jax.io.diffusers"):
    assert load_diffusers_folder(tmp_path / "c")[0] == spec
  assert "some_future_option" in caplog.text
  os.remove(tmp_path / "c" / WEIGHTS_SAFETENSORS)
  with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or"):
    load_diffusers_folder(tmp_path / "c")


def _write_shards(folder, state_dict, n_shards, fmt="safetensors"):
  """A sharded checkpoint as diffusers writes one: shard files + `<weights>.index.json` with its weight_map."""
  names = sorted(state_dict)
  wmap = {}
  for j in range(n_shards):
    shard = f"diffusion_pytorch_model-{j + 1:05d}-of-{n_shards:05d}.{fmt}"
    part = {k: state_dict[k] for k in names[j::n_shards]}
    if fmt == "safetensors":
      save_safetensors(part, os.path.join(folder, shard))
    else:
      _write_torch_zip(os.path.join(folder, shard), part)
    wmap.update({k: shard for k in part})
  index = os.path.join(folder, f"diffusion_pytorch_model.{fmt}.index.json")
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
  return index, wmap


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint(tiny, tmp_path, fmt):
  spec, params = tiny
  folder = tmp_path / "m"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **spec.to_config()}))
  index, wmap = _write_shards(folder, flax_to_torch(params), 3, fmt)
  _assert_same_tree(params, load_diffusers_folder(folder)[1])
  assert load_pretrained(str(folder)).num_params == sum(np.size(v) for v in jax.tree.leaves(params))
  # A shard that is gone, a shard that lacks a tensor the index puts there, a path outside the folder.
  shard = sorted(set(wmap.values()))[1]
  os.rename(folder / shard, tmp_path / "away")
  with pytest.raises(CheckpointError, match=rf"index.json: shard file {shard} .* is missing"):
    load_diffusers_folder(folder)
  os.rename(tmp_path / "away", folder / shard)
  some = next(k for k, v in wmap.items() if v == shard)
  with open(index, "w") as f:
    json.dump({"weight_map": dict(wmap, **{some: sorted(set(wmap.values()))[0]})}, f)
  with pytest.raises(CheckpointError, match=rf"lacks 1 tensors that .*index.json places there, e.g. '{some}'"):
    load_diffusers_folder(folder)
  with open(index, "w") as f:
    json.dump({"weight_map": dict(wmap, **{some: "../" + shard})}, f)
  with pytest.raises(CheckpointError, match="must be a file name in the index's folder"):
    load_diffusers_folder(folder)
  with open(index, "w") as f:
    json.dump({"weights": {}}, f)
  with pytest.raises(CheckpointError, match="weight_map must be a non-empty object"):
    load_diffusers_folder(folder)


@pytest.mark.parametrize("sched,match", [
    ({"prediction_type": "v_prediction"}, r"prediction_type is 'v_prediction'; only epsilon-prediction"),
    ({"prediction_type": "sample"}, r"prediction_type is 'sample'"),
    ({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 1348.0}, r"_class_name is 'ScoreSdeVeScheduler', not a "
                                                                  r"beta-schedule"),
    ({"_class_name": "MyScheduler"}, r"_class_name is 'MyScheduler'"),
    ({"beta_schedule": "sigmoid"}, r"beta_schedule is 'sigmoid'; expected one of linear"),
    ({"trained_betas": [0.1, 0.2]}, r"trained_betas has shape \(2,\); expected \(1000,\)"),
    ({"num_train_timesteps": 1.5}, r"num_train_timesteps is 1.5; expected an integer"),
    ({"beta_end": 2.0}, r"beta_end is 2.0; expected a number in \(0, 1\)"),
    ({"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr is true; not supported"),
    ({"thresholding": True}, r"thresholding is true"),
])
def test_scheduler_config_refused(tiny, tmp_path, sched, match):
  """A scheduler config whose model this toolkit would sample, invert or fine-tune wrongly is refused with the
  file and the field (and load_pretrained refuses it too)."""
  spec, params = tiny
  cfg = sched if "_class_name" in sched else dict(DEFAULT_SCHEDULER, **sched)  # a foreign class: its own keys
  save_diffusers_folder(tmp_path / "m", spec, params, cfg)
  with pytest.raises(SchedulerConfigError, match=r"scheduler_config.json: " + match):
    load_diffusers_folder(tmp_path / "m")
  with pytest.raises(SchedulerConfigError, match=match):
    load_pretrained(str(tmp_path / "m"))


@pytest.mark.parametrize("sched", [
    {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"},
    {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False},
    {"_class_name": "SomeFutureBetaScheduler", "beta_schedule": "scaled_linear"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"_class_name": "DDIMScheduler", "prediction_type": None},
])
def test_scheduler_config_accepted(tiny, tmp_path, sched):
  """Other beta-schedule schedulers (the betas are what the samplers here need) load."""
  spec, params = tiny
  save_diffusers_folder(tmp_path / "m", spec, params, dict(DEFAULT_SCHEDULER, **sched))
  assert load_diffusers_folder(tmp_path / "m")[2]["_class_name"] == sched.get("_class_name", "DDPMScheduler")
  assert load_pretrained(str(tmp_path / "m")).schedule.num_train_timesteps == 1000


def test_non_epsilon_unet_refused(tmp_path):
  """out_channels != in_channels (e.g. a learned-variance UNet) is refused when it becomes a diffusion model."""
  cfg = dict(preset("tiny"), out_channels=2)
  spec = UNetSpec.from_config(cfg)
  save_diffusers_folder(tmp_path / "m", spec, _random_params(spec))
  assert load_diffusers_folder(tmp_path / "m")[0].out_channels == 2  # the raw weights still load
  with pytest.raises(ConfigError, match=r"out_channels=2 but in_channels=1; the UNet must predict epsilon"):
    load_pretrained(str(tmp_path / "m"))


# ------------------------------------------------------------------------------------------ safetensors
def test_safetensors_roundtrip_and_bf16(tmp_path):
  import ml_dtypes  # ships with jax
  a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  b = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)
  p = tmp_path / "x.safetensors"
  save_safetensors({"a": a, "i": np.arange(3)}, p, metadata={"format": "pt"})
  out = load_safetensors(p)
  assert np.array_equal(out["a"], a) and out["i"].dtype == np.int64
  save_safetensors({"a": a, "b": b}, p)
  out = load_safetensors(p)
  assert out["b"].dtype == np.float32 and out["b"].tolist() == [1.5, -2.25, 3.0]
  assert np.array_equal(out["a"], a)
  assert [n for n in os.listdir(tmp_path)] == ["x.safetensors"]


def test_corrupt_safetensors(tiny, tmp_path):
  spec, params = tiny
  save_diffusers_folder(tmp_path / "m", spec, params)
  w = tmp_path / "m" / WEIGHTS_SAFETENSORS
  good = w.read_bytes()
  cases = {
      "truncated": good[:len(good) - 100],
      "tiny": good[:5],
      "huge_length": struct.pack("<Q", 1 << 40) + good[8:],
      "garbage_json": good[:8] + b"\xff{not json" + good[8 + 10:],
  }
  for what, data in cases.items():
    w.write_bytes(data)
    with pytest.raises(CheckpointError) as ei:
      load_diffusers_folder(tmp_path / "m")
    msg = str(ei.value)
    assert "\n" not in msg and str(w) in msg, (what, msg)
  w.write_bytes(good[:len(good) - 100])
  with pytest.raises(CheckpointError, match="truncated"):
    load_safetensors(w)


# ------------------------------------------------------------------------------------------ torch pickles
def test_torch_zip_reader(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  tensors = {"a": a, "h": np.array([0.5, 2.0], np.float16), "l": np.arange(4), "bf": np.array([1.0, -3.5], np.float32),
             "e": np.zeros((0, 3), np.float32)}
  p = _write_torch_zip(tmp_path / "x.pth", tensors, bf16={"bf"})
  out = load_torch_state_dict(p)
  assert out["a"].tolist() == a.tolist() and out["h"].dtype == np.float16 and out["l"].dtype == np.int64
  assert out["bf"].dtype == np.float32 and out["bf"].tolist() == [1.0, -3.5]
  assert out["e"].shape == (0, 3)
  # A transposed view: storage offset and strides are honoured.
  body = _u("t") + _tensor_pickle("0", "FloatStorage", 12, 1, (2, 3), (1, 4))
  pkl = b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u."
  p2 = _write_torch_zip(tmp_path / "v.pth", {"a": a}, raw_pickle=pkl)
  np.testing.assert_array_equal(load_torch_state_dict(p2)["t"],
                                np.lib.stride_tricks.as_strided(a.reshape(-1)[1:], (2, 3), (4, 16)))
  # Nested under 'state_dict' (Lightning-style): unwrapped.
  pkl = (b"\x80\x02}(" + _u("state_dict") + b"ccollections\nOrderedDict\n)R(" + _u("w")
         + _tensor_pickle("0", "FloatStorage", 12, 0, (12,), (1,)) + b"u" + _u("epoch") + _i(3) + b"u.")
  p3 = _write_torch_zip(tmp_path / "n.ckpt", {"a": a}, raw_pickle=pkl)
  assert load_torch_state_dict(p3)["w"].tolist() == a.reshape(-1).tolist()


def test_torch_zip_out_of_bounds_tensor(tmp_path):
  body = _u("t") + _tensor_pickle("0", "FloatStorage", 4, 2, (100, 100), (100, 1))
  pkl = b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u."
  p = _write_torch_zip(tmp_path / "x.bin", {"a": np.zeros(4, np.float32)}, raw_pickle=pkl)
  with pytest.raises(CheckpointError, match="reads past its storage"):
    load_torch_state_dict(p)


class _Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested"])
def test_malicious_pickle_does_not_run(tmp_path, kind):
  marker = tmp_path / "pwned"
  if kind == "os.system":
    payload = pickle.dumps({"w": _Evil(os.system, f"touch {marker}")}, protocol=2)
    refused = "system"
  elif kind == "builtins.eval":
    payload = pickle.dumps(_Evil(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4)
    refused = "builtins.eval"
  else:  # the payload hides inside an otherwise valid state dict entry
    inner = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)[2:-1]
    payload = (b"\x80\x02ccollections\nOrderedDict\n)R(" + _u("w")
               + _tensor_pickle("0", "FloatStorage", 1, 0, (1,), (1,)) + _u("x") + inner + b"u.")
    refused = "system"
  p = _write_torch_zip(tmp_path / "evil.bin", {"a": np.zeros(1, np.float32)}, raw_pickle=payload)
  with pytest.raises(CheckpointError) as ei:
    load_torch_state_dict(p)
  msg = str(ei.value)
  assert "evil.bin" in msg and "refusing to unpickle global" in msg and refused in msg
  assert not marker.exists()
  # A bare (non-zip) pickle is refused without being unpickled at all.
  bare = tmp_path / "bare.pth"
  bare.write_bytes(payload)
  with pytest.raises(CheckpointError, match="bare pickle"):
    load_torch_state_dict(bare)
  assert not marker.exists()


def test_legacy_magic_number_format(tmp_path):
  """torch 0.4-1.5 files (`_use_new_zipfile_serialization=False`): pickles, then each storage's bytes."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  obj = (b"\x80\x02ccollections\nOrderedDict\n)R(" + _u("a")
         + _tensor_pickle("k0", "FloatStorage", 6, 0, (2, 3), (3, 1), legacy=True) + _u("t")
         + _tensor_pickle("k0", "FloatStorage", 6, 0, (3, 2), (1, 3), legacy=True) + b"u.")
  data = (pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + pickle.dumps(1001, protocol=2)
          + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
          + obj + pickle.dumps(["k0"], protocol=2) + struct.pack("<q", 6) + a.tobytes())
  p = tmp_path / "old.pt"
  p.write_bytes(data)
  out = load_torch_state_dict(p)
  assert out["a"].tolist() == a.tolist() and out["t"].tolist() == a.T.tolist()
  p.write_bytes(data[:-8])
  with pytest.raises(CheckpointError, match="truncated"):
    load_torch_state_dict(p)
  # The pickles of a legacy file are restricted too.
  marker = tmp_path / "pwned"
  evil = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)
  p.write_bytes(data[:data.index(obj)] + evil + data[data.index(obj) + len(obj):])
  with pytest.raises(CheckpointError, match="refusing to unpickle global"):
    load_torch_state_dict(p)
  assert not marker.exists()


def test_unsupported_torch_formats_refused(tmp_path):
  import tarfile
  p = tmp_path / "ancient.pt"
  with tarfile.open(p, "w") as tar:
    info = tarfile.TarInfo("storages")
    info.size = 4
    tar.addfile(info, fileobj=__import__("io").BytesIO(b"\x80\x02K\x00"))
  with pytest.raises(CheckpointError, match=r"legacy tar-format.*re-save it with a newer torch.*safetensors"):
    load_torch_state_dict(p)
  (tmp_path / "junk.bin").write_bytes(b"hello world")
  with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
    load_torch_state_dict(tmp_path / "junk.bin")


def test_atomic_text_and_json_files(tmp_path, monkeypatch):
  from diffcleanse_jax.io import files
  p = tmp_path / "a" / "b" / "report.json"
  files.write_json(str(p), dict(x=np.float32(0.5), n=np.int64(3), arr=np.arange(2), z=1), sort_keys=True)
  assert json.loads(p.read_text()) == dict(arr=[0, 1], n=3, x=0.5, z=1)
  assert p.read_text().index('"arr"') < p.read_text().index('"z"')  # sorted
  # a failed rename leaves the previous file whole and no temp file behind
  monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError):
    files.write_text_atomic(str(p), "half")
  assert json.loads(p.read_text())["z"] == 1 and os.listdir(p.parent) == ["report.json"]
