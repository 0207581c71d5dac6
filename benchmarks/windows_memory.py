"""Memory and speed of lazy sliding windows over a long series, next to materialising them.

  python benchmarks/windows_memory.py

Builds a 200,000 x 7 float32 series (and, to show how it scales, a 2,000,000 x 7 one), cuts
windows of 512 with stride 1 and iterates 100 shuffled batches of 64 through the training
pipeline (grain). Prints the peak memory that the series and the pipeline hold together (the
series, normalised in place, plus every numpy allocation traced from the moment it exists:
temporaries of the statistics and the batches in flight), windows/s (timed in a second pass, without tracing), and what
materialising every window would take; writes the table to benchmarks/results/windows_memory.md.
"""

import pathlib
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ddpm_jax import input_pipeline  # noqa: E402
from ddpm_jax.input_pipeline import SeriesSource  # noqa: E402

CHANNELS, WINDOW, BATCH, BATCHES = 7, 512, 64, 100
MIB = 2 ** 20


def run_pipeline(series: np.ndarray):
  """Builds the windows source over ``series`` (handed over: normalised in place, as
  ``series_source`` does with what it reads) and draws BATCHES batches; returns the source."""
  source = SeriesSource(series, [f'c{i}' for i in range(CHANNELS)], WINDOW, 1, 0.0, 'zscore',
                        copy=False)
  iterator = input_pipeline.make_iterator(source, BATCH, seed=0)
  for _ in range(BATCHES):
    assert next(iterator)['x'].shape == (BATCH, WINDOW, CHANNELS)
  return source


def measure(rows: int) -> dict:
  series = np.random.default_rng(0).normal(size=(rows, CHANNELS)).astype(np.float32).cumsum(0)
  tracemalloc.start()
  source = run_pipeline(series)
  held = series.nbytes + tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  start = time.time()
  run_pipeline(series)  # already normalised: the second pass only times the iteration
  rate = BATCHES * BATCH / (time.time() - start)
  return dict(rows=rows, series=series.nbytes / MIB, windows=len(source),
              materialised=len(source) * WINDOW * CHANNELS * 4 / MIB, held=held / MIB, rate=rate)


def main():
  header = ('| series | windows (512 x 7) | materialising them | peak held by series + pipeline '
            '| windows/s |\n|---|---|---|---|---|')
  lines = [header]
  for rows in (200_000, 2_000_000):
    m = measure(rows)
    lines.append(f'| {m["rows"]:,} x {CHANNELS} float32 ({m["series"]:.1f} MiB) | '
                 f'{m["windows"]:,} | {m["materialised"]:,.0f} MiB | {m["held"]:.1f} MiB '
                 f'({m["held"] / m["series"]:.2f}x the series) | {m["rate"]:,.0f} |')
    print(lines[-1], flush=True)
  table = '\n'.join(lines)
  print(table)
  out = pathlib.Path(__file__).parent / 'results' / 'windows_memory.md'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table + '\n')


if __name__ == '__main__':
  main()
