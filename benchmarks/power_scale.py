"""configs/power.py at its own scale: 200,000 rows x 7 channels, windows of 512, trained and
backtested, with the time each part took. Meant for an accelerator.

  python benchmarks/power_scale.py --train_minutes=5
  python benchmarks/power_scale.py --series=load.csv --train_minutes=30

Without ``--series`` it writes a synthetic hourly load series (``--rows`` x 7: daily, weekly and
yearly cycles with per-channel amplitude and phase, a shared slowly wandering level, and AR(1)
noise correlated across channels; fixed seed) into the run's folder. Trains
``configs/power.py`` into ``--workdir`` for ``--train_minutes`` of wall time, compilation
included, then sends SIGTERM, which saves a checkpoint (a rerun resumes from it), so the step
count is whatever the machine reaches in that time. Then backtests with ``sample.py
--task=forecast --eval`` on ``--num_windows`` test windows (the final 10% of the rows), the last
``--horizon`` steps of each hidden, against the baselines sample.py scores on the same windows.
Writes the table with its date, machine and command to ``<results>/power_scale.md`` and the
first window's fan chart to ``<results>/power_scale.png``.
"""

import datetime
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402

flags.DEFINE_string('series', '', "A CSV, .npy or .npz [N, C] ('': the synthetic series).")
flags.DEFINE_integer('rows', 200_000, 'Rows of the synthetic series.')
flags.DEFINE_float('train_minutes', 5.0, 'Wall-clock minutes of training, compilation included.')
flags.DEFINE_integer('horizon', 96, 'Forecast horizon of the backtest (window 512).')
flags.DEFINE_integer('num_windows', 512, 'Test windows, evenly spaced (0: every one).')
flags.DEFINE_integer('num_samples', 100, 'Samples per window.')
flags.DEFINE_string('workdir', 'runs/power_scale', 'The run (resumed if it is there).')
flags.DEFINE_list('train_overrides', [], 'Extra --config.x=y flags for training.')
flags.DEFINE_string('results', str(REPO_ROOT / 'benchmarks' / 'results'),
                    'Where power_scale.md and .png go.')

CHANNELS = 7
SCORES = ('crps', 'crps_sum', 'energy', 'mae', 'mse', 'coverage_50', 'coverage_90')


def synthetic_load(rows: int, seed: int = 0) -> np.ndarray:
  """[rows, 7] float32: an hourly series with the structure of power load (see the docstring)."""
  rng = np.random.default_rng(seed)
  t = np.arange(rows, dtype=np.float64)[:, None]  # [N, 1] hours
  phase = rng.uniform(0, 2 * np.pi, (1, CHANNELS))
  daily = np.sin(2 * np.pi * t / 24 + phase) + 0.4 * np.sin(4 * np.pi * t / 24 + 2 * phase)
  weekend = ((t // 24) % 7 >= 5).astype(np.float64)
  yearly = np.sin(2 * np.pi * t / 8766 + phase)
  level = np.zeros(rows)
  steps = rng.normal(0, 0.02, rows)
  for i in range(1, rows):  # AR(1) with a ~40-day memory: the level wanders, then returns
    level[i] = 0.999 * level[i - 1] + steps[i]
  correlation = 0.6 + 0.4 * np.eye(CHANNELS)
  shocks = rng.normal(size=(rows, CHANNELS)) @ np.linalg.cholesky(correlation).T
  noise = np.zeros((rows, CHANNELS))
  for i in range(1, rows):
    noise[i] = 0.8 * noise[i - 1] + 0.3 * shocks[i]
  amplitude = rng.uniform(0.5, 2.0, (1, CHANNELS))
  series = (rng.uniform(-5, 5, (1, CHANNELS)) + amplitude * daily - 0.8 * amplitude * weekend
            + rng.uniform(0.5, 1.5, (1, CHANNELS)) * yearly
            + rng.uniform(1.0, 3.0, (1, CHANNELS)) * level[:, None] + noise)
  return series.astype(np.float32)


def write_csv(path: pathlib.Path, series: np.ndarray) -> None:
  """Writes ``series`` [N, C] as a CSV with an hourly ``date`` column from 2000-01-01."""
  dates = np.datetime64('2000-01-01T00') + np.arange(len(series)).astype('timedelta64[h]')
  header = 'date,' + ','.join(f'c{i}' for i in range(series.shape[1]))
  lines = [header] + [f'{str(d).replace("T", " ")}:00:00,' + ','.join(f'{v:.4f}' for v in row)
                      for d, row in zip(dates, series)]
  path.write_text('\n'.join(lines) + '\n')


def train(workdir: pathlib.Path, series: pathlib.Path, minutes: float) -> float:
  """Runs train.py for ``minutes`` of wall time, then SIGTERM (it saves); returns the minutes."""
  command = [sys.executable, 'train.py', '--config=configs/power.py', f'--workdir={workdir}',
             f'--config.data.path={series}', *flags.FLAGS.train_overrides]
  print(' '.join(command), flush=True)
  start = time.time()
  process = subprocess.Popen(command, cwd=REPO_ROOT)
  stopped = 0  # exit status of a run stopped by our SIGTERM (train.py exits 128 + signum)
  try:
    process.wait(timeout=minutes * 60)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGTERM)
    stopped = 128 + signal.SIGTERM
    try:
      process.wait(timeout=300)
    except subprocess.TimeoutExpired:
      process.kill()  # the newest complete checkpoint is still there
      raise SystemExit('train.py did not stop within 5 minutes of SIGTERM; killed it')
  if process.returncode not in (0, stopped):
    raise SystemExit(f'train.py failed (exit status {process.returncode}); see its message above')
  if not (workdir / 'checkpoints').is_dir():
    raise SystemExit(f'training wrote no checkpoint (exit status {process.returncode})')
  return (time.time() - start) / 60


def backtest(workdir: pathlib.Path) -> tuple:
  """Runs sample.py's forecast backtest; returns (metrics.json as a dict, its folder, seconds)."""
  f = flags.FLAGS
  out = workdir / 'power_scale_eval'
  command = [sys.executable, 'sample.py', f'--ckpt={workdir}', '--task=forecast', '--eval',
             f'--horizon={f.horizon}', f'--num_windows={f.num_windows}',
             f'--num_samples={f.num_samples}', f'--out={out}', '--overwrite']
  print(' '.join(command), flush=True)
  start = time.time()
  subprocess.run(command, cwd=REPO_ROOT, check=True)
  return json.loads((out / 'metrics.json').read_text()), out, time.time() - start


def main(argv):
  del argv
  f = flags.FLAGS
  workdir = pathlib.Path(f.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  if f.series:
    series, source = pathlib.Path(f.series).resolve(), f'`{pathlib.Path(f.series).name}`'
  else:
    series = workdir / f'synthetic_load_{f.rows}.csv'
    source = (f'the synthetic hourly load series of {f.rows:,} x {CHANNELS} (this script\'s '
              '`synthetic_load`: daily, weekly and yearly cycles, a wandering level, correlated '
              'AR(1) noise)')
    if not series.is_file():
      write_csv(series, synthetic_load(f.rows))
  minutes = train(workdir, series, f.train_minutes)
  record = common.training_record(workdir)
  batch = json.loads((workdir / 'config.json').read_text())['training']['batch_size']
  metrics, folder, seconds = backtest(workdir)
  lines = [f'Measured {datetime.date.today()} on {common.machine()} by', '',
           f'    python benchmarks/power_scale.py {" ".join(sys.argv[1:])}', '',
           f'Data: {source}; `configs/power.py` (windows of 512, stride 1; training 80%, '
           'validation 10%, test 10% in time order).', '',
           f'Training: {minutes:.1f} min of wall time, compilation included '
           f'({record["compile_s"]:.0f} s to compile and run the first step), '
           f'{record["step"]:,} steps at batch {batch}, {record["rate"]:.1f} steps/s after '
           f'compilation; last logged loss {record["loss"]:.4f}.', '',
           f'Backtest: {metrics["num_windows"]} test windows x {metrics["num_samples"]} samples, '
           f'the last {metrics["horizon"]} steps hidden; sampling {metrics["seconds"]:.1f} s '
           f'({metrics["samples_per_second"]:,.0f} forecast samples/s, compilation included), '
           f'{seconds:.0f} s for the whole command; scores in {metrics["scale"]}.', '',
           '| forecast | ' + ' | '.join(SCORES) + ' |', '|---' * (len(SCORES) + 1) + '|']
  for name, scores in metrics['scores'].items():
    cells = ['-' if scores.get(s) is None else f'{scores[s]:.4f}' for s in SCORES]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  text = '\n'.join(lines)
  print(text)
  results = pathlib.Path(f.results)
  results.mkdir(parents=True, exist_ok=True)
  (results / 'power_scale.md').write_text(
      text + '\n\n![fan chart of the first test window](power_scale.png)\n')
  shutil.copy(folder / 'forecast.png', results / 'power_scale.png')
  print(f'wrote {results / "power_scale.md"} and .png')


if __name__ == '__main__':
  app.run(main)
