"""Accuracy per network call: every sampler driven by the exact denoiser of a two-Gaussian mixture.

  python benchmarks/sampler_accuracy.py            # about 7 minutes on 2 CPU cores

Data x0 ~ 0.3 N(-0.6, 0.15²) + 0.7 N(0.5, 0.2²) (the tests' mixture), whose optimal noise
prediction is known in closed form (tests/analytic.py), so every error in the table is the
sampler's own, plus Monte-Carlo noise of --num_samples draws (at 50,000: about 0.3% on the
spread and 0.002 on the weight; the deterministic samplers share their x_T, so they share it).
For the linear and the cosine schedule (discrete T = 1000 for ddpm, ddim, heun and the
dpm_solver++ methods; their VP-SDE counterparts for euler, euler_maruyama and ode) and 5, 10,
20, 50, 100 and 1000 network calls, it reports the relative error of the spread (std), the error
of each component's mean, and the error of the weight of the larger component. A second table
puts the Karras-spaced routes at 10 calls (heun: 9) against rho: as rho grows, Karras spacing
tends to uniform steps in log sigma, which on a VP schedule is the log-SNR spacing. Writes
benchmarks/results/sampler_accuracy.md.
"""

import argparse
import datetime
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from ddpm_jax import sampling, schedules  # noqa: E402
from tests.analytic import gaussian_mixture_eps  # noqa: E402

WEIGHTS, MEANS, STDS = (0.3, 0.7), (-0.6, 0.5), (0.15, 0.2)
MEAN = sum(w * m for w, m in zip(WEIGHTS, MEANS))
STD = float(np.sqrt(sum(w * (s ** 2 + m ** 2) for w, m, s in zip(WEIGHTS, MEANS, STDS)) - MEAN ** 2))
SPLIT = -0.05  # between the components: a sample above it counts for the second
CALLS = (5, 10, 20, 50, 100, 1000)
SCHEDULES = {
    'linear': (schedules.linear(1000), schedules.vp_linear()),
    'cosine': (schedules.cosine(1000), schedules.vp_cosine()),
}


def cell(e: dict) -> str:
  """One table cell: spread error / largest component-mean error / weight error."""
  return f'{e["spread"]:+.1%} / {e["means"]:.3f} / {e["weight"]:+.3f}'


def errors(samples: np.ndarray) -> dict:
  upper = samples > SPLIT
  return {
      'spread': samples.std() / STD - 1,
      'means': max(abs(samples[~upper].mean() - MEANS[0]), abs(samples[upper].mean() - MEANS[1])),
      'weight': upper.mean() - WEIGHTS[1],
  }


# Every method that takes a step count on its own default spacing (the adaptive solve chooses
# its own steps: benchmarks/quality_per_call.py measures it), then the Karras-spaced routes.
ROUTES = [(method, sampling.METHOD_SPACINGS[method][0]) for method in sampling.METHODS
          if method != 'adaptive'] + [
    ('ddim', 'karras'), ('dpm_solver++', 'karras'), ('dpm_solver++3m', 'karras'),
    ('heun', 'logsnr')]
KARRAS_METHODS = ('ddim', 'dpm_solver++', 'dpm_solver++3m', 'heun')
RHOS = (5, 7, 10, 15, 20, 30, 50, 100)
RHO_CALLS = 10


def run(schedule, method: str, spacing: str, calls: int, num_samples: int, seed: int,
        rho: float = sampling.DEFAULT_RHO):
  """Samples with at most ``calls`` network calls, or None where the method cannot take that
  many (heun makes 2 N - 1: one fewer than an even budget)."""
  if method == 'ddpm':
    if calls != schedule.num_timesteps:
      return None
    num_steps = None
  elif method == 'ode':  # Heun in (x, t): two calls a step
    if calls % 2:
      return None
    num_steps = calls // 2
  elif method == 'heun':
    num_steps = (calls + 1) // 2
  else:
    num_steps = calls
  try:
    sampling.check_method(method, schedule, num_steps)
  except ValueError:  # e.g. dpm_solver++ takes at most T - 1 discrete steps
    return None
  model_fn = gaussian_mixture_eps(schedule, WEIGHTS, MEANS, STDS)
  fn = jax.jit(lambda key: sampling.sample(model_fn, schedule, key, (num_samples, 1),
                                           method=method, num_steps=num_steps, spacing=spacing,
                                           rho=rho, clip_x0=False))
  return np.asarray(fn(jax.random.key(seed)))[:, 0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_samples', type=int, default=50_000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--results', default=str(REPO / 'benchmarks' / 'results' /
                                               'sampler_accuracy.md'))
  args = parser.parse_args()
  table = {}
  for schedule_name, (discrete, continuous) in SCHEDULES.items():
    for route in ROUTES:
      method, spacing = route
      schedule = continuous if method in sampling.CONTINUOUS_ONLY else discrete
      for calls in CALLS:
        samples = run(schedule, method, spacing, calls, args.num_samples, args.seed)
        if samples is not None:
          table[(schedule_name, route, calls)] = e = errors(samples)
          print(f'{schedule_name:7s} {method:15s} {spacing:9s} {calls:5d} calls: spread '
                f'{e["spread"]:+.1%}, means {e["means"]:.3f}, weight {e["weight"]:+.3f}',
                flush=True)
    for method in KARRAS_METHODS:
      for rho in RHOS:
        # At the default rho the first table has this cell already.
        e = (table.get((schedule_name, (method, 'karras'), RHO_CALLS))
             if rho == sampling.DEFAULT_RHO else None)
        if e is None:
          e = errors(run(discrete, method, 'karras', RHO_CALLS, args.num_samples, args.seed, rho))
        table[(schedule_name, method, rho)] = e
        print(f'{schedule_name:7s} {method:15s} karras rho {rho:<4g} {RHO_CALLS} calls: spread '
              f'{e["spread"]:+.1%}, means {e["means"]:.3f}', flush=True)
  lines = [f'Measured {datetime.date.today()} on {common.machine()} with '
           f'`{" ".join(["python benchmarks/sampler_accuracy.py", *sys.argv[1:]])}`.', '',
           f'Exact denoiser of 0.3 N(-0.6, 0.15²) + 0.7 N(0.5, 0.2²); {args.num_samples:,} '
           f'samples per cell (seed {args.seed}). Cells: spread error (std / true std - 1) / '
           f'largest error of a component mean / weight error of the larger component; '
           f'- where the method cannot make that many calls (ddpm takes T = 1000, ode 2 a '
           f'step, heun 2 N - 1 (one fewer than an even budget), the dpm_solver++ methods at '
           f'most T - 1 discrete steps). Karras spacing: rho = {sampling.DEFAULT_RHO:g}, the '
           f'noise levels of the schedule\'s first and last times.',
           '']
  methods = dict.fromkeys(method for method, _ in ROUTES)  # in order, once each
  discrete_methods = [m for m in methods if m not in sampling.CONTINUOUS_ONLY]
  continuous_methods = [m for m in methods if m in sampling.CONTINUOUS_ONLY]
  for schedule_name in SCHEDULES:
    lines += [f'**{schedule_name} schedule** ({", ".join(discrete_methods)}: discrete T = 1000; '
              f'{", ".join(continuous_methods)}: the VP-SDE {schedule_name} schedule)', '',
              '| method | spacing | ' + ' | '.join(f'{c} calls' for c in CALLS) + ' |',
              '|---|---|' + '---|' * len(CALLS)]
    for method, spacing in ROUTES:
      cells = []
      for calls in CALLS:
        e = table.get((schedule_name, (method, spacing), calls))
        cells.append('-' if e is None else cell(e))
      lines.append(f'| {method} | {spacing} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines += [f'**Karras spacing against rho**, at {RHO_CALLS} calls (heun: {RHO_CALLS - 1}), '
            f'discrete T = 1000 (the same cells)', '',
            '| schedule | method | ' + ' | '.join(f'rho {rho:g}' for rho in RHOS) + ' |',
            '|---|---|' + '---|' * len(RHOS)]
  for schedule_name in SCHEDULES:
    for method in KARRAS_METHODS:
      lines.append(f'| {schedule_name} | {method} | ' + ' | '.join(
          cell(table[(schedule_name, method, rho)]) for rho in RHOS) + ' |')
  lines.append('')
  text = '\n'.join(lines)
  print(text)
  pathlib.Path(args.results).write_text(text)


if __name__ == '__main__':
  main()
