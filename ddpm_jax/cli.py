"""How the command-line entry points report bad input: one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys

from ddpm_jax.checkpointing import CheckpointError


def run(program: str, fn):
  """Calls fn(); a user-facing error becomes ``<program>: error: <one line>`` and exit code 1.

  Set DDPM_JAX_DEBUG=1 to see the traceback instead. Logging defaults to warnings (orbax logs
  every save and restore at INFO); --verbosity=0 shows it.
  """
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from ddpm_jax.trainer import Interrupted, TrainingError
  try:
    return fn()
  except Interrupted as stop:
    print(f'{program}: {stop}', file=sys.stderr)
    sys.exit(128 + stop.signum)
  except (ValueError, FileNotFoundError, NotADirectoryError, TrainingError,
          CheckpointError) as error:
    if os.environ.get('DDPM_JAX_DEBUG') == '1':
      raise
    message = ' '.join(str(error).split()) or type(error).__name__
    print(f'{program}: error: {message}', file=sys.stderr)
    sys.exit(1)
