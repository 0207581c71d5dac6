"""The exact likelihood through the probability-flow ODE against closed forms: a correlated
Gaussian with its exact denoiser (on the flow path and on a VP one), Hutchinson's estimate
against the exact divergence, the dequantised bits of a uniform density, one-line refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, evaluation, ode_likelihood, schedules, trainer
from ddpm_jax.errors import InputError
from tests.analytic import correlated_gaussian_eps
from tests.helpers import tiny_config

MEAN = np.array([0.3, -0.2, 0.1])
COV = np.array([[0.25, 0.15, 0.0], [0.15, 0.36, -0.1], [0.0, -0.1, 0.16]])


def _closed_form(schedule, x):
  """log N(x; alpha m, alpha² cov + sigma² I) at t_min: the density the ODE carries x to."""
  alpha, sigma = (float(v) for v in diffusion.alpha_sigma(schedule, schedule.t_min))
  cov = alpha ** 2 * COV + sigma ** 2 * np.eye(3)
  diff = np.asarray(x, np.float64) - alpha * MEAN
  quad = np.einsum('bi,ij,bj->b', diff, np.linalg.inv(cov), diff)
  return -0.5 * (quad + np.log(np.linalg.det(2 * np.pi * cov)))


def _data(n=32):
  z = jax.random.normal(jax.random.key(0), (n, 3))
  return jnp.asarray(MEAN, jnp.float32) + z @ jnp.asarray(np.linalg.cholesky(COV).T, jnp.float32)


@pytest.mark.parametrize('schedule', [schedules.rectified_flow(), schedules.vp_linear()],
                         ids=['flow', 'vp_linear'])
def test_ode_log_likelihood_is_the_closed_form_within_one_percent(schedule):
  """Measured: 0.03% (flow) and 0.2% (vp_linear, whose N(0, I) prior is off by abar(1))."""
  x = _data()
  result = jax.jit(lambda x: ode_likelihood.ode_log_likelihood(
      correlated_gaussian_eps(schedule, MEAN, COV), schedule, x, jax.random.key(1),
      exact=True))(x)
  want = _closed_form(schedule, x)
  np.testing.assert_allclose(np.asarray(result.log_p[0]), want, rtol=0.01)
  assert 20 < int(result.nfe) < 200


def test_hutchinson_agrees_with_the_exact_divergence_within_its_standard_error():
  schedule = schedules.rectified_flow()
  x = _data(16)
  model_fn = correlated_gaussian_eps(schedule, MEAN, COV)
  exact = ode_likelihood.ode_log_likelihood(model_fn, schedule, x, jax.random.key(1),
                                            exact=True).log_p[0]
  probes = ode_likelihood.ode_log_likelihood(model_fn, schedule, x, jax.random.key(2),
                                             num_probes=16).log_p  # [16, B]
  spread = np.asarray(probes).std(axis=0, ddof=1)
  assert spread.min() > 1e-3  # the probes do not see the trace exactly here
  error = np.asarray(probes).mean(axis=0) - np.asarray(exact)
  standard_error = spread / np.sqrt(16)
  # Each example's mean over 16 probes within 4 standard errors; all of them on average.
  assert np.all(np.abs(error) < 4 * standard_error), error / standard_error
  assert abs(error.mean()) < 4 * np.sqrt(np.mean(standard_error ** 2) / len(error))


def test_a_uniform_density_on_the_dequantised_cube_is_8_bits_per_dimension():
  dims = 64
  log_p = -dims * np.log(2.0)  # U[-1, 1)^64
  assert ode_likelihood.dequantised_bits_per_dim(log_p, dims) == pytest.approx(8.0)
  images = np.arange(256, dtype=np.uint8).reshape(256, 1)
  x = np.asarray(ode_likelihood.dequantise(images, jax.random.key(0)))
  assert x.min() >= -1 and x.max() < 1
  assert np.all(np.floor((x[:, 0] + 1) * 128) == np.arange(256))  # each level in its own bin


@pytest.mark.slow  # trains two tiny runs (about 3 minutes here): with the long runs
def test_ode_bits_per_dim_of_a_flow_run_and_the_one_line_refusals(tmp_path):
  config = tiny_config(name='digits')
  config.diffusion.schedule, config.diffusion.target = 'rectified_flow', 'velocity'
  config.training.num_steps = 2
  config.sampling.method, config.sampling.num_steps = 'euler', 4
  trainer.train(config, tmp_path / 'flow')
  result = evaluation.ode_bits_per_dim(str(tmp_path / 'flow'), num_images=4, batch_size=4,
                                       num_probes=2, rtol=1e-3, atol=1e-3)
  assert result['num_images'] == 4 and result['divergence'].startswith('hutchinson, 2')
  assert np.isfinite(result['bpd']) and result['probe_std'] > 0 and result['nfe_per_batch'] > 6
  with pytest.raises(InputError, match='the discrete bound needs a linear or cosine .* use '
                                       '--method=ode for this one'):
    evaluation.bits_per_dim(str(tmp_path / 'flow'), num_images=2)
  discrete = tiny_config(name='digits')
  discrete.training.num_steps = 2
  trainer.train(discrete, tmp_path / 'discrete')
  with pytest.raises(InputError, match='the ODE likelihood needs a continuous run .* use '
                                       '--method=bound for this one'):
    evaluation.ode_bits_per_dim(str(tmp_path / 'discrete'), num_images=2)
  with pytest.raises(InputError, match='needs rtol > 0 and atol > 0'):
    evaluation.ode_bits_per_dim(str(tmp_path / 'flow'), num_images=2, rtol=0.0)
