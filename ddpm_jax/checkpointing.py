"""Orbax checkpoints of the train state, the data iterator and dataset statistics.

Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so a save cut off by ``kill -9`` is never listed. A newest checkpoint that fails to
restore is set aside (renamed ``<step>.damaged``) and the one before it is used.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint could not be written."""


class Restored(NamedTuple):
  step: int
  state: object
  data_iter: Optional[dict]
  extras: dict


def _savable(state):
  """Typed PRNG keys are stored as their raw uint32 data."""
  return state.replace(key=jax.random.key_data(state.key))


def _abstract_savable(abstract_state):
  return abstract_state.replace(key=jax.eval_shape(jax.random.key_data, abstract_state.key))


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints in ``directory`` (``<workdir>/checkpoints``)."""

  def __init__(self, directory, max_to_keep: int = 3, read_only: bool = False):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    # A reader neither creates nor cleans anything. (orbax's own read_only option works too, but
    # logs three warnings on every sample.py run.)
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                           create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending_step = None

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter: Optional[dict], extras: dict) -> None:
    """Starts an asynchronous save; ``wait`` (or the next save) reports a failed write."""
    self.wait()
    args = dict(state=ocp.args.StandardSave(_savable(state)), extras=ocp.args.JsonSave(extras))
    if data_iter is not None:
      args['data_iter'] = ocp.args.JsonSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as error:
      raise self._error(step, error) from None
    self._pending_step = step

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointError if it failed."""
    if self._pending_step is None:
      return
    step, self._pending_step = self._pending_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as error:
      raise self._error(step, error) from None

  def _error(self, step, error) -> CheckpointError:
    done = [s for s in self.manager.all_steps() if s != step]
    kept = f'checkpoint {max(done)} is intact' if done else 'no earlier checkpoint exists'
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f'writing checkpoint {step} to {self.directory} failed ({detail}); '
                           f'{kept}. Free disk space or choose another --workdir, then rerun.')

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def restore(self, step: int, abstract_state) -> Restored:
    item_names = {p.name for p in (self.directory / str(step)).iterdir()}
    args = dict(state=ocp.args.StandardRestore(_abstract_savable(abstract_state)),
                extras=ocp.args.JsonRestore())
    if 'data_iter' in item_names:
      args['data_iter'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    state = restored['state']
    state = state.replace(key=jax.random.wrap_key_data(state.key))
    return Restored(step, state, restored['data_iter'] if 'data_iter' in args else None,
                    restored['extras'] or {})

  def restore_latest(self, abstract_state) -> Optional[Restored]:
    """The newest checkpoint that restores; damaged ones are reported and set aside."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state)
      except Exception as error:  # orbax raises many types for missing or damaged files
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:300]
        aside = self.directory / f'{step}.damaged'
        logging.warning('checkpoint %d in %s does not restore (%s: %s); moved it to %s and '
                        'trying the previous one', step, self.directory, type(error).__name__,
                        first_line, aside)
        print(f'warning: checkpoint {step} does not restore ({first_line}); set aside as {aside}')
        if jax.process_index() == 0:
          (self.directory / str(step)).rename(aside)
        self.manager.reload()
    return None
