"""A flax.linen re-statement of diffusers' `UNet2DModel`, driven by the same config keys.

Submodule names mirror the diffusers state dict with list indices folded in (`down_blocks.0.resnets.1.conv1`
-> `down_blocks_0/resnets_1/conv1`), so converting weights is a rename plus kernel transposes
(see `diffcleanse_jax.io.diffusers`). Activations are NHWC; the model maps a noisy image x (B,H,W,C) and
integer timesteps t (B,) to the predicted noise epsilon (B,H,W,out_channels).

Every Conv/Dense output width is read from `UNetSpec.widths` (module path -> features), which defaults to
what the config implies. A pruned model (non-uniform widths) is therefore rebuilt exactly from its config
plus the widths table; the *structure* (which layers exist, head counts, group counts) always comes from the
original config, never from the widths.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")

# diffusers UNet2DModel constructor defaults (diffusers 0.42.1). Old config.json files omit newer keys.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None, num_class_embeds=None,
    num_train_timesteps=None,
)


class ConfigError(ValueError):
  """A model config that cannot be built; the message names the field and what was expected."""


def _as_tuple(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Validated, hashable UNet2DModel config plus the per-layer widths table (only non-default entries)."""

  sample_size: int | None
  in_channels: int
  out_channels: int
  center_input_sample: bool
  time_embedding_type: str
  time_embedding_dim: int | None
  freq_shift: float
  flip_sin_to_cos: bool
  down_block_types: tuple[str, ...]
  mid_block_type: str | None
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  mid_block_scale_factor: float
  downsample_padding: int
  downsample_type: str
  upsample_type: str
  dropout: float
  act_fn: str
  attention_head_dim: int | None
  norm_num_groups: int
  attn_norm_num_groups: int | None
  norm_eps: float
  resnet_time_scale_shift: str
  add_attention: bool
  num_train_timesteps: int | None
  widths: tuple[tuple[str, int], ...] = ()

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, source: str = "model config", strict: bool = True,
                  widths: Mapping[str, int] | None = None) -> "UNetSpec":
    """Validates a diffusers-style dict. `strict` rejects unknown keys (typos); keys starting with '_' are
    metadata and ignored, except `_pruned_widths` which holds the widths table."""
    cfg = dict(config)
    pruned = cfg.pop("_pruned_widths", None)
    known = set(DIFFUSERS_DEFAULTS)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown and strict:
      k = unknown[0]
      hint = difflib.get_close_matches(k, sorted(known), n=1)
      raise ConfigError(f"{source}: unknown key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; valid keys: {', '.join(sorted(known))}")
    full = dict(DIFFUSERS_DEFAULTS)
    full.update({k: v for k, v in cfg.items() if k in known})
    full = {k: _as_tuple(v) for k, v in full.items()}

    def fail(key, msg):
      raise ConfigError(f"{source}: {key}={full.get(key)!r} {msg}")

    if full["class_embed_type"] is not None or full["num_class_embeds"] is not None:
      fail("class_embed_type", "is not supported (class-conditional UNets are out of scope); expected null")
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
      if not isinstance(full[key], int) or isinstance(full[key], bool) or full[key] < 1:
        fail(key, "must be a positive integer")
    boc = full["block_out_channels"]
    if not isinstance(boc, tuple) or not boc or not all(isinstance(c, int) and c > 0 for c in boc):
      fail("block_out_channels", "must be a non-empty list of positive integers")
    for key, valid in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
      types = full[key]
      if not isinstance(types, tuple) or len(types) != len(boc):
        fail(key, f"must be a list with one entry per block_out_channels ({len(boc)})")
      for i, bt in enumerate(types):
        if bt not in valid:
          raise ConfigError(f"{source}: {key}[{i}]={bt!r} is not a supported block type; expected one of "
                            f"{', '.join(valid)}")
    if full["mid_block_type"] not in ("UNetMidBlock2D", None):
      fail("mid_block_type", "is not supported; expected 'UNetMidBlock2D' or null")
    if full["time_embedding_type"] not in TIME_EMBEDDING_TYPES:
      fail("time_embedding_type", f"is not supported; expected one of {', '.join(TIME_EMBEDDING_TYPES)}")
    if full["time_embedding_type"] == "learned" and not full["num_train_timesteps"]:
      fail("num_train_timesteps", "must be set when time_embedding_type='learned'")
    if full["act_fn"] not in ACTIVATIONS:
      fail("act_fn", f"is not supported; expected one of {', '.join(ACTIVATIONS)}")
    if full["resnet_time_scale_shift"] not in ("default", "scale_shift"):
      fail("resnet_time_scale_shift", "is not supported; expected 'default' or 'scale_shift'")
    if full["downsample_type"] not in ("conv", "resnet"):
      fail("downsample_type", "is not supported; expected 'conv' or 'resnet'")
    if full["upsample_type"] not in ("conv", "resnet"):
      fail("upsample_type", "is not supported; expected 'conv' or 'resnet'")
    if full["downsample_padding"] not in (0, 1):
      fail("downsample_padding", "must be 0 or 1")
    g = full["norm_num_groups"]
    for i, c in enumerate(boc):
      if c % g:
        raise ConfigError(f"{source}: block_out_channels[{i}]={c} is not divisible by norm_num_groups={g}")
    ahd = full["attention_head_dim"]
    if ahd is not None:
      if not isinstance(ahd, int) or ahd < 1:
        fail("attention_head_dim", "must be a positive integer or null")
      for i, c in enumerate(boc):
        uses_attn = "Attn" in full["down_block_types"][i] or "Attn" in full["up_block_types"][len(boc) - 1 - i]
        if uses_attn and c % ahd:
          raise ConfigError(f"{source}: block_out_channels[{i}]={c} is not divisible by attention_head_dim={ahd}")
    ss = full["sample_size"]
    if isinstance(ss, tuple):
      if len(set(ss)) != 1:
        fail("sample_size", "must be square")
      ss = ss[0]
    if ss is not None:
      if isinstance(ss, bool) or not isinstance(ss, (int, float)) or int(ss) != ss or int(ss) < 1:
        fail("sample_size", "must be a positive integer (or null)")
      ss = int(ss)
      n_down = len(full["block_out_channels"]) - 1
      if ss % (2 ** n_down):
        fail("sample_size", f"is not divisible by 2**{n_down} (the UNet downsamples {n_down} times, so its skip "
                            "connections would not line up)")
    if pruned is not None and widths is None:
      widths = pruned
    return cls(
        sample_size=ss, in_channels=full["in_channels"], out_channels=full["out_channels"],
        center_input_sample=bool(full["center_input_sample"]),
        time_embedding_type=full["time_embedding_type"], time_embedding_dim=full["time_embedding_dim"],
        freq_shift=float(full["freq_shift"]), flip_sin_to_cos=bool(full["flip_sin_to_cos"]),
        down_block_types=full["down_block_types"], mid_block_type=full["mid_block_type"],
        up_block_types=full["up_block_types"], block_out_channels=boc,
        layers_per_block=full["layers_per_block"], mid_block_scale_factor=float(full["mid_block_scale_factor"]),
        downsample_padding=int(full["downsample_padding"]), downsample_type=full["downsample_type"],
        upsample_type=full["upsample_type"], dropout=float(full["dropout"]), act_fn=full["act_fn"],
        attention_head_dim=ahd, norm_num_groups=g, attn_norm_num_groups=full["attn_norm_num_groups"],
        norm_eps=float(full["norm_eps"]), resnet_time_scale_shift=full["resnet_time_scale_shift"],
        add_attention=bool(full["add_attention"]), num_train_timesteps=full["num_train_timesteps"],
    ).with_widths(widths or {})

  def with_widths(self, widths: Mapping[str, int]) -> "UNetSpec":
    """Returns a copy whose widths table is `widths` (entries equal to the default are dropped)."""
    defaults = default_widths(self)
    bad = sorted(set(widths) - set(defaults))
    if bad:
      raise ConfigError(f"widths table: unknown layer {bad[0]!r}; layers are module paths such as "
                        f"{next(iter(defaults))!r}")
    items = []
    for k in sorted(widths):
      w = int(widths[k])
      if w < 1:
        raise ConfigError(f"widths table: {k}={w} must be >= 1")
      if w != defaults[k]:
        items.append((k, w))
    return dataclasses.replace(self, widths=tuple(items))

  # ---------------------------------------------------------------- views
  def to_config(self) -> dict[str, Any]:
    """diffusers-compatible config dict (lists, not tuples); the widths table goes in `_pruned_widths`."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "widths"}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    d["class_embed_type"] = None
    d["num_class_embeds"] = None
    if self.widths:
      d["_pruned_widths"] = dict(self.widths)
    return d

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def width(self, path: str) -> int:
    for k, w in self.widths:
      if k == path:
        return w
    return default_widths(self)[path]


# ------------------------------------------------------------------------------------------ structure
def _resnet_layers(prefix: str, out: int, has_shortcut: bool, scale_shift: bool) -> list[tuple[str, int]]:
  layers = [(f"{prefix}/conv1", out), (f"{prefix}/time_emb_proj", 2 * out if scale_shift else out),
            (f"{prefix}/conv2", out)]
  if has_shortcut:
    layers.append((f"{prefix}/conv_shortcut", out))
  return layers


def _attn_layers(prefix: str, c: int) -> list[tuple[str, int]]:
  return [(f"{prefix}/to_q", c), (f"{prefix}/to_k", c), (f"{prefix}/to_v", c), (f"{prefix}/to_out_0", c)]


def walk(spec: UNetSpec) -> list[dict[str, Any]]:
  """The block list the forward pass follows, as plain records (used by the model, the converter and pruning).

  Each record: kind in {conv_in, resnet, attention, downsample, upsample, conv_out, ...}, path, and channel
  facts from the *original* config (in/out channels, whether a conv_shortcut exists, heads, concat split).
  """
  boc = spec.block_out_channels
  n = len(boc)
  ss = spec.resnet_time_scale_shift == "scale_shift"
  recs: list[dict[str, Any]] = [dict(kind="conv_in", path="conv_in", cin=spec.in_channels, cout=boc[0])]
  recs.append(dict(kind="time_embedding", path="time_embedding", cin=boc[0] * (2 if spec.time_embedding_type == "fourier" else 1),
                   cout=spec.time_embed_dim))
  out_ch = boc[0]
  skips = [boc[0]]
  for i, bt in enumerate(spec.down_block_types):
    in_ch, out_ch = out_ch, boc[i]
    heads = out_ch // (spec.attention_head_dim or out_ch)
    for j in range(spec.layers_per_block):
      cin = in_ch if j == 0 else out_ch
      recs.append(dict(kind="resnet", path=f"down_blocks_{i}/resnets_{j}", cin=cin, cout=out_ch,
                       shortcut=cin != out_ch, scale_shift=ss, groups=spec.norm_num_groups))
      if bt == "AttnDownBlock2D":
        recs.append(dict(kind="attention", path=f"down_blocks_{i}/attentions_{j}", c=out_ch, heads=heads,
                         groups=spec.norm_num_groups, rescale=1.0))
      skips.append(out_ch)
    if i < n - 1:
      if bt == "AttnDownBlock2D" and spec.downsample_type == "resnet":
        recs.append(dict(kind="resnet", path=f"down_blocks_{i}/downsamplers_0", cin=out_ch, cout=out_ch,
                         shortcut=False, scale_shift=ss, groups=spec.norm_num_groups, down=True))
      else:
        recs.append(dict(kind="downsample", path=f"down_blocks_{i}/downsamplers_0", c=out_ch,
                         padding=spec.downsample_padding))
      skips.append(out_ch)
  if spec.mid_block_type is not None:
    c = boc[-1]
    heads = c // (spec.attention_head_dim or c)
    attn_groups = spec.attn_norm_num_groups
    if attn_groups is None:
      attn_groups = spec.norm_num_groups if spec.resnet_time_scale_shift == "default" else None
    sf = spec.mid_block_scale_factor
    recs.append(dict(kind="resnet", path="mid_block/resnets_0", cin=c, cout=c, shortcut=False, scale_shift=ss,
                     groups=spec.norm_num_groups, output_scale=sf))
    if spec.add_attention:
      recs.append(dict(kind="attention", path="mid_block/attentions_0", c=c, heads=heads, groups=attn_groups,
                       rescale=sf))
    recs.append(dict(kind="resnet", path="mid_block/resnets_1", cin=c, cout=c, shortcut=False, scale_shift=ss,
                     groups=spec.norm_num_groups, output_scale=sf))
  rev = list(reversed(boc))
  out_ch = rev[0]
  for i, bt in enumerate(spec.up_block_types):
    prev_out, out_ch = out_ch, rev[i]
    in_ch = rev[min(i + 1, n - 1)]
    heads = out_ch // (spec.attention_head_dim or out_ch)
    nl = spec.layers_per_block + 1
    for j in range(nl):
      skip_ch = skips.pop()
      h_ch = prev_out if j == 0 else out_ch
      recs.append(dict(kind="resnet", path=f"up_blocks_{i}/resnets_{j}", cin=h_ch + skip_ch, cout=out_ch,
                       concat=(h_ch, skip_ch), shortcut=h_ch + skip_ch != out_ch, scale_shift=ss,
                       groups=spec.norm_num_groups))
      if bt == "AttnUpBlock2D":
        recs.append(dict(kind="attention", path=f"up_blocks_{i}/attentions_{j}", c=out_ch, heads=heads,
                         groups=spec.norm_num_groups, rescale=1.0))
    if i < n - 1:
      if bt == "AttnUpBlock2D" and spec.upsample_type == "resnet":
        recs.append(dict(kind="resnet", path=f"up_blocks_{i}/upsamplers_0", cin=out_ch, cout=out_ch,
                         shortcut=False, scale_shift=ss, groups=spec.norm_num_groups, up=True))
      else:
        recs.append(dict(kind="upsample", path=f"up_blocks_{i}/upsamplers_0", c=out_ch))
  recs.append(dict(kind="conv_out", path="conv_out", cin=boc[0], cout=spec.out_channels,
                   groups=spec.norm_num_groups))
  return recs


def default_widths(spec: UNetSpec) -> dict[str, int]:
  """Output features of every Conv/Dense in the model, as the config implies (module path -> width)."""
  out: dict[str, int] = {}
  for r in walk(spec):
    k = r["kind"]
    if k == "conv_in":
      out["conv_in"] = r["cout"]
    elif k == "time_embedding":
      out["time_embedding/linear_1"] = r["cout"]
      out["time_embedding/linear_2"] = r["cout"]
    elif k == "resnet":
      out.update(_resnet_layers(r["path"], r["cout"], r["shortcut"], r["scale_shift"]))
    elif k == "attention":
      out.update(_attn_layers(r["path"], r["c"]))
    elif k in ("downsample", "upsample"):
      out[f"{r['path']}/conv"] = r["c"]
    elif k == "conv_out":
      out["conv_out"] = r["cout"]
  return out


# ------------------------------------------------------------------------------------------ layers
def activation(name: str):
  return {"silu": nn.silu, "swish": nn.silu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
          "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}[name]


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers `get_timestep_embedding`: t (B,) -> (B, dim) float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(groups: int, eps: float, name: str):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D (pre-norm, 'default' or 'scale_shift' time conditioning, optional up/down)."""

  spec: UNetSpec
  rec: Any  # a frozen walk() record: tuple of items

  @nn.compact
  def __call__(self, x, temb, train: bool = False):
    r = dict(self.rec)
    p, s = r["path"], self.spec
    act = activation(s.act_fn)
    w = s.width
    h = act(_group_norm(r["groups"], s.norm_eps, "norm1")(x))
    if r.get("up"):
      x, h = _upsample_nearest(x), _upsample_nearest(h)
    elif r.get("down"):
      x, h = _avg_pool2(x), _avg_pool2(h)
    h = nn.Conv(w(f"{p}/conv1"), (3, 3), padding=((1, 1), (1, 1)), name="conv1")(h)
    t = nn.Dense(w(f"{p}/time_emb_proj"), name="time_emb_proj")(act(temb))[:, None, None, :]
    if r["scale_shift"]:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = _group_norm(r["groups"], s.norm_eps, "norm2")(h) * (1 + scale) + shift
    else:
      h = _group_norm(r["groups"], s.norm_eps, "norm2")(h + t)
    h = act(h)
    if s.dropout > 0:
      h = nn.Dropout(s.dropout, deterministic=not train)(h)
    h = nn.Conv(w(f"{p}/conv2"), (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
    if r["shortcut"]:
      x = nn.Conv(w(f"{p}/conv_shortcut"), (1, 1), padding="VALID", name="conv_shortcut")(x)
    out = x + h
    sf = r.get("output_scale", 1.0)
    return out / sf if sf != 1.0 else out


class AttentionBlock(nn.Module):
  """diffusers Attention as built by the Attn*Block2D / mid block: GroupNorm -> q,k,v -> softmax -> out, residual.

  The head count comes from the config; the per-head dim is the (possibly pruned) inner width // heads, and the
  softmax scale is 1/sqrt(head dim) as in diffusers' AttnProcessor2_0.
  """

  spec: UNetSpec
  rec: Any

  @nn.compact
  def __call__(self, x):
    r = dict(self.rec)
    p, s = r["path"], self.spec
    b, hh, ww, c = x.shape
    h = x
    if r["groups"] is not None:
      h = _group_norm(r["groups"], s.norm_eps, "group_norm")(h)
    h = h.reshape(b, hh * ww, c)
    heads = r["heads"]
    q = nn.Dense(s.width(f"{p}/to_q"), name="to_q")(h)
    k = nn.Dense(s.width(f"{p}/to_k"), name="to_k")(h)
    v = nn.Dense(s.width(f"{p}/to_v"), name="to_v")(h)
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % heads or v.shape[-1] % heads:
      raise ConfigError(f"{p}: attention widths q={q.shape[-1]} k={k.shape[-1]} v={v.shape[-1]} must agree "
                        f"(q == k) and be divisible by heads={heads}")
    dq, dv = q.shape[-1] // heads, v.shape[-1] // heads
    q = q.reshape(b, -1, heads, dq)
    k = k.reshape(b, -1, heads, dq)
    v = v.reshape(b, -1, heads, dv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(dq))
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, hh * ww, heads * dv)
    o = nn.Dense(s.width(f"{p}/to_out_0"), name="to_out_0")(o).reshape(b, hh, ww, -1)
    out = o + x
    return out / r["rescale"] if r["rescale"] != 1.0 else out


def _upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class _Resample(nn.Module):
  spec: UNetSpec
  rec: Any

  @nn.compact
  def __call__(self, x):
    r = dict(self.rec)
    feats = self.spec.width(f"{r['path']}/conv")
    if r["kind"] == "upsample":
      return nn.Conv(feats, (3, 3), padding=((1, 1), (1, 1)), name="conv")(_upsample_nearest(x))
    pad = ((0, 1), (0, 1)) if r["padding"] == 0 else ((1, 1), (1, 1))
    return nn.Conv(feats, (3, 3), strides=(2, 2), padding=pad, name="conv")(x)


def _frozen(rec: Mapping[str, Any]):
  return tuple(sorted(rec.items()))


class _Block(nn.Module):
  """A named container (down_blocks_i / mid_block / up_blocks_i) so that param paths mirror diffusers."""

  spec: UNetSpec
  recs: Any  # tuple of frozen records belonging to this container

  @nn.compact
  def __call__(self, h, temb, skips, train: bool = False):
    skips = list(skips)
    outputs = []
    for rec in self.recs:
      r = dict(rec)
      name = r["path"].split("/", 1)[1]
      if r["kind"] == "resnet":
        if "concat" in r:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResnetBlock(self.spec, rec, name=name)(h, temb, train)
      elif r["kind"] == "attention":
        h = AttentionBlock(self.spec, rec, name=name)(h)
      else:
        h = _Resample(self.spec, rec, name=name)(h)
      if self.name.startswith("down_blocks") and not (r["kind"] == "resnet" and _followed_by_attention(self.recs, rec)):
        outputs.append(h)
    return h, tuple(outputs), tuple(skips)


def _followed_by_attention(recs, rec) -> bool:
  i = list(recs).index(rec)
  return i + 1 < len(recs) and dict(recs[i + 1])["kind"] == "attention"


class UNet2DModel(nn.Module):
  """epsilon_theta(x, t): x (B,H,W,in_channels) NHWC float32 in [-1,1], t (B,) or scalar timesteps -> (B,H,W,out)."""

  spec: UNetSpec

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    s = self.spec
    if x.ndim != 4 or x.shape[-1] != s.in_channels:
      raise ConfigError(f"UNet input must be NHWC with {s.in_channels} channels, got shape {tuple(x.shape)}")
    n_down = len(s.block_out_channels) - 1
    if x.shape[1] % (2 ** n_down) or x.shape[2] % (2 ** n_down):
      raise ConfigError(f"UNet input spatial size {x.shape[1:3]} must be divisible by 2**{n_down}")
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if s.center_input_sample:
      x = 2 * x - 1.0
    recs = walk(s)
    c0 = s.block_out_channels[0]
    if s.time_embedding_type == "positional":
      temb = timestep_embedding(t, c0, s.flip_sin_to_cos, s.freq_shift)
    elif s.time_embedding_type == "fourier":
      wf = jax.lax.stop_gradient(self.param("time_proj", lambda k: {"weight": 16.0 * jax.random.normal(k, (c0,))})["weight"])
      xp = jnp.log(t.astype(jnp.float32))[:, None] * wf[None, :] * 2 * math.pi
      temb = jnp.concatenate([jnp.sin(xp), jnp.cos(xp)], axis=-1)  # diffusers never flips this one
    else:
      temb = nn.Embed(s.num_train_timesteps, c0, name="time_proj")(t.astype(jnp.int32))
    temb = TimeEmbedding(s, name="time_embedding")(temb)
    h = nn.Conv(s.width("conv_in"), (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(x)
    skips: tuple = (h,)
    containers: dict[str, list] = {}
    for r in recs:
      if "/" in r["path"]:
        containers.setdefault(r["path"].split("/", 1)[0], []).append(_frozen(r))
    for i in range(len(s.block_out_channels)):
      name = f"down_blocks_{i}"
      h, outs, _ = _Block(s, tuple(containers[name]), name=name)(h, temb, (), train)
      skips = skips + outs
    if "mid_block" in containers:
      h, _, _ = _Block(s, tuple(containers["mid_block"]), name="mid_block")(h, temb, (), train)
    for i in range(len(s.block_out_channels)):
      name = f"up_blocks_{i}"
      nres = s.layers_per_block + 1
      h, _, _ = _Block(s, tuple(containers[name]), name=name)(h, temb, skips[-nres:], train)
      skips = skips[:-nres]
    h = nn.silu(_group_norm(s.norm_num_groups, s.norm_eps, "conv_norm_out")(h))  # diffusers: always SiLU here
    out = nn.Conv(s.width("conv_out"), (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)
    if s.time_embedding_type == "fourier":
      out = out / t.astype(out.dtype)[:, None, None, None]
    return out


class TimeEmbedding(nn.Module):
  """linear_1 -> act -> linear_2, as diffusers TimestepEmbedding."""

  spec: UNetSpec

  @nn.compact
  def __call__(self, temb):
    s = self.spec
    h = nn.Dense(s.width("time_embedding/linear_1"), name="linear_1")(temb)
    h = nn.silu(h)  # diffusers' TimestepEmbedding always uses SiLU, whatever act_fn says
    return nn.Dense(s.width("time_embedding/linear_2"), name="linear_2")(h)


def _init_fn(spec: UNetSpec, image_size: int | None = None):
  """key -> the 'params' collection of `spec` (flax default initialisers)."""
  size = image_size or spec.sample_size or 32
  x = jnp.zeros((1, size, size, spec.in_channels), jnp.float32)
  return lambda k: UNet2DModel(spec).init(k, x, jnp.zeros((1,), jnp.int32))["params"]


def init_params(spec: UNetSpec, key: jax.Array, image_size: int | None = None) -> dict:
  """Random parameters for `spec` (flax default initialisers); returns the 'params' collection."""
  # One compiled init instead of hundreds of small eager ops. On the CPU it is compiled without XLA's backend
  # optimisations: the threefry/truncated-normal graph of every parameter otherwise takes ~20 s to compile for
  # even the tiny preset, ~5 s this way; the program runs once, and its values differ from the optimised
  # compile's by at most 1.2e-7 on the tiny preset (docs/RESULTS.md, "Test suite time").
  lowered = jax.jit(_init_fn(spec, image_size)).lower(key)
  opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=opts)(key)


def abstract_params(spec: UNetSpec, image_size: int | None = None) -> dict:
  """Shapes/dtypes of the parameter tree without allocating it (jax.ShapeDtypeStruct leaves)."""
  return jax.eval_shape(_init_fn(spec, image_size), jax.random.key(0))


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def param_paths(tree, prefix: str = "") -> Iterable[tuple[str, Any]]:
  """Yields ('a/b/kernel', leaf) for a nested dict."""
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      yield from param_paths(v, p)
    else:
      yield p, v
