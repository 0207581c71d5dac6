"""ETTh1 and ETTh2 on the forecasting literature's protocol: our runs, the baselines, the papers.

  python benchmarks/ett_protocol.py --data_dir=ETT-small
  python benchmarks/ett_protocol.py --data_dir=ETT-small --datasets=ETTh1 --horizon=96

For each dataset, trains ``configs/ett.py`` into ``--runs/<dataset>_h<horizon>`` (unless a
finished run is there: its training time is read from its metrics.jsonl), then runs
``sample.py --task=forecast --eval --num_windows=0`` on every test window for each sampling seed
into ``<run>/ett_eval/<method>_<steps>/s<seed>``, keeping what an earlier call left there.
Prints one table per dataset (mean +- sd over seeds, on the z-scored scale: CRPS, MSE and MAE of
the median, MSE of the mean, the energy score and the 50% / 90% interval coverage) with the
baselines of the same windows and the published rows, and writes it with its date, machine and
command to benchmarks/results/ett_protocol_<datasets>_h<horizon>.md, beside a .png of:
the reliability of the intervals (coverage against nominal level) and a fan chart of the oil
temperature (OT) over three test windows.
"""

import datetime
import json
import pathlib
import subprocess
import sys

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import common  # noqa: E402
from ddpm_jax import plots, series_data, series_metrics  # noqa: E402
from ddpm_jax import workdir as workdir_lib  # noqa: E402

RESULTS = REPO_ROOT / 'benchmarks' / 'results'
# Published rows at lookback 96, horizon 24, on the z-scored scale, as MMPD tabulates them
# (ICLR 2026, Table 9.3); DLinear at horizon 96 from its paper's table (Zeng et al. 2023).
PUBLISHED = {
    ('ETTh1', 24): [('CSDI', 0.339, 0.265), ('TSDiff', 0.345, 0.292),
                    ('Diffusion-TS', 0.351, 0.294), ('MMPD', 0.298, 0.254)],
    ('ETTh1', 96): [('DLinear', 0.375, None)],
    ('ETTh2', 96): [('DLinear', 0.289, None)],
}
SOURCE = {24: 'MMPD (ICLR 2026), Table 9.3', 96: 'DLinear (Zeng et al., AAAI 2023), Table 2'}
LABELS = {'model': 'ours (configs/ett.py)', 'linear_map': 'linear map',
          'nlinear_map': 'NLinear map (linear map relative to the last value)'}
SCORES = ('crps', 'mse', 'mae', 'mse_mean', 'energy', 'coverage_50', 'coverage_90')
LEVELS = np.linspace(0.1, 0.9, 9)

flags.DEFINE_string('data_dir', None, 'The folder with ETTh1.csv and ETTh2.csv.')
flags.DEFINE_list('datasets', ['ETTh1', 'ETTh2'], 'Which of them.')
flags.DEFINE_integer('horizon', 24, 'Forecast horizon (lookback 96).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Sampling seeds.')
flags.DEFINE_string('method', '', "Sampler ('': the config's).")
flags.DEFINE_integer('num_steps', 0, "Sampler steps (0: the config's).")
flags.DEFINE_integer('num_samples', 100, 'Samples per window.')
flags.DEFINE_integer('num_windows', 0, 'Test windows (0: every one).')
flags.DEFINE_string('runs', 'runs', 'Where the runs are (or are trained).')
flags.DEFINE_list('train_overrides', [], 'Extra --config.x=y flags for training.')
flags.mark_flag_as_required('data_dir')


def _command(*args) -> None:
  print(' '.join(args), flush=True)
  subprocess.run([sys.executable, *args], cwd=REPO_ROOT, check=True)


def _train(dataset: str, workdir: pathlib.Path) -> float:
  """Trains the run unless it has finished; returns its training minutes (from metrics.jsonl)."""
  f = flags.FLAGS
  saved = workdir / 'config.json'
  config = json.loads(saved.read_text()) if saved.is_file() else None
  if config is None or not (workdir / 'metrics.jsonl').is_file() or \
      json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])['step'] < \
      config['training']['num_steps']:
    _command('train.py', '--config=configs/ett.py', f'--workdir={workdir}',
             f'--config.data.path={pathlib.Path(f.data_dir).resolve() / (dataset + ".csv")}',
             f'--config.data.horizon={f.horizon}', *f.train_overrides)
  return common.training_record(workdir)['minutes']


def _evaluate(workdir: pathlib.Path, seed: int) -> pathlib.Path:
  f = flags.FLAGS
  sampler = f'{f.method or "default"}_{f.num_steps or "default"}'
  out = workdir / 'ett_eval' / sampler / f's{seed}'
  if not (out / 'metrics.json').is_file():
    options = ([f'--method={f.method}'] if f.method else []) + \
        ([f'--num_steps={f.num_steps}'] if f.num_steps else [])
    _command('sample.py', f'--ckpt={workdir}', '--task=forecast', '--eval',
             f'--num_windows={f.num_windows}', f'--num_samples={f.num_samples}',
             f'--seed={seed}', f'--out={out}', '--overwrite', *options)
  return out


def _cell(values, digits=3) -> str:
  values = np.asarray([v for v in values if v is not None], np.float64)
  if not len(values):
    return '-'
  return f'{values.mean():.{digits}f}' + (f' ± {values.std(ddof=1):.{digits}f}'
                                          if len(values) > 1 else '')


def _table(dataset: str, results: list, minutes: float) -> list:
  f = flags.FLAGS
  first = results[0]
  lines = [f'### {dataset}, lookback 96, horizon {f.horizon}: {first["num_windows"]} test windows '
           f'x {first["num_samples"]} samples, seeds {",".join(f.seeds)}', '',
           '| forecast | CRPS | MSE | MAE | MSE of mean | energy | 50% covered | 90% covered |',
           '|---|---|---|---|---|---|---|---|']
  for name in first['scores']:
    label = LABELS.get(name, name.replace('_', ' '))
    lines.append(f'| {label} | ' + ' | '.join(_cell([r['scores'][name][s] for r in results])
                                              for s in SCORES) + ' |')
  for name, mse, crps in PUBLISHED.get((dataset, f.horizon), []):
    lines.append(f'| {name} (published) | {"-" if crps is None else crps} | {mse} | - | - | - | '
                 f'- | - |')
  seconds = np.median([r['seconds'] + r.get('scoring_seconds', 0.0) for r in results])
  lines += ['', f'Training: {minutes:.1f} min. Sampling and scoring every window: '
            f'{seconds / 60:.1f} min per seed (median), '
            f'{np.median([r["samples_per_second"] for r in results]):.0f} samples/s.', '']
  return lines


def _reliability(axes, dataset: str, folder: pathlib.Path, stats: dict) -> None:
  """Coverage of the central intervals against their nominal level, seed 0's samples."""
  with np.load(folder / 'forecast.npz') as arrays:
    samples = series_data.normalize(arrays['samples'], stats)
    target = series_data.normalize(arrays['target'], stats)
  hidden = np.ones(target.shape, bool)
  covered = [series_metrics.interval_coverage(samples, target, hidden, level) for level in LEVELS]
  axes.plot(LEVELS, covered, 'o-', label=dataset)


def _fan(axes_row, dataset: str, folder: pathlib.Path, names: list) -> None:
  """``dataset``'s OT over three test windows: context, 5-95% band, median and truth."""
  channel = names.index('OT') if 'OT' in names else len(names) - 1
  with np.load(folder / 'forecast.npz') as arrays:
    count = len(arrays['samples'])
    for axes, k in zip(axes_row, (0, count // 2, count - 1)):
      context, samples = arrays['context'][k, :, channel], arrays['samples'][k, :, :, channel]
      target, row = arrays['target'][k, :, channel], int(arrays['first_rows'][k])
      past = np.arange(row, row + len(context))
      future = np.arange(past[-1] + 1, past[-1] + 1 + samples.shape[1])
      low, median, high = np.quantile(samples, (0.05, 0.5, 0.95), axis=0)
      axes.plot(past, context, color='black', lw=1, label='observed')
      axes.fill_between(future, low, high, color=plots.COLOURS[0], alpha=0.3, label='5-95%')
      axes.plot(future, median, color=plots.COLOURS[0], label='median')
      axes.plot(future, target, color=plots.COLOURS[3], label='true')
      axes.set_title(f'{dataset} {names[channel]}, test window {k}', fontsize=9)
      axes.set_xlabel('CSV row')
  axes_row[0].set_ylabel(names[channel])
  axes_row[0].legend(fontsize=7)


def main(argv):
  del argv
  f = flags.FLAGS
  seeds = [int(s) for s in f.seeds]
  runs = pathlib.Path(f.runs).resolve()
  lines = [f'Measured {datetime.date.today()} on {common.machine()} by', '',
           f'    python benchmarks/ett_protocol.py {" ".join(sys.argv[1:])}', '',
           'The Informer / DLinear split (train rows 0-8,639, validation 8,640-11,519, test '
           '11,520-14,399), all 7 channels, scores on the training rows\' z-scores; published '
           f'rows from {SOURCE.get(f.horizon, "-")}.', '']
  figure = Figure(figsize=(13, 3.4), layout='constrained')
  grid = figure.add_gridspec(1, 4)
  reliability = figure.add_subplot(grid[0, 0])
  fans = [figure.add_subplot(grid[0, i]) for i in (1, 2, 3)]
  for dataset in f.datasets:
    workdir = runs / f'{dataset}_h{f.horizon}'
    minutes = _train(dataset, workdir)
    folders = [_evaluate(workdir, seed) for seed in seeds]
    results = [json.loads((folder / 'metrics.json').read_text()) for folder in folders]
    lines += _table(dataset, results, minutes)
    stats = workdir_lib.load_run(workdir).data_stats
    _reliability(reliability, dataset, folders[0], stats)
    if dataset == f.datasets[0]:
      _fan(fans, dataset, folders[0], stats['columns'])
  reliability.plot([0, 1], [0, 1], color='grey', ls=':', label='calibrated')
  reliability.set_xlabel('nominal central interval')
  reliability.set_ylabel('share of test values inside')
  reliability.set_title('interval reliability', fontsize=9)
  reliability.legend(fontsize=7)
  text = '\n'.join(lines)
  print(text)
  RESULTS.mkdir(parents=True, exist_ok=True)
  name = f'ett_protocol_{"_".join(f.datasets)}_h{f.horizon}'
  (RESULTS / f'{name}.md').write_text(text + f'\n![reliability and fan chart]({name}.png)\n')
  plots.save_figure(figure, RESULTS / f'{name}.png')
  print(f'wrote {RESULTS / name}.md and .png')


if __name__ == '__main__':
  app.run(main)
