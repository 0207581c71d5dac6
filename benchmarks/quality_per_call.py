"""Sample quality per network call on a trained digits run, for every training-free route.

  python benchmarks/quality_per_call.py --ckpt=runs/digits                 # FD and confidence
  python benchmarks/quality_per_call.py --ckpt=runs/digits --fid_cells=ddim:50,heun:11
  python benchmarks/quality_per_call.py --ckpt=runs/digits --distilled=runs/digits_distilled
  python benchmarks/quality_per_call.py --ckpt=runs/digits_flow --routes=euler,ddim,dpm_solver++,heun,adaptive --calls=1,2,4,8,16 --results=quality_per_call_flow

For ddim, dpm_solver++, dpm_solver++3m (each on its default spacing), dpm_solver++ and heun on
Karras spacing, at 1, 2, 4, 8, 10, 20 and 50 calls (heun makes 2 N - 1: the largest N within
the budget; plus heun at 6 steps, 11 calls), it draws --num_samples samples (fixed seed) and
scores them with the digits classifier (digits FD, lower is better, and mean confidence; see
ddpm_jax.digits_quality) and, for the cells named in --fid_cells (route:calls, FID is slow on
a CPU: about 80 s per 500 images), FID against all 1,797 digits. --distilled adds each
finished student of a distillation run (distill.py), sampled with its own steps. --routes and
--calls choose a subset; on continuous and flow runs the routes euler (Euler on the ODE, on
its trailing, Karras and log-SNR spacings) and adaptive (the run's diffrax solver,
sampling.solver, at sampling.rtol/atol or at each of --tolerances: one cell each, the calls it
took; adaptive/bosh3, adaptive/tsit5, ... name the solver) are there too.
Writes benchmarks/results/<--results>.md and .png (FD against calls, log x).
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

from ddpm_jax import (config_lib, digits_quality, evaluation, inference, plots,  # noqa: E402
                      sampling, schedules)
from ddpm_jax import workdir as workdir_lib

flags.DEFINE_string('ckpt', None, 'A trained digits run (configs/digits.py).')
flags.DEFINE_integer('num_samples', 500, 'Samples per cell.')
flags.DEFINE_integer('seed', 0, 'Sampling seed (the same for every cell).')
flags.DEFINE_string('fid_cells', '', 'Comma-separated route:calls cells that also get FID, e.g. '
                    'ddim:50,heun:11 (route names as in the table: ddim, dpm_solver++, '
                    'dpm_solver++3m, dpm_solver++/karras, heun).')
flags.DEFINE_string('distilled', '', 'A distillation workdir (distill.py) of --ckpt: its '
                    'students become the route "distilled".')
flags.DEFINE_string('routes', '', 'Comma-separated route names to run (default: all that the '
                    'run takes).')
flags.DEFINE_string('calls', '', 'Comma-separated call budgets (default: 1,2,4,8,10,20,50).')
flags.DEFINE_string('tolerances', '', 'Comma-separated rtol = atol values of the adaptive '
                    'route, one cell each (default: the run\'s sampling.rtol and atol).')
flags.DEFINE_string('results', 'quality_per_call', 'Results file name, without .md / .png.')
flags.mark_flags_as_required(['ckpt'])

RESULTS = REPO / 'benchmarks' / 'results'
CALLS = (1, 2, 4, 8, 10, 20, 50)
# (name, method, spacing, or the adaptive solve's solver): None is the run's or method's own.
ROUTES = (('ddim', 'ddim', None), ('dpm_solver++', 'dpm_solver++', None),
          ('dpm_solver++3m', 'dpm_solver++3m', None),
          ('dpm_solver++/karras', 'dpm_solver++', 'karras'), ('heun', 'heun', 'karras'))
CONTINUOUS_ROUTES = (('euler', 'euler', None), ('euler/karras', 'euler', 'karras'),
                     ('euler/logsnr', 'euler', 'logsnr'), ('adaptive', 'adaptive', None)) + tuple(
                         (f'adaptive/{solver}', 'adaptive', solver)
                         for solver in sampling.ADAPTIVE_SOLVERS)


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
  budgets = tuple(int(c) for c in f.calls.split(',')) if f.calls else CALLS
  routes = ROUTES + (CONTINUOUS_ROUTES if schedules.is_continuous(
      config_lib.schedule_from_config(config)) else ())
  if f.routes:
    wanted = f.routes.split(',')
    routes = tuple(r for r in routes if r[0] in wanted)
  classifier = digits_quality.load_classifier()
  rows = []
  cells = []  # (route, steps, tolerance), each once, in order
  tolerances = [float(t) for t in f.tolerances.split(',')] if f.tolerances else [None]
  for route in routes:
    if route[1] == 'adaptive':  # the solver picks its steps: one cell per tolerance
      cells += [((route[0] if tol is None else f'{route[0]}/{tol:g}', *route[1:]), None, tol)
                for tol in tolerances]
      continue
    steps = {steps_for(route[1], calls) for calls in budgets} | (
        {6} if route[0] == 'heun' and not f.calls else set())
    cells += [(route, n, None) for n in sorted(steps)]
  students = workdir_lib.finished_students(f.distilled) if f.distilled else {}
  cells += [(('distilled', 'ddim', 'trailing'), n, None) for n in sorted(students)]
  for (name, method, variant), steps, tolerance in cells:
    route_fn, route_params = (inference.load_sampler(students[steps]) if name == 'distilled'
                              else (sample_fn, params))
    calls = []
    # The adaptive solve takes a tolerance (None: the run's own) instead of steps.
    settings = (dict(rtol=tolerance, atol=tolerance, solver=variant) if method == 'adaptive'
                else dict(num_steps=steps, spacing=variant))
    samples = inference.sample_in_batches(route_fn, route_params, jax.random.key(f.seed),
                                          f.num_samples, f.num_samples, calls=calls,
                                          method=method, **settings)
    uint8 = np.round(samples * 255).astype(np.uint8)
    scores = digits_quality.quality(uint8, classifier=classifier)
    nfe = calls[0]
    row = dict(route=name, calls=nfe, steps=steps or '-', fd=scores['fd'],
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
           + (f' --routes={f.routes}' if f.routes else '')
           + (f' --calls={f.calls}' if f.calls else '')
           + (f' --tolerances={f.tolerances}' if f.tolerances else '')
           + (f' --results={f.results}' if f.results != 'quality_per_call' else '')
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
  (RESULTS / f'{f.results}.md').write_text(text)
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
  axes.set_title(f'Quality per call: {run.workdir.name} ({config.diffusion.schedule}), '
                 f'checkpoint {run.step}, '
                 f'{f.num_samples} samples')
  axes.grid(True, which='both', alpha=0.3)
  axes.legend()
  plots.save_figure(figure, RESULTS / f'{f.results}.png')
  print(text)


if __name__ == '__main__':
  app.run(main)
