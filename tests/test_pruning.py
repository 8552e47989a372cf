"""Channel groups, the GroupNorm rule, structured slicing and Taylor importance (defense/pruning.py)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

from diffcleanse_jax.defense import pruning as P
from diffcleanse_jax.io.native import load_pretrained, save_pretrained
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models import unet as unet_lib
from diffcleanse_jax.models.presets import preset
from diffcleanse_jax.models.unet import UNetSpec, abstract_params, count_params

CIFAR_GN_FREE = {
    "time_embedding/linear_1", "time_embedding/linear_2",
    "down_blocks_1/attentions_0/to_q", "down_blocks_1/attentions_1/to_q", "mid_block/attentions_0/to_q",
    "up_blocks_2/attentions_0/to_q", "up_blocks_2/attentions_1/to_q", "up_blocks_2/attentions_2/to_q",
    "up_blocks_0/resnets_2/conv2", "up_blocks_1/resnets_2/conv2"}


def _tiny_cfg(**kw):
  cfg = preset("tiny")
  cfg.update(kw)
  return cfg


def _model(cfg=None, seed=0, scale=0.1):
  """A tiny model with non-zero biases/GroupNorm affines (flax initialises biases to zero)."""
  m = DiffusionModel.from_config(cfg or preset("tiny"), key=seed)
  rng = np.random.default_rng(seed + 1)  # numpy noise: eager jax.random per leaf shape compiles for ~30 s
  return m.replace(params=jax.tree.map(lambda l: l + scale * rng.standard_normal(l.shape, np.float32), m.params))


def _inputs(model, n=2):
  x = jax.random.normal(jax.random.key(7), (n, *model.image_shape))
  return x, jnp.array([3, 950][:n], jnp.int32)


def test_cifar_groups_gn_rule_and_reference_parameter_counts():
  spec = UNetSpec.from_config(preset("ddpm-cifar10-32"))
  groups = P.channel_groups(spec)
  assert len(groups) == 50  # torch_pruning's DepGraph finds 50 as well (ALGORITHMS §5.4)
  assert {g.name for g in groups if not g.has_groupnorm} == CIFAR_GN_FREE
  by_name = {g.name: g for g in groups}
  assert len(by_name["time_embedding/linear_2"].scored_modules) == 23  # linear_2 + 22 time_emb_proj
  assert len(by_name["time_embedding/linear_1"].scored_modules) == 2
  assert len(by_name["mid_block/attentions_0/to_q"].scored_modules) == 4
  assert len(by_name["up_blocks_0/resnets_2/conv2"].scored_modules) == 3
  base = count_params(abstract_params(spec))
  assert base == 35_746_307
  for ratio, want in ((0.01, 35_660_249), (0.02, 35_580_386)):
    keep = P.plan_by_ratio(groups, ratio)
    assert set(keep) == CIFAR_GN_FREE  # exactly the 10 GN-free groups are pruned
    new = P.pruned_spec(spec, groups, {n: len(k) for n, k in keep.items()})
    assert count_params(abstract_params(new)) == want


def _check_layout(spec):
  groups = P.channel_groups(spec)
  shapes = traverse_util.flatten_dict(abstract_params(spec), sep="/")
  sizes = {g.name: g.size for g in groups}
  for (leaf, axis), segs in P.axis_layout(groups).items():
    assert leaf in shapes, leaf
    off = 0
    for name, o in segs:
      assert o == off, (leaf, segs)
      off += sizes[name]
    assert off == shapes[leaf].shape[axis], (leaf, axis, segs)
  return groups


@pytest.mark.parametrize("name", ["tiny", "ddpm-cifar10-32"])
def test_groups_cover_axes_exactly_and_never_touch_image_channels(name):
  groups = _check_layout(UNetSpec.from_config(preset(name)))
  for g in groups:
    for m in g.members:
      assert (m.leaf, m.axis) != ("conv_in/kernel", 2)
      assert not (m.leaf.startswith("conv_out/") and m.role in ("out", "bias"))
      assert not m.leaf.startswith("time_proj")


def test_layout_of_scale_shift_and_resnet_resampling_variants():
  cfg = _tiny_cfg(resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet",
                  attention_head_dim=8)
  spec = UNetSpec.from_config(cfg)
  groups = _check_layout(spec)
  inner = {g.name: g for g in groups}["down_blocks_0/resnets_0/conv1"]
  offs = sorted(m.offset for m in inner.members if m.leaf.endswith("time_emb_proj/kernel"))
  assert offs == [0, inner.size]  # scale and shift halves
  att = {g.name: g for g in groups}["down_blocks_1/attentions_0/to_q"]
  assert att.chunks == 2  # 16 channels, head dim 8 -> 2 heads
  m = _model(cfg)
  pruned = P.prune(m, P.plan_by_ratio(groups, 0.5), groups)
  x, t = _inputs(m)
  assert pruned(x, t).shape == x.shape


def test_groupnorm_rule_small_ratio_untouched_half_ratio_floor_per_chunk():
  spec = UNetSpec.from_config(preset("tiny"))  # 4 GroupNorm groups
  groups = P.channel_groups(spec)
  keep = P.plan_by_ratio(groups, 0.03)
  assert all(not g.has_groupnorm for g in groups if g.name in keep)
  sal = {g.name: np.random.default_rng(0).random(g.size) for g in groups}
  keep = P.plan_by_ratio(groups, 0.5, sal)
  for g in groups:
    n = P.num_to_prune(g.size, 0.5)
    per = n // g.chunks
    chunk = g.size // g.chunks
    kept = keep.get(g.name, np.arange(g.size))
    counts = np.bincount(kept // chunk, minlength=g.chunks)
    assert np.all(counts == chunk - per), g.name
    # inside every chunk the removed channels are the most salient ones
    for j in range(g.chunks):
      lo = j * chunk
      removed = np.setdiff1d(np.arange(lo, lo + chunk), kept)
      rest = np.intersect1d(np.arange(lo, lo + chunk), kept)
      if removed.size:
        assert sal[g.name][removed].min() >= sal[g.name][rest].max()
  gn = [g for g in groups if g.has_groupnorm and g.size == 16]
  assert gn and all(len(keep[g.name]) == 8 for g in gn)  # 16 channels, 4 GN chunks: 2 of 4 removed per chunk


def test_keep_all_is_bit_exact_identity():
  m = _model()
  groups = P.channel_groups(m.spec)
  same = P.prune(m, {g.name: np.arange(g.size) for g in groups}, groups)
  assert same.spec == m.spec
  x, t = _inputs(m)
  np.testing.assert_array_equal(np.asarray(same(x, t)), np.asarray(m(x, t)))


def test_sliced_equals_masked_for_time_mlp_and_gn_free_conv_groups():
  # UpBlock2D up_blocks_0 with an upsampler: its last resnet's output space is GN-free (feeds the upsampler conv)
  cfg = _tiny_cfg(down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                 add_attention=False)
  m = _model(cfg)
  groups = P.channel_groups(m.spec)
  free = {g.name: g for g in groups if not g.has_groupnorm}
  assert set(free) == {"time_embedding/linear_1", "time_embedding/linear_2", "up_blocks_0/resnets_1/conv2"}
  rng = np.random.default_rng(0)
  keep = {n: np.sort(rng.choice(g.size, g.size // 2, replace=False)) for n, g in free.items()}
  sliced, masked = P.prune(m, keep, groups), P.mask_channels(m, keep, groups)
  assert sliced.num_params < m.num_params
  x, t = _inputs(m)
  np.testing.assert_allclose(np.asarray(sliced(x, t)), np.asarray(masked(x, t)), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(masked(x, t)), np.asarray(m(x, t)), atol=1e-3)  # the mask did something


def test_attention_slicing_changes_the_softmax_scale_unless_rescaled():
  m = _model()
  groups = P.channel_groups(m.spec)
  name = "mid_block/attentions_0/to_q"
  keep = {name: np.arange(0, 16, 2)}
  masked = P.mask_channels(m, keep, groups)
  x, t = _inputs(m)
  ref = np.asarray(masked(x, t))
  plain = np.asarray(P.prune(m, keep, groups)(x, t))
  fixed = np.asarray(P.prune(m, keep, groups, rescale_attention=True)(x, t))
  np.testing.assert_allclose(fixed, ref, rtol=1e-5, atol=1e-5)  # q * sqrt(d'/d): exactly the masked model
  assert np.abs(plain - ref).max() > 1e-4  # 1/sqrt(head dim) follows the pruned width (like diffusers)


def test_random_pruning_of_every_group_runs_matches_arithmetic_and_reloads(tmp_path):
  m = _model()
  groups = P.channel_groups(m.spec)
  sal = {g.name: np.random.default_rng(1).random(g.size) for g in groups}
  keep = P.plan_by_ratio(groups, 0.5, sal)
  assert len(keep) == len(groups)  # every group, GroupNorm ones included
  pruned = P.prune(m, keep, groups)
  assert pruned.num_params == count_params(abstract_params(pruned.spec))
  assert pruned.num_params == count_params(abstract_params(
      P.pruned_spec(m.spec, groups, {n: len(k) for n, k in keep.items()})))
  x, t = _inputs(m)
  y = np.asarray(pruned(x, t))
  assert y.shape == x.shape and np.all(np.isfinite(y))
  for fmt in ("diffusers", "native"):
    back = load_pretrained(save_pretrained(pruned, str(tmp_path / fmt), format=fmt))
    assert back.spec == pruned.spec
    np.testing.assert_allclose(np.asarray(back(x, t)), y, rtol=1e-6, atol=1e-6)
  # groups of a pruned spec are derived from its widths: pruning again works
  again = P.prune(pruned, P.plan_by_ratio(P.channel_groups(pruned.spec), 0.5), None)
  assert again.num_params < pruned.num_params


def test_keep_plan_validation_names_the_problem():
  m = _model()
  groups = P.channel_groups(m.spec)
  gn = next(g for g in groups if g.has_groupnorm)
  with pytest.raises(P.PruningError, match="chunk count"):
    P.prune(m, {gn.name: np.arange(gn.size - 1)}, groups)
  with pytest.raises(P.PruningError, match="unknown channel group"):
    P.prune(m, {"nope": [0]}, groups)


def test_unknown_block_kind_is_an_error_naming_the_block(monkeypatch):
  real = unet_lib.walk

  def fake(spec):
    recs = real(spec)
    return recs[:3] + [dict(kind="transformer", path="down_blocks_0/transformers_0")] + recs[3:]

  monkeypatch.setattr(unet_lib, "walk", fake)
  with pytest.raises(P.PruningError, match="down_blocks_0/transformers_0"):
    P.channel_groups(UNetSpec.from_config(preset("tiny")))


def test_taylor_gradient_matches_a_batched_sum_and_finite_differences_and_the_score_by_hand():
  m = _model()
  groups = P.channel_groups(m.spec)
  acp = np.asarray(m.schedule.alphas_cumprod)
  x0 = jax.random.uniform(jax.random.key(3), (2, *m.image_shape), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(4), x0.shape)
  trig = 0.5 * jnp.ones(m.image_shape)
  ts = np.array([996, 997, 998, 999])

  def total_loss(params):  # sum over t of the per-t mean, written as one batch of all (t, image) pairs
    a = acp[ts][:, None, None, None, None]
    x = (np.sqrt(a) * x0[None] + np.sqrt(1 - a) * (noise + trig)[None]).reshape(-1, *m.image_shape)
    eps = m.apply(params, x, jnp.repeat(jnp.asarray(ts), 2))
    return len(ts) * jnp.mean((eps - jnp.tile(noise, (len(ts), 1, 1, 1))) ** 2)

  g = P.accumulate_grads(P.make_grad_fn(m.apply, acp), m.params, x0, noise, trig, ts, t_chunk=3)  # 3 + padded 1
  ref = jax.jit(jax.grad(total_loss))(m.params)  # jitted: run eagerly, every op would compile on its own
  total_loss = jax.jit(total_loss)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # directional finite difference along one member's kernel
  leaf = "time_embedding/linear_1/kernel"
  flat = traverse_util.flatten_dict(m.params, sep="/")
  d = np.asarray(jax.random.normal(jax.random.key(5), flat[leaf].shape))
  h = 1e-2

  def shifted(s):
    f = dict(flat)
    f[leaf] = flat[leaf] + s * h * d
    return float(total_loss(traverse_util.unflatten_dict(f, sep="/")))

  fd = (shifted(1) - shifted(-1)) / (2 * h)
  an = float(np.sum(np.asarray(traverse_util.flatten_dict(g, sep="/")[leaf]) * d))
  assert abs(fd - an) <= 2e-2 * abs(an) + 1e-5
  # the group score by hand: mean over linear_1 (out rows) and linear_2 (in columns) of sum |W*G|, / its mean
  imp = P.group_importance(groups, m.params, g)["time_embedding/linear_1"]
  fg = traverse_util.flatten_dict(g, sep="/")
  w1, g1 = np.asarray(flat[leaf]), np.asarray(fg[leaf])
  w2, g2 = np.asarray(flat["time_embedding/linear_2/kernel"]), np.asarray(fg["time_embedding/linear_2/kernel"])
  by_hand = (np.abs(w1 * g1).sum(0) + np.abs(w2 * g2).sum(1)) / 2
  np.testing.assert_allclose(imp, by_hand / by_hand.mean(), rtol=1e-5)


def test_score_modes_rank_as_documented():
  g = P.ChannelGroup(name="g", kind="time_hidden", size=4, members=(), chunks=1, norms=(), blocks=())
  bd = {"g": np.array([3.0, 0.1, 0.5, 0.4])}
  cl = {"g": np.array([0.1, 0.2, 3.0, 0.7])}

  def removed(mode):
    keep = P.plan_by_ratio([g], 0.5, P.saliency(bd, cl, mode, key=jax.random.key(0)))
    return set(np.setdiff1d(np.arange(4), keep["g"]).tolist())

  assert removed("sum") == {0, 2}  # largest I_bd + I_cl (the reference code: S = -(I_bd + I_cl), ascending)
  assert removed("bd_minus_clean") == {0, 1}  # 2.9, -0.1 vs -2.5, -0.3
  assert removed("bd_only") == {0, 2}
  assert removed("clean_only") == {2, 3}
  assert len(removed("random")) == 2
  with pytest.raises(P.PruningError, match="score_mode"):
    P.saliency(bd, cl, "backdoor")


def test_forward_flops_shrink_with_pruning():
  m = _model()
  groups = P.channel_groups(m.spec)
  f0 = P.forward_flops(m)
  f1 = P.forward_flops(P.prune(m, P.plan_by_ratio(groups, 0.5), groups))
  assert f0 and f1 and f1 < f0
