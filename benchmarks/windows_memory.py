"""Memory and speed of lazy sliding windows over a long series, next to materialising them.

  python benchmarks/windows_memory.py

Builds a 200,000 x 7 float32 series, cuts windows of 512 with stride 1 (199,489 windows) and
iterates 100 shuffled batches of 64 through the training pipeline (grain). Prints peak resident
memory (the growth over the process before the series existed) and windows/s, and appends the
table to benchmarks/results/windows_memory.md. No JAX is imported.
"""

import pathlib
import resource
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax.timeseries import SeriesSource  # noqa: E402

ROWS, CHANNELS, WINDOW, BATCH, BATCHES = 200_000, 7, 512, 64, 100


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def main():
  baseline = current_rss_mb()
  rng = np.random.default_rng(0)
  series = rng.normal(size=(ROWS, CHANNELS)).astype(np.float32).cumsum(axis=0)
  series_mb = series.nbytes / 2 ** 20
  source = SeriesSource(series, [f'c{i}' for i in range(CHANNELS)], WINDOW, 1, 0.0, 'zscore')
  del series  # the source keeps its one normalised copy
  iterator = input_pipeline.make_iterator(source, BATCH, seed=0)
  start = time.time()
  for _ in range(BATCHES):
    batch = next(iterator)
    assert batch['x'].shape == (BATCH, WINDOW, CHANNELS)
  elapsed = time.time() - start
  growth = peak_rss_mb() - baseline
  materialised_mb = len(source) * WINDOW * CHANNELS * 4 / 2 ** 20
  rows = [
      ('series (float32)', f'{series_mb:.1f} MiB'),
      ('windows', f'{len(source):,} of {WINDOW} x {CHANNELS}'),
      ('materialising every window would take', f'{materialised_mb:,.0f} MiB'),
      ('peak resident memory growth while building and iterating', f'{growth:.1f} MiB '
       f'({growth / series_mb:.2f}x the series)'),
      (f'throughput ({BATCHES} batches of {BATCH})', f'{BATCHES * BATCH / elapsed:,.0f} windows/s'),
  ]
  table = '| measure | value |\n|---|---|\n' + '\n'.join(f'| {a} | {b} |' for a, b in rows)
  print(table)
  out = pathlib.Path(__file__).parent / 'results' / 'windows_memory.md'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table + '\n')


if __name__ == '__main__':
  main()
