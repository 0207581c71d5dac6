"""Every documented series path runs once against an oracle: `--task=impute --eval` (points and
blocks) driven by the exact AR(1) conditional denoiser, the baselines where they must be exact,
a forecast past the end of a dated CSV."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from ddpm_jax import inference, series_metrics, series_tasks
from tests.test_series_tasks import (LENGTH, PHI, STATS, ExactDenoiser, _conditional_law,
                                     _series_config)


def _ar1_csv(path, rows: int, seed: int = 0):
  """A unit-variance AR(1) series (PHI) of ``rows`` hourly rows, as a dated CSV."""
  rng = np.random.default_rng(seed)
  values = np.empty(rows)
  values[0] = rng.normal()
  for i in range(1, rows):
    values[i] = PHI * values[i - 1] + math.sqrt(1 - PHI ** 2) * rng.normal()
  stamps = np.datetime64('2021-01-01T00') + np.arange(rows).astype('timedelta64[h]')
  path.write_text('date,x\n' + ''.join(f'{str(t).replace("T", " ")}:00,{v:.9f}\n'
                                       for t, v in zip(stamps, values)))
  return values


def _exact_sampler(config):
  """sample_fn of the exact conditional AR(1) denoiser."""
  return inference.make_sample_fn(ExactDenoiser(True), config, STATS)


def _gaussian_crps(mean, sd, y):
  """CRPS(N(mean, sd^2), y) = sd [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)]."""
  z = (y - mean) / sd
  return sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


@pytest.mark.parametrize('hide', [dict(missing=0.3), dict(block=4)])
def test_impute_eval_crps_is_the_conditional_gaussians_closed_form(tmp_path, hide):
  """The CRPS `impute --eval` reports for the exact conditional denoiser equals the mean closed-
  form CRPS of the exact conditional law of each hidden entry given its window's observed ones
  (measured: -1.7% for points, +0.3% for a block; DDPM with T = 1000 and 300 samples a window); the baselines' scores
  are the metrics of the baselines computed here on the same windows and masks."""
  config = _series_config(True)
  config.data.path = str(tmp_path / 'ar1.csv')
  config.data.time_column = 'date'
  config.data.stride = 1
  config.data.val_fraction, config.data.test_fraction = 0.1, 0.2
  _ar1_csv(tmp_path / 'ar1.csv', 400)
  result = series_tasks.impute(_exact_sampler(config), {}, config, STATS, tmp_path / 'out', evaluate=True,
                               num_windows=8, num_samples=300, seed=1, batch_size=2400,
                               method='ddpm', **hide)
  with np.load(tmp_path / 'out' / 'imputation.npz') as saved:
    masks, target = saved['mask'][..., 0], saved['target'][..., 0]
  assert json.loads((tmp_path / 'out' / 'metrics.json').read_text()) == result
  closed = []
  for window, mask in zip(target.astype(np.float64), masks):
    mean, cov = _conditional_law(window, mask)
    closed.append(_gaussian_crps(mean, np.sqrt(np.diag(cov)), window[mask == 0]))
  closed = np.concatenate(closed).mean()
  assert result['scores']['model']['crps'] == pytest.approx(closed, rel=0.05), closed
  hidden = (masks == 0)[..., None]
  interpolated = series_metrics.linear_interpolation(target[..., None].astype(np.float64),
                                              masks[..., None])
  assert result['scores']['linear_interpolation'] == pytest.approx(
      series_metrics.probabilistic_scores(interpolated[:, None], target[..., None], hidden))


def test_linear_interpolation_is_exact_on_a_linear_series():
  windows = (3.0 * np.arange(16) - 2.0)[None, :, None] * np.ones((2, 1, 3))
  mask = np.ones_like(windows)
  mask[0, 3:7, 0], mask[1, [1, 8, 9, 14], 2] = 0, 0
  np.testing.assert_allclose(series_metrics.linear_interpolation(windows * mask, mask), windows,
                             atol=1e-12)


def test_seasonal_naive_and_profile_are_exact_on_a_periodic_series():
  season = 24
  series = np.stack([np.sin(2 * np.pi * np.arange(24 * 20) / season),
                     np.cos(4 * np.pi * np.arange(24 * 20) / season)], axis=1)  # [480, 2]
  history = np.stack([series[s:s + 48] for s in (5, 100, 200)])  # [K=3, 48, 2]
  future = np.stack([series[s + 48:s + 48 + 30] for s in (5, 100, 200)])
  np.testing.assert_allclose(series_metrics.seasonal_naive(history, 30, season), future, atol=1e-12)
  train_rows = series[:300]
  rows = np.array([[310, 311, 333], [400, 401, 479]])
  np.testing.assert_allclose(series_metrics.seasonal_profile(train_rows, 0, rows, season), series[rows],
                             atol=1e-12)


def test_climatology_crps_on_iid_gaussian_rows_is_one_over_root_pi():
  """Targets and training rows i.i.d. N(0, 1): E CRPS(N(0, 1), Y) = E|X - Y| - E|X - X'| / 2
  = 2 / sqrt(pi) - 1 / sqrt(pi)."""
  rng = np.random.default_rng(0)
  train_rows = rng.normal(size=(20_000, 1))
  target = rng.normal(size=(50, 20, 1))
  samples = series_metrics.climatology_samples(train_rows, 500, target.shape, seed=1)
  crps = series_metrics.probabilistic_scores(samples, target, np.ones_like(target, bool))['crps']
  # 1,000 targets: the standard error of the mean CRPS is about 0.4 / sqrt(1000) = 0.013.
  assert crps == pytest.approx(1 / math.sqrt(math.pi), abs=0.04)


def test_a_forecast_past_the_end_of_a_csv_has_the_next_dated_rows(tmp_path):
  config = _series_config(True)
  config.data.path = str(tmp_path / 'ar1.csv')
  values = _ar1_csv(tmp_path / 'ar1.csv', 50)
  horizon = 4
  result = series_tasks.forecast(_exact_sampler(config), {}, config, STATS, tmp_path / 'out', horizon=horizon,
                                 num_samples=400, seed=0, batch_size=400, method='ddpm')
  assert result == {}
  with np.load(tmp_path / 'out' / 'forecast.npz') as saved:
    samples, context, first_rows = saved['samples'], saved['context'], saved['first_rows']
  assert samples.shape == (1, 400, horizon, 1)
  np.testing.assert_allclose(context[0, :, 0], values[-(LENGTH - horizon):], atol=1e-6)
  assert list(first_rows) == [50 - (LENGTH - horizon)]
  # The forecast is the AR(1) law after the last value: mean PHI^h x_N, variance 1 - PHI^2h.
  h = np.arange(1, horizon + 1)
  mean, var = PHI ** h * values[-1], 1 - PHI ** (2 * h)
  np.testing.assert_array_less(np.abs(samples[0, :, :, 0].mean(0) - mean), 4 * np.sqrt(var / 400))
  np.testing.assert_allclose(samples[0, :, :, 0].var(0), var, rtol=0.2)
  lines = (tmp_path / 'out' / 'forecast.csv').read_text().splitlines()
  dates = [line.split(',')[1] for line in lines[1:]]
  assert dates == ['2021-01-03 02:00:00', '2021-01-03 03:00:00', '2021-01-03 04:00:00',
                   '2021-01-03 05:00:00']
