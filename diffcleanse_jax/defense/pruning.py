"""Structured channel pruning of the Flax UNet2DModel (Diff-Cleanse stage 2; ALGORITHMS §5, ENGINEERING §4).

Channel groups ("spaces") are derived from `walk(spec)` -- the block list the forward pass follows -- without
tracing the model:

  * resnet-internal space (one per resnet): conv1 out, time_emb_proj out (both halves for scale_shift), norm2,
    conv2 in;
  * residual/stream spaces: conv_in out, conv2/conv_shortcut outs, attention to_out_0 outs, resample conv outs;
    spaces that are *added* together (identity shortcuts, attention residuals) are joined by union-find. Their
    consumers (norm1, conv1/conv_shortcut in, attention group_norm and to_q/k/v in, resample conv in,
    conv_norm_out, conv_out in) slice their input axis;
  * concat consumers (up-resnet norm1, conv1, conv_shortcut) see [h || skip]: the skip space sits at offset
    len(h) on the input axis;
  * attention inner space: to_q, to_k, to_v outs and to_out_0 in (one space, as torch_pruning's channel_groups
    with heads = 1). With heads > 1 the same number of channels is removed from every head (floor(n/heads) per
    head, exactly like the GroupNorm rule below), so the head count is kept and every head keeps the same dim;
  * time MLP: hidden (linear_1 out <-> linear_2 in) and output (linear_2 out <-> every time_emb_proj in);
  * never the image channels (conv_in in, conv_out out), never the fixed time_proj input.

GroupNorm rule (the reference's modified torch_pruning, ALGORITHMS §5.4): a group with GroupNorm members keeps
its group count; n = C - int(C (1 - rho)) channels are to be removed and floor(n / G) are removed from every
contiguous GroupNorm chunk, so at Diff-Cleanse ratios (1-3 %) GN-coupled groups are untouched and only the
GN-free groups shrink. A group can have several chunk constraints (GroupNorm groups, attention heads): it is
chunked by their least common multiple. Known approximation (shared with torch_pruning): a concat consumer's
norm1 chunks span the h/skip boundary, so after pruning its GroupNorm membership shifts.

Attention note: the softmax scale is 1/sqrt(current head dim) (diffusers AttnProcessor2_0), so removing attention
inner channels changes the scale slightly: masked and sliced attention differ unless q is rescaled by
sqrt(d_new/d_old) (`prune(..., rescale_attention=True)`; off by default, as in the reference). For the time-MLP
and GN-free conv groups, slicing equals zero-masking exactly (up to float summation order).

Importance: Taylor |W * G| (ALGORITHMS §5.2): G = sum_t dL_t/dtheta over t in [t_thr, T-1] (absolute value after
the sum), per member reduced over every axis but the channel axis, bias and GroupNorm members excluded, group
score = mean over members, normalised by its mean.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models import unet as unet_lib

SCORE_MODES = ("sum", "bd_minus_clean", "bd_only", "clean_only", "random")
_CONV_NAMES = ("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "conv")
_KNOWN_KINDS = ("conv_in", "time_embedding", "resnet", "attention", "downsample", "upsample", "conv_out")


class PruningError(ValueError):
  """A model that cannot be grouped or a pruning plan that does not fit it (the message names the block)."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One parameter axis (or a slice of it) that belongs to a channel group.

  leaf: param path 'down_blocks_0/resnets_0/conv1/kernel'; axis: the channel axis of that leaf; offset: where the
  group's channels start on that axis (non-zero for concat inputs and the shift half of a scale_shift projection);
  role: 'out' (producer kernel), 'in' (consumer kernel), 'bias' (producer bias), 'norm' (GroupNorm scale/bias).
  """

  leaf: str
  axis: int
  offset: int
  role: str

  @property
  def module(self) -> str:
    return self.leaf.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """A set of parameter axes whose channels must be removed together (a channel space after union-find)."""

  name: str  # the first producer module, e.g. 'time_embedding/linear_1', 'down_blocks_1/attentions_0/to_q'
  kind: str  # stream | resnet_internal | attention_inner | time_hidden | time_out
  size: int
  members: tuple[Member, ...]
  chunks: int  # channels are removed equally from `chunks` contiguous chunks (lcm of GroupNorm groups and heads)
  norms: tuple[str, ...]  # GroupNorm modules in the group
  blocks: tuple[str, ...]  # block paths (walk records) that touch the group

  @property
  def has_groupnorm(self) -> bool:
    return bool(self.norms)

  @property
  def scored_modules(self) -> tuple[str, ...]:
    """Modules whose kernels enter the Taylor score (bias and GroupNorm excluded), in member order."""
    out: list[str] = []
    for m in self.members:
      if m.role in ("out", "in") and m.module not in out:
        out.append(m.module)
    return tuple(out)

  def removal(self, ratio: float) -> tuple[int, int]:
    """(channels removed per chunk, total removed) at pruning ratio `ratio` under the GroupNorm/heads rule."""
    n = num_to_prune(self.size, ratio)
    chunk = self.size // self.chunks
    k = min(n // self.chunks, chunk - 1)
    return k, k * self.chunks


def num_to_prune(size: int, ratio: float) -> int:
  """n = C - int(C (1 - rho)) (torch_pruning's count, ALGORITHMS §5.3)."""
  if not 0.0 <= ratio < 1.0:
    raise PruningError(f"pruning ratio {ratio} must be in [0, 1)")
  return int(size) - int(size * (1.0 - ratio))


# ------------------------------------------------------------------------------------------ grouping
def _is_conv(module: str) -> bool:
  return module.rsplit("/", 1)[-1] in _CONV_NAMES


class _Builder:
  def __init__(self, spec: unet_lib.UNetSpec):
    self.spec = spec
    self.parent: list[int] = []
    self.size: list[int] = []
    self.kind: list[str] = []
    self.name: list[str] = []
    self.members: list[list[Member]] = []
    self.chunks: list[list[int]] = []
    self.norms: list[list[str]] = []
    self.blocks: list[list[str]] = []
    self.block = ""

  def width(self, module: str) -> int:
    return self.spec.width(module)

  def new(self, kind: str, size: int, name: str) -> int:
    i = len(self.parent)
    self.parent.append(i)
    self.size.append(int(size))
    self.kind.append(kind)
    self.name.append(name)
    self.members.append([])
    self.chunks.append([])
    self.norms.append([])
    self.blocks.append([])
    return i

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]
      i = self.parent[i]
    return i

  def union(self, a: int, b: int) -> int:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return ra
    if self.size[ra] != self.size[rb]:
      raise PruningError(f"cannot derive channel groups: block {self.block!r} adds tensors of {self.size[ra]} and "
                         f"{self.size[rb]} channels")
    lo, hi = min(ra, rb), max(ra, rb)
    self.parent[hi] = lo
    for attr in ("members", "chunks", "norms", "blocks"):
      getattr(self, attr)[lo].extend(getattr(self, attr)[hi])
    self.kind[lo] = self.kind[lo] if self.kind[lo] == self.kind[hi] else "stream"
    return lo

  def _add(self, s: int, m: Member) -> None:
    r = self.find(s)
    self.members[r].append(m)
    if self.block and self.block not in self.blocks[r]:
      self.blocks[r].append(self.block)

  def out(self, s: int, module: str, offset: int = 0) -> None:
    """`module`'s output channels [offset, offset + size) are group s (kernel out axis + bias)."""
    self._add(s, Member(f"{module}/kernel", 3 if _is_conv(module) else 1, offset, "out"))
    self._add(s, Member(f"{module}/bias", 0, offset, "bias"))

  def inp(self, s: int, module: str, offset: int = 0) -> None:
    self._add(s, Member(f"{module}/kernel", 2 if _is_conv(module) else 0, offset, "in"))

  def norm(self, s: int, module: str, groups: int | None, offset: int = 0) -> None:
    r = self.find(s)
    self._add(r, Member(f"{module}/scale", 0, offset, "norm"))
    self._add(r, Member(f"{module}/bias", 0, offset, "norm"))
    self.norms[r].append(module)
    if groups:
      self.chunks[r].append(int(groups))

  def sz(self, s: int) -> int:
    return self.size[self.find(s)]

  def check(self, s: int, module: str, expect: int) -> None:
    got = self.width(module)
    if got != expect:
      raise PruningError(f"cannot derive channel groups: block {self.block!r}: {module} has {got} output channels "
                         f"but its channel group has {expect}")


def channel_groups(spec: unet_lib.UNetSpec) -> list[ChannelGroup]:
  """All channel groups of the UNet described by `spec` (widths from its widths table, so pruned specs work).

  Raises PruningError naming the block when the architecture cannot be grouped.
  """
  recs = unet_lib.walk(spec)
  b = _Builder(spec)
  for r in recs:
    if r.get("kind") not in _KNOWN_KINDS:
      raise PruningError(f"cannot derive channel groups: block {r.get('path')!r} has kind {r.get('kind')!r}; "
                         f"pruning knows {', '.join(_KNOWN_KINDS)}")
  h: int | None = None
  tout: int | None = None
  skips: list[int] = []
  for idx, r in enumerate(recs):
    kind, p = r["kind"], r["path"]
    b.block = p
    if kind == "conv_in":
      h = b.new("stream", b.width("conv_in"), "conv_in")
      b.out(h, "conv_in")
      skips = [h]
      continue
    if kind == "time_embedding":
      hid = b.new("time_hidden", b.width("time_embedding/linear_1"), "time_embedding/linear_1")
      b.out(hid, "time_embedding/linear_1")
      b.inp(hid, "time_embedding/linear_2")
      tout = b.new("time_out", b.width("time_embedding/linear_2"), "time_embedding/linear_2")
      b.out(tout, "time_embedding/linear_2")
      continue
    if h is None:
      raise PruningError(f"cannot derive channel groups: block {p!r} comes before conv_in")
    if kind == "resnet":
      segs = [(h, 0)]
      if "concat" in r:
        if not skips:
          raise PruningError(f"cannot derive channel groups: block {p!r} concatenates a skip but none is left")
        skip = skips.pop()
        segs.append((skip, b.sz(h)))
      for s, off in segs:
        b.norm(s, f"{p}/norm1", r.get("groups"), off)
        b.inp(s, f"{p}/conv1", off)
        if r["shortcut"]:
          b.inp(s, f"{p}/conv_shortcut", off)
      inner = b.new("resnet_internal", b.width(f"{p}/conv1"), f"{p}/conv1")
      ci = b.sz(inner)
      b.out(inner, f"{p}/conv1")
      b.check(inner, f"{p}/time_emb_proj", ci * (2 if r["scale_shift"] else 1))
      b.out(inner, f"{p}/time_emb_proj", 0)
      if r["scale_shift"]:
        b.out(inner, f"{p}/time_emb_proj", ci)
      b.norm(inner, f"{p}/norm2", r.get("groups"))
      b.inp(inner, f"{p}/conv2")
      if tout is None:
        raise PruningError(f"cannot derive channel groups: block {p!r} needs a time embedding")
      b.inp(tout, f"{p}/time_emb_proj")
      if r["shortcut"]:
        o = b.new("stream", b.width(f"{p}/conv2"), f"{p}/conv2")
        b.out(o, f"{p}/conv2")
        b.check(o, f"{p}/conv_shortcut", b.sz(o))
        b.out(o, f"{p}/conv_shortcut")
        h = o
      else:
        if len(segs) > 1:
          raise PruningError(f"cannot derive channel groups: block {p!r} adds its concatenated input to its output "
                             "through an identity shortcut (the output space would be split)")
        o = b.new("stream", b.width(f"{p}/conv2"), f"{p}/conv2")
        b.out(o, f"{p}/conv2")
        h = b.union(h, o)  # identity shortcut: x + h
    elif kind == "attention":
      if r.get("groups"):
        b.norm(h, f"{p}/group_norm", r["groups"])
      for q in ("to_q", "to_k", "to_v"):
        b.inp(h, f"{p}/{q}")
      heads = int(r.get("heads") or 1)
      inner = b.new("attention_inner", b.width(f"{p}/to_q"), f"{p}/to_q")
      for q in ("to_k", "to_v"):
        b.check(inner, f"{p}/{q}", b.sz(inner))
      for q in ("to_q", "to_k", "to_v"):
        b.out(inner, f"{p}/{q}")
      b.inp(inner, f"{p}/to_out_0")
      if heads > 1:
        b.chunks[b.find(inner)].append(heads)
      o = b.new("stream", b.width(f"{p}/to_out_0"), f"{p}/to_out_0")
      b.out(o, f"{p}/to_out_0")
      h = b.union(h, o)  # attention residual
    elif kind in ("downsample", "upsample"):
      b.inp(h, f"{p}/conv")
      o = b.new("stream", b.width(f"{p}/conv"), f"{p}/conv")
      b.out(o, f"{p}/conv")
      h = o
    elif kind == "conv_out":
      b.norm(h, "conv_norm_out", r.get("groups"))
      b.inp(h, "conv_out")
    if p.startswith("down_blocks"):
      nxt = recs[idx + 1] if idx + 1 < len(recs) else None
      followed = (kind == "resnet" and nxt is not None and nxt["kind"] == "attention"
                  and nxt["path"].split("/")[0] == p.split("/")[0])
      if not followed:
        skips.append(h)
  if skips:
    raise PruningError(f"cannot derive channel groups: {len(skips)} skip connection(s) were never consumed by an "
                       "up block")
  roots = sorted({b.find(i) for i in range(len(b.parent))})
  groups = []
  for r in roots:
    c = b.size[r]
    chunks = 1
    for g in b.chunks[r]:
      chunks = chunks * g // math.gcd(chunks, g)
    if c % chunks:
      raise PruningError(f"cannot derive channel groups: group {b.name[r]!r} ({c} channels) is not divisible by its "
                         f"GroupNorm/head chunk count {chunks} (blocks {', '.join(b.blocks[r][:3])})")
    groups.append(ChannelGroup(name=b.name[r], kind=b.kind[r], size=c, members=tuple(b.members[r]), chunks=chunks,
                               norms=tuple(dict.fromkeys(b.norms[r])), blocks=tuple(b.blocks[r])))
  return groups


def axis_layout(groups: Sequence[ChannelGroup]) -> dict[tuple[str, int], list[tuple[str, int]]]:
  """(leaf, axis) -> [(group name, offset), ...] sorted by offset: how every grouped axis is composed."""
  lay: dict[tuple[str, int], list[tuple[str, int]]] = {}
  for g in groups:
    for m in g.members:
      lay.setdefault((m.leaf, m.axis), []).append((g.name, m.offset))
  for k in lay:
    lay[k].sort(key=lambda e: e[1])
  return lay


def summarize_groups(groups: Sequence[ChannelGroup], ratio: float) -> list[dict[str, Any]]:
  """One JSON-able row per group: name, kind, size, chunks, GroupNorm, members, removed at `ratio`."""
  rows = []
  for g in groups:
    k, n = g.removal(ratio)
    rows.append(dict(name=g.name, kind=g.kind, size=g.size, chunks=g.chunks, groupnorm=g.has_groupnorm,
                     scored_members=len(g.scored_modules), num_to_prune=num_to_prune(g.size, ratio),
                     removed=n, kept=g.size - n))
  return rows


# ------------------------------------------------------------------------------------------ plans and slicing
def _group_map(groups: Sequence[ChannelGroup]) -> dict[str, ChannelGroup]:
  return {g.name: g for g in groups}


def _check_keep(groups: Sequence[ChannelGroup], keep: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
  gm = _group_map(groups)
  out: dict[str, np.ndarray] = {}
  for name, idx in keep.items():
    if name not in gm:
      raise PruningError(f"keep: unknown channel group {name!r}; groups are e.g. {', '.join(list(gm)[:4])}")
    g = gm[name]
    a = np.asarray(idx, np.int64).reshape(-1)
    if a.size == 0:
      raise PruningError(f"keep[{name!r}]: at least one channel must be kept")
    if np.any(a < 0) or np.any(a >= g.size) or len(np.unique(a)) != a.size:
      raise PruningError(f"keep[{name!r}]: indices must be unique and in [0, {g.size})")
    if a.size % g.chunks:
      raise PruningError(f"keep[{name!r}]: {a.size} kept channels is not divisible by the group's GroupNorm/head "
                         f"chunk count {g.chunks} (blocks {', '.join(g.blocks[:3])})")
    out[name] = np.sort(a)
  return out


def pruned_spec(spec: unet_lib.UNetSpec, groups: Sequence[ChannelGroup],
                new_sizes: Mapping[str, int]) -> unet_lib.UNetSpec:
  """The spec after giving group g `new_sizes[g]` channels (others unchanged); no weights needed."""
  sizes = {g.name: int(new_sizes.get(g.name, g.size)) for g in groups}
  widths = dict(unet_lib.default_widths(spec))
  widths.update(dict(spec.widths))
  for (leaf, axis), segs in axis_layout(groups).items():
    module, kind = leaf.rsplit("/", 1)
    if kind != "kernel" or axis != (3 if _is_conv(module) else 1):
      continue
    widths[module] = sum(sizes[name] for name, _ in segs)
  return spec.with_widths(widths)


def plan_by_ratio(groups: Sequence[ChannelGroup], ratio: float,
                  saliency: Mapping[str, np.ndarray] | None = None,
                  only: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """Kept indices per group at `ratio`: in every chunk remove the `k` channels with the highest saliency (ties:
  lower index first); without saliency remove the last k of every chunk. Groups where nothing is removed are
  omitted. `only` restricts pruning to the named groups."""
  only = set(only) if only is not None else None
  keep: dict[str, np.ndarray] = {}
  for g in groups:
    if only is not None and g.name not in only:
      continue
    k, n = g.removal(ratio)
    if n == 0:
      continue
    chunk = g.size // g.chunks
    sal = None if saliency is None else np.asarray(saliency[g.name], np.float64)
    kept = []
    for j in range(g.chunks):
      lo = j * chunk
      if sal is None:
        removed = np.arange(lo + chunk - k, lo + chunk)
      else:
        order = np.argsort(-sal[lo:lo + chunk], kind="stable")
        removed = lo + order[:k]
      kept.append(np.setdiff1d(np.arange(lo, lo + chunk), removed))
    keep[g.name] = np.concatenate(kept)
  return keep


def _flat(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def _axis_index(segs, keep: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> np.ndarray:
  parts = [off + (keep[name] if name in keep else np.arange(sizes[name])) for name, off in segs]
  return np.concatenate(parts)


def prune(model: DiffusionModel, keep: Mapping[str, Sequence[int]], groups: Sequence[ChannelGroup] | None = None,
          rescale_attention: bool = False) -> DiffusionModel:
  """Physically removes channels: `keep[group name]` = kept channel indices (groups not listed keep everything).

  Returns a new DiffusionModel whose spec records the new widths (`spec.with_widths`), so it saves to and reloads
  from both formats exactly. `rescale_attention=True` multiplies to_q by sqrt(d_new/d_old) per attention layer so
  the pruned attention equals the zero-masked one (the reference does not do this)."""
  groups = list(groups) if groups is not None else channel_groups(model.spec)
  keep = _check_keep(groups, keep)
  sizes = {g.name: g.size for g in groups}
  flat = _flat(model.params)
  out = {k: np.asarray(v) for k, v in flat.items()}
  for (leaf, axis), segs in axis_layout(groups).items():
    if leaf not in out:
      raise PruningError(f"prune: parameter {leaf} is missing from the model (block {leaf.rsplit('/', 2)[0]!r})")
    total = sum(sizes[n] for n, _ in segs)
    if out[leaf].shape[axis] != total or any(off != sum(sizes[n] for n, _ in segs[:i]) for i, (_, off) in
                                             enumerate(segs)):
      raise PruningError(f"prune: parameter {leaf} axis {axis} has {out[leaf].shape[axis]} entries but its channel "
                         f"groups ({', '.join(n for n, _ in segs)}) account for {total}")
    if not any(n in keep for n, _ in segs):
      continue
    out[leaf] = np.take(out[leaf], _axis_index(segs, keep, sizes), axis=axis)
  new_sizes = {n: len(k) for n, k in keep.items()}
  if rescale_attention:
    for g in groups:
      if g.kind == "attention_inner" and g.name in new_sizes:
        f = math.sqrt(new_sizes[g.name] / g.size)
        q = g.name  # .../to_q
        out[f"{q}/kernel"] = out[f"{q}/kernel"] * np.float32(f)
        out[f"{q}/bias"] = out[f"{q}/bias"] * np.float32(f)
  spec = pruned_spec(model.spec, groups, new_sizes)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in out.items()}, sep="/")
  want = _flat(unet_lib.abstract_params(spec, model.image_shape[0]))
  for k, v in want.items():
    if k not in out or tuple(out[k].shape) != tuple(v.shape):
      raise PruningError(f"prune: internal shape mismatch at {k}: sliced {None if k not in out else out[k].shape}, "
                         f"spec implies {v.shape}")
  removed = {n: sizes[n] - len(k) for n, k in keep.items() if sizes[n] != len(k)}
  meta = dict(model.metadata)
  meta["pruning"] = dict(meta.get("pruning", {}), removed=dict(removed))
  return model.replace(spec=spec, params=params, metadata=meta)


def mask_channels(model: DiffusionModel, keep: Mapping[str, Sequence[int]],
                  groups: Sequence[ChannelGroup] | None = None) -> DiffusionModel:
  """Zero-masks instead of removing: every member entry of a removed channel (producer rows and biases, consumer
  columns, GroupNorm affine) is set to 0; shapes stay. Exactly equivalent to `prune` for GN-free groups other
  than attention (see the module docstring)."""
  groups = list(groups) if groups is not None else channel_groups(model.spec)
  keep = _check_keep(groups, keep)
  gm = _group_map(groups)
  out = {k: np.array(v) for k, v in _flat(model.params).items()}
  for name, kept in keep.items():
    g = gm[name]
    removed = np.setdiff1d(np.arange(g.size), kept)
    for m in g.members:
      a = out[m.leaf]
      sl = [slice(None)] * a.ndim
      sl[m.axis] = m.offset + removed
      a[tuple(sl)] = 0.0
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in out.items()}, sep="/")
  return model.replace(params=params)


# ------------------------------------------------------------------------------------------ Taylor importance
def make_grad_fn(eps_fn: Callable, alphas_cumprod: Any):
  """jitted (params, x0 (B,...), noise (B,...), trigger (H,W,C), ts (k,), w (k,)) -> sum_i w_i dL_{ts_i}/dtheta.

  L_t = MSE(eps_theta(sqrt(abar_t) x0 + sqrt(1-abar_t)(noise + trigger), t), noise) (mean over all elements;
  trigger = 0 gives the clean loss; ALGORITHMS §5.1). The k timesteps run as one batch of k*B."""
  acp = jnp.asarray(np.asarray(alphas_cumprod), jnp.float32)

  def loss(params, x0, noise, trigger, ts, w):
    k, bsz = ts.shape[0], x0.shape[0]
    a = acp[ts][:, None, None, None, None]
    x = jnp.sqrt(a) * x0[None] + jnp.sqrt(1.0 - a) * (noise + trigger)[None]
    x = x.reshape((k * bsz,) + x0.shape[1:])
    t = jnp.repeat(ts, bsz)
    pred = eps_fn(params, x, t).reshape((k, bsz) + x0.shape[1:])
    mse = jnp.mean((pred - noise[None]) ** 2, axis=tuple(range(1, pred.ndim)))
    return jnp.sum(w * mse)

  return jax.jit(jax.grad(loss))


def accumulate_grads(grad_fn, params, x0, noise, trigger, t_values: Sequence[int], t_chunk: int = 10):
  """sum_{t in t_values} dL_t/dtheta, `t_chunk` timesteps per call (the last chunk zero-weight padded)."""
  t_values = np.asarray(list(t_values), np.int32)
  if t_values.size == 0:
    raise PruningError("importance: the timestep window is empty")
  k = max(1, min(int(t_chunk), t_values.size))
  trig = jnp.zeros(x0.shape[1:], jnp.float32) if trigger is None else jnp.asarray(trigger, jnp.float32)
  total = None
  for i in range(0, t_values.size, k):
    ts = t_values[i:i + k]
    w = np.ones(k, np.float32)
    if ts.size < k:
      w[ts.size:] = 0.0
      ts = np.concatenate([ts, np.full(k - ts.size, ts[-1], np.int32)])
    g = grad_fn(params, x0, noise, trig, jnp.asarray(ts), jnp.asarray(w))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return total


def group_importance(groups: Sequence[ChannelGroup], params, grads) -> dict[str, np.ndarray]:
  """Normalised Taylor importance per group (C,): I[c] = mean over scored modules of sum |W*G| over the channel's
  entries, divided by mean_c I[c]. Bias and GroupNorm members are skipped (ALGORITHMS §5.2)."""
  fp, fg = _flat(params), _flat(grads)
  cache: dict[tuple[str, int], np.ndarray] = {}

  def red(leaf, axis):
    if (leaf, axis) not in cache:
      wg = np.abs(np.asarray(fp[leaf], np.float64) * np.asarray(fg[leaf], np.float64))
      cache[(leaf, axis)] = wg.sum(axis=tuple(i for i in range(wg.ndim) if i != axis))
    return cache[(leaf, axis)]

  out = {}
  for g in groups:
    per_module: dict[str, np.ndarray] = {}
    for m in g.members:
      if m.role not in ("out", "in"):
        continue
      v = red(m.leaf, m.axis)[m.offset:m.offset + g.size]
      per_module[m.module] = per_module.get(m.module, 0.0) + v
    imp = np.mean(np.stack(list(per_module.values())), axis=0) if per_module else np.zeros(g.size)
    mean = float(np.mean(imp))
    out[g.name] = imp / mean if mean > 0 else imp
  return out


def saliency(imp_bd: Mapping[str, np.ndarray], imp_cl: Mapping[str, np.ndarray] | None, mode: str = "sum",
             key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """Per-channel saliency (higher = removed first). The reference's score is S = -saliency, pruned in ascending
  order (ALGORITHMS §5.3): sum = I_bd + I_cl (code, default), bd_minus_clean = I_bd - I_cl (its comment),
  bd_only = I_bd, clean_only = I_cl, random = uniform noise (baseline, needs `key`)."""
  if mode not in SCORE_MODES:
    raise PruningError(f"score_mode={mode!r}; expected one of {', '.join(SCORE_MODES)}")
  names = list(imp_bd) if imp_bd is not None else list(imp_cl)
  out = {}
  for i, n in enumerate(names):
    if mode == "random":
      if key is None:
        raise PruningError("score_mode='random' needs a PRNG key")
      out[n] = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (len((imp_bd or imp_cl)[n]),)))
    elif mode == "sum":
      out[n] = imp_bd[n] + imp_cl[n]
    elif mode == "bd_minus_clean":
      out[n] = imp_bd[n] - imp_cl[n]
    elif mode == "bd_only":
      out[n] = np.asarray(imp_bd[n])
    else:
      out[n] = np.asarray(imp_cl[n])
  return out


def timestep_window(num_train_timesteps: int, t_threshold: int, stride: int = 1) -> np.ndarray:
  """t in [t_threshold, T-1] (every `stride`-th, always ending at T-1)."""
  T = int(num_train_timesteps)
  if not 0 <= int(t_threshold) < T:
    raise PruningError(f"t_threshold={t_threshold} must be in [0, {T - 1}]")
  return np.arange(T - 1, int(t_threshold) - 1, -max(1, int(stride)))[::-1].astype(np.int32)


def taylor_importance(model: DiffusionModel, groups: Sequence[ChannelGroup], x0, noise, trigger,
                      t_threshold: int = 900, t_stride: int = 1, t_chunk: int = 10, need_clean: bool = True,
                      log: Callable[[str], None] = logging.info) -> dict[str, dict[str, np.ndarray]]:
  """{'bd': I_bd, 'clean': I_cl} per group from one batch x0 and one fixed noise (ALGORITHMS §5.1-5.2)."""
  grad_fn = make_grad_fn(model.apply, model.schedule.alphas_cumprod)
  ts = timestep_window(model.schedule.num_train_timesteps, t_threshold, t_stride)
  x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  out = {}
  for name, trig in (("clean", None), ("bd", trigger)):
    if name == "clean" and not need_clean:
      continue
    t0 = time.time()
    g = accumulate_grads(grad_fn, model.params, x0, noise, trig, ts, t_chunk)
    out[name] = group_importance(groups, model.params, g)
    log(f"importance ({name}): {ts.size} timesteps x batch {x0.shape[0]} in {time.time() - t0:.1f}s")
  return out


# ------------------------------------------------------------------------------------------ misc
def forward_flops(model: DiffusionModel, batch: int = 1) -> float | None:
  """FLOPs of one forward pass (XLA cost analysis of the lowered program), or None if unavailable."""
  x = jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), model.params)
  try:
    ca = jax.jit(model.apply).lower(p, x, t).cost_analysis()
  except Exception:  # noqa: BLE001 - cost analysis is best-effort on some backends
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])
