"""Long multichannel series cut into sliding windows without copying, and their normalisation.

A series [N, C] is stored once; window i is the view ``series[i * stride : i * stride + window]``.
The split is by time: validation windows come from the final part of the series and never
overlap training windows. Normalisation statistics are fitted on the training part only and
saved with the checkpoint, so samples come back in the original units.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Optional, Sequence

import numpy as np

from ddpm_jax import plots
from ddpm_jax.input_pipeline import DataInfo

NORMALIZATIONS = ('zscore', 'minmax')


class LazyWindows:
  """Random access to the sliding windows of one [N, C] array: ``len`` windows of [window, C].

  ``windows[i]`` is a view into the series (no copy); ``get_batch(indices)`` copies only the
  windows asked for.
  """

  def __init__(self, series: np.ndarray, window: int, stride: int = 1):
    series = np.asarray(series)
    if series.ndim == 1:
      series = series[:, None]
    if series.ndim != 2:
      raise ValueError(f'a series must be [N, C], got shape {list(series.shape)}')
    if int(window) != window or window < 1:
      raise ValueError(f'window must be a positive integer, got {window!r}')
    if int(stride) != stride or stride < 1:
      raise ValueError(f'stride must be an integer >= 1, got {stride!r}')
    if window > series.shape[0]:
      raise ValueError(f'window {window} is longer than the series ({series.shape[0]} rows); '
                       f'use a window of at most {series.shape[0]}')
    self.series, self.window, self.stride = series, int(window), int(stride)

  def __len__(self) -> int:
    return (self.series.shape[0] - self.window) // self.stride + 1

  def __getitem__(self, index: int) -> np.ndarray:
    length = len(self)
    if not -length <= index < length:
      raise IndexError(f'window {index} out of range for {length} windows')
    start = (index % length) * self.stride
    return self.series[start:start + self.window]

  def get_batch(self, indices) -> dict:
    indices = np.asarray(indices)
    # [n, window] row numbers, then one gather: only the requested windows are copied.
    rows = (indices * self.stride)[:, None] + np.arange(self.window)[None, :]
    return {'x': self.series[rows].astype(np.float32, copy=False)}


def read_series(path: pathlib.Path, columns: str = '', time_column: str = 'date'):
  """Reads a CSV (a header row; ``columns`` names, comma-separated, '' = every column but the
  time column), a .npy [N, C] or a .npz (first array) -> (float64 [N, C], column names)."""
  wanted = [c.strip() for c in columns.split(',') if c.strip()]
  if path.suffix in ('.npy', '.npz'):
    if path.suffix == '.npy':
      array = np.load(path)
    else:
      with np.load(path) as archive:
        array = archive[next(iter(archive))]
    array = np.asarray(array)
    if array.ndim == 1:
      array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
      raise ValueError(f'{path} must hold a numeric [N, C] array, got {array.dtype} '
                       f'{list(array.shape)}')
    names = [str(i) for i in range(array.shape[1])]
    if wanted:
      unknown = [c for c in wanted if c not in names]
      if unknown:
        raise ValueError(f'columns {unknown} not in {path}: an array file takes column indices '
                         f'0..{array.shape[1] - 1}')
      array = array[:, [int(c) for c in wanted]]
      names = wanted
    return array.astype(np.float64), names
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  if len(rows) < 2:
    raise ValueError(f'{path} has no data rows')
  header = [h.strip() for h in rows[0]]
  body = rows[1:]
  if time_column in header:
    time_index = header.index(time_column)
    order = sorted(range(len(body)), key=lambda r: body[r][time_index])  # ISO times sort as text
    body = [body[r] for r in order]
  names = wanted or [h for h in header if h != time_column]
  unknown = [c for c in names if c not in header]
  if unknown:
    raise ValueError(f'column {unknown[0]!r} is not in {path}; it has {", ".join(header)}')
  if not names:
    raise ValueError(f'{path} has no columns besides {time_column!r}')
  array = np.empty((len(body), len(names)), np.float64)
  for j, name in enumerate(names):
    k = header.index(name)
    for r, row in enumerate(body):
      cell = row[k].strip() if k < len(row) else ''
      try:
        array[r, j] = float(cell) if cell else np.nan
      except ValueError:
        raise ValueError(f'column {name!r} of {path} is not numeric: row {r + 2} holds '
                         f'{cell[:40]!r}; choose numeric columns with --config.data.columns')
  return array, names


def check_or_fill_nans(series: np.ndarray, names: Sequence[str], fill: bool, source: str):
  """Refuses NaNs with their row numbers, or fills them by linear interpolation if asked."""
  missing = np.isnan(series)
  if not missing.any():
    return series
  for j, name in enumerate(names):
    if missing[:, j].all():
      raise ValueError(f'column {name!r} of {source} has no numbers (all empty or NaN)')
  if not fill:
    rows = np.flatnonzero(missing.any(axis=1))
    shown = ', '.join(str(r) for r in rows[:5]) + (', ...' if len(rows) > 5 else '')
    raise ValueError(f'{source} has NaN or empty values in {len(rows)} row(s) (data rows {shown}, '
                     f'counting from 0); clean them or set --config.data.fill_nan=True to '
                     f'interpolate')
  series = series.copy()
  index = np.arange(series.shape[0])
  for j in range(series.shape[1]):
    bad = missing[:, j]
    if bad.any():
      series[bad, j] = np.interp(index[bad], index[~bad], series[~bad, j])
  return series


def fit_normalization(train_part: np.ndarray, method: str, names: Sequence[str]) -> dict:
  """Per-channel statistics of the training part, as a JSON-able dict."""
  if method == 'zscore':
    std = train_part.std(axis=0)
    return {'method': method, 'columns': list(names), 'mean': train_part.mean(axis=0).tolist(),
            'std': np.where(std > 0, std, 1.0).tolist()}
  if method == 'minmax':
    low, high = train_part.min(axis=0), train_part.max(axis=0)
    return {'method': method, 'columns': list(names), 'min': low.tolist(),
            'max': np.where(high > low, high, low + 1.0).tolist()}
  raise ValueError(f'unknown data.normalization {method!r}; choose one of '
                   f'{", ".join(NORMALIZATIONS)}')


def normalize(x: np.ndarray, stats: dict, copy: bool = True) -> np.ndarray:
  """Original units -> model space (z-scores, or [-1, 1] for minmax), float32.

  With ``copy=False`` a float32 ``x`` is normalised in place and returned (no second copy of a
  long series); otherwise the result is one new array.
  """
  out = np.array(x, np.float32) if copy else np.asarray(x, np.float32)
  if stats['method'] == 'zscore':
    out -= np.asarray(stats['mean'], np.float32)
    out /= np.asarray(stats['std'], np.float32)
  else:
    low, high = np.asarray(stats['min'], np.float32), np.asarray(stats['max'], np.float32)
    out -= low
    out *= 2.0 / (high - low)
    out -= 1.0
  return out


def denormalize(x, stats: dict):
  """Model space -> original units; the inverse of ``normalize``."""
  if stats is None:
    raise ValueError('this time-series run saved no normalisation statistics')
  if stats['method'] == 'zscore':
    return x * np.asarray(stats['std'], np.float32) + np.asarray(stats['mean'], np.float32)
  low, high = np.asarray(stats['min'], np.float32), np.asarray(stats['max'], np.float32)
  return (x + 1.0) / 2.0 * (high - low) + low


class SeriesSource:
  """Training windows of a normalised series, plus the validation windows that follow them."""

  def __init__(self, series: np.ndarray, names: Sequence[str], window: int, stride: int,
               val_fraction: float, normalization: str, copy: bool = True):
    """``copy=False`` hands the series over: a float32 one is normalised in place."""
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f'data.val_fraction must lie in [0, 1), got {val_fraction}')
    num_val = int(round(series.shape[0] * val_fraction))
    split = series.shape[0] - num_val
    if window > split:
      raise ValueError(f'window {window} is longer than the training part of the series '
                       f'({split} of {series.shape[0]} rows); use a window of at most {split}')
    self.stats = fit_normalization(series[:split], normalization, names)
    normalized = normalize(series, self.stats, copy=copy)
    self.names = list(names)
    self.train = LazyWindows(normalized[:split], window, stride)
    # Validation windows start at the split: no window spans both parts.
    self.validation = LazyWindows(normalized[split:], window, stride) \
        if num_val >= window else None

  def __len__(self):
    return len(self.train)

  def get_batch(self, indices) -> dict:
    return self.train.get_batch(indices)

  def info(self) -> DataInfo:
    return DataInfo((self.train.window, self.train.series.shape[1]), len(self), 0, self.stats)


def series_source(path: pathlib.Path, data_config) -> SeriesSource:
  """Reads, checks and splits the series that ``config.data`` names."""
  series, names = read_series(path, data_config.columns, data_config.time_column)
  series = check_or_fill_nans(series, names, data_config.fill_nan, str(path))
  return SeriesSource(series.astype(np.float32), names, data_config.window, data_config.stride,
                      data_config.val_fraction, data_config.normalization, copy=False)


def plot_windows(generated: np.ndarray, real: Optional[np.ndarray], path,
                 names: Optional[Sequence[str]] = None) -> None:
  """windows.png: one panel per channel; real windows in blue/green, generated in orange/red."""
  num_channels = generated.shape[-1]
  names = list(names or [])
  if len(names) != num_channels:
    names = [str(c) for c in range(num_channels)]
  steps = np.arange(generated.shape[1])
  panels = []
  for c in range(num_channels):
    lines = [(steps, w[:, c], 1 + 2 * (i % 2)) for i, w in enumerate(generated)]
    if real is not None:
      lines = [(steps, w[:, c], 2 * (i % 2)) for i, w in enumerate(real)] + lines
    title = f'{names[c]}: ' + ('real (blue, green) vs ' if real is not None else '') + \
        'generated (orange, red)'
    panels.append({'title': title, 'lines': lines, 'xlabel': 'time step in the window'})
  plots.line_panels(panels, path)


def write_series_outputs(samples: np.ndarray, config, stats: dict, out: pathlib.Path,
                         evaluate: bool) -> None:
  """samples.npy [N, window, C] in original units, samples.csv (long format), windows.png, and
  with ``evaluate`` metrics.json against real training and validation windows."""
  np.save(out / 'samples.npy', samples.astype(np.float32))
  names = stats.get('columns') or [str(c) for c in range(samples.shape[-1])]
  with open(out / 'samples.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['sample', 'step'] + list(names))
    for n, window in enumerate(samples):
      for step, values in enumerate(window):
        writer.writerow([n, step] + [f'{v:.6g}' for v in values])
  source = None
  path = pathlib.Path(config.data.path).expanduser()
  if path.exists():
    source = series_source(path, config.data)
  real = None
  if source is not None:
    picks = np.linspace(0, len(source.train) - 1, 2).astype(int)
    real = denormalize(source.train.get_batch(picks)['x'], stats)
  plot_windows(samples[:2], real, out / 'windows.png', names=names)
  if evaluate:
    if source is None:
      raise FileNotFoundError(f'--eval needs the training data at {path}')
    from ddpm_jax import metrics
    table = metrics.evaluate_against_data(samples, source, stats)
    (out / 'metrics.json').write_text(json.dumps(table, indent=2))
    print(metrics.format_table(table))
