"""The variational bound against data whose exact denoiser and exact likelihood are known: a
discretised Gaussian on the 256-level grid of [-1, 1]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import likelihood, schedules

MEAN, STD = 0.1, 0.3
GRID = -1.0 + 2.0 * np.arange(256) / 255.0


def _atom_probabilities():
  """P(x0 = GRID[k]) for N(MEAN, STD^2) integrated over each bin (outer bins take the tails)."""
  edges = np.concatenate([[-np.inf], (GRID[:-1] + GRID[1:]) / 2, [np.inf]])
  return np.diff(stats.norm.cdf(edges, MEAN, STD))


def _exact_x0_fn(schedule):
  """E[x0 | x_t] by Bayes' rule over the 256 atoms: the optimal x0 prediction."""
  log_p = jnp.log(jnp.asarray(_atom_probabilities(), jnp.float32))
  atoms = jnp.asarray(GRID, jnp.float32)

  def model_fn(x_t, t):  # x_t [B, 1], t [B]
    alpha = schedule.sqrt_alphas_cumprod[t][:, None]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t][:, None]
    logits = log_p - 0.5 * ((x_t - alpha * atoms) / sigma) ** 2  # [B, 256]
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * atoms, axis=-1, keepdims=True)

  return model_fn


def _data(count, seed=0):
  rng = np.random.default_rng(seed)
  index = rng.choice(256, size=count, p=_atom_probabilities())
  return index, jnp.asarray(GRID[index][:, None], jnp.float32)


def test_kl_terms_equal_their_closed_form():
  """Same variance on both sides ('small'): KL = coef1^2 (x0 - E[x0|x_t])^2 / (2 beta-tilde_t);
  'large': plus the variance mismatch. Computed here in float64 from the schedule's formulas."""
  schedule = schedules.linear(1000)
  model_fn = _exact_x0_fn(schedule)
  _, x0 = _data(64)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  abar = np.cumprod(1 - betas)
  for t in (1, 10, 500, 999):
    x_t = np.sqrt(abar[t]) * np.asarray(x0, np.float64) + np.sqrt(1 - abar[t]) * np.asarray(noise)
    x0_hat = np.asarray(model_fn(jnp.asarray(x_t, jnp.float32), jnp.full((64,), t)), np.float64)
    coef1 = betas[t] * np.sqrt(abar[t - 1]) / (1 - abar[t])
    posterior_var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    for variance, model_var in (('small', posterior_var), ('large', betas[t])):
      want = 0.5 * (np.log(model_var / posterior_var) + posterior_var / model_var - 1
                    + (coef1 * (np.asarray(x0) - x0_hat)) ** 2 / model_var) / np.log(2)
      got = likelihood.term_bits(model_fn, schedule, x0, t, noise, prediction='x0',
                                 variance=variance, clip_x0=False)
      np.testing.assert_allclose(np.asarray(got), want[:, 0], rtol=2e-3, atol=2e-6)


def test_prior_term_closed_form():
  schedule = schedules.linear(1000)
  x0 = jnp.asarray([[-1.0], [0.0], [0.5]])
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[-1]
  want = 0.5 * (-1 - np.log(1 - abar) + (1 - abar) + abar * np.asarray(x0)[:, 0] ** 2) / np.log(2)
  np.testing.assert_allclose(np.asarray(likelihood.prior_bits(schedule, x0)), want, rtol=1e-4,
                             atol=1e-8)  # float32 rounding of 1e-9-sized terms


def test_decoder_is_a_distribution_over_the_256_levels():
  """exp(log P) over every level sums to 1, for any mean and scale."""
  x = jnp.asarray(GRID, jnp.float32)
  for mean, log_scale in ((0.0, np.log(0.02)), (0.97, np.log(0.004)), (-2.0, np.log(0.5))):
    total = jnp.exp(likelihood.discretized_gaussian_log_likelihood(x, mean, log_scale)).sum()
    assert float(total) == pytest.approx(1.0, abs=1e-4)


def test_bound_with_the_exact_denoiser_is_above_the_true_nll_and_close_to_it():
  """The data's exact NLL is -log P(x0) (7.32 bits here). The bound is an upper bound in
  expectation. With the exact denoiser and T = 1000 its gap is what the Gaussian reverse steps
  cost on 8-bit data: measured 0.13 bits with sigma_t^2 = beta_t ('large') and 0.80 with
  beta-tilde_t ('small'), which is too narrow for the many-atom posterior at small t."""
  schedule = schedules.linear(1000)
  index, x0 = _data(2000)
  true_nll_bits = -np.log(_atom_probabilities()[index]) / np.log(2)
  exact = _exact_x0_fn(schedule)
  gaps = {}
  for variance in ('small', 'large'):
    terms = likelihood.terms_fn(lambda params: exact, schedule, prediction='x0',
                                variance=variance, clip_x0=True)
    result = likelihood.bound(terms, None, schedule, x0, jax.random.key(0), chunk=250)
    gaps[variance] = float(result.total.mean() - true_nll_bits.mean())
    assert result.terms.shape == (2000, 1000)
    np.testing.assert_allclose(result.total, result.prior + result.terms.sum(axis=1), rtol=1e-6)
  # Monte Carlo noise of the mean over 2000 examples is ~0.002 bits.
  assert -0.005 < gaps['large'] < 0.2, gaps
  assert gaps['large'] + 0.3 < gaps['small'] < 1.0, gaps


@pytest.mark.slow  # 25 s on the 2-core CI machine: in the slow pass
def test_bpd_command_writes_the_bound_it_prints(tmp_path):
  """python -m ddpm_jax.bpd on a tiny digits run: bpd.json holds, for both variances, a bound
  that is the sum of its terms (prior + decoder + KL) and equals the library call's."""
  import json
  import subprocess
  import sys
  from ddpm_jax import evaluation, trainer
  from tests.helpers import REPO_ROOT, tiny_config
  run = tmp_path / 'run'
  trainer.train(tiny_config(name='digits'), run)
  result = subprocess.run([sys.executable, '-m', 'ddpm_jax.bpd', f'--ckpt={run}',
                           '--num_images=6', '--batch_size=4'], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((run / 'eval' / 'bpd.json').read_text())
  assert f'wrote {run / "eval" / "bpd.json"}' in result.stdout
  assert saved['checkpoint'] == 4 and saved['num_timesteps'] == 100
  for variance in ('small', 'large'):
    terms = saved[variance]
    assert terms['bpd'] == pytest.approx(terms['prior'] + terms['decoder'] + terms['kl'],
                                         rel=1e-5)
    assert f'{terms["bpd"]:.4f}' in result.stdout
  direct = evaluation.bits_per_dim(str(run), num_images=6, batch_size=4)
  for variance in ('small', 'large'):
    assert direct[variance]['bpd'] == pytest.approx(saved[variance]['bpd'], rel=1e-4)
