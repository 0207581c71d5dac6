"""How the command-line entry points report bad input: one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import pathlib
import sys

from absl import flags, logging

from ddpm_jax import compilation_cache, configs, cpu_backend, run_log
from ddpm_jax.errors import Interrupted, UserError

# The project's own errors, and the OS errors of a path the user gave (missing, a file where a
# folder belongs or the reverse, no permission, already there). Everything else is a bug and
# keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


# The installed copy of the checkout's configs/ folder.
CONFIG_DIR = pathlib.Path(configs.__file__).resolve().parent


def packaged_config(name: str) -> str:
  """The path of the installed ``configs/<name>.py``."""
  return str(CONFIG_DIR / f'{name}.py')


def _find_configs(argv: list[str]) -> list[str]:
  """``--config=configs/X.py`` names the installed copy where the folder holds no such file,
  so the README's commands work from any folder after ``pip install``."""
  found = []
  for arg in argv:
    name, eq, value = arg.partition('=')
    path = pathlib.PurePath(value)
    if (eq and name in ('--config', '-config') and len(path.parts) == 2
        and path.parts[0] == 'configs' and not os.path.exists(value)
        and (CONFIG_DIR / path.name).is_file()):
      arg = f'{name}={CONFIG_DIR / path.name}'
    found.append(arg)
  return found


def program_name(argv0: str = '') -> str:
  """How errors name the running program: ``train.py``, ``ddpm-train`` or ``ddpm_jax.fid``."""
  path = os.path.abspath(argv0 or sys.argv[0])
  if os.path.basename(os.path.dirname(path)) == 'ddpm_jax':  # python -m ddpm_jax.X
    return f'ddpm_jax.{os.path.splitext(os.path.basename(path))[0]}'
  return os.path.basename(path)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``: a flag that does not
  exist or does not parse, a config file that does not load and a config override naming no
  field (ml_collections' suggestion kept) are one line and exit 1 instead of a traceback."""
  program = program_name(argv[0] if argv else 'ddpm_jax')
  try:
    remaining = flags.FLAGS(_find_configs(argv))
    for name in list(flags.FLAGS):
      # ml_collections defers a config file's load error to the first use of the config.
      try:
        getattr(flags.FLAGS[name].value, 'to_dict', None)
      except OSError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f'--{name}: {lines[-1]}') from None
    return remaining
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    # ml_collections' messages quote a KeyError's repr ('\'num_step\'\nDid you mean ...').
    text = ' '.join(str(error).replace('\\n', ' ').replace("\\'", "'").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
      text = text[1:-1]
    if isinstance(error, AttributeError):  # an override that names no config field
      text = f'no such config field: {text}'
    print(f'{program}: error: {text} (see --helpfull)', file=sys.stderr, flush=True)
    sys.exit(1)


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
