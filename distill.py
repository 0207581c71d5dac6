"""Distils a trained run into students of fewer sampling steps (progressive distillation):

  python distill.py --teacher=runs/digits --workdir=runs/digits_distilled

--config defaults to configs/distill.py; override any field, e.g.
--config.distill.steps_per_stage=400. Rerunning with the same --workdir resumes.
"""

from ddpm_jax.commands import distill

if __name__ == '__main__':
  distill.run()
