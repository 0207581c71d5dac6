"""Long multichannel series as numpy: reading, NaN checks, normalisation, sliding windows.

The bottom of the data layer (numpy only, no other ddpm_jax module). A series [N, C] is stored
once; window i is the view ``series[i * stride : i * stride + window]``. Normalisation
statistics are fitted on the training part only and saved with the checkpoint, so samples come
back in the original units.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Sequence

import numpy as np

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
  series, names, _ = read_series_with_times(path, columns, time_column)
  return series, names


def read_series_with_times(path: pathlib.Path, columns: str = '', time_column: str = 'date'):
  """read_series, plus the time column's values in row order (strings; None when absent)."""
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
    return array.astype(np.float64), names, None
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  if len(rows) < 2:
    raise ValueError(f'{path} has no data rows')
  header = [h.strip() for h in rows[0]]
  body = rows[1:]
  times = None
  if time_column in header:
    time_index = header.index(time_column)
    order = sorted(range(len(body)), key=lambda r: body[r][time_index])  # ISO times sort as text
    body = [body[r] for r in order]
    times = [row[time_index].strip() for row in body]
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
  return array, names, times


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
