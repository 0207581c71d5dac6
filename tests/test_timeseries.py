import numpy as np
import pytest

from ddpm_jax.configs import power_small
from ddpm_jax import inference, input_pipeline, series_metrics, series_data
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.series_data import LazyWindows


@pytest.mark.parametrize('n,window,stride', [(10, 3, 1), (10, 3, 2), (10, 10, 1), (10, 1, 1),
                                              (10, 4, 7), (10, 4, 100), (7, 2, 3)])
def test_window_count_and_contents(n, window, stride):
  series = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
  windows = LazyWindows(series, window, stride)
  starts = list(range(0, n - window + 1, stride))
  assert len(windows) == len(starts)
  for i, start in enumerate(starts):
    np.testing.assert_array_equal(windows[i], series[start:start + window])
    assert np.shares_memory(windows[i], series)  # a view, not a copy
  np.testing.assert_array_equal(windows[-1], series[starts[-1]:starts[-1] + window])
  batch = windows.get_batch(np.arange(len(windows))[::-1])['x']
  np.testing.assert_array_equal(batch[0], windows[len(windows) - 1])
  with pytest.raises(IndexError):
    windows[len(windows)]


def test_bad_window_arguments():
  series = np.zeros((5, 2))
  with pytest.raises(ValueError, match='window 6 is longer than the series \\(5 rows\\)'):
    LazyWindows(series, 6)
  with pytest.raises(ValueError, match='stride must be an integer >= 1, got 0'):
    LazyWindows(series, 2, 0)


def test_train_and_validation_windows_never_overlap():
  n = 1000
  series = np.stack([np.arange(n), np.sin(np.arange(n))], axis=1).astype(np.float64)
  source = input_pipeline.SeriesSource(series, ['t', 's'], window=50, stride=3, val_fraction=0.2,
                                   normalization='zscore')
  stats = source.stats
  to_rows = lambda w: np.round(series_data.denormalize(w, stats)[:, 0]).astype(int)
  train_rows = set()
  for i in range(len(source.train)):
    train_rows.update(to_rows(source.train[i]))
  val_rows = set()
  for i in range(len(source.validation)):
    val_rows.update(to_rows(source.validation[i]))
  assert max(train_rows) < min(val_rows) == 800
  # Statistics come from the training part only.
  np.testing.assert_allclose(stats['mean'][0], np.arange(800).mean())


@pytest.mark.parametrize('method', series_data.NORMALIZATIONS)
def test_normalization_round_trip(method):
  rng = np.random.default_rng(0)
  series = rng.normal([5.0, -300.0, 0.01], [2.0, 50.0, 0.001], (500, 3))
  stats = series_data.fit_normalization(series, method, ['a', 'b', 'c'])
  normalized = series_data.normalize(series, stats)
  if method == 'zscore':
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(normalized.std(0), 1, rtol=1e-5)
  else:
    np.testing.assert_allclose(normalized.min(0), -1, atol=1e-6)
    np.testing.assert_allclose(normalized.max(0), 1, atol=1e-6)
  restored = series_data.denormalize(normalized, stats)
  scale = np.abs(series).max(axis=0)
  assert np.all(np.abs(restored - series) <= 1e-5 * np.abs(series) + 1e-6 * scale)


def test_metrics_on_known_inputs():
  rng = np.random.default_rng(1)
  t = np.arange(48)
  x = np.stack([np.sin(t / 4 + p)[:, None] * [1.0, -2.0] for p in rng.uniform(0, 6, 300)])
  x = x + 0.1 * rng.normal(size=x.shape)
  same = series_metrics.compare(x, x)
  assert same['marginal'] < 1e-9 and same['acf'] < 1e-9 and same['cross_corr'] < 1e-9
  assert same['discriminative'] < 0.1
  shifted = series_metrics.compare(x + 0.7, x)
  np.testing.assert_allclose(shifted['marginal'], 0.7, rtol=1e-6)
  assert shifted['acf'] < 1e-9 and shifted['cross_corr'] < 1e-9  # shift-invariant
  noise = series_metrics.gaussian_baseline(x, 300)
  far = series_metrics.compare(noise, x)
  assert far['acf'] > 0.3 and far['cross_corr'] > 0.5 and far['discriminative'] > 0.3


def _write_csv(path, rows, header='date,a,b'):
  path.write_text(header + '\n' + '\n'.join(rows) + '\n')
  return path


def test_csv_reading_and_bad_input(tmp_path):
  good = _write_csv(tmp_path / 'good.csv', ['2020-01-02,3,4', '2020-01-01,1,2', '2020-01-03,5,6'])
  series, names = series_data.read_series(good)
  assert names == ['a', 'b']
  np.testing.assert_array_equal(series, [[1, 2], [3, 4], [5, 6]])  # ordered by date
  series, names = series_data.read_series(good, columns='b')
  np.testing.assert_array_equal(series.ravel(), [2, 4, 6])
  with pytest.raises(ValueError, match="column 'c' is not in .*date, a, b"):
    series_data.read_series(good, columns='a,c')
  text = _write_csv(tmp_path / 'text.csv', ['2020-01-01,1,x', '2020-01-02,2,y'])
  with pytest.raises(ValueError, match="column 'b' .* not numeric: row 2 holds 'x'"):
    series_data.read_series(text)
  holes = _write_csv(tmp_path / 'holes.csv', ['d1,1,', 'd2,,', 'd3,3,1', 'd4,4,2'])
  series, names = series_data.read_series(holes)
  with pytest.raises(ValueError, match=r'NaN or empty values in 2 row\(s\) \(data rows 0, 1'):
    series_data.check_or_fill_nans(series, names, False, 'holes.csv')
  filled = series_data.check_or_fill_nans(series, names, True, 'holes.csv')
  np.testing.assert_allclose(filled[:, 0], [1, 2, 3, 4])
  empty_col = _write_csv(tmp_path / 'empty.csv', ['d1,1,', 'd2,2,'])
  series, names = series_data.read_series(empty_col)
  with pytest.raises(ValueError, match="column 'b' .* has no numbers"):
    series_data.check_or_fill_nans(series, names, True, 'empty.csv')


def test_etth1_from_shared_data(shared_data):
  config = power_small.get_config().data
  config.path = str(shared_data / 'ETTh1.csv')
  source = input_pipeline.series_source(shared_data / 'ETTh1.csv', config)
  assert source.names == ['HUFL', 'HULL', 'MUFL', 'MULL', 'LUFL', 'LULL', 'OT']
  # train | validation | test in time order, 10% each for the last two (configs/power.py)
  assert source.row_ranges == {'train': (0, 13936), 'validation': (13936, 15678),
                               'test': (15678, 17420)}
  assert source.train.series.shape == (13936, 7)
  assert len(source) == 13936 - 64 + 1
  assert len(source.test) == 1742 - 64 + 1
  assert source.info().shape == (64, 7)


@pytest.mark.slow  # 55 s on the 2-core CI machine: in the slow pass
def test_series_run_end_to_end_in_original_units(tmp_path):
  import json

  from ddpm_jax import generate, trainer
  from tests.helpers import tiny_config
  t = np.arange(400)
  rows = [f'2020-01-01 {i:05d},{1000 + 50 * np.sin(i / 5):.3f},{-3 + 0.1 * np.cos(i / 7):.4f}'
          for i in t]
  path = _write_csv(tmp_path / 'series.csv', rows, header='date,load,temp')
  config = tiny_config(name='series', path=str(path), window=16, stride=2, val_fraction=0.2)
  config.model.spatial_dims = 1
  config.model.attn_resolutions = (8,)
  trainer.train(config, tmp_path / 'run')
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['channels'] == 2
  out = generate.generate(generate.SampleRequest(
      str(tmp_path / 'run'), str(tmp_path / 'out'), num_samples=6, method='ddim', num_steps=4,
      evaluate=True))
  samples = np.load(out / 'samples.npy')
  assert samples.shape == (6, 16, 2)
  # What was written is sample_fn's output, and that is the model's output in original units.
  import jax
  run = workdir_lib.load_run(tmp_path / 'run')
  sample_fn, params = inference.load_sampler(tmp_path / 'run')
  stats = run.data_stats
  assert stats['columns'] == ['load', 'temp'] and abs(stats['mean'][0] - 1000) < 5
  direct = sample_fn(params, jax.random.fold_in(jax.random.key(0), 0), 6, method='ddim',
                     num_steps=4)
  np.testing.assert_allclose(samples, direct, rtol=1e-5)
  model_space = np.asarray(jax.numpy.ones((1, 16, 2)))
  np.testing.assert_allclose(inference.to_data_space(model_space, run.config, stats)[0, 0],
                             np.asarray(stats['mean']) + np.asarray(stats['std']), rtol=1e-6)
  lines = (out / 'samples.csv').read_text().splitlines()
  assert lines[0] == 'sample,step,load,temp' and len(lines) == 1 + 6 * 16
  np.testing.assert_allclose([float(v) for v in lines[1].split(',')[2:]], samples[0, 0], rtol=1e-4)
  assert (out / 'windows.png').is_file()
  table = json.loads((out / 'metrics.json').read_text())
  assert set(table['generated vs real train']) == set(series_metrics.METRIC_NAMES)


def test_handing_the_series_over_normalises_it_in_place():
  series = np.random.default_rng(0).normal(3.0, 2.0, (300, 2)).astype(np.float32)
  kept = input_pipeline.SeriesSource(series, ['a', 'b'], 10, 1, 0.0, 'zscore')
  assert not np.shares_memory(kept.train.series, series) and abs(series.mean() - 3) < 0.5
  given = input_pipeline.SeriesSource(series, ['a', 'b'], 10, 1, 0.0, 'zscore', copy=False)
  assert np.shares_memory(given.train.series, series)  # one array, no second copy
  np.testing.assert_allclose(given.train.series, kept.train.series, rtol=1e-6, atol=1e-6)
