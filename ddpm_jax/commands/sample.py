"""Draws samples from a training run.

  python sample.py --ckpt=runs/digits --num_samples=64 --method=ddim --num_steps=50 --out=out/

Writes grid.png and samples.npz (uint8 [N, H, W, C] under arr_0) for images; samples.npy,
samples.csv and windows.png for time series.
"""

from absl import app, flags

from ddpm_jax import cli, generate

flags.DEFINE_string('ckpt', None, 'A training workdir, its checkpoints/ or one checkpoints/<step>.')
flags.DEFINE_string('out', '', 'Output folder (default: <workdir>/generated/<method>).')
flags.DEFINE_integer('num_samples', 64, 'How many samples.')
flags.DEFINE_string('method', '', 'ddpm | ddim | dpm_solver++ | dpm_solver++3m | heun | euler | '
                    'adaptive | euler_maruyama | ode (default: the config\'s sampling.method).')
flags.DEFINE_float('rtol', None, 'adaptive: relative tolerance of the ODE solve (default: the '
                   'config\'s sampling.rtol).')
flags.DEFINE_float('atol', None, 'adaptive: absolute tolerance (default: sampling.atol).')
flags.DEFINE_string('solver', '', 'adaptive: bosh3 | tsit5 | dopri5 | heun, the diffrax solver '
                    '(default: sampling.solver).')
flags.DEFINE_bool('antithetic', None, 'Draw x_T in mirrored pairs (z, -z): an ensemble\'s mean '
                  'and median with less Monte Carlo error (default: sampling.antithetic).')
flags.DEFINE_string('spacing', '', 'Step spacing: uniform | quadratic | logsnr | karras | '
                    'trailing, as the method takes them (default: the config\'s, else the '
                    'method\'s own).')
flags.DEFINE_float('rho', 0.0, 'karras spacing: rho (default: the config\'s sampling.rho, 7).')
flags.DEFINE_integer('num_steps', 0, 'Reverse steps (default: the config\'s; ddpm takes all T). '
                     'For a distillation run (distill.py): which student, by its steps.')
flags.DEFINE_float('eta', -1.0, 'DDIM eta in [0, 1] (default: the config\'s).')
flags.DEFINE_integer('seed', 0, 'Random seed; the same seed reproduces the same samples.')
flags.DEFINE_integer('batch_size', 0, 'Samples per device call (default: sampling.batch_size).')
flags.DEFINE_string('png_dir', '', 'Also write one PNG per sample here.')
flags.DEFINE_bool('trajectory', False, 'Also write trajectory.png: x_t and predicted x0 along '
                  'the reverse process.')
flags.DEFINE_string('labels', '', 'Class labels for a class-conditional model: "3" or "0,1,2".')
flags.DEFINE_float('guidance_scale', -1.0, 'Classifier-free guidance w: 1 conditional, 0 '
                   'unconditional, >1 guided (default: the config\'s).')
flags.DEFINE_bool('eval', False, 'Also write metrics.json: FID/KID against the run\'s data (images; '
                  'digits also get the classifier scores) or metrics against real windows '
                  '(series).')
flags.DEFINE_string('fid_stats', '', 'With --eval: reference statistics (.npz with mu, sigma) '
                    'instead of the run\'s data.')
flags.DEFINE_string('inception_weights', '', 'With --eval: the FID network\'s weights (default: '
                    '$DDPM_JAX_INCEPTION_WEIGHTS or ~/.cache/ddpm_jax/inception/).')
flags.DEFINE_enum('task', 'generate', ['generate', 'forecast', 'impute'], 'Series runs: '
                  'generate windows, forecast --horizon steps, or fill missing values.')
flags.DEFINE_integer('horizon', 0, 'forecast: steps to forecast (shorter than the window); 0: '
                     "the run's data.horizon, else 24.")
flags.DEFINE_string('series', '', 'forecast / impute: the CSV to read (default: the run\'s data).')
flags.DEFINE_integer('num_windows', 100, 'forecast / impute --eval: test windows to score, evenly '
                     'spaced over the test part (0: all of them).')
flags.DEFINE_enum('eval_part', 'test', ['test', 'validation'], 'forecast / impute --eval: score '
                  'windows of the test part, or of the validation part to choose settings on.')
flags.DEFINE_float('missing', 0.3, 'impute --eval: fraction of points hidden at random.')
flags.DEFINE_integer('block', 0, 'impute --eval: hide one block of this many steps per window '
                     'instead of random points.')
flags.DEFINE_integer('season', 24, 'forecast / impute --eval: the season of the baselines '
                     '(24 for hourly data).')
flags.DEFINE_bool('overwrite', False, 'Write into an --out (or --png_dir) folder that holds '
                  'files ddpm_jax did not write.')
flags.DEFINE_bool('allow_unknown_weights', False, 'With --eval: read --inception_weights even '
                  'if it is not one of the two known FID weight files.')
flags.mark_flags_as_required(['ckpt'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.run(cli.program_name(),
          lambda: generate.generate(generate.SampleRequest.from_flags(flags.FLAGS)))


def run():
  """The console script's entry point."""
  app.run(main, flags_parser=cli.parse_flags)
