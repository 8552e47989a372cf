"""Numerical parity with diffusers' torch UNet2DModel: random tiny models saved with `save_pretrained` (both
formats), loaded torch-free with `load_diffusers_folder`, run in flax; and our export reloaded in diffusers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402

from diffcleanse_jax.io import flax_to_torch, load_diffusers_folder, save_diffusers_folder  # noqa: E402
from diffcleanse_jax.io.diffusers import WEIGHTS_BIN, WEIGHTS_SAFETENSORS  # noqa: E402
from diffcleanse_jax.models.unet import UNet2DModel  # noqa: E402

pytestmark = pytest.mark.parity

TOL = 1e-4
# Tiny models: compile time dominates, and XLA's backend optimisations do not change these results.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BASE = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
ATTN_BOTH = dict(down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"))
NO_ATTN = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
INT_T = ([0, 1], [500, 999])

CONFIGS = {
    # google/ddpm-* legacy settings: one head, asymmetric downsample padding, cos/sin order, freq_shift 1.
    "ddpm_legacy": dict(attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                        norm_eps=1e-6, layers_per_block=2),
    # diffusers defaults: several heads (16 ch -> 2, 32 ch -> 4), symmetric padding, sin/cos flipped.
    "heads_pad1": dict(ATTN_BOTH, attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0),
    "no_attention": dict(NO_ATTN, add_attention=False, flip_sin_to_cos=True, freq_shift=1, downsample_padding=0),
    "scale_shift": dict(ATTN_BOTH, resnet_time_scale_shift="scale_shift", attention_head_dim=8,
                        mid_block_scale_factor=1.41421356),
    "resnet_resample": dict(ATTN_BOTH, downsample_type="resnet", upsample_type="resnet", attention_head_dim=16),
    "fourier_no_mid_attention": dict(time_embedding_type="fourier", attention_head_dim=8, add_attention=False),
    "learned_no_mid_block": dict(time_embedding_type="learned", num_train_timesteps=1000, mid_block_type=None,
                                 flip_sin_to_cos=False),
    "center_temb_dim_attn_groups": dict(center_input_sample=True, in_channels=1, out_channels=2,
                                        time_embedding_dim=48, attn_norm_num_groups=4, norm_num_groups=4,
                                        mid_block_scale_factor=2.0, downsample_padding=0),
    "three_levels": dict(block_out_channels=(8, 16, 16), norm_num_groups=4,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                         flip_sin_to_cos=False, freq_shift=1, downsample_padding=0),
    "act_gelu": dict(act_fn="gelu"),
}


def _torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**cfg).eval()
  with torch.no_grad():  # move every parameter off its (often trivial: ones/zeros) init
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _timesteps(cfg):
  if cfg.get("time_embedding_type") == "fourier":  # log(t): strictly positive float noise levels
    return ([0.5, 1.0], [3.7, 80.0])
  return INT_T


def _torch_out(model, x, t):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.tensor(t)).sample.numpy()


def _flax_out(apply, params, x, t):
  y = apply({"params": params}, jax.numpy.asarray(x.transpose(0, 2, 3, 1)), jax.numpy.asarray(t))
  return np.asarray(y).transpose(0, 3, 1, 2)


def _check(name, cfg, tmp_path):
  model = _torch_model(cfg)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, cfg["in_channels"], 16, 16)).astype(np.float32)
  if cfg.get("center_input_sample"):
    x = (x + 1) / 2
  refs = [(t, _torch_out(model, x, t)) for t in _timesteps(cfg)]
  apply, spec0, params0 = None, None, None
  for safe in (True, False):
    folder = tmp_path / f"{name}-{'st' if safe else 'bin'}"
    model.save_pretrained(folder, safe_serialization=safe)
    assert (folder / (WEIGHTS_SAFETENSORS if safe else WEIGHTS_BIN)).is_file()
    spec, params, _, config = load_diffusers_folder(folder)
    assert config["_class_name"] == "UNet2DModel"
    if apply is None:
      spec0, params0 = spec, params
      apply = jax.jit(UNet2DModel(spec).apply, compiler_options=FAST_COMPILE)
    assert spec == spec0
    for t, ref in refs:
      err = float(np.abs(_flax_out(apply, params, x, t) - ref).max())
      assert err < TOL, f"{name} ({'safetensors' if safe else 'bin'}) t={t}: max abs err {err:.3g}"
  # Our export loads in diffusers and reproduces the original torch outputs.
  out = save_diffusers_folder(tmp_path / f"{name}-export", spec0, params0)
  reloaded = diffusers.UNet2DModel.from_pretrained(out).eval()
  for t, ref in refs:
    np.testing.assert_allclose(_torch_out(reloaded, x, t), ref, rtol=0, atol=1e-6)
  sd = reloaded.state_dict()
  mine = flax_to_torch(params0)
  assert sorted(sd) == sorted(mine)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_parity(name, tmp_path):
  _check(name, dict(BASE, **CONFIGS[name]), tmp_path)


def test_pipeline_folder_and_legacy_bin(tmp_path):
  """A DDPMPipeline folder (unet/ + scheduler/) loads; a .bin with legacy attention names loads in both."""
  cfg = dict(BASE, attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
  model = _torch_model(cfg, seed=1)
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=True)
  diffusers.DDPMPipeline(unet=model, scheduler=sched).save_pretrained(tmp_path / "pipe",
                                                                     safe_serialization=False)
  spec, params, sched_cfg, _ = load_diffusers_folder(tmp_path / "pipe")
  assert sched_cfg["_class_name"] == "DDPMScheduler"
  assert sched_cfg["variance_type"] == "fixed_large" and sched_cfg["clip_sample"] is True
  x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
  apply = jax.jit(UNet2DModel(spec).apply, compiler_options=FAST_COMPILE)
  ref = _torch_out(model, x, [10, 700])
  assert np.abs(_flax_out(apply, params, x, [10, 700]) - ref).max() < TOL

  # Old google/ddpm-* naming: attentions.N.{query,key,value,proj_attn}.
  legacy = {}
  for k, v in model.state_dict().items():
    for cur, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                     (".to_out.0.", ".proj_attn.")):
      k = k.replace(cur, old)
    legacy[k] = v.clone()
  assert any(".proj_attn." in k for k in legacy)
  folder = tmp_path / "legacy"
  model.save_pretrained(folder, safe_serialization=False)
  torch.save(legacy, folder / WEIGHTS_BIN)
  _, params2, _, _ = load_diffusers_folder(folder)
  assert np.abs(_flax_out(apply, params2, x, [10, 700]) - ref).max() < TOL
  theirs = diffusers.UNet2DModel.from_pretrained(folder).eval()
  np.testing.assert_allclose(_torch_out(theirs, x, [10, 700]), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_save_pretrained(tmp_path, safe):
  """diffusers' own sharded checkpoints (save_pretrained with a small max_shard_size) load with parity; a
  v-prediction scheduler next to the same UNet is refused by name."""
  from diffcleanse_jax.diffusion.schedules import SchedulerConfigError
  from diffcleanse_jax.io.native import load_pretrained
  cfg = dict(BASE, **CONFIGS["heads_pad1"])
  model = _torch_model(cfg, seed=2)
  folder = tmp_path / "sharded"
  model.save_pretrained(folder, safe_serialization=safe, max_shard_size="60KB")
  index = WEIGHTS_SAFETENSORS if safe else WEIGHTS_BIN
  assert (folder / f"{index}.index.json").is_file() and not (folder / index).exists()
  assert len(list(folder.glob("diffusion_pytorch_model-*"))) > 1
  spec, params, _, _ = load_diffusers_folder(folder)
  x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
  apply = jax.jit(UNet2DModel(spec).apply, compiler_options=FAST_COMPILE)
  assert np.abs(_flax_out(apply, params, x, [5, 900]) - _torch_out(model, x, [5, 900])).max() < TOL
  diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(folder)
  with pytest.raises(SchedulerConfigError, match="prediction_type is 'v_prediction'"):
    load_pretrained(str(folder))


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_matches_torch_load(tmp_path, zip_format):
  """The torch-free reader against torch.save: dtypes, views, offsets, strides, bf16, nested state_dict."""
  from diffcleanse_jax.io import load_torch_state_dict
  torch.manual_seed(0)
  base = torch.randn(20)
  sd = {"w": torch.randn(3, 4), "t": torch.randn(4, 3).t(), "bf": torch.randn(6).bfloat16(),
        "h": torch.randn(2, 2).half(), "p": torch.nn.Parameter(torch.ones(2)), "i": torch.arange(5),
        "view": base[2:8].view(2, 3), "tail": base[5:], "perm": torch.randn(4, 5, 6).permute(2, 0, 1)[1:, ::2],
        "empty": torch.zeros(0, 3), "b": torch.tensor([True, False])}
  path = tmp_path / "sd.pth"
  torch.save({"state_dict": sd, "epoch": 7}, path, _use_new_zipfile_serialization=zip_format)
  out = load_torch_state_dict(path)
  assert sorted(out) == sorted(sd)
  for k, v in sd.items():
    ref = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    assert out[k].dtype == ref.dtype and out[k].shape == ref.shape, k
    np.testing.assert_array_equal(out[k], ref, err_msg=k)
