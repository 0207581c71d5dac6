"""Forecasting and imputation with a trained series run (``sample.py --task=forecast|impute``).

The samples are conditioned on the observed values of each window: through the network for a
run trained with ``model.observed_input`` (configs/power*.py), else by replacement (a
training-free route; see sampling.make_plan). Everything written is in original units.

  forecast           the ``horizon`` steps after the end of a series, from the window before
  forecast --eval    a backtest on windows of the run's test part (or validation part): the
                     last ``horizon`` steps of each are hidden, forecast, and scored against
                     seasonal naive, the least-squares linear map and the training part's
                     climatology (on the z-scale for a data.protocol='ett' run)
  impute             the NaNs of a series, each window with gaps filled from the rest
  impute --eval      random points (``missing``) or blocks (``block``) of test windows hidden,
                     filled and scored against linear interpolation and the seasonal profile
"""

from __future__ import annotations

import csv
import json
import pathlib
import time
from typing import Callable, Optional

import jax
import numpy as np
from matplotlib.figure import Figure

from ddpm_jax import (config_lib, file_checks, inference, input_pipeline, masking, plots, series_metrics,
                      series_data)
from ddpm_jax.errors import InputError

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TASKS = ('generate', 'forecast', 'impute')


def check_training_file(path: pathlib.Path, trained_on: dict) -> None:
  """The run's own data, read again: gone is one line naming the file (and its sha256) to put
  back or pass with --series; changed since training is a warning, as its windows differ."""
  digest = trained_on['sha256']
  if not path.exists():
    raise FileNotFoundError(f'the run was trained on {path} (sha256 {digest[:12]}...), which is '
                            f'not there now; put it back or pass --series=CSV')
  if file_checks.sha256_of_file(path) != digest:
    print(f'warning: {path} has changed since the run was trained on it (sha256 '
          f'{digest[:12]}... then); its windows are not the ones the run saw', flush=True)


class SeriesInput:
  """The series a task reads, in original units [N, C], with its times and column names."""

  def __init__(self, config, stats: dict, series_path: str = ''):
    path = pathlib.Path(series_path or config.data.path).expanduser()
    trained_on = stats.get('source')  # runs trained before it was recorded have none
    if not series_path and trained_on:
      check_training_file(path, trained_on)
    if not path.exists():
      raise FileNotFoundError(f'series {path} does not exist; pass --series=CSV')
    columns = stats['columns']
    try:
      values, names, times = series_data.read_series_with_times(
          path, ','.join(columns) if path.suffix == '.csv' else '', config.data.time_column)
    except ValueError as error:
      raise InputError(f'{error} (the run was trained on columns {", ".join(columns)})') from None
    if list(names) != list(columns):
      raise InputError(f'{path} has columns {", ".join(names)} but the run was trained on '
                       f'{", ".join(columns)}')
    series_data.refuse_infinities(values, names, str(path))
    if np.isnan(values).all():
      raise InputError(f'every value of {path} is missing')
    self.path, self.values, self.times, self.names = path, values, times, list(columns)
    self.time_column = config.data.time_column if times else 'row'


def _sample_windows(sample_fn, params, observed: np.ndarray, mask: np.ndarray, num_samples: int,
                    *, seed: int, batch_size: int, progress, **options) -> np.ndarray:
  """[K, S, L, C] samples (original units) for windows observed [K, L, C] (model space, 0 where
  hidden) and mask [K, L, C]; each window repeated S times."""
  repeat = lambda a: np.repeat(a, num_samples, axis=0)
  flat = inference.sample_in_batches(
      sample_fn, params, jax.random.key(seed), len(observed) * num_samples, batch_size,
      observed=repeat(observed), mask=repeat(mask), progress=progress, **options)
  return flat.reshape((len(observed), num_samples) + observed.shape[1:])


def _times_after(times, count: int):
  """``count`` times continuing ``times`` at its median spacing (None without parseable times)."""
  if not times:
    return None
  try:
    parsed = np.array(times, dtype='datetime64[s]')
  except ValueError:
    return None
  step = np.median(np.diff(parsed[-50:]).astype(np.int64)).astype('timedelta64[s]')
  return [str(parsed[-1] + step * (i + 1)).replace('T', ' ') for i in range(count)]


def _as_datetimes(labels):
  try:
    return np.array(labels, dtype='datetime64[s]')
  except (ValueError, TypeError):
    return np.arange(len(labels))


def fan_chart(context: np.ndarray, samples: np.ndarray, target: Optional[np.ndarray], names,
              context_times, future_times, path, title: str,
              baselines: Optional[dict] = None) -> pathlib.Path:
  """One panel per channel: the context, the 5-95% and 25-75% bands and median of the samples
  [S, H, C], the true values when known and each baseline's point forecast {name: [H, C]}."""
  channels = samples.shape[-1]
  figure = Figure(figsize=(10, 1.9 * channels), layout='constrained')
  low, q25, median, q75, high = np.quantile(samples, QUANTILES, axis=0)
  x_context, x_future = _as_datetimes(context_times), _as_datetimes(future_times)
  for c in range(channels):
    axes = figure.add_subplot(channels, 1, c + 1)
    axes.plot(x_context, context[:, c], color='black', lw=1, label='observed')
    axes.fill_between(x_future, low[:, c], high[:, c], color=plots.COLOURS[0], alpha=0.2,
                      label='5-95%')
    axes.fill_between(x_future, q25[:, c], q75[:, c], color=plots.COLOURS[0], alpha=0.4,
                      label='25-75%')
    axes.plot(x_future, median[:, c], color=plots.COLOURS[0], lw=1.5, label='median')
    if target is not None:
      axes.plot(x_future, target[:, c], color=plots.COLOURS[3], lw=1, label='true')
    for b, (name, points) in enumerate((baselines or {}).items()):
      axes.plot(x_future, points[:, c], color=plots.COLOURS[(4 + b) % len(plots.COLOURS)],
                lw=1, ls='--', label=name.replace('_', ' '))
    axes.set_ylabel(names[c])
    axes.grid(True, alpha=0.3)
  figure.axes[0].set_title(title)
  figure.axes[0].legend(loc='upper left', fontsize=7, ncol=7)
  return plots.save_figure(figure, path)


def _write_quantile_csv(path, samples: np.ndarray, names, times_of, target=None) -> None:
  """One row per (window, step): the median and quantiles of each channel (and the truth)."""
  quantiles = np.quantile(samples, QUANTILES, axis=1)  # [Q, K, H, C]
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    header = ['window', 'time']
    for name in names:
      header += [f'{name}_median', f'{name}_q05', f'{name}_q25', f'{name}_q75', f'{name}_q95']
      if target is not None:
        header.append(f'{name}_true')
    writer.writerow(header)
    for k in range(samples.shape[0]):
      for h in range(samples.shape[2]):
        row = [k, times_of(k, h)]
        for c in range(len(names)):
          q = quantiles[:, k, h, c]
          row += [f'{q[2]:.6g}', f'{q[0]:.6g}', f'{q[1]:.6g}', f'{q[3]:.6g}', f'{q[4]:.6g}']
          if target is not None:
            row.append(f'{target[k, h, c]:.6g}')
        writer.writerow(row)


def resolve_horizon(config, requested: Optional[int]) -> int:
  """The steps a forecast covers: ``requested`` (None: the run's data.horizon, else 24),
  checked against the window and against the one horizon a run made for one was trained on."""
  trained = config.data.get('horizon', 0)
  horizon = requested if requested is not None else (trained or 24)
  masking.forecast_mask(config.data.window, config.data.channels, horizon)
  if trained and horizon != trained:
    raise InputError(f'this run was trained to forecast {trained} steps (data.horizon) from '
                     f'{config.data.window - trained}; --horizon={horizon} needs a run trained '
                     f'with --config.data.horizon={horizon}')
  return horizon


EVAL_PARTS = ('test', 'validation')


def window_picks(count: int, num_windows: int) -> np.ndarray:
  """Indices of ``num_windows`` windows evenly spaced over ``count`` (0: all of them), the
  first and the last included."""
  if num_windows < 0:
    raise InputError(f'--num_windows must be 0 (every window) or more, got {num_windows}')
  if num_windows == 0 or num_windows >= count:
    return np.arange(count)
  return np.unique(np.linspace(0, count - 1, num_windows).round().astype(int))


def _eval_windows(config, series: SeriesInput, num_windows: int, part: str = 'test'):
  """(windows [K, L, C] original units, their first rows [K], the source): evenly spaced
  windows of the test part (or of the validation part, to choose settings on)."""
  if part not in EVAL_PARTS:
    raise InputError(f'unknown --eval_part={part}; choose one of {", ".join(EVAL_PARTS)}')
  source = input_pipeline.source_from_config(series.values.astype(np.float32), series.names,
                                             config.data)
  windows_of_part = getattr(source, part)
  if windows_of_part is None:
    fraction = 'test_fraction' if part == 'test' else 'val_fraction'
    raise InputError(f'{series.path} has no {part} part as long as one window '
                     f'(data.{fraction}={config.data.get(fraction, 0.0)}); train with '
                     f'--config.data.{fraction}=0.1 (configs/power*.py do)')
  if np.isnan(series.values).any():
    raise InputError(f'{series.path} has missing values; --eval scores on a complete series')
  picks = window_picks(len(windows_of_part), num_windows)
  windows = series_data.denormalize(windows_of_part.get_batch(picks)['x'], source.stats)
  first_rows = source.window_rows[part][0] + picks * windows_of_part.stride
  return windows.astype(np.float64), first_rows, source


def _normalize(values: np.ndarray, stats: dict) -> np.ndarray:
  return series_data.normalize(np.nan_to_num(values), stats)


def forecast(sample_fn, params, config, stats: dict, out: pathlib.Path, *,
             horizon: Optional[int] = None, series_path: str = '',
             evaluate: bool = False, num_windows: int = 100, num_samples: int = 100,
             season: int = 24, seed: int = 0, batch_size: int = 256, eval_part: str = 'test',
             progress_factory: Callable = None, **options) -> dict:
  """Forecasts ``horizon`` steps (see the module docstring); writes forecast.npz, forecast.csv,
  forecast.png (and metrics.json with ``evaluate``). Returns the metrics (or {}). ``config``
  and ``stats`` are the run's (``ddpm_jax.workdir.Run``)."""
  length, channels = config.data.window, config.data.channels
  horizon = resolve_horizon(config, horizon)
  mask = masking.forecast_mask(length, channels, horizon)
  series = SeriesInput(config, stats, series_path)
  if evaluate:
    windows, first_rows, source = _eval_windows(config, series, num_windows, eval_part)
  else:
    if len(series.values) < length - horizon:
      raise InputError(f'{series.path} has {len(series.values)} rows; a forecast needs the '
                       f'{length - horizon} before it (window {length} - horizon {horizon})')
    tail = series.values[len(series.values) - (length - horizon):]
    if np.isnan(tail).any():
      raise InputError(f'the last {length - horizon} rows of {series.path} have missing values; '
                       'impute them first (--task=impute)')
    windows = np.concatenate([tail, np.zeros((horizon, channels))])[None]
    first_rows = np.array([len(series.values) - (length - horizon)])
  masks = np.broadcast_to(mask, windows.shape).astype(np.float32)
  progress = progress_factory(len(windows) * num_samples) if progress_factory else None
  start = time.time()
  try:
    samples = _sample_windows(sample_fn, params, _normalize(windows, stats) * masks, masks,
                              num_samples, seed=seed, batch_size=batch_size, progress=progress,
                              **options)
  finally:
    if progress is not None:
      progress.close()
  elapsed = time.time() - start
  file_checks.create_output_folder(out)  # only now: bad input above leaves nothing behind
  context, future = windows[:, :length - horizon], samples[:, :, length - horizon:]
  target = windows[:, length - horizon:] if evaluate else None
  arrays = dict(samples=future.astype(np.float32), context=context.astype(np.float32),
                first_rows=first_rows)
  if target is not None:
    arrays['target'] = target.astype(np.float32)
  np.savez(out / 'forecast.npz', **arrays)
  times = series.times
  if evaluate or times is None:
    times_of = (lambda k, h: times[first_rows[k] + length - horizon + h]) if times else \
        (lambda k, h: int(first_rows[k] + length - horizon + h))
    future_times = ([times[first_rows[0] + length - horizon + h] for h in range(horizon)]
                    if times else list(range(horizon)))
  else:
    future_times = _times_after(times, horizon) or list(range(horizon))
    times_of = lambda k, h: future_times[h]
  _write_quantile_csv(out / 'forecast.csv', future, series.names, times_of, target)
  context_times = ([times[first_rows[0] + i] for i in range(length - horizon)] if times
                   else list(range(-(length - horizon), 0)))
  baselines = forecast_baselines(series.values[:source.row_ranges['train'][1]], context,
                                 horizon, season, num_samples, seed) if evaluate else {}
  fan_chart(context[0], future[0], None if target is None else target[0], series.names,
            context_times, future_times, out / 'forecast.png',
            f'{horizon}-step forecast, {num_samples} samples'
            + (f' ({eval_part} window 0)' if evaluate else ''),
            {name: b[0, 0] for name, b in baselines.items() if b.shape[1] == 1})
  print(f'{len(windows) * num_samples} forecast samples ({len(windows)} window(s) x '
        f'{num_samples}) in {elapsed:.1f} s, compilation included')
  if not evaluate:
    return {}
  # The benchmark protocol scores on the training rows' z-scores; other runs in their units.
  scale = 'z-scored' if config.data.get('protocol') == 'ett' else 'original units'
  on_scale = (lambda a: series_data.normalize(a, stats)) if scale == 'z-scored' else \
      (lambda a: a)
  hidden = np.ones(target.shape, bool)
  scoring_start = time.time()
  scores = {name: series_metrics.probabilistic_scores(on_scale(forecasts), on_scale(target),
                                                      hidden)
            for name, forecasts in [('model', future)] + list(baselines.items())}
  result = _result(config, 'forecast', dict(horizon=horizon, scale=scale, part=eval_part),
                   len(windows), num_samples, elapsed, scores)
  result['scoring_seconds'] = round(time.time() - scoring_start, 2)
  (out / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
  return result


def forecast_baselines(train_rows: np.ndarray, context: np.ndarray, horizon: int, season: int,
                       num_samples: int, seed: int) -> dict:
  """{name: forecasts [K, S, horizon, C]} of the windows' context [K, T, C] (original units)
  by the simple models a forecaster must beat, fitted on the training rows [N, C]: seasonal
  naive and the least-squares linear maps of series_data.LINEAR_MAPS (points, S = 1) and
  climatology (S = num_samples)."""
  baselines = {'seasonal_naive': series_metrics.seasonal_naive(context, horizon, season)[:, None]}
  for name, relative in series_data.LINEAR_MAPS.items():
    weights = series_data.fit_linear_map(train_rows, context.shape[1], horizon, relative)
    baselines[name] = series_data.linear_map_forecast(weights, context)[:, None]
  baselines['climatology'] = series_metrics.climatology_samples(
      train_rows, num_samples, (len(context), horizon, context.shape[2]), seed)
  return baselines


def _result(config, task, settings, num_windows, num_samples, elapsed, scores) -> dict:
  route = 'network' if config_lib.observed_input(config) else 'replacement'
  return {'task': task, **settings, 'conditioning': route,
          'num_windows': num_windows, 'num_samples': num_samples,
          'seconds': round(elapsed, 2),
          'samples_per_second': round(num_windows * num_samples / elapsed, 1), 'scores': scores}


def _covering_starts(rows: int, length: int) -> np.ndarray:
  """Window starts that cover rows 0..rows-1: every length-th, plus one ending at the last row."""
  starts = list(range(0, rows - length + 1, length))
  if starts[-1] + length < rows:
    starts.append(rows - length)
  return np.array(starts)


def impute(sample_fn, params, config, stats: dict, out: pathlib.Path, *, series_path: str = '',
           evaluate: bool = False, num_windows: int = 100, num_samples: int = 100,
           missing: float = 0.3, block: int = 0, season: int = 24, seed: int = 0,
           batch_size: int = 256, eval_part: str = 'test', progress_factory: Callable = None,
           **options) -> dict:
  """Fills missing values (see the module docstring); writes imputed.csv, imputed.png,
  imputation.npz (and metrics.json with ``evaluate``). Returns the metrics (or {}). ``config``
  and ``stats`` are the run's (``ddpm_jax.workdir.Run``)."""
  length = config.data.window
  series = SeriesInput(config, stats, series_path)
  if evaluate:
    windows, first_rows, source = _eval_windows(config, series, num_windows, eval_part)
    masks = masking.evaluation_mask(np.random.default_rng(seed), windows.shape, missing, block)
  else:
    if len(series.values) < length:
      raise InputError(f'{series.path} has {len(series.values)} rows, fewer than one window '
                       f'({length})')
    gaps = np.isnan(series.values)
    if not gaps.any():
      raise InputError(f'{series.path} has no missing values: nothing to impute (--eval hides '
                       'values of test windows to score the imputation)')
    starts = _covering_starts(len(series.values), length)
    rows = starts[:, None] + np.arange(length)
    keep = gaps[rows].any(axis=(1, 2))  # windows with something to fill
    first_rows, windows = starts[keep], series.values[rows[keep]]
    masks = (~np.isnan(windows)).astype(np.float32)
    if not masks.any(axis=(1, 2)).all():
      raise InputError('a window of the series has no observed value at all; the imputation '
                       'needs some observations in every window')
  progress = progress_factory(len(windows) * num_samples) if progress_factory else None
  start = time.time()
  try:
    samples = _sample_windows(sample_fn, params, _normalize(windows, stats) * masks, masks,
                              num_samples, seed=seed, batch_size=batch_size, progress=progress,
                              **options)
  finally:
    if progress is not None:
      progress.close()
  elapsed = time.time() - start
  file_checks.create_output_folder(out)  # only now: bad input above leaves nothing behind
  print(f'{len(windows) * num_samples} imputation samples ({len(windows)} window(s) x '
        f'{num_samples}) in {elapsed:.1f} s, compilation included')
  np.savez(out / 'imputation.npz', samples=samples.astype(np.float32),
           mask=masks.astype(np.float32), first_rows=first_rows,
           **({'target': windows.astype(np.float32)} if evaluate else {}))
  if evaluate:
    hidden = masks == 0
    train_rows = series.values[:source.row_ranges['train'][1]]
    profile = series_metrics.seasonal_profile(train_rows, 0, first_rows[:, None] + np.arange(length),
                                       season)
    settings = dict(block=block) if block else dict(missing=missing)
    settings['part'] = eval_part
    result = _result(config, 'impute', settings, len(windows), num_samples, elapsed, {
        'model': series_metrics.probabilistic_scores(samples, windows, hidden),
        'linear_interpolation': series_metrics.probabilistic_scores(
            series_metrics.linear_interpolation(windows, masks)[:, None], windows, hidden),
        'seasonal_profile': series_metrics.probabilistic_scores(profile[:, None], windows, hidden)})
    (out / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
    _plot_imputation(windows[0], masks[0], samples[0], series, first_rows[0],
                     out / 'imputed.png', truth=True)
    return result
  filled, quantiles = _fill_series(series.values, first_rows, samples)
  _write_imputed_csv(out / 'imputed.csv', series, filled, quantiles)
  _plot_imputation(series.values[first_rows[0]:first_rows[0] + length], masks[0], samples[0],
                   series, first_rows[0], out / 'imputed.png', truth=False)
  return {}


def _fill_series(values: np.ndarray, first_rows, samples: np.ndarray):
  """The series with each NaN replaced by its sample median; quantiles [Q, N, C] (NaN where
  observed). A row covered by two windows takes the later one's samples."""
  quantiles = np.full((len(QUANTILES),) + values.shape, np.nan)
  length = samples.shape[2]
  for k, first in enumerate(first_rows):
    quantiles[:, first:first + length] = np.quantile(samples[k], QUANTILES, axis=0)
  gaps = np.isnan(values)
  quantiles[:, ~gaps] = np.nan
  filled = np.where(gaps, quantiles[2], values)
  return filled, quantiles


def _write_imputed_csv(path, series: SeriesInput, filled, quantiles) -> None:
  gaps = np.isnan(series.values)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    header = [series.time_column] + list(series.names)
    for name in series.names:
      header += [f'{name}_imputed', f'{name}_q05', f'{name}_q25', f'{name}_q75', f'{name}_q95']
    writer.writerow(header)
    for r in range(len(filled)):
      row = [series.times[r] if series.times else r] + [f'{v:.6g}' for v in filled[r]]
      for c in range(filled.shape[1]):
        q = quantiles[:, r, c]
        row += [int(gaps[r, c])] + ['' if np.isnan(v) else f'{v:.6g}'
                                    for v in (q[0], q[1], q[3], q[4])]
      writer.writerow(row)


def _plot_imputation(window, mask, samples, series: SeriesInput, first_row: int, path,
                     truth: bool) -> None:
  """One window: observed points, the sample median and 5-95% band on the hidden ones (and the
  hidden truth under --eval)."""
  channels = window.shape[-1]
  figure = Figure(figsize=(10, 1.9 * channels), layout='constrained')
  rows = first_row + np.arange(window.shape[0])
  x = _as_datetimes([series.times[r] for r in rows]) if series.times else rows
  low, median, high = np.quantile(samples, (0.05, 0.5, 0.95), axis=0)
  for c in range(channels):
    axes = figure.add_subplot(channels, 1, c + 1)
    seen = mask[:, c] > 0
    axes.fill_between(x, low[:, c], high[:, c], color=plots.COLOURS[0], alpha=0.25,
                      label='5-95%')
    axes.plot(x, np.where(seen, np.nan, median[:, c]), 'o', ms=2.5, color=plots.COLOURS[0],
              label='imputed median')
    axes.plot(x, np.where(seen, window[:, c], np.nan), '.-', ms=3, lw=0.8, color='black',
              label='observed')
    if truth:
      axes.plot(x, np.where(seen, np.nan, window[:, c]), 'x', ms=3, color=plots.COLOURS[3],
                label='hidden truth')
    axes.set_ylabel(series.names[c])
    axes.grid(True, alpha=0.3)
  figure.axes[0].set_title('imputation of one window')
  figure.axes[0].legend(loc='upper left', fontsize=7, ncol=4)
  plots.save_figure(figure, path)


def format_scores(result: dict) -> str:
  """The scores of metrics.json as a plain-text table: one row per method."""
  names = ('crps', 'crps_sum', 'energy', 'mae', 'mse', 'coverage_50', 'coverage_90')
  width = max(len(method) for method in result['scores']) + 2
  lines = [f'scores on the {result.get("scale", "original units")} scale',
           ' ' * width + ''.join(f'{n:>13}' for n in names)]
  for method, scores in result['scores'].items():
    cells = [f'{"-":>13}' if scores[n] is None else f'{scores[n]:>13.4f}' for n in names]
    lines.append(f'{method:<{width}}' + ''.join(cells))
  return '\n'.join(lines)
