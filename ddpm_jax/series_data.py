"""Long multichannel series as numpy: reading, NaN checks, normalisation, sliding windows.

The bottom of the data layer (numpy, ddpm_jax.file_checks and errors only). A series [N, C] is
stored once; window i is the view ``series[i * stride : i * stride + window]``. Normalisation
statistics are fitted on the training part only and saved with the checkpoint, so samples come
back in the original units.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Sequence

import numpy as np

from ddpm_jax import file_checks
from ddpm_jax.errors import InputError

NORMALIZATIONS = ('zscore', 'minmax')
# How a series is split in time order into training, validation and test rows: by fractions of
# its rows, or the ETT benchmark's fixed months (the Informer / Autoformer / DLinear loaders).
PROTOCOLS = ('fractions', 'ett')
ETT_MONTH = 30 * 24  # hourly rows
ETT_ROWS = {'train': (0, 12 * ETT_MONTH), 'validation': (12 * ETT_MONTH, 16 * ETT_MONTH),
            'test': (16 * ETT_MONTH, 20 * ETT_MONTH)}
# The least-squares linear maps from a lookback to a horizon (fit_linear_map), by name: the
# plain one (DLinear without its decomposition) and NLinear's, relative to the last past value.
# A run for one horizon saves both with its statistics; model.forecast_base names one of them.
LINEAR_MAPS = {'linear_map': False, 'nlinear_map': True}
# Limits of the CSV reader: a real series has a handful of short cells per row.
MAX_CSV_COLUMNS = 10_000
MAX_CSV_LINE = 1 << 20


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
      raise InputError(f'a series must be [N, C], got shape {list(series.shape)}')
    if int(window) != window or window < 1:
      raise InputError(f'window must be a positive integer, got {window!r}')
    if int(stride) != stride or stride < 1:
      raise InputError(f'stride must be an integer >= 1, got {stride!r}')
    if window > series.shape[0]:
      raise InputError(f'window {window} is longer than the series ({series.shape[0]} rows); '
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


def split_rows(protocol: str, rows: int, *, val_fraction: float = 0.0,
               test_fraction: float = 0.0) -> dict:
  """{'train' | 'validation' | 'test': (first, end)}: each part's own rows of a series of
  ``rows`` rows, in time order.

  'fractions': the final ``test_fraction`` of the rows are the test part and the
  ``val_fraction`` before them the validation part. 'ett': rows 0-8,639, 8,640-11,519 and
  11,520-14,399 (12 / 4 / 4 months of hourly rows; the rows after them are not used).
  """
  if protocol == 'ett':
    end = ETT_ROWS['test'][1]
    if rows < end:
      raise InputError(f'data.protocol=ett takes the first {end} rows (20 months of hourly rows: '
                       f'ETTh1.csv or ETTh2.csv); this series has {rows}')
    return dict(ETT_ROWS)
  if protocol != 'fractions':
    raise InputError(f'unknown data.protocol {protocol!r}; choose one of {", ".join(PROTOCOLS)}')
  for name, fraction in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise InputError(f'data.{name} must lie in [0, 1), got {fraction}')
  num_test = int(round(rows * test_fraction))
  split, test_start = rows - int(round(rows * val_fraction)) - num_test, rows - num_test
  return {'train': (0, split), 'validation': (split, test_start), 'test': (test_start, rows)}


def read_series(path: pathlib.Path, columns: str = '', time_column: str = 'date'):
  """Reads a CSV (a header row; ``columns`` names, comma-separated, '' = every column but the
  time column), a .npy [N, C] or a .npz (first array) -> (float64 [N, C], column names)."""
  series, names, _ = read_series_with_times(path, columns, time_column)
  return series, names


def read_series_with_times(path: pathlib.Path, columns: str = '', time_column: str = 'date'):
  """read_series, plus the time column's values in row order (strings; None when absent)."""
  wanted = [c.strip() for c in columns.split(',') if c.strip()]
  file_checks.check_regular_file(path, 'series file')
  if path.suffix in ('.npy', '.npz'):
    array = file_checks.load_array(path, what='series file')
    if array.ndim == 1:
      array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
      raise InputError(f'{path} must hold a numeric [N, C] array, got {array.dtype} '
                       f'{list(array.shape)}')
    names = [str(i) for i in range(array.shape[1])]
    if wanted:
      unknown = [c for c in wanted if c not in names]
      if unknown:
        raise InputError(f'columns {unknown} not in {path}: an array file takes column indices '
                         f'0..{array.shape[1] - 1}')
      array = array[:, [int(c) for c in wanted]]
      names = wanted
    return array.astype(np.float64), names, None
  rows = _read_csv_rows(path)
  if len(rows) < 2:
    raise InputError(f'{path} has no data rows')
  header = [h.strip() for h in rows[0]]
  body = rows[1:]
  for r, row in enumerate(body):
    if len(row) > len(header):
      raise InputError(f'{path}: row {r + 2} has {len(row)} cells but the header names '
                       f'{len(header)} columns')
  times = None
  if time_column in header:
    time_index = header.index(time_column)
    stamps = [row[time_index].strip() if time_index < len(row) else '' for row in body]
    if '' in stamps:
      raise InputError(f'{path}: row {stamps.index("") + 2} has no {time_column!r} value')
    order = sorted(range(len(body)), key=lambda r: stamps[r])  # ISO times sort as text
    body = [body[r] for r in order]
    times = [stamps[r] for r in order]
  names = wanted or [h for h in header if h != time_column]
  unknown = [c for c in names if c not in header]
  if unknown:
    raise InputError(f'column {unknown[0]!r} is not in {path}; it has {", ".join(header)}')
  if not names:
    raise InputError(f'{path} has no columns besides {time_column!r}')
  array = np.empty((len(body), len(names)), np.float64)
  for j, name in enumerate(names):
    k = header.index(name)
    for r, row in enumerate(body):
      cell = row[k].strip() if k < len(row) else ''
      try:
        array[r, j] = float(cell) if cell else np.nan
      except ValueError:
        raise InputError(f'column {name!r} of {path} is not numeric: row {r + 2} holds '
                         f'{cell[:40]!r}; choose numeric columns with --config.data.columns')
  return array, names, times


def _read_csv_rows(path: pathlib.Path) -> list[list[str]]:
  """The CSV's rows, blank lines dropped; lines bounded by MAX_CSV_LINE characters and rows by
  MAX_CSV_COLUMNS cells."""
  rows = []
  try:
    with open(path, newline='') as f:
      for row in csv.reader(_bounded_lines(f, path)):
        if not any(cell.strip() for cell in row):
          continue  # a blank line, e.g. the file's last
        if len(row) > MAX_CSV_COLUMNS:
          raise InputError(f'{path}: row {len(rows) + 1} has {len(row)} cells, more than the '
                           f'{MAX_CSV_COLUMNS} columns this reader takes')
        rows.append(row)
  except UnicodeDecodeError as error:
    raise InputError(f'{path} is not a UTF-8 text CSV ({error.reason} at byte '
                     f'{error.start})') from None
  except csv.Error as error:
    raise InputError(f'{path} is not a well-formed CSV ({error})') from None
  return rows


def _bounded_lines(file, path: pathlib.Path):
  """The file's lines, refusing one longer than MAX_CSV_LINE characters before it is held."""
  while True:
    line = file.readline(MAX_CSV_LINE + 1)
    if not line:
      return
    if len(line) > MAX_CSV_LINE:
      raise InputError(f'{path} has a line longer than {MAX_CSV_LINE} characters; is it a CSV '
                       'with one row per line?')
    yield line


def refuse_infinities(series: np.ndarray, names: Sequence[str], source: str) -> None:
  """One line naming the first infinite value of a series [N, C] (NaN means missing; inf is
  never data)."""
  infinite = np.isinf(series)
  if infinite.any():
    row, column = np.argwhere(infinite)[0]
    raise InputError(f'{source} holds {int(infinite.sum())} infinite value(s): data row {row} '
                     f'(counting from 0), column {names[column]!r} is {series[row, column]}; '
                     'only finite numbers or empty cells are accepted')


def check_or_fill_nans(series: np.ndarray, names: Sequence[str], fill: bool, source: str):
  """Refuses NaNs with their row numbers, or fills them by linear interpolation if asked;
  infinities are refused either way."""
  refuse_infinities(series, names, source)
  missing = np.isnan(series)
  if not missing.any():
    return series
  for j, name in enumerate(names):
    if missing[:, j].all():
      raise InputError(f'column {name!r} of {source} has no numbers (all empty or NaN)')
  if not fill:
    rows = np.flatnonzero(missing.any(axis=1))
    shown = ', '.join(str(r) for r in rows[:5]) + (', ...' if len(rows) > 5 else '')
    raise InputError(f'{source} has NaN or empty values in {len(rows)} row(s) (data rows {shown}, '
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
    # In float64: a float32 sum over thousands of rows drifts in the fifth digit.
    std = train_part.std(axis=0, dtype=np.float64)
    return {'method': method, 'columns': list(names),
            'mean': train_part.mean(axis=0, dtype=np.float64).tolist(),
            'std': np.where(std > 0, std, 1.0).tolist()}
  if method == 'minmax':
    low, high = train_part.min(axis=0), train_part.max(axis=0)
    return {'method': method, 'columns': list(names), 'min': low.tolist(),
            'max': np.where(high > low, high, low + 1.0).tolist()}
  raise InputError(f'unknown data.normalization {method!r}; choose one of '
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
    raise InputError('this time-series run saved no normalisation statistics')
  if stats['method'] == 'zscore':
    return x * np.asarray(stats['std'], np.float32) + np.asarray(stats['mean'], np.float32)
  low, high = np.asarray(stats['min'], np.float32), np.asarray(stats['max'], np.float32)
  return (x + 1.0) / 2.0 * (high - low) + low


def fit_linear_map(train_rows: np.ndarray, lookback: int, horizon: int,
                   relative: bool = False) -> np.ndarray:
  """The least-squares linear map from ``lookback`` past steps (and a constant) to the next
  ``horizon``, one per channel, fitted on every window of the training rows [N, C] (DLinear
  without its trend / seasonal split) -> weights [C, lookback + 1, horizon].

  ``relative``: NLinear's map (Zeng et al. 2023), fitted to each window less its last past
  value and adding that value back, s + A (past - s) + b. Its weights sum to one over the past,
  so a context moved by a constant moves the forecast by the same constant: the map does not
  pull a level the training rows never had back towards theirs. It is returned in the same form
  as the plain map, A's weights with 1 - sum(A) added to the last past step's."""
  if len(train_rows) < lookback + horizon + lookback:
    raise InputError(f'the training part ({len(train_rows)} rows) is too short to fit a linear '
                     f'map from {lookback} steps to {horizon}')
  windows = np.lib.stride_tricks.sliding_window_view(train_rows, lookback + horizon, axis=0)
  weights = []
  for c in range(train_rows.shape[1]):
    past, future = windows[:, c, :lookback], windows[:, c, lookback:]  # [W, lookback], [W, H]
    if relative:
      last = past[:, -1:]
      past, future = past[:, :-1] - last, future - last  # the last step's column would be 0
    design = np.concatenate([past, np.ones((len(past), 1))], axis=1)
    fitted = np.linalg.lstsq(design, future, rcond=None)[0]
    if relative:
      fitted = np.concatenate([fitted[:-1], 1.0 - fitted[:-1].sum(0, keepdims=True),
                               fitted[-1:]])
    weights.append(fitted)
  return np.stack(weights)


def linear_map_forecast(weights: np.ndarray, context: np.ndarray) -> np.ndarray:
  """context [K, T, C] (T >= lookback; its last lookback steps are used) -> [K, horizon, C]."""
  lookback = weights.shape[1] - 1
  if context.shape[1] < lookback:
    raise InputError(f'the linear map needs {lookback} steps of context, got {context.shape[1]}')
  past = context[:, context.shape[1] - lookback:]
  return np.einsum('ktc,cth->khc', past, weights[:, :lookback]) + weights[:, lookback].T[None]
