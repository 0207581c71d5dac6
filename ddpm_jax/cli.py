"""How the command-line entry points report bad input: one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from ddpm_jax import compilation_cache, cpu_backend, run_log
from ddpm_jax.errors import Interrupted, UserError

# The project's own errors, and the OS errors of a path the user gave (missing, a file where a
# folder belongs or the reverse, no permission, already there). Everything else is a bug and
# keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def run(program: str, fn):
  """Calls fn(); a user error (``USER_ERRORS``) becomes ``<program>: error: <one line>`` and exit
  code 1; any other exception is a bug and shows its traceback.

  Set DDPM_JAX_DEBUG=1 to see the traceback instead. Logging defaults to warnings (orbax logs
  every save and restore at INFO); --verbosity=0 shows it. JAX's persistent compilation cache
  is on (see ddpm_jax.compilation_cache; DDPM_JAX_COMPILATION_CACHE=off switches it off), and
  XLA:CPU runs convolutions with its own kernels (ddpm_jax.cpu_backend;
  DDPM_JAX_CPU_CONVOLUTIONS=ynnpack leaves XLA's default).
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  compilation_cache.enable()
  try:
    cpu_backend.configure()  # a bad setting or launch is a user error like any other
    return fn()
  except Interrupted as stop:
    run_log.silence_library_output()
    print(f'{program}: {stop}', file=sys.stderr, flush=True)
    sys.exit(128 + stop.signum)
  except USER_ERRORS as error:
    if os.environ.get('DDPM_JAX_DEBUG') == '1':
      raise
    run_log.silence_library_output()
    message = ' '.join(str(error).split()) or type(error).__name__
    print(f'{program}: error: {message}', file=sys.stderr, flush=True)
    sys.exit(1)
