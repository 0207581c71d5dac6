"""The ETT benchmark protocol (data.protocol='ett'): its split rows against the Informer /
DLinear loaders' numbers, the linear-map baseline against scikit-learn, the energy score and
interval coverage against their closed forms on Gaussian forecasts, and a protocol run's
backtest against the rows of the CSV it read."""

import json
import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy import special, stats
from sklearn.linear_model import LinearRegression

from benchmarks import common
from ddpm_jax import (config_lib, generate, inference, input_pipeline, masking, schedules,
                      series_data, series_metrics, series_tasks, trainer)
from ddpm_jax.configs import ett
from tests.helpers import run_script, skip_unless_ci, tiny_config
from tests.test_series_tasks import LENGTH, STATS, _series_config

LOOKBACK, HORIZON = 96, 24


def _ett_source(rows=17420, window=LOOKBACK + HORIZON, horizon=HORIZON, stride=1):
  # Row r holds r in channel 0 and -r in channel 1, so a window names the rows it was cut from.
  series = np.stack([np.arange(rows), -np.arange(rows)], axis=1).astype(np.float32)
  return input_pipeline.SeriesSource(series, ['a', 'b'], window, stride, 0.0, 'zscore',
                                     protocol='ett', horizon=horizon)


def _rows_of(source, windows, picks):
  x = windows.get_batch(np.asarray(picks))['x'][..., 0]
  return np.round(x * source.stats['std'][0] + source.stats['mean'][0]).astype(int)


def test_split_rows_are_the_literatures():
  source = _ett_source()
  assert source.row_ranges == {'train': (0, 8640), 'validation': (8640, 11520),
                               'test': (11520, 14400)}
  # Informer's loader: len = border2 - border1 - seq_len - pred_len + 1 with the lookback
  # taken from the part before: 2,857 test windows at horizon 24.
  assert (len(source.train), len(source.validation), len(source.test)) == (8521, 2857, 2857)
  test = _rows_of(source, source.test, [0, len(source.test) - 1])
  # The first test window looks back into the validation rows and forecasts the first test rows;
  # the last ends at row 14,399 (rows after the 20 months are not used).
  assert test[0, 0] == 11520 - LOOKBACK and test[0, LOOKBACK] == 11520
  assert test[-1, -1] == 14399
  validation = _rows_of(source, source.validation, [0])
  assert validation[0, LOOKBACK] == 8640
  assert _rows_of(source, source.train, [len(source.train) - 1])[0, -1] == 8639
  # z-scores of the training rows alone: the mean of 0..8639.
  assert source.stats['mean'][0] == pytest.approx(4319.5)
  assert source.stats['std'][0] == pytest.approx(np.arange(8640).std(), rel=1e-6)
  assert source.window_rows['test'] == (11520 - LOOKBACK, 14400)


def test_other_horizons_keep_the_lookback():
  source = _ett_source(window=LOOKBACK + 96, horizon=96)
  assert len(source.test) == 2880 - 96 + 1
  assert _rows_of(source, source.test, [0])[0, LOOKBACK] == 11520


def test_a_series_shorter_than_the_protocol_is_refused():
  with pytest.raises(ValueError, match='takes the first 14400 rows .* this series has 14399'):
    _ett_source(rows=14399)
  with pytest.raises(ValueError, match='data.horizon in 1..119'):
    _ett_source(horizon=0)


def test_the_config_cuts_lookback_plus_horizon():
  config = ett.get_config()
  assert (config.data.window, config.data.lookback, config.data.horizon) == (120, 96, 24)
  config.data.horizon = 96
  assert config.data.window == 192


def test_training_masks_hide_exactly_the_horizon():
  masks = np.asarray(masking.training_masks(jax.random.key(0), (200, 120, 3), (0, 0, 0, 1),
                                            horizon=HORIZON))
  assert (masks[:, :LOOKBACK] == 1).all() and (masks[:, LOOKBACK:] == 0).all()


def test_linear_map_is_least_squares():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(300, 2)).cumsum(axis=0)
  lookback, horizon = 6, 3
  weights = series_data.fit_linear_map(train, lookback, horizon)
  context = rng.normal(size=(5, 10, 2))
  forecast = series_data.linear_map_forecast(weights, context)
  for c in range(2):  # scikit-learn's regression on the windows, built here row by row
    inputs = np.stack([train[i:i + lookback, c] for i in range(300 - lookback - horizon + 1)])
    outputs = np.stack([train[i + lookback:i + lookback + horizon, c]
                        for i in range(300 - lookback - horizon + 1)])
    reference = LinearRegression().fit(inputs, outputs).predict(context[:, -lookback:, c])
    np.testing.assert_allclose(forecast[..., c], reference, rtol=1e-6, atol=1e-8)


def test_nlinear_map_is_least_squares_on_the_window_less_its_last_value():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(300, 2)).cumsum(axis=0)
  lookback, horizon = 6, 3
  weights = series_data.fit_linear_map(train, lookback, horizon, relative=True)
  context = rng.normal(size=(5, 10, 2))
  forecast = series_data.linear_map_forecast(weights, context)
  for c in range(2):  # NLinear: regress the future less the last value on the past less it
    starts = range(300 - lookback - horizon + 1)
    last = np.stack([train[i + lookback - 1, c] for i in starts])[:, None]
    inputs = np.stack([train[i:i + lookback - 1, c] for i in starts]) - last
    outputs = np.stack([train[i + lookback:i + lookback + horizon, c] for i in starts]) - last
    past, now = context[:, -lookback:-1, c], context[:, -1:, c]
    reference = now + LinearRegression().fit(inputs, outputs).predict(past - now)
    np.testing.assert_allclose(forecast[..., c], reference, rtol=1e-6, atol=1e-8)


def test_nlinear_map_moves_with_the_level_and_the_plain_map_does_not():
  # A mean-reverting AR(1) around 0: the plain map pulls a context at level 5 back towards 0,
  # NLinear's moves its forecast with the level, exactly.
  rng = np.random.default_rng(2)
  x = np.zeros(3000)
  for t in range(1, 3000):
    x[t] = 0.9 * x[t - 1] + rng.normal()
  context = x[None, 2000:2024, None]
  for relative, moves in ((False, False), (True, True)):
    weights = series_data.fit_linear_map(x[:2000, None], 24, 6, relative)
    shift = (series_data.linear_map_forecast(weights, context + 5.0)
             - series_data.linear_map_forecast(weights, context))
    assert np.allclose(shift, 5.0, atol=1e-9) == moves, shift


def test_linear_map_recovers_an_exact_recursion():
  x = np.zeros(200)
  x[:2] = 1.0, 2.0
  for t in range(2, 200):
    x[t] = 0.5 * x[t - 1] - 0.3 * x[t - 2] + 1.0
  weights = series_data.fit_linear_map(x[:150, None], 2, 4)
  forecast = series_data.linear_map_forecast(weights, x[None, 150:170, None])
  np.testing.assert_allclose(forecast[0, :, 0], x[170:174], atol=1e-8)


def _chi_mean(d):
  """E||Z|| for Z ~ N(0, I_d)."""
  return math.sqrt(2) * math.exp(special.gammaln((d + 1) / 2) - special.gammaln(d / 2))


def test_energy_score_and_coverage_of_a_gaussian_forecast():
  rng = np.random.default_rng(0)
  windows, draws, length, channels = 250, 400, 4, 2
  mean = rng.normal(size=(windows, length, channels))
  samples = mean[:, None] + rng.normal(size=(windows, draws, length, channels))
  hidden = np.ones(mean.shape, bool)
  d = length * channels
  # At y = the mean: E||X - y|| = chi_d's mean, E||X - X'|| = sqrt(2) times it.
  energy = series_metrics.energy_score(samples, mean, hidden)
  expected = _chi_mean(d) * (1 - math.sqrt(2) / 2)
  assert energy.mean() == pytest.approx(expected, rel=0.03)
  # Hidden entries only: the observed ones add nothing to either distance.
  half = hidden.copy()
  half[:, :, 1] = False
  shifted = mean + np.where(half, 0.0, 100.0)
  assert series_metrics.energy_score(samples, shifted, half).mean() == pytest.approx(
      _chi_mean(d // 2) * (1 - math.sqrt(2) / 2), rel=0.03)
  # Coverage: a target from the forecast's own law falls in its central p interval w.p. p; a
  # target shifted by s in P(|Z + s| <= z) = Phi(z - s) - Phi(-z - s).
  target = mean + rng.normal(size=mean.shape)
  for level in (0.5, 0.9):
    got = series_metrics.interval_coverage(samples, target, hidden, level)
    assert got == pytest.approx(level, abs=3 * math.sqrt(level * (1 - level) / target.size) + 0.01)
    z = stats.norm.ppf((1 + level) / 2)
    want = stats.norm.cdf(z - 1.0) - stats.norm.cdf(-z - 1.0)
    got = series_metrics.interval_coverage(samples, target + 1.0, hidden, level)
    assert got == pytest.approx(want, abs=3 * math.sqrt(want * (1 - want) / target.size) + 0.01)
  scores = series_metrics.probabilistic_scores(samples, target, hidden)
  # The target's own noise: both errors have variance 1 (the median's a little more).
  assert scores['mse_mean'] == pytest.approx(1.0, rel=0.15)
  assert scores['mse'] == pytest.approx(scores['mse_mean'], rel=0.05)
  point = series_metrics.probabilistic_scores(mean[:, None], target, hidden)
  assert point['coverage_90'] is None and point['crps'] == pytest.approx(point['mae'])
  assert point['energy'] == pytest.approx(
      np.linalg.norm((mean - target).reshape(windows, -1), axis=1).mean())


def test_window_picks_are_evenly_spaced():
  np.testing.assert_array_equal(series_tasks.window_picks(2857, 5),
                                [0, 714, 1428, 2142, 2856])
  np.testing.assert_array_equal(series_tasks.window_picks(7, 0), np.arange(7))
  np.testing.assert_array_equal(series_tasks.window_picks(7, 50), np.arange(7))
  with pytest.raises(ValueError, match='--num_windows must be 0'):
    series_tasks.window_picks(7, -1)


@pytest.fixture(scope='module')
def ett_csv():
  from tests.conftest import SHARED_DATA
  path = SHARED_DATA / 'ETTh1.csv'
  if not path.is_file():
    skip_unless_ci(f'{path} is absent')
  return path


@pytest.fixture(scope='module')
def protocol_run(tmp_path_factory, ett_csv):
  workdir = tmp_path_factory.mktemp('ett_tiny')
  config = tiny_config(name='series', path=str(ett_csv), protocol='ett', lookback=12, horizon=4,
                       window=16)
  config.model.spatial_dims = 1
  config.model.observed_input = True
  config.training.mask_mix = (0.0, 0.0, 0.0, 1.0)
  trainer.train(config, workdir)
  return workdir


@pytest.mark.slow  # 20 s on the 2-core CI machine: in the slow pass
def test_backtest_scores_test_windows_on_the_z_scale(protocol_run, ett_csv, tmp_path):
  out = tmp_path / 'forecast'
  run = run_script('sample.py', f'--ckpt={protocol_run}', '--task=forecast', '--eval',
                   '--num_windows=3', '--num_samples=4', '--method=ddim', '--num_steps=2',
                   f'--out={out}')
  assert run.returncode == 0, run.stderr
  assert 'scores on the z-scored scale' in run.stdout
  values, _ = series_data.read_series(ett_csv)
  with np.load(out / 'forecast.npz') as arrays:
    first_rows = arrays['first_rows']
    # 2,877 windows of 16 rows over rows 11,508..14,399: the first, middle and last.
    np.testing.assert_array_equal(first_rows, 11520 - 12 + np.array([0, 1438, 2876]))
    for k, row in enumerate(first_rows):
      np.testing.assert_allclose(arrays['context'][k], values[row:row + 12], rtol=1e-5)
      np.testing.assert_allclose(arrays['target'][k], values[row + 12:row + 16], rtol=1e-5)
    assert arrays['samples'].shape == (3, 4, 4, 7)
  result = json.loads((out / 'metrics.json').read_text())
  assert result['horizon'] == 4 and result['scale'] == 'z-scored'
  assert set(result['scores']) == {'model', 'seasonal_naive', 'linear_map', 'nlinear_map',
                                    'climatology'}
  # The linear maps' MSE, recomputed here on the z-scale from the CSV's rows.
  train = values[:8640]
  mean, std = train.mean(axis=0), train.std(axis=0)
  z = (values - mean) / std
  context = np.stack([z[r:r + 12] for r in first_rows])
  target = np.stack([z[r + 12:r + 16] for r in first_rows])
  for name, relative in (('linear_map', False), ('nlinear_map', True)):
    weights = series_data.fit_linear_map(z[:8640], 12, 4, relative)
    mse = ((series_data.linear_map_forecast(weights, context) - target) ** 2).mean()
    assert result['scores'][name]['mse'] == pytest.approx(mse, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('args,message', [
    (['--horizon=3'], 'trained to forecast 4 steps .* --config.data.horizon=3'),
    (['--series=columns'], 'the run was trained on columns'),
])
def test_protocol_backtest_bad_input(protocol_run, ett_csv, tmp_path, args, message):
  if args == ['--series=columns']:
    lines = ett_csv.read_text().splitlines()
    path = tmp_path / 'columns.csv'
    path.write_text('\n'.join([lines[0].replace('OT', 'OIL')] + lines[1:]) + '\n')
    args = [f'--series={path}']
  run = run_script('sample.py', f'--ckpt={protocol_run}', '--task=forecast', '--eval',
                   '--num_windows=2', '--num_samples=2', f'--out={tmp_path / "out"}', *args)
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('sample.py: error:'), run.stderr
  assert re.search(message, lines[0]), lines[0]


@pytest.mark.slow
def test_training_on_a_short_csv_is_one_line(ett_csv, tmp_path):
  path = tmp_path / 'short.csv'
  path.write_text('\n'.join(ett_csv.read_text().splitlines()[:10001]) + '\n')
  run = run_script('train.py', '--config=configs/ett.py', f'--workdir={tmp_path / "run"}',
                   f'--config.data.path={path}')
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert lines == ['train.py: error: data.protocol=ett takes the first 14400 rows (20 months of '
                   'hourly rows: ETTh1.csv or ETTh2.csv); this series has 10000'], run.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_window_shift_uses_the_map_in_forecast_horizons_and_the_observed_mean_elsewhere():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(2, 5, 3)).astype(np.float32)  # 2 channels, lookback 4, horizon 3
  observed = rng.normal(size=(4, 7, 2)).astype(np.float32)
  forecast = masking.forecast_mask(7, 2, 3)
  points = (rng.random((7, 2)) < 0.5).astype(np.float32)
  longer = masking.forecast_mask(7, 2, 4)  # another horizon: not the map's
  masks = np.stack([forecast, points, np.zeros((7, 2), np.float32), longer])
  mapped = series_data.linear_map_forecast(weights, observed[:1, :4])[0]
  base = np.asarray(masking.window_shift(observed, masks, weights))
  np.testing.assert_allclose(base[0, 4:], mapped, rtol=1e-5, atol=1e-6)
  assert (base[0, :4] == 0).all() and (base[1:] == 0).all()
  shift = np.asarray(masking.window_shift(observed * masks, masks, weights, center=True))
  np.testing.assert_allclose(shift[0, 4:], mapped, rtol=1e-5, atol=1e-6)
  for k in range(4):
    seen = masks[k] > 0
    for c in range(2):
      want = observed[k, seen[:, c], c].mean() if seen[:, c].any() else 0.0
      rows = slice(0, 4) if k == 0 else slice(None)
      np.testing.assert_allclose(shift[k, rows, c], want, rtol=1e-5, atol=1e-6)


class StandardNormalDenoiser(nn.Module):
  """The exact eps prediction for x0 ~ N(0, I) (sigma_t x_t), reading x_t from the network's
  conditioned input [B, L, 3C]: with a linear base, forecasts are base + N(0, 1)."""
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    sigma = schedules.linear(1000).sqrt_one_minus_alphas_cumprod[t][:, None, None]
    return sigma * x[..., :x.shape[-1] // 3]


@pytest.mark.parametrize('base,center', [('linear_map', False), ('linear_map', True),
                                         ('nlinear_map', True), ('', True)])
def test_a_shifted_run_samples_the_shift_plus_the_networks_residual(base, center):
  """The network's space is the window less its shift (the map's forecast in the horizon, or
  the lookback's mean when centred alone); with the N(0, 1) denoiser a forecast is that shift
  plus N(0, 1)."""
  config = _series_config(True)
  config.data.horizon = 4
  config.model.forecast_base = base
  config.model.center_observed = center
  rng = np.random.default_rng(1)
  weights = rng.normal(scale=0.3, size=(1, LENGTH - 4 + 1, 4))
  stats_ = dict(STATS, mean=[2.0], std=[3.0], linear_map=weights.tolist(),
                nlinear_map=(weights[..., ::-1]).tolist())
  weights = np.asarray(stats_[base or 'linear_map'])  # the map the run's base names
  sample_fn = inference.make_sample_fn(StandardNormalDenoiser(), config, stats_)
  observed = rng.normal(size=(LENGTH, 1)).astype(np.float32)  # model space
  mask = masking.forecast_mask(LENGTH, 1, 4)
  count = 2000
  samples = np.asarray(sample_fn(
      {}, jax.random.key(0), count, method='ddpm',
      observed=np.broadcast_to(observed * mask, (count, LENGTH, 1)),
      mask=np.broadcast_to(mask, (count, LENGTH, 1))))
  z = (samples - 2.0) / 3.0  # back to model space
  np.testing.assert_allclose(z[:, :LENGTH - 4], np.broadcast_to(observed[:LENGTH - 4],
                                                               (count, LENGTH - 4, 1)), atol=1e-5)
  expected = (series_data.linear_map_forecast(weights, observed[None, :LENGTH - 4])[0] if base
              else observed[:LENGTH - 4].mean(0, keepdims=True))
  np.testing.assert_array_less(np.abs(z[:, LENGTH - 4:].mean(0) - expected), 4 / math.sqrt(count))
  np.testing.assert_allclose(z[:, LENGTH - 4:].var(0), 1.0, rtol=0.1)


def test_a_forecast_base_needs_a_horizon():
  config = _series_config(True)
  config.model.forecast_base = 'linear_map'
  with pytest.raises(ValueError, match='set --config.model.observed_input=True and '
                                       '--config.data.horizon'):
    config_lib.resolve(config, (LENGTH, 1), 0)
  config.data.horizon, config.model.forecast_base = 4, 'linear'
  with pytest.raises(ValueError, match="unknown model.forecast_base 'linear'"):
    config_lib.resolve(config, (LENGTH, 1), 0)


def test_the_validation_part_can_be_scored_to_choose_settings(protocol_run, tmp_path):
  out = generate.generate(generate.SampleRequest(
      str(protocol_run), str(tmp_path / 'val'), num_samples=2, method='ddim', num_steps=2,
      task='forecast', evaluate=True, num_windows=2, eval_part='validation'))
  with np.load(out / 'forecast.npz') as arrays:
    # Validation windows look back into the training rows; the last one's horizon ends at the
    # validation part's last row, 11,519.
    np.testing.assert_array_equal(arrays['first_rows'], [8640 - 12, 11520 - 16])
  assert json.loads((out / 'metrics.json').read_text())['part'] == 'validation'


def test_training_time_of_a_resumed_run_leaves_out_the_gap(tmp_path):
  # Two sessions of a run: steps 1-100 in 50 s, a day's pause, then steps 101-200 in 40 s, each
  # session first compiling (10 s, then 5 s). The benchmarks report 105 s, not a day.
  records = [{'step': 1, 'compile_and_first_step_s': 10.0},
             {'step': 50, 'loss': 0.5, 'time': 1000.0}, {'step': 100, 'loss': 0.4, 'time': 1050.0},
             {'step': 101, 'compile_and_first_step_s': 5.0},
             {'step': 150, 'loss': 0.3, 'time': 87_400.0},
             {'step': 200, 'loss': 0.2, 'time': 87_440.0}]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  record = common.training_record(tmp_path)
  assert record['step'] == 200 and record['loss'] == 0.2 and record['compile_s'] == 15.0
  assert math.isclose(record['minutes'], (50 + 40 + 15) / 60)
  assert math.isclose(record['rate'], (50 + 50) / (50 + 40))
