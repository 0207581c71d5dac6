import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax
from ddpm_jax import diffusion, schedules


def test_q_sample_moments_discrete_images():
  sched = schedules.linear()
  n = 20000
  x0 = jnp.full((n, 2, 2, 1), 0.7)
  t = jnp.full((n,), 300)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = jax.jit(ddpm_jax.q_sample)(sched, x0, t, noise)
  abar = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)[:301]))
  np.testing.assert_allclose(x_t.mean(), np.sqrt(abar) * 0.7, atol=0.01)
  np.testing.assert_allclose(x_t.var(), 1 - abar, rtol=0.02)


def test_q_sample_continuous_series_and_per_example_broadcast():
  sched = schedules.vp_linear()
  x0 = jnp.ones((3, 5, 2))  # [B, L, C]
  t = jnp.array([0.1, 0.5, 0.9])
  noise = jnp.zeros_like(x0)
  x_t = ddpm_jax.q_sample(sched, x0, t, noise)
  for b in range(3):
    np.testing.assert_allclose(x_t[b], np.sqrt(sched.alpha_bar(t[b])), rtol=1e-6)


def test_q_posterior_matches_bayes_rule():
  """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), two Gaussians in x_{t-1}."""
  sched = schedules.cosine(100)
  t = np.array([1, 10, 50, 99])
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(4, 3)).astype(np.float32)
  x_t = rng.normal(size=(4, 3)).astype(np.float32)
  mean, var, _ = jax.jit(ddpm_jax.q_posterior)(sched, x0, x_t, t)
  betas = np.asarray(sched.betas, np.float64)
  abar = np.cumprod(1 - betas)
  for i, ti in enumerate(t):
    # likelihood in x_{t-1}: x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) e
    a, b = np.sqrt(1 - betas[ti]), betas[ti]
    prior_mean, prior_var = np.sqrt(abar[ti - 1]) * x0[i], 1 - abar[ti - 1]
    post_precision = a * a / b + 1 / prior_var
    post_var = 1 / post_precision
    post_mean = post_var * (a * x_t[i] / b + prior_mean / prior_var)
    np.testing.assert_allclose(var[i].squeeze(), post_var, rtol=1e-4)
    np.testing.assert_allclose(mean[i], post_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sched', [schedules.linear(), schedules.vp_cosine()])
def test_conversions_round_trip(sched):
  key = jax.random.key(1)
  x0 = jax.random.normal(key, (4, 3, 3, 2))
  eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  t = jnp.array([0, 10, 500, 999]) if not schedules.is_continuous(sched) else \
      jnp.array([0.01, 0.2, 0.6, 0.95])
  x_t = ddpm_jax.q_sample(sched, x0, t, eps)
  convert = jax.jit(diffusion.convert_prediction, static_argnames=('source', 'target'))
  alpha, sigma = (diffusion.per_example(c, x0) for c in diffusion.alpha_sigma(sched, t))
  v = alpha * eps - sigma * x0
  truths = {'eps': eps, 'x0': x0, 'v': v, 'score': -eps / sigma}
  for source, value in truths.items():
    for target, expected in truths.items():
      got = convert(sched, x_t, t, value, source=source, target=target)
      np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3,
                                 err_msg=f'{source} -> {target}')


def test_bad_timesteps_and_names():
  sched = schedules.linear(10)
  x = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match=r'\[0, 9\].*\[3, 10\]'):
    ddpm_jax.q_sample(sched, x, jnp.array([3, 10]), x)
  with pytest.raises(ValueError, match='integers'):
    ddpm_jax.q_sample(sched, x, jnp.array([0.5, 0.2]), x)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    ddpm_jax.q_sample(schedules.vp_linear(), x, jnp.array([0.5, 1.5]), x)
  with pytest.raises(ValueError, match="unknown prediction target 'noise'.*eps, x0, v, velocity, score"):
    diffusion.convert_prediction(sched, x, jnp.array([1, 2]), x, source='noise', target='eps')
  with pytest.raises(ValueError, match='discrete'):
    ddpm_jax.q_posterior(schedules.vp_linear(), x, x, jnp.array([0.1, 0.2]))
