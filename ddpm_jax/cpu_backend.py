"""The XLA:CPU setting that train.py, sample.py, convert, the evaluation commands and load_sampler
choose before JAX starts its CPU backend.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. Its own (Eigen) convolutions are
faster for this UNet's, above all in the backward pass (docs/performance.md has the
measurements). Dots, reductions and elementwise ops stay with YNNPACK. XLA_FLAGS is read once, when the backend starts, so this only takes effect
in a process that has not used JAX's devices yet; a user's own setting of the flag in XLA_FLAGS
wins, and ``DDPM_JAX_CPU_CONVOLUTIONS=ynnpack`` leaves XLA's default.

Several CPU devices in a process (``--xla_force_host_platform_device_count``) or several processes
keep XLA's default: Eigen's convolutions share one thread pool, and there YNNPACK's were faster.
"""

from __future__ import annotations

import os
import re

from ddpm_jax import sharding
from ddpm_jax.errors import InputError

VARIABLE = 'DDPM_JAX_CPU_CONVOLUTIONS'
CHOICES = ('eigen', 'ynnpack')
FLAG = '--xla_cpu_experimental_ynn_fusion_type'
EIGEN_CONVOLUTIONS = f'{FLAG}=-individual_convolution'


def several_cpu_runtimes(environ) -> bool:
  """Whether ``environ`` asks for several host devices in a process or several processes (a
  launch ``sharding.launch_settings`` reads; raises LaunchError for a bad one)."""
  devices = re.findall(r'--xla_force_host_platform_device_count=(\d+)',
                       environ.get('XLA_FLAGS', ''))
  launch = sharding.launch_settings(environ)
  return ((bool(devices) and int(devices[-1]) > 1) or
          (launch is not None and launch['num_processes'] != 1))


def configure(environ=None) -> None:
  """Adds the convolution setting to XLA_FLAGS in ``environ`` (default os.environ) unless it is
  switched off, XLA_FLAGS already sets the flag, or several CPU devices or processes run."""
  environ = os.environ if environ is None else environ
  choice = environ.get(VARIABLE, 'eigen').strip().lower() or 'eigen'
  if choice not in CHOICES:
    raise InputError(f'{VARIABLE}={environ[VARIABLE]!r}: choose one of {", ".join(CHOICES)}')
  xla_flags = environ.get('XLA_FLAGS', '')
  if choice == 'eigen' and FLAG not in xla_flags and not several_cpu_runtimes(environ):
    environ['XLA_FLAGS'] = f'{xla_flags} {EIGEN_CONVOLUTIONS}'.strip()
