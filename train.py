"""Trains a diffusion model: python train.py --config=configs/digits.py --workdir=runs/digits

Overrides: --config.training.batch_size=64 (any field). Rerunning with the same --workdir
resumes from its newest complete checkpoint.
"""

from ddpm_jax.commands import train

if __name__ == '__main__':
  train.run()
