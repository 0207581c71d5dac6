"""The README's ETTh1 table: forecasting and imputation scores of series runs over sampling seeds.

  python benchmarks/series_tasks.py --ckpt=runs/power_small
  python benchmarks/series_tasks.py --ckpt=runs/power_small,runs/power_plain \
      --method=ddim --num_steps=50

For each run, task (forecast of the last 24 steps; 30% of points hidden at random; one 24-step
block hidden) and seed, runs ``sample.py --task=... --eval`` on the run's test windows (100
windows x 100 samples by default) into ``--out/<run>/<method>_<steps>/<task>/s<seed>``, keeping
what an earlier call left there, then prints one table (mean +- standard deviation over seeds of
CRPS, CRPS-sum, MAE and RMSE in original units, the model's and each baseline's on the same
hidden values) with seconds per command and samples/s, and writes it to
benchmarks/results/series_tasks_<method>_<steps>.md. A seed changes the samples and, for
imputation, which values are hidden; the training run itself is not repeated.
"""

import json
import pathlib
import platform
import subprocess
import sys

import numpy as np
from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / 'benchmarks' / 'results'
TASKS = {'forecast 24': ['--task=forecast', '--horizon=24'],
         'impute 30% points': ['--task=impute', '--missing=0.3'],
         'impute 24-step block': ['--task=impute', '--block=24']}
SCORES = ('crps', 'crps_sum', 'mae', 'rmse')

flags.DEFINE_list('ckpt', None, 'Series run workdirs (comma-separated).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Sampling seeds.')
flags.DEFINE_string('method', 'dpm_solver++', 'Sampler (the configs\' default).')
flags.DEFINE_integer('num_steps', 20, 'Sampler steps.')
flags.DEFINE_integer('num_windows', 100, 'Test windows per task.')
flags.DEFINE_integer('num_samples', 100, 'Samples per window.')
flags.DEFINE_string('out', 'runs/series_tasks', 'Where each command writes its outputs.')
flags.mark_flag_as_required('ckpt')


def _run(ckpt: str, task_args: list, seed: int, out: pathlib.Path) -> dict:
  """metrics.json of one sample.py command (run unless ``out`` already has one)."""
  metrics = out / 'metrics.json'
  if not metrics.is_file():
    f = flags.FLAGS
    command = [sys.executable, 'sample.py', f'--ckpt={ckpt}', *task_args, '--eval',
               f'--num_windows={f.num_windows}', f'--num_samples={f.num_samples}',
               f'--method={f.method}', f'--num_steps={f.num_steps}', f'--seed={seed}',
               f'--out={out}']
    print(' '.join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)
  return json.loads(metrics.read_text())


def _cell(values) -> str:
  values = np.asarray(values)
  return f'{values.mean():.3f}' + (f' ± {values.std(ddof=1):.3f}' if len(values) > 1 else '')


def _rows(run_name: str, task: str, results: list) -> list:
  """Table rows of one run and task: the model first, then its baselines."""
  rows = []
  for scorer in results[0]['scores']:
    name = (f'{run_name} ({results[0].get("conditioning", "model")})' if scorer == 'model'
            else scorer)
    cells = [_cell([r['scores'][scorer][score] for r in results]) for score in SCORES]
    timing = (f'{np.median([r["seconds"] for r in results]):.0f} s, '
              f'{np.median([r["samples_per_second"] for r in results]):.0f}/s'
              if scorer == 'model' else '')
    rows.append(f'| {task} | {name} | ' + ' | '.join(cells) + f' | {timing} |')
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  seeds = [int(seed) for seed in f.seeds]
  sampler = f'{f.method}_{f.num_steps}'
  lines = [f'{platform.processor() or platform.machine()}; {f.num_windows} test windows x '
           f'{f.num_samples} samples, {f.method} {f.num_steps} steps, seeds '
           f'{",".join(f.seeds)}; mean ± sd over seeds, original units.', '',
           '| task | scored | CRPS | CRPS-sum | MAE | RMSE | time per command, samples/s |',
           '|---|---|---|---|---|---|---|']
  for task, task_args in TASKS.items():
    for ckpt in f.ckpt:
      run_name = pathlib.Path(ckpt).name
      results = [_run(ckpt, task_args, seed,
                      pathlib.Path(f.out).resolve() / run_name / sampler / task.replace(' ', '_')
                      .replace('%', '') / f's{seed}') for seed in seeds]
      rows = _rows(run_name, task, results)
      # The baselines see the same hidden values whichever run is scored: list them once.
      lines += rows if ckpt == f.ckpt[0] else rows[:1]
  text = '\n'.join(lines) + '\n'
  print(text)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f'series_tasks_{sampler}.md').write_text(text)


if __name__ == '__main__':
  app.run(main)
