"""The rectified-flow path and the ODE methods: closed forms of x_t, the velocity and every
conversion; the samplers that claim the path reproduce the Gaussian mixture with its exact
velocity; euler is first order and adaptive meets its tolerance on the exact Gaussian ODE map;
one-line errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, losses, sampling, schedules
from ddpm_jax.errors import InputError
from tests.analytic import gaussian_eps, gaussian_mixture_eps

FLOW = schedules.rectified_flow()
VP = schedules.vp_linear()
MIX = dict(weights=[0.3, 0.7], means=[-0.6, 0.5], stds=[0.15, 0.2])
MIX_MEAN = 0.3 * -0.6 + 0.7 * 0.5
MIX_STD = float(np.sqrt(0.3 * (0.15 ** 2 + 0.36) + 0.7 * (0.04 + 0.25) - MIX_MEAN ** 2))


def exact_velocity(schedule, eps_fn):
  """The exact flow denoiser: E[d x_t / dt | x_t] from the exact E[eps | x_t]."""
  return lambda x, t: diffusion.convert_prediction(schedule, x, t, eps_fn(x, t), source='eps',
                                                   target='velocity')


def test_flow_path_closed_forms():
  x0, eps = jnp.array([[0.3], [-0.8]]), jnp.array([[1.2], [0.5]])
  t = jnp.array([0.25, 0.9])
  np.testing.assert_allclose(diffusion.q_sample(FLOW, x0, t, eps),
                             (1 - t[:, None]) * x0 + t[:, None] * eps, rtol=1e-6)
  np.testing.assert_allclose(diffusion.regression_target(FLOW, x0, eps, t, 'velocity'),
                             eps - x0, rtol=1e-6)
  np.testing.assert_allclose(diffusion.alpha_sigma_rates(FLOW, t), [[-1, -1], [1, 1]])
  np.testing.assert_allclose(diffusion.log_snr(FLOW, t), 2 * np.log((1 - t) / t), rtol=1e-5)
  assert not schedules.is_variance_preserving(FLOW) and schedules.is_continuous(FLOW)


@pytest.mark.parametrize('schedule', [FLOW, VP, schedules.vp_cosine()],
                         ids=['flow', 'vp_linear', 'vp_cosine'])
def test_every_conversion_is_exact_both_ways(schedule):
  key = jax.random.key(0)
  x0 = jax.random.normal(key, (64, 3))
  eps = jax.random.normal(jax.random.fold_in(key, 1), (64, 3))
  t = jax.random.uniform(jax.random.fold_in(key, 2), (64,), minval=0.05, maxval=0.95)
  x_t = diffusion.q_sample(schedule, x0, t, eps)
  truth = {p: diffusion.regression_target(schedule, x0, eps, t, p) for p in
           ('eps', 'x0', 'v', 'velocity')}
  for source in truth:
    for target in truth:
      got = diffusion.convert_prediction(schedule, x_t, t, truth[source], source=source,
                                         target=target)
      np.testing.assert_allclose(got, truth[target], rtol=1e-4, atol=1e-4,
                                 err_msg=f'{source} -> {target}')
  # The velocity is d x_t / dt at fixed (x0, eps): a central difference of q_sample.
  h = 1e-3
  difference = (diffusion.q_sample(schedule, x0, t + h, eps)
                - diffusion.q_sample(schedule, x0, t - h, eps)) / (2 * h)
  np.testing.assert_allclose(truth['velocity'], difference, rtol=2e-3, atol=2e-3)


# (method, num_steps, tolerance on the std): every method that claims the flow path.
FLOW_CASES = [('ddim', 50, 0.05), ('dpm_solver++', 20, 0.05), ('dpm_solver++3m', 20, 0.05),
              ('heun', 40, 0.05), ('euler', 100, 0.05), ('ode', 100, 0.05),
              ('euler_maruyama', 1000, 0.05), ('adaptive', None, 0.03)]


@pytest.mark.parametrize('method,num_steps,std_tol', FLOW_CASES,
                         ids=[f'{m}-{n}' for m, n, _ in FLOW_CASES])
def test_samplers_reproduce_the_mixture_on_the_flow_path(method, num_steps, std_tol):
  """Measured: stds within 2.3% (heun 40), 1% or less elsewhere; weights within 0.01."""
  fn = jax.jit(functools.partial(
      sampling.sample, exact_velocity(FLOW, gaussian_mixture_eps(FLOW, **MIX)), FLOW,
      method=method, num_steps=num_steps, prediction='velocity', clip_x0=False,
      shape=(4000, 1)))
  samples = np.asarray(fn(jax.random.key(0))).ravel()
  assert abs(samples.mean() - MIX_MEAN) < 0.03, samples.mean()
  assert abs(samples.std() / MIX_STD - 1) < std_tol, samples.std() / MIX_STD
  assert abs(np.mean(samples > -0.05) - 0.7) < 0.03


def _exact_ode_map(schedule, x_T, m, s):
  """x0 ~ N(m, s²): the probability-flow ODE maps quantiles, x_t = alpha m + sqrt(alpha² s² +
  sigma²) z, so x_T at t_max goes to m + s z."""
  alpha, sigma = (float(v) for v in diffusion.alpha_sigma(schedule, schedule.t_max))
  z = (np.asarray(x_T, np.float64) - alpha * m) / np.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)
  return m + s * z


@pytest.mark.parametrize('schedule', [FLOW, VP], ids=['flow', 'vp_linear'])
def test_euler_is_first_order_on_the_exact_gaussian_ode(schedule):
  """Doubling the steps halves the error (measured ratios 1.9-2.0)."""
  m, s = 0.4, 0.3
  x_T = jnp.linspace(-2.0, 2.0, 9).reshape(9, 1)
  eps_fn = gaussian_eps(schedule, m, s)
  exact = _exact_ode_map(schedule, x_T, m, s)
  errors = []
  for n in (50, 100, 200):
    x = sampling.sample(eps_fn, schedule, jax.random.key(0), (9, 1), method='euler',
                        num_steps=n, x_T=x_T, clip_x0=False)
    errors.append(np.abs(np.asarray(x, np.float64) - exact).max())
  ratios = errors[0] / errors[1], errors[1] / errors[2]
  assert all(1.7 < r < 2.3 for r in ratios), (errors, ratios)


@pytest.mark.parametrize('solver', list(sampling.ADAPTIVE_SOLVERS))
@pytest.mark.parametrize('schedule', [FLOW, VP], ids=['flow', 'vp_linear'])
@pytest.mark.parametrize('tolerance', [1e-3, 1e-5])
def test_adaptive_meets_its_tolerance_and_counts_its_calls(schedule, tolerance, solver):
  """The solve by each solver at rtol = atol = tol lands within 20 tol of the exact map; the
  calls it reports are the calls the network got."""
  m, s = 0.4, 0.3
  x_T = jnp.linspace(-2.0, 2.0, 9).reshape(9, 1)
  eps_fn = gaussian_eps(schedule, m, s)
  calls = []

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return eps_fn(x, t)

  x, nfe = jax.jit(lambda x: sampling.adaptive_sample(counted, schedule, x, clip_x0=False,
                                                      rtol=tolerance, atol=tolerance,
                                                      solver=solver))(x_T)
  jax.effects_barrier()
  error = np.abs(np.asarray(x, np.float64) - _exact_ode_map(schedule, x_T, m, s)).max()
  assert error < 20 * tolerance + 2e-4, error
  assert int(nfe) == len(calls), (int(nfe), len(calls))
  if tolerance == 1e-3 and solver == sampling.ADAPTIVE_DEFAULTS['solver']:
    assert int(nfe) <= 60, int(nfe)


def test_the_velocity_target_trains_against_eps_minus_x0():
  """The loss of a network that outputs eps - x0 exactly is 0; of one that outputs eps, not."""
  x0 = jax.random.normal(jax.random.key(0), (16, 4))
  draw, model_key = losses.draw_training_noise(jax.random.key(1), FLOW, x0)

  def loss_of(fn):
    apply_fn = lambda params, x_t, t, key: fn(x_t, t)
    return float(losses.denoising_loss(apply_fn, None, x0, draw, model_key, FLOW,
                                       target='velocity')[0])

  assert loss_of(lambda x_t, t: draw.noise - x0) < 1e-10
  assert loss_of(lambda x_t, t: draw.noise) > 0.5


@pytest.mark.parametrize('call, message', [
    (lambda: sampling.sample(lambda x, t: x, schedules.linear(), jax.random.key(0), (2, 1),
                             method='adaptive'),
     "'adaptive' integrates in continuous time and needs a continuous schedule"),
    (lambda: sampling.sample(lambda x, t: x, FLOW, jax.random.key(0), (2, 1),
                             method='adaptive', rtol=0.0),
     'the adaptive solve needs rtol > 0 and atol > 0, got rtol=0.0'),
    (lambda: sampling.sample(lambda x, t: x, FLOW, jax.random.key(0), (2, 1),
                             method='adaptive', num_steps=10),
     'the adaptive solve chooses its own steps; drop num_steps=10'),
    (lambda: sampling.sample(lambda x, t: x, FLOW, jax.random.key(0), (2, 1), method='ddim',
                             num_steps=4, rtol=1e-3),
     "rtol, atol and solver are the adaptive solve's; ddim takes none"),
    (lambda: sampling.sample(lambda x, t: x, FLOW, jax.random.key(0), (2, 1),
                             method='adaptive', solver='rk4'),
     "unknown adaptive solver 'rk4'; choose one of bosh3, tsit5, dopri5, heun"),
    (lambda: sampling.sample(lambda x, t: x, schedules.linear(), jax.random.key(0), (2, 1),
                             method='euler', num_steps=4),
     "'euler' integrates in continuous time"),
    (lambda: losses.check_target(schedules.linear(), 'velocity', 'simple'),
     "diffusion.target='velocity' \\(d x_t / dt\\) needs a continuous schedule"),
])
def test_what_a_method_or_target_cannot_serve_is_one_line(call, message):
  with pytest.raises(InputError, match=message) as error:
    call()
  assert '\n' not in str(error.value)
