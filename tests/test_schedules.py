import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from ddpm_jax import schedules


def test_linear_endpoints_and_abar_T():
  s = schedules.linear()
  assert s.num_timesteps == 1000
  np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
  # abar_T for the DDPM defaults: prod(1 - beta) ≈ 4.04e-5.
  np.testing.assert_allclose(s.alphas_cumprod[-1], 4.0358e-5, rtol=1e-3)


@pytest.mark.parametrize('make', [schedules.linear, schedules.cosine])
def test_tables_are_consistent(make):
  s = make(num_timesteps=200)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-5, atol=1e-10)
  assert s.alphas_cumprod_prev[0] == 1.0
  np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2, abar, rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod ** 2, 1 - abar, rtol=1e-4)
  abar_prev = np.append(1.0, abar[:-1])
  tilde = betas * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(s.posterior_variance, tilde, rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(tilde[1:]), rtol=1e-4)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(tilde[1]), rtol=1e-5)
  assert all(v.dtype == jnp.float32 for v in s)


def test_cosine_formula():
  T, s_ = 1000, 0.008
  sched = schedules.cosine(T, s=s_)
  f = lambda t: np.cos((t / T + s_) / (1 + s_) * np.pi / 2) ** 2
  t = np.arange(1, T + 1)
  expected = f(t) / f(0)
  # Away from the end, where max_beta clips nothing, abar is the formula itself.
  np.testing.assert_allclose(sched.alphas_cumprod[:900], expected[:900], rtol=1e-4)
  assert float(sched.betas.max()) <= 0.999 + 1e-7
  np.testing.assert_allclose(sched.betas[-1], 0.999, rtol=1e-6)


def test_from_betas_and_bad_input():
  s = schedules.from_betas([0.1, 0.2, 0.3])
  np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)
  with pytest.raises(ValueError, match=r'betas\[1\] = -0.1'):
    schedules.from_betas([0.1, -0.1])
  with pytest.raises(ValueError, match='beta_start'):
    schedules.linear(10, beta_start=0.0)
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*linear, cosine"):
    schedules.get_schedule('quadratic')


@pytest.mark.parametrize('sched', [schedules.vp_linear(), schedules.vp_cosine()])
def test_vp_alpha_bar_matches_integrated_beta(sched):
  for t in [0.05, 0.3, 0.7, 0.95]:
    integral, _ = integrate.quad(lambda s: float(sched.beta(s)), 0.0, t)
    np.testing.assert_allclose(float(sched.alpha_bar(t)), np.exp(-integral), rtol=1e-4)


@pytest.mark.parametrize('sched', [schedules.vp_linear(), schedules.vp_cosine()])
def test_vp_marginals_jit_and_grad(sched):
  t = jnp.array([0.01, 0.5, 0.9])
  abar = jax.jit(lambda s, t: s.alpha_bar(t))(sched, t)
  np.testing.assert_allclose(sched.mean_coef(t) ** 2, abar, rtol=1e-5)
  np.testing.assert_allclose(sched.std(t) ** 2, 1 - abar, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sched.log_snr(t), np.log(abar / (1 - abar)), rtol=1e-4)
  # beta(t) = -d/dt log abar(t).
  dlog = jax.vmap(jax.grad(lambda u: sched.log_alpha_bar(u)))(t)
  np.testing.assert_allclose(-dlog, sched.beta(t), rtol=1e-4)


def test_vp_linear_is_ddpm_limit():
  """VP-SDE linear with beta = T * beta_discrete approximates DDPM's abar at t = i / T."""
  disc, cont = schedules.linear(), schedules.vp_linear()
  for i in [100, 500, 999]:
    np.testing.assert_allclose(cont.log_alpha_bar((i + 1) / 1000), np.log(disc.alphas_cumprod[i]),
                               rtol=0.01)
