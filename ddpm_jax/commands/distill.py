"""Distils a trained run into students of fewer sampling steps (progressive distillation):

  python distill.py --teacher=runs/digits --workdir=runs/digits_distilled

--config defaults to configs/distill.py; override any field, e.g.
--config.distill.steps_per_stage=400. Rerunning with the same --workdir resumes.
"""

from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import cli, distiller

config_flags.DEFINE_config_file(
    'config', cli.packaged_config('distill'), 'Path to a distillation config (configs/distill.py).', lock_config=True)
flags.DEFINE_string('teacher', None, 'The workdir of a trained run to distil.')
flags.DEFINE_string('workdir', '', 'Folder for the students (one run per stage).')
flags.mark_flags_as_required(['teacher'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  cli.run(cli.program_name(), lambda: distiller.distill(f.config, f.teacher, f.workdir))


def run():
  """The console script's entry point."""
  app.run(main, flags_parser=cli.parse_flags)
