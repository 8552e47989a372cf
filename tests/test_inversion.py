"""Diff-Cleanse stage 1 trigger inversion (defense/inversion.py): STE, sets, losses, gradient transport,
the code-bug drift, vmapped restarts/models, white-box gradients. Toy analytic eps functions keep it fast."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.defense import inversion as inv
from diffcleanse_jax.diffusion import samplers
from diffcleanse_jax.diffusion.schedules import schedule_from_config
from diffcleanse_jax.model import DiffusionModel
from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER, preset
from toys import S, ToyEps, toy_params

SCHED = DEFAULT_SCHEDULER


def toy_settings(**kw):
  d = dict(sampler="ddim", num_steps=10, max_epochs=30, log_every=0)
  d.update(kw)
  return inv.InversionSettings(**d)


# ------------------------------------------------------------------------------------------------ pieces
def test_ste_round_forward_backward():
  x = jnp.array([0.2, 0.5, 1.49, -2.7])
  np.testing.assert_array_equal(inv.ste_round(x), jnp.round(x))
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(inv.ste_round(v) * jnp.arange(4.0)))(x), jnp.arange(4.0))
  p = jax.random.normal(jax.random.key(0), (4, 4, 1))
  g = inv.pattern_from_raw(p)
  np.testing.assert_allclose(g * 255, jnp.round(g * 255), atol=1e-4)  # multiples of 1/255
  np.testing.assert_allclose(g, 1 - 2 * p, atol=0.5 / 255 + 1e-6)
  np.testing.assert_allclose(jax.grad(lambda q: jnp.sum(inv.pattern_from_raw(q)))(p), -2.0 * jnp.ones_like(p))


def test_entropies():
  v = np.full((2, 4, 4, 1), 0.2, np.float32)
  v[0, 0, :3] = 0.9          # 3 pixels at the max intensity: H ~ log 3
  v[1, 0, :1] = 0.9          # 1 pixel: H ~ 0
  h = np.asarray(inv.image_entropy(jnp.asarray(v)))
  np.testing.assert_allclose(h, [np.log(3), 0.0], atol=1e-4)
  g = jnp.zeros((2, 5, 1))    # uniform rows: entropy log(width)
  np.testing.assert_allclose(inv.pattern_entropy(g), np.log(5), atol=1e-5)


def _img(v):
  return np.asarray(v, np.float32).reshape(4, 4, 1)


def test_target_sets_on_constructed_images():
  rng = np.random.default_rng(0)
  base = rng.uniform(0.2, 0.8, 16)
  imgs = np.stack([
      _img(base),                            # 0: in T (identical to 3, parallel to 4)
      _img(np.full(16, 0.005)),              # 1: near-black -> excluded even though identical to 5
      _img(rng.uniform(0.0, 1.0, 16)),       # 2: different
      _img(base),                            # 3: identical to 0
      _img(base * 0.9),                      # 4: scaled copy: cos = 1 (not mean-centred) -> in T
      _img(np.full(16, 0.005)),              # 5: near-black
      _img(np.full(16, 0.995)),              # 6: near-white -> excluded
      _img(np.full(16, 0.995)),              # 7: near-white
  ])
  sets = inv.target_sets(jnp.asarray(imgs))
  np.testing.assert_array_equal(np.asarray(sets.in_t), [1, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(sets.excluded), [0, 1, 0, 0, 0, 1, 1, 1])
  assert int(sets.anchor) == 0 and int(sets.count) == 3
  # no pairs above the threshold: T empty, L_s = sum over the non-excluded pairs, low-entropy band (w = 20)
  diverse = jnp.asarray(rng.uniform(0.1, 0.9, (3, 4, 4, 1)).astype(np.float32))
  s2 = inv.target_sets(diverse)
  assert int(s2.count) == 0
  total, parts = inv.image_loss(diverse, s2)
  cos = np.asarray(inv.cosine_matrix(diverse))
  # the margin diagnostic: largest cosine over the considered pairs (excluded images take part in none)
  np.testing.assert_allclose(s2.max_cos, max(cos[0, 1], cos[0, 2], cos[1, 2]), rtol=1e-6)
  assert float(sets.max_cos) > 0.999
  assert float(inv.target_sets(jnp.asarray(imgs[[1, 5, 6]])).max_cos) == -1.0  # all excluded: no pair
  np.testing.assert_allclose(parts.sim, (1 - cos[0, 1]) + (1 - cos[0, 2]) + (1 - cos[1, 2]), rtol=1e-5)
  assert float(parts.ent_weight) == 20.0 and float(parts.sim_weight) == 1.0  # B/|R| = 3/3


def test_blackbox_gradient_hand_computed():
  """B = 3: images 0 and 1 identical (T, anchor 0), image 2 a permutation of them (R, same entropy so the band
  term is inactive, 10 pixels above 0.95 for the value loss). Then L = 3 (1 - cos(v0, v2)) + sum relu(v2 - 0.95)
  and G = s (-2) mean_b dL/dI_b with the cosine derivative written out by hand."""
  rng = np.random.default_rng(1)
  v0 = rng.uniform(0.2, 0.6, 256).astype(np.float32)
  v0[:10] = 0.97
  v2 = rng.permutation(v0)
  imgs = jnp.asarray(np.stack([v0, v0, v2]).reshape(3, 16, 16, 1))
  sets = inv.target_sets(imgs)
  np.testing.assert_array_equal(np.asarray(sets.in_t), [1, 1, 0])
  s = 1000.0
  G, parts = inv.blackbox_pattern_grad(imgs, sets, s)
  v0d, v2d = v0.astype(np.float64), v2.astype(np.float64)
  n0, n2 = np.linalg.norm(v0d), np.linalg.norm(v2d)
  c = v0d @ v2d / (n0 * n2)
  d_cos_d0 = v2d / (n0 * n2) - c * v0d / n0 ** 2
  d_cos_d2 = v0d / (n0 * n2) - c * v2d / n2 ** 2
  w_s = 3.0  # B / |R|
  dL0 = -w_s * d_cos_d0
  dL2 = -w_s * d_cos_d2 + (v2d > 0.95)
  expected = s * (-2.0) * (dL0 + dL2) / 3.0
  np.testing.assert_allclose(np.asarray(G).reshape(-1), expected, rtol=2e-4, atol=2e-3)
  assert float(parts.ent) == 0.0 and float(parts.ent_weight) == 10.0
  np.testing.assert_allclose(parts.sim, 1 - c, rtol=1e-4)
  np.testing.assert_allclose(parts.value, np.sum(np.maximum(v2d - 0.95, 0)), rtol=1e-4)


def test_blackbox_gradient_is_scaled_batch_mean_of_image_gradient():
  imgs = jax.random.uniform(jax.random.key(3), (5, 8, 8, 1))
  sets = inv.target_sets(imgs)
  G, _ = inv.blackbox_pattern_grad(imgs, sets, 7.0)
  dI = jax.grad(lambda x: inv.image_loss(x, sets)[0])(imgs)
  np.testing.assert_allclose(G, 7.0 * -2.0 * jnp.mean(dI, axis=0), rtol=1e-6)


def test_sample_unrolled_matches_scan():
  params = toy_params(1.5)
  sched = schedule_from_config(SCHED)
  x_T = jax.random.normal(jax.random.key(0), (3, S, S, 1)) + 1.0
  for method in ("ddpm", "ddim"):
    cfg = samplers.SamplerConfig(method=method, num_steps=6)
    a = samplers.sample_loop(ToyEps(), params, x_T, jax.random.key(1), sched, cfg)
    b = inv.sample_unrolled(ToyEps(), params, x_T, jax.random.key(1), sched, cfg, remat=True)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_whitebox_gradient_exact_finite_and_differs_from_blackbox():
  params = toy_params(1e9)
  s_wb = toy_settings(method="whitebox", batch_size=4, num_steps=4)
  noise, skey = inv.fixed_noise(jax.random.key(0), 4, (S, S, 1))
  p = inv.initial_patterns(jax.random.key(0), 1, (S, S, 1))[0]
  g_wb, parts, sets, imgs = inv.pattern_gradient(ToyEps(), params, SCHED, s_wb, p, noise, skey)
  assert np.all(np.isfinite(g_wb)) and float(jnp.abs(g_wb).sum()) > 0
  # exact: the same composition differentiated through the lax.scan sampler, sets held fixed
  sched = schedule_from_config(SCHED)
  scfg = s_wb.sampler_config(SCHED)

  def loss(q):
    x0 = samplers.sample_loop(ToyEps(), params, noise + inv.pattern_from_raw(q)[None], skey, sched, scfg)
    return inv.image_loss(samplers.to_images01(x0), sets)[0]

  np.testing.assert_allclose(g_wb, jax.grad(loss)(p), rtol=1e-4, atol=1e-6 * float(jnp.abs(g_wb).max()))
  g_bb, parts_bb, _, _ = inv.pattern_gradient(ToyEps(), params, SCHED, dataclasses.replace(s_wb, method="bbti"),
                                              p, noise, skey)
  np.testing.assert_allclose(parts.total, parts_bb.total, rtol=1e-5)  # same forward pass
  cos = float(jnp.sum(g_wb * g_bb) / (jnp.linalg.norm(g_wb) * jnp.linalg.norm(g_bb)))
  assert cos < 0.99, cos


def test_sample_loop_start_stop_splits_the_chain():
  params = toy_params(1.5)
  sched = schedule_from_config(SCHED)
  x_T = jax.random.normal(jax.random.key(0), (2, S, S, 1))
  cfg = samplers.SamplerConfig(method="ddpm", num_steps=6)
  whole = samplers.sample_loop(ToyEps(), params, x_T, jax.random.key(1), sched, cfg)
  mid = samplers.sample_loop(ToyEps(), params, x_T, jax.random.key(1), sched, cfg, stop=2)
  np.testing.assert_allclose(samplers.sample_loop(ToyEps(), params, mid, jax.random.key(1), sched, cfg, start=2),
                             whole, atol=1e-6)
  mid_u = inv.sample_unrolled(ToyEps(), params, x_T, jax.random.key(1), sched, cfg, stop=2)
  np.testing.assert_allclose(mid_u, mid, atol=1e-5)


@pytest.mark.parametrize("window", ["first", "last"])
def test_whitebox_window_gradient_is_exact_through_its_k_steps_only(window):
  """whitebox_backprop_steps = K: the loss and outputs of the whole chain; the gradient is the VJP through the
  window's K steps with the identity for the other N-K (sets held fixed); K = N is the exact gradient."""
  params = toy_params(1e9)
  n, k = 5, 2
  s_full = toy_settings(method="whitebox", sampler="ddpm", batch_size=4, num_steps=n)
  s_win = dataclasses.replace(s_full, whitebox_backprop_steps=k, whitebox_window=window)
  noise, skey = inv.fixed_noise(jax.random.key(0), 4, (S, S, 1))
  p = inv.initial_patterns(jax.random.key(0), 1, (S, S, 1))[0]
  g_full, parts, sets, imgs = inv.pattern_gradient(ToyEps(), params, SCHED, s_full, p, noise, skey)
  g_win, parts_w, _, imgs_w = inv.pattern_gradient(ToyEps(), params, SCHED, s_win, p, noise, skey)
  np.testing.assert_allclose(imgs_w, imgs, atol=1e-6)          # the same forward chain
  np.testing.assert_allclose(parts_w.total, parts.total, rtol=1e-6)
  sched = schedule_from_config(SCHED)
  scfg = s_full.sampler_config(SCHED)
  x_T = noise + inv.pattern_from_raw(p)[None]
  x0 = samplers.sample_loop(ToyEps(), params, x_T, skey, sched, scfg)
  # the cotangent at x_0, then back through the window's K steps by hand
  _, vjp_out = jax.vjp(lambda x: inv.image_loss(samplers.to_images01(x), sets)[0], x0)
  ct = vjp_out(jnp.float32(1.0))[0]
  if window == "first":
    _, vjp_k = jax.vjp(lambda x: samplers.sample_loop(ToyEps(), params, x, skey, sched, scfg, stop=k), x_T)
  else:
    x_mid = samplers.sample_loop(ToyEps(), params, x_T, skey, sched, scfg, stop=n - k)
    _, vjp_k = jax.vjp(lambda x: samplers.sample_loop(ToyEps(), params, x, skey, sched, scfg, start=n - k), x_mid)
  ct_T = vjp_k(ct)[0]
  want = jax.grad(lambda q: jnp.sum(ct_T * (noise + inv.pattern_from_raw(q)[None])))(p)
  np.testing.assert_allclose(g_win, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))
  assert float(jnp.abs(g_win - g_full).max()) > 1e-3 * float(jnp.abs(g_full).max())  # truncation changes it
  g_all = inv.pattern_gradient(ToyEps(), params, SCHED, dataclasses.replace(s_win, whitebox_backprop_steps=n),
                               p, noise, skey)[0]
  np.testing.assert_allclose(g_all, g_full, rtol=1e-5, atol=1e-7 * float(jnp.abs(g_full).max()))


def test_whitebox_window_settings_are_validated():
  with pytest.raises(inv.InversionError, match="whitebox_window='middle'"):
    toy_settings(whitebox_window="middle").validate()
  with pytest.raises(inv.InversionError, match="whitebox_backprop_steps=-1"):
    toy_settings(whitebox_backprop_steps=-1).validate()


@pytest.mark.parametrize("knob,part", [("whitebox_value_weight", "value"), ("whitebox_sim_scale", "sim")])
def test_whitebox_loss_weights_scale_only_their_term_of_whitebox_epochs(knob, part):
  """whitebox_value_weight w_v / whitebox_sim_scale c: a whitebox epoch's loss is c w_s L_s + w_e L_e + w_v L_v
  (its gradient that of this loss, through the sampler); bbti epochs keep the reference weights; < 0 refused."""
  params = toy_params(1e9)
  noise, skey = inv.fixed_noise(jax.random.key(0), 4, (S, S, 1))
  p = inv.initial_patterns(jax.random.key(0), 1, (S, S, 1))[0]
  s1 = toy_settings(method="whitebox", batch_size=4, num_steps=3)
  sv = dataclasses.replace(s1, **{knob: 0.25})
  g1, parts1, sets, _ = inv.pattern_gradient(ToyEps(), params, SCHED, s1, p, noise, skey)
  gv, partsv, _, _ = inv.pattern_gradient(ToyEps(), params, SCHED, sv, p, noise, skey)

  def term(parts):  # the weighted term in the reference loss
    return parts.value if part == "value" else parts.sim_weight * parts.sim

  assert float(term(parts1)) > 0
  np.testing.assert_allclose(getattr(partsv, part), getattr(parts1, part), rtol=1e-6)  # parts are unweighted
  np.testing.assert_allclose(partsv.total, parts1.total - 0.75 * term(parts1), rtol=1e-5)
  sched = schedule_from_config(SCHED)
  scfg = s1.sampler_config(SCHED)

  def term_of(q):
    x0 = samplers.sample_loop(ToyEps(), params, noise + inv.pattern_from_raw(q)[None], skey, sched, scfg)
    return term(inv.image_loss(samplers.to_images01(x0), sets)[1])

  np.testing.assert_allclose(gv, g1 - 0.75 * jax.grad(term_of)(p), rtol=1e-3, atol=1e-5 * float(jnp.abs(g1).max()))
  g_bb1 = inv.pattern_gradient(ToyEps(), params, SCHED, dataclasses.replace(s1, method="bbti"), p, noise, skey)[0]
  g_bbv = inv.pattern_gradient(ToyEps(), params, SCHED, dataclasses.replace(sv, method="bbti"), p, noise, skey)[0]
  np.testing.assert_array_equal(g_bbv, g_bb1)
  with pytest.raises(inv.InversionError, match=f"{knob}=-1"):
    toy_settings(**{knob: -1.0}).validate()


# ------------------------------------------------------------------------------------------ optimisation
def test_faithful_code_bug_is_a_uniform_drift():
  """§4.2: no image-loss gradient reaches p; after the first update Adam sees a constant -2 everywhere, so p
  rises uniformly: +0 at the first update, then 0.0744, 0.0858, ... (Adam bias correction)."""
  params = toy_params(1e9)  # diverse, partly saturated outputs: L_s != 0 and L_v != 0, so every epoch updates
  s = toy_settings(faithful_code_bug=True, batch_size=8)
  noise, skey = inv.fixed_noise(jax.random.key(0), 8, (S, S, 1))
  p0 = inv.initial_patterns(jax.random.key(0), 1, (S, S, 1))
  state = jax.vmap(lambda p: inv.init_state(p, s))(p0)
  ps = [np.asarray(state.p[0])]
  for _ in range(4):
    state, m = inv.epoch_step(ToyEps(), params, SCHED, s, noise, skey, state)
    assert bool(m.updated[0])
    ps.append(np.asarray(state.p[0]))
  deltas = [b - a for a, b in zip(ps[:-1], ps[1:])]
  np.testing.assert_allclose(deltas[0], 0.0, atol=1e-7)
  for d in deltas[1:]:
    np.testing.assert_allclose(d, d.flat[0], atol=1e-6)  # uniform
  b1, b2, lr = 0.9, 0.999, 0.1
  m = v = 0.0
  expected = []
  for k, grad in enumerate([0.0, -2.0, -2.0, -2.0], start=1):
    m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2
    expected.append(-lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + 1e-8))
  np.testing.assert_allclose([d.flat[0] for d in deltas], expected, atol=1e-5)
  assert abs(expected[1] - 0.0744) < 1e-3


def test_bbti_inverts_the_toy_backdoor():
  res = inv.run_inversion(ToyEps(), toy_params(3.0), (S, S, 1), SCHED, toy_settings(), jax.random.key(0))[0]
  assert res.mscr_per_epoch[0] == 0.0            # the random p_0 does not fire the backdoor
  assert res.best_mscr == 1.0 and res.epochs < 30  # early stop at |T| = B
  box = np.asarray(toy_params(3.0)["region"]) > 0
  assert float(res.trigger[box].mean()) > 3.0   # the inverted box is bright enough to fire
  assert res.trigger.shape == (S, S, 1) and res.history["updated"][0]
  # per-epoch margin to the collapse threshold: above it exactly at the epochs where T is non-empty
  assert len(res.history["max_pair_cos"]) == res.epochs
  assert [c > 0.999 for c in res.history["max_pair_cos"]] == [m > 0 for m in res.mscr_per_epoch]


def test_trigger_mscr_of_a_given_trigger():
  import types
  model = types.SimpleNamespace(apply=ToyEps(), params=toy_params(3.0), image_shape=(S, S, 1), scheduler_config=SCHED)
  box = np.asarray(toy_params(3.0)["region"]) * 4.0
  hit = inv.trigger_mscr(model, box, dict(sampler="ddim", num_steps=10))
  assert hit["mscr"] == 1.0 and hit["images01"].shape == (16, S, S, 1)
  assert inv.trigger_mscr(model, np.zeros((S, S, 1)), dict(sampler="ddim", num_steps=10))["mscr"] == 0.0


def test_stop_mscr_and_fresh_noise_refinement(monkeypatch):
  params = toy_params(3.0)
  full = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, toy_settings(), jax.random.key(0))[0]
  s = toy_settings(stop_mscr=0.25, refine_epochs=4)
  res = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, s, jax.random.key(0))[0]
  # stops at the first epoch with |T| >= 4 of 16 (the same trajectory as the full run up to there)
  first = next(i for i, m in enumerate(full.mscr_per_epoch) if m >= 0.25)
  assert res.epochs == first + 1 and res.mscr_per_epoch == full.mscr_per_epoch[:first + 1]
  assert len(res.history["refine_mscr"]) == 4 and res.to_json()["refined"]
  assert np.abs(res.trigger - res.unrefined_trigger).max() > 0   # refinement moved the pattern
  assert res.best_mscr == max(res.mscr_per_epoch)                # the score is the main loop's
  model = types.SimpleNamespace(apply=ToyEps(), params=params, image_shape=(S, S, 1), scheduler_config=SCHED)
  fresh = inv.trigger_mscr(model, res.trigger, dict(sampler="ddim", num_steps=10), jax.random.key(77))
  assert fresh["mscr"] == 1.0                                    # the refined trigger fires on other noise
  # nothing collapsed (no backdoor): no refinement epoch runs, the pattern is left alone
  refine = inv._refine
  monkeypatch.setattr(inv, "_refine", lambda *a, **k: pytest.fail("refinement ran without a collapse"))
  clean = inv.run_inversion(ToyEps(), toy_params(1e9), (S, S, 1), SCHED, toy_settings(max_epochs=3, refine_epochs=2),
                            jax.random.key(0))[0]
  assert clean.best_mscr == 0.0 and "refine_mscr" not in clean.history and not clean.to_json()["refined"]
  assert clean.epochs == 3
  monkeypatch.setattr(inv, "_refine", refine)
  np.testing.assert_array_equal(clean.trigger, clean.last_trigger)
  with pytest.raises(inv.InversionError, match="stop_mscr"):
    toy_settings(stop_mscr=0.0).validate()
  with pytest.raises(inv.InversionError, match="refine_epochs"):
    toy_settings(refine_epochs=-1).validate()
  # the refinement's own lr: a different refined pattern from the same main loop
  slow = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, dataclasses.replace(s, refine_learning_rate=0.01),
                           jax.random.key(0))[0]
  np.testing.assert_array_equal(slow.unrefined_trigger, res.unrefined_trigger)
  assert np.abs(slow.trigger - res.trigger).max() > 0


def test_refinement_chain_and_gradient_are_its_own(monkeypatch):
  """refine_num_steps / refine_method set the refinement's sampler chain and gradient; the main loop (and so the
  score and the unrefined pattern) is unchanged."""
  params = toy_params(3.0)
  s = toy_settings(stop_mscr=0.25, refine_epochs=3)
  seen = []
  real = inv._refine

  def spy(eps_fn, params, sched_key, scfg, step_s, *a, **k):
    seen.append((scfg.num_steps, step_s.method, step_s.learning_rate))
    return real(eps_fn, params, sched_key, scfg, step_s, *a, **k)
  monkeypatch.setattr(inv, "_refine", spy)
  base = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, s, jax.random.key(0))[0]
  long = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED,
                           dataclasses.replace(s, refine_num_steps=25, refine_method="whitebox",
                                               refine_learning_rate=0.05), jax.random.key(0))[0]
  assert seen == [(10, "bbti", s.learning_rate), (25, "whitebox", 0.05)]
  np.testing.assert_array_equal(long.unrefined_trigger, base.unrefined_trigger)
  assert long.mscr_per_epoch == base.mscr_per_epoch and len(long.history["refine_mscr"]) == 3
  assert np.abs(long.trigger - base.trigger).max() > 0
  with pytest.raises(inv.InversionError, match="refine_method"):
    toy_settings(refine_method="adam").validate()
  with pytest.raises(inv.InversionError, match="refine_num_steps"):
    toy_settings(refine_num_steps=-1).validate()


@pytest.mark.parametrize("method", ["bbti", "whitebox"])
def test_shift_term_adds_the_exact_elijah_gradient(method):
  """The method's own shift weight w (shift_weight for bbti, whitebox_shift_weight for whitebox) adds
  w * dL_shift/dp to the epoch's gradient: after one epoch from a fresh Adam the first moment differs from the
  w = 0 run by exactly (1 - b1) w dL_shift/dp; the other method's weight changes nothing; w = 0 is the reference."""
  from diffcleanse_jax.defense.elijah import elijah_loss
  params = toy_params(3.0)
  key = jax.random.key(3)
  bsz = 16 if method == "bbti" else 4
  noise, skey = inv.fixed_noise(key, bsz, (S, S, 1))
  p0 = inv.initial_patterns(key, 1, (S, S, 1))
  sched = schedule_from_config(SCHED)
  w = 50.0
  own, other = ("shift_weight", "whitebox_shift_weight") if method == "bbti" else (
      "whitebox_shift_weight", "shift_weight")
  out = {}
  for name, kw in (("off", {}), ("own", {own: w}), ("other", {other: w})):
    s = toy_settings(method=method, batch_size=bsz, num_steps=10 if method == "bbti" else 3, **kw)
    assert s.epoch_shift_weight == (w if name == "own" else 0.0)
    state = jax.vmap(lambda q: inv.init_state(q, s))(p0)
    state, m = inv.epoch_step(ToyEps(), params, SCHED, s, noise, skey, state)
    assert bool(m.updated[0])
    out[name] = state.opt[0].mu[0]
  want = jax.grad(lambda q: elijah_loss(ToyEps(), params, inv.pattern_from_raw(q), noise,
                                        sched.num_train_timesteps - 1, 0.5))(p0[0])
  assert float(jnp.abs(want).max()) > 0
  np.testing.assert_allclose(out["own"] - out["off"], (1 - 0.9) * w * want, rtol=1e-3, atol=1e-4)  # float32
  np.testing.assert_array_equal(out["other"], out["off"])
  with pytest.raises(inv.InversionError, match="shift_weight"):
    toy_settings(**{own: -1.0}).validate()


def test_refinement_uses_the_shift_weight_of_its_own_method():
  s = toy_settings(shift_weight=7.0, whitebox_shift_weight=0.0, refine_epochs=2, refine_method="whitebox")
  assert s.epoch_shift_weight == 7.0 and inv._refine_settings(s).epoch_shift_weight == 0.0
  s = inv.InversionSettings.from_config(dict(shift_weight=1e7), method="whitebox")
  assert s.shift_weight == 1e7 and s.epoch_shift_weight == 0.0


def test_vmapped_restarts_equal_one_by_one():
  params = toy_params(3.0)
  s = toy_settings(restarts=3, max_epochs=8, refine_epochs=2)
  key = jax.random.key(5)
  joint = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, s, key)[0]
  p0 = inv.initial_patterns(key, 3, (S, S, 1))
  single = [inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, dataclasses.replace(s, restarts=1), key,
                              p0=p0[r:r + 1])[0] for r in range(3)]
  np.testing.assert_allclose(joint.triggers, np.concatenate([r.triggers for r in single]), atol=1e-5)
  np.testing.assert_allclose(joint.restart_best_mscr, [r.best_mscr for r in single])
  best = single[joint.restart]
  np.testing.assert_allclose(joint.mscr_per_epoch, best.mscr_per_epoch)
  np.testing.assert_allclose(joint.history["loss"], best.history["loss"], rtol=1e-5)
  assert joint.best_mscr == max(r.best_mscr for r in single)
  assert len(joint.history.get("refine_mscr", [])) == (2 if joint.best_mscr > 0 else 0)


def test_stop_any_ends_every_restart_at_the_first_one_that_reaches_stop_mscr():
  params = toy_params(3.0)
  key = jax.random.key(5)
  s = toy_settings(restarts=3, stop_mscr=0.5)
  p0 = inv.initial_patterns(key, 3, (S, S, 1))
  single = [inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, dataclasses.replace(s, restarts=1), key,
                              p0=p0[r:r + 1])[0] for r in range(3)]
  fast = min(range(3), key=lambda r: single[r].epochs)   # this restart reaches stop_mscr first
  first = single[fast].epochs
  assert max(r.epochs for r in single) > first           # the restarts differ, so the option matters here
  anyr = inv.run_inversion(ToyEps(), params, (S, S, 1), SCHED, dataclasses.replace(s, stop_any=True), key)[0]
  assert anyr.epochs <= first and anyr.best_mscr >= 0.5
  assert anyr.restart_best_mscr[fast] == single[fast].best_mscr
  for r in range(3):                                     # the others stopped with it, at their state of then
    assert anyr.restart_best_mscr[r] == max(single[r].mscr_per_epoch[:first])


def test_invert_many_two_tiny_models_matches_one_by_one():
  models = [DiffusionModel.from_config(preset("tiny"), key=k) for k in (0, 1)]
  cfg = dict(batch_size=4, num_steps=2, max_epochs=2, log_every=0)
  key = jax.random.key(0)
  many = inv.invert_models(models, cfg, key)
  assert len(many) == 2
  for m, r in zip(models, many):
    one = inv.invert_trigger(m, cfg, key)
    np.testing.assert_allclose(r.trigger, one.trigger, atol=1e-5)
    np.testing.assert_allclose(r.history["loss"], one.history["loss"], rtol=1e-4)
    assert r.epochs == one.epochs and r.trigger.shape == (16, 16, 1)
  other = models[1].replace(scheduler_config=dict(models[1].scheduler_config, beta_end=0.03))
  with pytest.raises(inv.InversionError):
    inv.invert_models([models[0], other], cfg)


def test_settings_from_full_or_flat_config():
  from configs.common import base_config
  c = base_config("tiny")
  s = inv.InversionSettings.from_config(c)
  assert s == inv.InversionSettings()  # config defaults == dataclass defaults
  wb = inv.InversionSettings.from_config(dict(num_steps=100, whitebox_num_steps=20), method="whitebox")
  bb = inv.InversionSettings.from_config(dict(num_steps=100, whitebox_num_steps=20), method="bbti")
  assert (wb.num_steps, bb.num_steps) == (20, 100)  # white-box has its own chain length when set
  r = dict(restarts=3, whitebox_restarts=6)
  assert [inv.InversionSettings.from_config(r, method=m).restarts for m in ("whitebox", "bbti")] == [6, 3]
  assert inv.InversionSettings.from_config(dict(restarts=3), method="whitebox").restarts == 3  # 0 = restarts
  with pytest.raises(inv.InversionError, match="whitebox_restarts"):
    inv.InversionSettings.from_config(dict(whitebox_restarts=-1))
  s2 = inv.InversionSettings.from_config(dict(max_epochs="5", grad_scale=10, threshold=0.3), method="whitebox")
  assert s2.max_epochs == 5 and s2.grad_scale == 10.0 and s2.method == "whitebox"
  with pytest.raises(inv.InversionError):
    inv.InversionSettings.from_config(dict(method="nope"))
