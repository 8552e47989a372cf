"""Checkpoints in the original DDPM UNet layout (ermongroup/ddim, pytorch_diffusion, TrojDiff): a small torch
network written here from the layout's definition, saved the way ddim's trainer saves it (`ckpt.pth` =
[model, optimizer, epoch, step, ema] + `config.yml` dumped from an argparse.Namespace), loaded torch-free,
and compared output for output."""
import argparse
import math

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402

from diffcleanse_jax.io import CheckpointError  # noqa: E402
from diffcleanse_jax.io.native import load_pretrained  # noqa: E402

pytestmark = pytest.mark.parity


def _norm(c):
  return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
  def __init__(self, cin, cout, temb):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.temb_proj = nn.Linear(temb, cout)
    self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = _norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (b, query, key)
    return x + self.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww))


class _Level(nn.Module):
  pass


class OriginalUNet(nn.Module):
  """The original DDPM UNet: levels of resnets (+ attention at chosen resolutions), skip concatenation,
  asymmetric-pad stride-2 conv down, nearest + conv up, [sin, cos] timestep features."""

  def __init__(self, ch, ch_mult, num_res_blocks, attn_res, resolution, cin=3):
    super().__init__()
    self.ch, self.nb = ch, num_res_blocks
    temb = 4 * ch
    self.temb = _Level()
    self.temb.dense = nn.ModuleList([nn.Linear(ch, temb), nn.Linear(temb, temb)])
    self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
    self.down, res, c = nn.ModuleList(), resolution, ch
    skips = [ch]
    for i, m in enumerate(ch_mult):
      lvl = _Level()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        lvl.block.append(_Res(c, ch * m, temb))
        c = ch * m
        skips.append(c)
        if res in attn_res:
          lvl.attn.append(_Attn(c))
      if i < len(ch_mult) - 1:
        lvl.downsample = _Level()
        lvl.downsample.conv = nn.Conv2d(c, c, 3, stride=2)
        res //= 2
        skips.append(c)
      self.down.append(lvl)
    self.mid = _Level()
    self.mid.block_1, self.mid.attn_1, self.mid.block_2 = _Res(c, c, temb), _Attn(c), _Res(c, c, temb)
    ups = []
    for i in reversed(range(len(ch_mult))):
      lvl = _Level()
      lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        lvl.block.append(_Res(c + skips.pop(), ch * ch_mult[i], temb))
        c = ch * ch_mult[i]
        if res in attn_res:
          lvl.attn.append(_Attn(c))
      if i > 0:
        lvl.upsample = _Level()
        lvl.upsample.conv = nn.Conv2d(c, c, 3, padding=1)
        res *= 2
      ups.insert(0, lvl)
    self.up = nn.ModuleList(ups)
    self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cin, 3, padding=1)

  def forward(self, x, t):
    half = self.ch // 2
    freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32))
    e = t.float()[:, None] * freqs[None]
    temb = self.temb.dense[1](F.silu(self.temb.dense[0](torch.cat([e.sin(), e.cos()], 1))))
    hs = [self.conv_in(x)]
    for i, lvl in enumerate(self.down):
      for j, blk in enumerate(lvl.block):
        h = blk(hs[-1], temb)
        hs.append(lvl.attn[j](h) if len(lvl.attn) else h)
      if hasattr(lvl, "downsample"):
        hs.append(lvl.downsample.conv(F.pad(hs[-1], (0, 1, 0, 1))))
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
    for lvl in reversed(self.up):
      for j, blk in enumerate(lvl.block):
        h = blk(torch.cat([h, hs.pop()], 1), temb)
        h = lvl.attn[j](h) if len(lvl.attn) else h
      if hasattr(lvl, "upsample"):
        h = lvl.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return self.conv_out(F.silu(self.norm_out(h)))


def _model(seed, **kw):
  torch.manual_seed(seed)
  m = OriginalUNet(**kw).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m


def _ddim_config(image_size, schedule="linear", var_type="fixedlarge"):
  ns = argparse.Namespace
  return ns(data=ns(image_size=image_size, channels=3, dataset="CIFAR10"),
            model=ns(type="simple", in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     attn_resolutions=[8], dropout=0.1, var_type=var_type, ema_rate=0.9999, ema=True,
                     resamp_with_conv=True),
            diffusion=ns(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=1000))


def _out(model, x, t):
  with torch.no_grad():
    return model(torch.from_numpy(x), torch.tensor(t)).numpy()


def test_ddim_log_folder_loads_with_parity(tmp_path):
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), resolution=16)
  raw, ema = _model(0, **kw), _model(1, **kw)
  opt = torch.optim.Adam(raw.parameters(), lr=2e-4)
  raw(torch.zeros(1, 3, 16, 16), torch.tensor([3])).sum().backward()
  opt.step()  # a real optimizer state (tensors, ints, tuples) in the pickle
  wrap = lambda sd: {"module." + k: v for k, v in sd.items()}  # noqa: E731  (DataParallel names)
  log_dir = tmp_path / "logs" / "trojdiff_run"
  log_dir.mkdir(parents=True)
  torch.save([wrap(raw.state_dict()), opt.state_dict(), 3, 1200, wrap(ema.state_dict())], log_dir / "ckpt.pth")
  with open(log_dir / "config.yml", "w") as f:
    yaml.dump(_ddim_config(16), f, default_flow_style=False)
  assert "!!python/object:argparse.Namespace" in (log_dir / "config.yml").read_text()

  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
  t = [7, 910]
  for use_ema, ref_model in ((True, ema), (False, raw)):
    model = load_pretrained(str(log_dir), use_ema=use_ema)
    assert model.image_shape == (16, 16, 3)
    assert model.config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert model.scheduler_config["variance_type"] == "fixed_large" and model.spec.dropout == 0.1
    got = np.asarray(model(x.transpose(0, 2, 3, 1), np.asarray(t))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, _out(ref_model, x, t), atol=1e-4, rtol=0)

  # Exported as a diffusers folder, diffusers itself reproduces the original network.
  diffusers = pytest.importorskip("diffusers")
  from diffcleanse_jax.workflows import export_model
  out = export_model({"seed": 0}, str(tmp_path / "export"), str(log_dir))
  theirs = diffusers.UNet2DModel.from_pretrained(out).eval()
  with torch.no_grad():
    np.testing.assert_allclose(theirs(torch.from_numpy(x), torch.tensor(t)).sample.numpy(), _out(ema, x, t),
                               atol=1e-4, rtol=0)

  # A bare state-dict file (pytorch_diffusion style) loads too; without a config.yml: 32x32 with a warning.
  torch.save(raw.state_dict(), tmp_path / "model.ckpt")
  bare = load_pretrained(str(tmp_path / "model.ckpt"))
  assert bare.image_shape == (32, 32, 3) and bare.num_params == sum(p.numel() for p in raw.parameters())
  # --mode=detect/cleanse/scan take such files and folders as models.
  from diffcleanse_jax.defense.workflow import list_model_dirs, load_model_dir
  assert load_model_dir(str(tmp_path / "model.ckpt")).num_params == bare.num_params
  (tmp_path / "notes.txt").write_text("not a model")
  assert list_model_dirs(str(tmp_path)) == ["export", "logs", "model.ckpt"]


def test_ddim_schedules_and_refusals(tmp_path):
  from diffcleanse_jax.io.original_ddpm import ddim_betas
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), resolution=16)
  m = _model(2, **kw)
  for schedule, check in (("quad", lambda s: s["beta_schedule"] == "scaled_linear"),
                          ("sigmoid", lambda s: len(s["trained_betas"]) == 1000)):
    d = tmp_path / schedule
    d.mkdir()
    torch.save([m.state_dict(), {}, 0, 0], d / "ckpt.pth")
    with open(d / "config.yml", "w") as f:
      yaml.dump(_ddim_config(16, schedule, "fixedsmall"), f)
    model = load_pretrained(str(d))
    assert check(model.scheduler_config) and model.scheduler_config["variance_type"] == "fixed_small"
    assert model.config["down_block_types"] == ["DownBlock2D", "DownBlock2D"]
  np.testing.assert_allclose(load_pretrained(str(tmp_path / "sigmoid")).schedule.betas,
                             ddim_betas("sigmoid", 1e-4, 0.02, 1000, "x").astype(np.float32), rtol=1e-6)
  # quad == diffusers scaled_linear (up to float32 rounding of the square root grid)
  quad = np.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000) ** 2
  np.testing.assert_allclose(load_pretrained(str(tmp_path / "quad")).schedule.betas, quad, rtol=1e-5)

  # A config.yml with an arbitrary python object is refused, never constructed.
  (tmp_path / "quad" / "config.yml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(CheckpointError, match=r"config.yml: refusing the YAML python tag"):
    load_pretrained(str(tmp_path / "quad"))
  # Not this layout / not a checkpoint.
  torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
  with pytest.raises(CheckpointError, match="not an original-DDPM"):
    load_pretrained(str(tmp_path / "other.pth"))
  torch.save([1, 2, 3], tmp_path / "list.pth")
  with pytest.raises(CheckpointError, match=r"expected a state dict or ddim's \[model state"):
    load_pretrained(str(tmp_path / "list.pth"))
  sd = {k: v for k, v in m.state_dict().items() if not k.startswith("down.0.downsample")}
  torch.save(sd, tmp_path / "avgpool.pth")
  with pytest.raises(CheckpointError, match="resamp_with_conv=False"):
    load_pretrained(str(tmp_path / "avgpool.pth"))
