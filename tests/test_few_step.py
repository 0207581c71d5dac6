"""Karras sigma spacing and EDM's Heun sampler against their closed forms and the exact
denoisers of Gaussian data."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.errors import InputError
from tests.analytic import gaussian_eps, gaussian_mixture_eps
from tests.test_sampling import LINEAR, MIX, MIX_STD, VP


def _noise_levels(schedule, times):
  alpha, sigma = (np.asarray(a, np.float64) for a in sampling.grid_alpha_sigma(schedule, times))
  return sigma / alpha


def _karras(s_max, s_min, n, rho):
  i = np.arange(n)
  return (s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


@pytest.mark.parametrize('rho', [3.0, 7.0])
def test_karras_levels_are_the_papers_closed_form_on_a_continuous_schedule(rho):
  """sigma_i = (smax^1/rho + i/(N-1) (smin^1/rho - smax^1/rho))^rho, smax and smin the
  schedule's levels at t_max and t_min (Karras et al. 2022, eq. 5)."""
  times = sampling.timesteps(VP, 12, 'karras', rho)
  levels = _noise_levels(VP, times)
  s_max, s_min = _noise_levels(VP, np.array([VP.t_max, VP.t_min], np.float32))
  np.testing.assert_allclose(levels, _karras(s_max, s_min, 12, rho), rtol=2e-3)
  assert times[0] == pytest.approx(VP.t_max) and times[-1] == pytest.approx(VP.t_min, rel=1e-3)


def test_karras_levels_on_a_discrete_schedule_are_the_nearest_distinct_timesteps():
  times = sampling.timesteps(LINEAR, 10, 'karras')
  assert times[0] == 999 and times[-1] == 0 and (np.diff(times) < 0).all()
  table = _noise_levels(LINEAR, np.arange(1000))
  wanted = _karras(table[-1], table[0], 10, 7.0)
  for t, level in zip(times, wanted):  # each is the timestep whose level is nearest (in t)
    t_exact = np.interp(np.log(level), np.log(table), np.arange(1000))
    assert abs(t - t_exact) <= 0.5 + 1e-9, (t, t_exact)
  assert not np.array_equal(times, sampling.timesteps(LINEAR, 10, 'karras', rho=2.0))


def test_a_spacing_a_method_does_not_take_is_one_line_and_one_it_takes_changes_its_steps():
  model = gaussian_eps(LINEAR, 0.0, 1.0)
  sample = lambda **kw: sampling.sample(model, LINEAR, jax.random.key(0), (2, 1), **kw)
  for method, spacing in [('dpm_solver++', 'quadratic'), ('dpm_solver++', 'uniform'),
                          ('ddpm', 'karras'), ('ddim', 'logsnr'), ('ddim', 'karass')]:
    with pytest.raises(InputError, match=re.escape(f'{method} does not take spacing={spacing!r}')):
      sample(method=method, num_steps=None if method == 'ddpm' else 10, spacing=spacing)
  with pytest.raises(InputError, match='rho > 0'):
    sample(method='heun', num_steps=5, spacing='karras', rho=0.0)
  plan = lambda **kw: sampling.make_plan(model, LINEAR, jax.random.key(0), num_steps=10, **kw)
  for method in ('ddim', 'dpm_solver++', 'dpm_solver++3m'):
    default, karras = plan(method=method), plan(method=method, spacing='karras')
    assert not np.array_equal(default.xs['t'], karras.xs['t']), method
  with pytest.raises(InputError, match="churn .* is heun's"):
    plan(method='ddim', churn=sampling.Churn(s_churn=1.0))


def _eps(x, t):
  return jnp.sin(3 * x) + 0.001 * jnp.asarray(t, jnp.float32)[:, None]


@pytest.mark.parametrize('schedule', [LINEAR, VP], ids=['discrete', 'continuous'])
def test_heun_steps_are_algorithm_1(schedule):
  """In y = x / alpha and s = sigma / alpha: d = (y - D(y, s_i)) / s_i, y' = y + (s_{i+1} - s_i) d,
  then y + (s_{i+1} - s_i) (d + d') / 2; the last step is Euler to s = 0."""
  plan = sampling.make_plan(_eps, schedule, jax.random.key(0), method='heun', num_steps=6,
                            clip_x0=False)
  assert plan.nfe == 11
  times = np.asarray(plan.xs['t'])
  levels = _noise_levels(schedule, times)
  alphas = np.asarray(sampling.grid_alpha_sigma(schedule, times)[0], np.float64)
  x = np.linspace(-2, 2, 6).reshape(6, 1)

  def denoised(y, i):
    a, s = alphas[i], levels[i]
    eps = np.asarray(_eps(jnp.asarray(a * y, jnp.float32), np.full(6, times[i])), np.float64)
    return y - s * eps  # x0 = (x - sigma eps) / alpha

  for i in (2, 5):
    out, _ = plan.step(jnp.asarray(x, jnp.float32), jax.tree.map(lambda v: v[i], plan.xs))
    y = x / alphas[i]
    d = (y - denoised(y, i)) / levels[i]
    if i < 5:
      step = levels[i + 1] - levels[i]
      y_euler = y + step * d
      want = alphas[i + 1] * (y + step * 0.5 * (d + (y_euler - denoised(y_euler, i + 1))
                                                / levels[i + 1]))
    else:
      want = denoised(y, i)  # Euler from s_5 to 0 lands on D
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


def test_heun_is_second_order_on_the_exact_gaussian_flow():
  """x0 ~ N(m, s^2): the flow maps y_T to m + (y_T - m) sqrt((s^2 + sig^2) / (s^2 + sig_T^2)).
  At the last Heun level (before the final Euler step), doubling the steps divides the error
  by about 4 (measured: 4.6 from 16 to 32 steps, 4.3 from 32 to 64)."""
  m, s = 0.4, 0.3
  model_fn = gaussian_eps(VP, m, s)
  x_T = jnp.linspace(-2.0, 2.0, 9).reshape(9, 1)
  errors = []
  for n in (16, 32, 64):
    _, (trajectory, _) = sampling.sample(model_fn, VP, jax.random.key(0), (9, 1), method='heun',
                                         num_steps=n, x_T=x_T, clip_x0=False,
                                         return_trajectory=True)
    times = sampling.timesteps(VP, n, 'karras')
    (alpha_T, alpha_min), levels = (np.asarray(sampling.grid_alpha_sigma(VP, times[[0, -1]])[0],
                                               np.float64), _noise_levels(VP, times[[0, -1]]))
    y_T = np.asarray(x_T, np.float64) / alpha_T
    exact = m + (y_T - m) * np.sqrt((s ** 2 + levels[1] ** 2) / (s ** 2 + levels[0] ** 2))
    errors.append(np.abs(np.asarray(trajectory[-2], np.float64) / alpha_min - exact).max())
  ratios = errors[0] / errors[1], errors[1] / errors[2]
  assert all(3.5 < r < 5.0 for r in ratios), (errors, ratios)


@pytest.mark.parametrize('schedule', [LINEAR, VP], ids=['discrete', 'continuous'])
def test_heun_with_the_exact_denoiser_reproduces_the_mixture(schedule):
  """50 Karras steps (99 calls): spread within 3%, the weight within 0.02 (measured: +1.3% and
  -0.012 on both)."""
  fn = jax.jit(functools.partial(sampling.sample, gaussian_mixture_eps(schedule, **MIX), schedule,
                                 shape=(20000, 1), method='heun', num_steps=50, clip_x0=False))
  samples = np.asarray(fn(jax.random.key(0))).ravel()
  assert abs(samples.std() / MIX_STD - 1) < 0.03, samples.std() / MIX_STD - 1
  assert abs(np.mean(samples > -0.05) - 0.7) < 0.02


def test_heun_calls_the_network_2n_minus_1_times():
  calls = []

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.zeros_like(x)

  jax.block_until_ready(sampling.sample(counting, LINEAR, jax.random.key(0), (2, 1),
                                        method='heun', num_steps=7))
  assert len(calls) == 13


def test_churn_raises_the_level_to_a_trained_timestep_and_adds_its_noise():
  """Algorithm 2: gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax]; the raised
  level is one the network was trained at (a discrete timestep at or above s (1 + gamma)), and
  the added noise has standard deviation sqrt(s_hat^2 - s^2) s_noise."""
  churn = sampling.Churn(s_churn=2.0, s_tmin=0.05, s_tmax=5.0, s_noise=1.0)
  plan = sampling.make_plan(_eps, LINEAR, jax.random.key(0), method='heun', num_steps=10,
                            churn=churn)
  times, raised = np.asarray(plan.xs['t']), np.asarray(plan.xs['t_hat'])
  levels = _noise_levels(LINEAR, times)
  inside = (levels >= 0.05) & (levels <= 5.0)
  gamma = min(2.0 / 10, np.sqrt(2) - 1)
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(raised[~inside], times[~inside])
  raised_levels = _noise_levels(LINEAR, raised[inside])
  assert (raised_levels >= levels[inside] * (1 + gamma) * (1 - 1e-6)).all()
  assert (_noise_levels(LINEAR, raised[inside] - 1) < levels[inside] * (1 + gamma)).all()
  np.testing.assert_allclose(np.asarray(plan.xs['churn_std'])[inside],
                             np.sqrt(raised_levels ** 2 - levels[inside] ** 2), rtol=1e-4)
  assert (np.asarray(plan.xs['churn_std'])[~inside] == 0).all()
  model_fn = gaussian_mixture_eps(LINEAR, **MIX)
  x_T = jnp.zeros((4, 1))
  draw = lambda seed, **kw: np.asarray(sampling.sample(
      model_fn, LINEAR, jax.random.key(seed), (4, 1), method='heun', num_steps=10, x_T=x_T, **kw))
  np.testing.assert_array_equal(draw(1), draw(2))  # deterministic without churn
  assert not np.allclose(draw(1, churn=churn), draw(2, churn=churn))
  with pytest.raises(InputError, match='s_churn >= 0'):
    draw(1, churn=sampling.Churn(s_churn=-1.0))
