"""Sample quality per network call on a trained digits run, for every training-free route.

  python benchmarks/quality_per_call.py --ckpt=runs/digits                 # FD and confidence
  python benchmarks/quality_per_call.py --ckpt=runs/digits --fid_cells=ddim:50,heun:11
  python benchmarks/quality_per_call.py --ckpt=runs/digits --distilled=runs/digits_distilled

For ddim, dpm_solver++, dpm_solver++3m (each on its default spacing), dpm_solver++ and heun on
Karras spacing, at 1, 2, 4, 8, 10, 20 and 50 calls (heun makes 2 N - 1: the largest N within
the budget; plus heun at 6 steps, 11 calls), it draws --num_samples samples (fixed seed) and
scores them with the digits classifier (digits FD, lower is better, and mean confidence; see
ddpm_jax.digits_quality) and, for the cells named in --fid_cells (route:calls, FID is slow on
a CPU: about 80 s per 500 images), FID against all 1,797 digits. --distilled adds each
finished student of a distillation run (distill.py), sampled with its own steps. Writes
benchmarks/results/quality_per_call.md and quality_per_call.png (FD against calls, log x).
"""

import datetime
import pathlib
import platform
import sys

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpm_jax import digits_quality, evaluation, inference, plots  # noqa: E402
from ddpm_jax import workdir as workdir_lib

flags.DEFINE_string('ckpt', None, 'A trained digits run (configs/digits.py).')
flags.DEFINE_integer('num_samples', 500, 'Samples per cell.')
flags.DEFINE_integer('seed', 0, 'Sampling seed (the same for every cell).')
flags.DEFINE_string('fid_cells', '', 'Comma-separated route:calls cells that also get FID, e.g. '
                    'ddim:50,heun:11 (route names as in the table: ddim, dpm_solver++, '
                    'dpm_solver++3m, dpm_solver++/karras, heun).')
flags.DEFINE_string('distilled', '', 'A distillation workdir (distill.py) of --ckpt: its '
                    'students become the route "distilled".')
flags.mark_flags_as_required(['ckpt'])

RESULTS = REPO / 'benchmarks' / 'results'
CALLS = (1, 2, 4, 8, 10, 20, 50)
# (name, method, spacing): None is the method's own default.
ROUTES = (('ddim', 'ddim', None), ('dpm_solver++', 'dpm_solver++', None),
          ('dpm_solver++3m', 'dpm_solver++3m', None),
          ('dpm_solver++/karras', 'dpm_solver++', 'karras'), ('heun', 'heun', 'karras'))


def steps_for(method: str, calls: int) -> int:
  """The most steps within ``calls`` network calls."""
  return (calls + 1) // 2 if method == 'heun' else calls


def main(argv):
  del argv
  f = flags.FLAGS
  import jax
  run = workdir_lib.load_run(f.ckpt)
  config, params = run.config, run.params
  sample_fn = inference.make_sample_fn(run.model, config)
  if config.data.name != 'digits':
    raise SystemExit(f'{f.ckpt} is a {config.data.name} run; this benchmark scores digits')
  fid_cells = {cell.strip() for cell in f.fid_cells.split(',') if cell.strip()}
  classifier = digits_quality.load_classifier()
  rows = []
  cells = []  # (route, steps), each once, in order
  for route in ROUTES:
    steps = {steps_for(route[1], calls) for calls in CALLS} | ({6} if route[0] == 'heun' else set())
    cells += [(route, n) for n in sorted(steps)]
  students = workdir_lib.finished_students(f.distilled) if f.distilled else {}
  cells += [(('distilled', 'ddim', 'trailing'), n) for n in sorted(students)]
  for (name, method, spacing), steps in cells:
    route_fn, route_params = (inference.load_sampler(students[steps]) if name == 'distilled'
                              else (sample_fn, params))
    samples = inference.sample_in_batches(route_fn, route_params, jax.random.key(f.seed),
                                          f.num_samples, f.num_samples, method=method,
                                          num_steps=steps, spacing=spacing)
    uint8 = np.round(samples * 255).astype(np.uint8)
    scores = digits_quality.quality(uint8, classifier=classifier)
    nfe = 2 * steps - 1 if method == 'heun' else steps
    row = dict(route=name, calls=nfe, steps=steps, fd=scores['fd'],
               confidence=scores['confidence'], fid=None)
    if f'{name}:{nfe}' in fid_cells:
      row['fid'] = evaluation.evaluate_images(uint8, config, run.workdir)['fid']
    rows.append(row)
    print(f'{name:20s} {nfe:3d} calls ({steps} steps): FD {row["fd"]:.3f}, confidence '
          f'{row["confidence"]:.3f}' + ('' if row['fid'] is None else f', FID {row["fid"]:.2f}'),
          flush=True)
  machine = f'{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s)'
  lines = [f'Measured {datetime.date.today()} on {machine}: `python benchmarks/'
           f'quality_per_call.py --ckpt={f.ckpt}' + (f' --fid_cells={f.fid_cells}'
                                                     if f.fid_cells else '')
           + (f' --distilled={f.distilled}' if f.distilled else '') + '`, run at '
           f'checkpoint {run.step}, {f.num_samples} samples per cell, seed {f.seed}. '
           'Digits FD (lower is better) and confidence from ddpm_jax.digits_quality; FID '
           'against all 1,797 digits (pytorch-fid protocol) where computed.', '',
           '| route | calls | steps | digits FD | confidence | FID |', '|---|---|---|---|---|---|']
  for row in rows:
    lines.append(f'| {row["route"]} | {row["calls"]} | {row["steps"]} | {row["fd"]:.3f} | '
                 f'{row["confidence"]:.3f} | '
                 + ('-' if row['fid'] is None else f'{row["fid"]:.2f}') + ' |')
  text = '\n'.join(lines) + '\n'
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / 'quality_per_call.md').write_text(text)
  series = {}
  for row in rows:
    series.setdefault(row['route'], []).append((row['calls'], row['fd']))
  figure = Figure(figsize=(8, 4.5), layout='constrained')
  axes = figure.add_subplot()
  for colour, (name, points) in zip(plots.COLOURS, series.items()):
    calls, fd = zip(*sorted(points))
    axes.plot(calls, fd, 'o-', color=colour, label=name)
  axes.set_xscale('log')
  axes.set_yscale('log')
  axes.set_xlabel('network calls per sample')
  axes.set_ylabel('digits FD (lower is better)')
  axes.set_title(f'Quality per call: digits run, checkpoint {run.step}, '
                 f'{f.num_samples} samples')
  axes.grid(True, which='both', alpha=0.3)
  axes.legend()
  plots.save_figure(figure, RESULTS / 'quality_per_call.png')
  print(text)


if __name__ == '__main__':
  app.run(main)
