"""The errors a user sees as one line (``ddpm_jax.cli`` turns them into ``<program>: error: ...``).

Bad input raises a ``UserError`` where it is detected, saying what to do: ``InputError`` for an
argument, a file's content or a config value (a ValueError too, so library callers that catch
ValueError keep working), the others for a run that cannot go on. Anything else that escapes a
command is a bug and keeps its traceback. No module imports another's errors.
"""

from __future__ import annotations

import signal


class UserError(Exception):
  """Something the user can fix; the message says what."""


class InputError(UserError, ValueError):
  """A bad argument, config value or file content (a malformed, oversized or non-finite file)."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint could not be written or read for a reason other than damage (a full disk, a
  permission, a checkpoint of another model)."""


class TrainingError(UserError, RuntimeError):
  """The run cannot go on (it diverged)."""


class LaunchError(UserError, RuntimeError):
  """Multi-process JAX could not start: a launch variable is wrong or a peer is missing."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived (here or, in a multi-process run, at another process); the state
  was saved."""

  def __init__(self, signum: int, step: int, here: bool = True):
    where = '' if here else ' (at another process)'
    super().__init__(f'stopped by {signal.Signals(signum).name}{where} at step {step}; '
                     f'checkpoint {step} saved; run the same command to resume')
    self.signum = signum
