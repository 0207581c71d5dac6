"""Files of a time-series run's windows (what sample.py writes, and the trainer's windows plot):
samples in original units, CSV, plots, metrics."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Optional, Sequence

import numpy as np

from ddpm_jax import input_pipeline, plots, series_metrics
from ddpm_jax.series_data import denormalize


def plot_windows(generated: np.ndarray, real: Optional[np.ndarray], path,
                 names: Optional[Sequence[str]] = None) -> None:
  """windows.png: one panel per channel, generated windows [N, L, C] beside real ones, in the
  data's units (``ddpm_jax.plots.window_panels``)."""
  names = list(names or [])
  if len(names) != generated.shape[-1]:
    names = [str(c) for c in range(generated.shape[-1])]
  plots.window_panels(generated, real, names, path)


def write_series_outputs(samples: np.ndarray, config, stats: dict, out: pathlib.Path,
                         evaluate: bool) -> None:
  """samples.npy [N, window, C] in original units, samples.csv (long format), windows.png (with
  two real windows beside the generated ones under ``evaluate``, which reads the series) and
  with ``evaluate`` metrics.json against real training and validation windows."""
  np.save(out / 'samples.npy', samples.astype(np.float32))
  names = stats.get('columns') or [str(c) for c in range(samples.shape[-1])]
  with open(out / 'samples.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['sample', 'step'] + list(names))
    for n, window in enumerate(samples):
      for step, values in enumerate(window):
        writer.writerow([n, step] + [f'{v:.6g}' for v in values])
  real, source = None, None
  if evaluate:  # the series is read only when it is needed for the metrics
    path = pathlib.Path(config.data.path).expanduser()
    if not path.exists():
      raise FileNotFoundError(f'--eval needs the training data at {path}')
    source = input_pipeline.series_source(path, config.data)
    picks = np.linspace(0, len(source.train) - 1, 2).astype(int)
    real = denormalize(source.train.get_batch(picks)['x'], stats)
  plot_windows(samples[:2], real, out / 'windows.png', names=names)
  if evaluate:
    table = series_metrics.evaluate_against_data(samples, source, stats)
    (out / 'metrics.json').write_text(json.dumps(table, indent=2))
    print(series_metrics.format_table(table))
