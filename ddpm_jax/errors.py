"""The errors a user sees as one line (``ddpm_jax.cli`` turns them into ``<program>: error: ...``).

Every module raises these (or ValueError / FileNotFoundError for bad arguments); none imports
another's errors.
"""

from __future__ import annotations

import signal


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read for a reason other than damage (a full disk, a
  permission, a checkpoint of another model)."""


class TrainingError(RuntimeError):
  """The run cannot go on (it diverged)."""


class LaunchError(RuntimeError):
  """Multi-process JAX could not start: a launch variable is wrong or a peer is missing."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived (here or, in a multi-process run, at another process); the state
  was saved."""

  def __init__(self, signum: int, step: int, here: bool = True):
    where = '' if here else ' (at another process)'
    super().__init__(f'stopped by {signal.Signals(signum).name}{where} at step {step}; '
                     f'checkpoint {step} saved; run the same command to resume')
    self.signum = signum
