"""Trains a diffusion model: python train.py --config=configs/digits.py --workdir=runs/digits

Overrides: --config.training.batch_size=64 (any field). Rerunning with the same --workdir
resumes from its newest complete checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import cli, trainer

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', '', 'Folder for checkpoints, samples, metrics and config.json.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  cli.run(cli.program_name(), lambda: trainer.train(f.config, f.workdir))


def run():
  """The console script's entry point."""
  app.run(main, flags_parser=cli.parse_flags)
