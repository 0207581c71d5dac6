"""The XLA:CPU setting that train.py, sample.py, convert, the evaluation commands and load_sampler
choose before JAX starts its CPU backend.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. Its own (Eigen) convolutions are
faster for this UNet's, above all in the backward pass: measured on a 2-core x86_64 CPU, the
digits config trains at 10.4 steps/s instead of 7.4 and the CIFAR-10 network's training step
takes 8% less; 1-D series models are unchanged (README, Speed). Dots, reductions and elementwise
ops stay with YNNPACK. XLA_FLAGS is read once, when the backend starts, so this only takes effect
in a process that has not used JAX's devices yet; a user's own setting of the flag in XLA_FLAGS
wins, and ``DDPM_JAX_CPU_CONVOLUTIONS=ynnpack`` leaves XLA's default.
"""

from __future__ import annotations

import os

VARIABLE = 'DDPM_JAX_CPU_CONVOLUTIONS'
CHOICES = ('eigen', 'ynnpack')
FLAG = '--xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'{FLAG}=-individual_convolution'


def configure(environ=None) -> None:
  """Adds the convolution setting to XLA_FLAGS in ``environ`` (default os.environ) unless it is
  switched off or XLA_FLAGS already sets the flag."""
  environ = os.environ if environ is None else environ
  choice = environ.get(VARIABLE, 'eigen').strip().lower() or 'eigen'
  if choice not in CHOICES:
    raise ValueError(f'{VARIABLE}={environ[VARIABLE]!r}: choose one of {", ".join(CHOICES)}')
  xla_flags = environ.get('XLA_FLAGS', '')
  if choice == 'eigen' and FLAG not in xla_flags:
    environ['XLA_FLAGS'] = f'{xla_flags} {EIGEN_CONVOLUTIONS}'.strip()
