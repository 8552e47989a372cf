"""BadDiffusion objective: the eps target reproduces the backdoored posterior mean; rho values; marginals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffcleanse_jax.attacks import (ObjectiveError, baddiffusion_eps_target, baddiffusion_inputs, baddiffusion_loss,
                                     rho)
from diffcleanse_jax.diffusion.schedules import make_schedule

SCHED = make_schedule()
# Exact float64 cumulative product of the schedule's alphas (Schedule.alphas_cumprod reproduces diffusers'
# float32 cumprod, which differs in the 6th digit near t = 999); the identities below are checked in float64.
ABAR64 = np.cumprod(SCHED.alphas)
RHO64 = (1 - np.sqrt(SCHED.alphas)) * np.sqrt(1 - ABAR64) / SCHED.betas
T_CHECK = np.array([0, 1, 2, 10, 250, 500, 998, 999])


def _abar_prev(abar, t):
  return np.where(t > 0, abar[np.maximum(t - 1, 0)], 1.0)


def test_rho_values():
  r = rho(SCHED)
  assert r.shape == (1000,) and r.dtype == np.float64
  np.testing.assert_allclose(r[[0, 500, 999]], [0.0050, 0.481, 0.5025], rtol=1e-3)
  np.testing.assert_array_equal(r, SCHED.rho())


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_eps_target_gives_backdoored_posterior_mean(solver):
  """Standard reverse mean with eps + rho_t r equals mu_tilde (sde); ode doubles the r coefficient."""
  rng = np.random.default_rng(0)
  b = len(T_CHECK)
  y, r, eps = (rng.normal(size=(b, 4, 4, 3)) for _ in range(3))
  t = T_CHECK
  betas, alphas, abar = SCHED.betas, SCHED.alphas, ABAR64
  xt = baddiffusion_inputs(y, r, eps, t, abar)
  assert xt.dtype == np.float64
  np.testing.assert_allclose(rho(SCHED), RHO64, rtol=1e-4)
  target = baddiffusion_eps_target(eps, r, t, RHO64, solver=solver)
  e = lambda v: v[t][:, None, None, None]  # noqa: E731
  ab_prev = _abar_prev(abar, t)[:, None, None, None]
  # independent: the shifted-frame posterior mean
  c0 = np.sqrt(ab_prev) * e(betas) / (1 - e(abar))
  c1 = np.sqrt(e(alphas)) * (1 - ab_prev) / (1 - e(abar))
  mu_tilde = r + c0 * (y - r) + c1 * (xt - r)
  if solver == "sde":
    mu_model = (xt - e(betas) / np.sqrt(1 - e(abar)) * target) / np.sqrt(e(alphas))
    np.testing.assert_allclose(mu_model, mu_tilde, atol=1e-6, rtol=0)
    # without the rho term (plain DDPM target) the mean is off at every t
    mu_plain = (xt - e(betas) / np.sqrt(1 - e(abar)) * eps) / np.sqrt(e(alphas))
    assert np.all(np.abs(mu_plain - mu_tilde).max(axis=(1, 2, 3)) > 1e-5)
  else:
    np.testing.assert_allclose(target, eps + 2 * RHO64[t][:, None, None, None] * r, atol=1e-12)


def test_x_t_is_closed_form_and_kernel_composition():
  """Iterating the one-step mean gives sqrt(abar_t) y + (1 - sqrt(abar_t)) r; MC matches mean and variance."""
  rng = np.random.default_rng(1)
  y, r = rng.uniform(-1, 1, (1, 2, 2, 1)), rng.uniform(-1, 1, (1, 2, 2, 1))
  sa = np.sqrt(SCHED.alphas)
  x = y.copy()
  for t in range(1000):
    x = sa[t] * x + (1 - sa[t]) * r
    if t in T_CHECK:
      want = baddiffusion_inputs(y, r, np.zeros_like(y), np.array([t]), ABAR64)
      np.testing.assert_allclose(x, want, atol=1e-10)
  # Monte Carlo with noise through all 1000 kernels, checked at t = 999 and t = 250
  m = 4000
  y0, r0 = y.reshape(1, 4), r.reshape(1, 4)
  xs = np.broadcast_to(y0, (m, 4)).copy()
  snap = {}
  for t in range(1000):
    xs = sa[t] * xs + (1 - sa[t]) * r0 + np.sqrt(SCHED.betas[t]) * rng.normal(size=xs.shape)
    if t in (250, 999):
      snap[t] = xs.copy()
  for t, xs_t in snap.items():
    ab = SCHED.alphas_cumprod[t]
    mean = np.sqrt(ab) * y0 + (1 - np.sqrt(ab)) * r0
    sd = np.sqrt(1 - ab)
    assert np.all(np.abs(xs_t.mean(0) - mean) < 5 * sd / np.sqrt(m))
    np.testing.assert_allclose(xs_t.var(0), sd ** 2, rtol=0.1)


def test_clean_samples_are_plain_ddpm():
  rng = np.random.default_rng(2)
  x0, eps = rng.normal(size=(3, 4, 4, 1)), rng.normal(size=(3, 4, 4, 1))
  t = np.array([0, 400, 999])
  ab = SCHED.alphas_cumprod[t][:, None, None, None]
  np.testing.assert_allclose(baddiffusion_inputs(x0, np.zeros_like(x0), eps, t, SCHED.alphas_cumprod),
                             np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-12)
  np.testing.assert_array_equal(baddiffusion_eps_target(eps, np.zeros_like(eps), t, rho(SCHED)), eps)


def test_jax_path_matches_numpy_under_jit():
  rng = np.random.default_rng(3)
  y, r, eps = (rng.normal(size=(5, 8, 8, 3)).astype(np.float32) for _ in range(3))
  t = np.array([0, 1, 500, 998, 999], np.int32)
  ac, rt = SCHED.alphas_cumprod, rho(SCHED)

  @jax.jit
  def f(y, r, eps, t):
    xt = baddiffusion_inputs(y, r, eps, t, ac)
    tgt = baddiffusion_eps_target(eps, r, t, rt, solver="ode")
    return xt, tgt, baddiffusion_loss(xt, tgt)

  jxt, jtgt, jl = f(jnp.asarray(y), jnp.asarray(r), jnp.asarray(eps), jnp.asarray(t))
  assert jxt.dtype == jnp.float32 and jtgt.dtype == jnp.float32
  y64, r64, e64 = (a.astype(np.float64) for a in (y, r, eps))
  nxt = baddiffusion_inputs(y64, r64, e64, t, ac)
  ntgt = baddiffusion_eps_target(e64, r64, t, rt, solver="ode")
  np.testing.assert_allclose(np.asarray(jxt), nxt, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jtgt), ntgt, atol=1e-5)
  np.testing.assert_allclose(float(jl), np.mean((nxt - ntgt) ** 2), rtol=1e-5)


def test_loss_and_solver_errors():
  a, b = np.ones((2, 3, 3, 1)), np.zeros((2, 3, 3, 1))
  assert baddiffusion_loss(a, b) == 1.0
  b[0, 0, 0, 0] = 3.0
  np.testing.assert_allclose(baddiffusion_loss(a, b), (17 * 1 + 4) / 18)
  with pytest.raises(ObjectiveError) as e:
    baddiffusion_eps_target(a, a, np.array([0, 1]), rho(SCHED), solver="euler")
  assert isinstance(e.value, ValueError) and "sde" in str(e.value)
