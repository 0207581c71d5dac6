"""Orbax checkpoints of the train state, the data iterator and dataset statistics.

Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so a save cut off by ``kill -9`` is never listed. Restores place every array with the
sharding of the current mesh, so a checkpoint written on N devices or processes restores on any
other count.

A checkpoint that fails to restore is one of two things, told apart before anything is renamed:
- damaged: a file differs from the sha256 recorded when the step was written (``DIGESTS``), its
  metadata cannot be read, or it describes the expected arrays but their data cannot be read
  (missing or truncated files). The trainer sets it aside (``<step>.damaged``,
  then a barrier) and uses the previous one; a reader warns and uses the previous one, renaming
  nothing.
- not damaged (a CheckpointError, nothing renamed): it holds arrays of other shapes (another
  model or config), its files cannot be opened for a permission, or the machine ran out of memory.
"""

from __future__ import annotations

import contextlib
import json
import logging as python_logging
import os
import pathlib
import sys
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from ddpm_jax import file_checks, sharding
from ddpm_jax.errors import CheckpointError


class Restored(NamedTuple):
  step: int
  state: object
  data_iter: Optional[dict]
  extras: dict


class DamagedCheckpoint(Exception):
  """The files of one checkpoint step are missing, unreadable or not what was written."""


# Beside orbax's files in each step folder: the sha256 of every file of the step, written once
# the step is complete. orbax keeps no checksum, so without it flipped bytes restore silently.
DIGESTS = 'ddpm_jax_digests.json'


def _step_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob('*') if p.is_file() and p.name != DIGESTS)


def write_digests(folder: pathlib.Path) -> None:
  """Records the sha256 of every file of a complete step folder (atomically)."""
  digests = {str(p.relative_to(folder)): file_checks.sha256_of_file(p) for p in _step_files(folder)}
  partial = folder / f'{DIGESTS}.partial'
  partial.write_text(json.dumps(digests, indent=0, sort_keys=True))
  os.replace(partial, folder / DIGESTS)


def verify_digests(folder: pathlib.Path) -> bool:
  """Raises DamagedCheckpoint when a file of the step is missing or differs from its recorded
  digest; False when the step has no digests (written before they existed, or cut off between
  the save and its digest), True when every file matches."""
  path = folder / DIGESTS
  if not path.is_file():
    return False
  try:
    digests = json.loads(path.read_text())
    if not isinstance(digests, dict):
      raise ValueError('not an object')
  except (ValueError, UnicodeDecodeError) as error:
    raise DamagedCheckpoint(f'{DIGESTS} is unreadable ({error})') from None
  for name, expected in digests.items():
    file = folder / name
    if not file.is_file():
      raise DamagedCheckpoint(f'{name} is missing')
    if file_checks.sha256_of_file(file) != expected:
      raise DamagedCheckpoint(f'{name} differs from the file that was written (sha256)')
  return True


# Failures of a restore that say nothing about the files' integrity.
_NOT_DAMAGE = ('Topology mismatch', 'RESOURCE_EXHAUSTED', 'Permission denied', 'PERMISSION_DENIED',
               'out of memory')


@contextlib.contextmanager
def _library_errors_quiet():
  """orbax logs an ERROR for each unreadable metadata file; the caller reports the damage in
  one line of its own."""
  previous = python_logging.root.manager.disable
  python_logging.disable(python_logging.ERROR)
  try:
    yield
  finally:
    python_logging.disable(previous)


def _savable(state):
  """Typed PRNG keys are stored as their raw uint32 data."""
  return state.replace(key=jax.random.key_data(state.key))


def _restore_target(abstract_state, target_sharding):
  """The abstract savable state with every leaf placed by ``target_sharding`` (current mesh)."""
  savable = jax.eval_shape(_savable, abstract_state)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target_sharding),
                      savable)


def _first_line(error: BaseException, limit: int = 300) -> str:
  """The error's first line; a long one keeps its head and its tail, where orbax puts the cause
  (e.g. '... Failed to write 3891200 bytes to file 4: File too large')."""
  line = (str(error).splitlines() or [type(error).__name__])[0]
  if len(line) <= limit:
    return line
  return f'{line[:limit // 3]} ... {line[-(2 * limit) // 3:]}'


def _path_names(path) -> tuple:
  """A pytree path as plain names, whatever the container (dataclass field, dict key, index)."""
  names = []
  for entry in path:
    for attribute in ('name', 'key', 'idx'):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
  return tuple(names)


def _leaf_shapes(tree) -> dict:
  return {_path_names(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints in ``directory`` (``<workdir>/checkpoints``).

  ``read_only``: a reader (sample.py, load_sampler) that neither creates, cleans nor renames.
  """

  def __init__(self, directory, max_to_keep: int = 3, read_only: bool = False):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    self.read_only = read_only
    # (orbax's own read_only option works too, but logs three warnings on every sample.py run.)
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                           create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=True)
    # Handlers named up front, so a fresh manager can read an item's metadata before a restore.
    handlers = dict(state=ocp.StandardCheckpointHandler(), extras=ocp.JsonCheckpointHandler(),
                    data_iter=ocp.JsonCheckpointHandler())
    with _library_errors_quiet():  # it reads every step's metadata; restore reports damage
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=handlers)
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
      raise self._write_error(step, error) from None
    self._pending_step = step

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointError if it failed."""
    if self._pending_step is None:
      return
    step, self._pending_step = self._pending_step, None
    try:
      self.manager.wait_until_finished()
      if sharding.is_main_process():
        write_digests(self.directory / str(step))
    except Exception as error:
      raise self._write_error(step, error) from None

  def _write_error(self, step, error) -> CheckpointError:
    done = [s for s in self.manager.all_steps() if s != step]
    kept = f'checkpoint {max(done)} is intact' if done else 'no earlier checkpoint exists'
    return CheckpointError(f'writing checkpoint {step} to {self.directory} failed '
                           f'({_first_line(error)}); {kept}. Free disk space or choose another '
                           f'--workdir, then rerun.')

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def _check_readable(self, step: int) -> None:
    """A permission problem is the user's to fix, not damage: say so and rename nothing."""
    for root, _, files in os.walk(self.directory / str(step)):
      for name in [root] + [os.path.join(root, f) for f in files]:
        if not os.access(name, os.R_OK):
          raise CheckpointError(f'cannot read {name} (permission denied); fix the permissions of '
                                f'{self.directory / str(step)} and rerun')

  def _check_metadata(self, step: int, target) -> None:
    """Damaged when the metadata cannot be read; a CheckpointError when it describes arrays of
    other shapes (another model), so a config mismatch is never taken for damage."""
    try:
      with _library_errors_quiet():
        metadata = self.manager.item_metadata(step)['state']
      saved = _leaf_shapes(getattr(metadata, 'tree', metadata))
    except Exception as error:  # missing or truncated metadata files, in many error types
      raise DamagedCheckpoint(f'{type(error).__name__}: {_first_line(error)}') from None
    wanted = _leaf_shapes(target)
    if saved != wanted:
      differ = sorted(set(saved) ^ set(wanted)) or \
          sorted(k for k in wanted if saved.get(k) != wanted[k])
      name = '/'.join(differ[0])
      raise CheckpointError(
          f'checkpoint {step} in {self.directory} holds other arrays than this config\'s model '
          f'({len(differ)} differ, e.g. {name}: {saved.get(differ[0], "absent")} saved, '
          f'{wanted.get(differ[0], "absent")} now); use the config it was written with')

  def restore(self, step: int, abstract_state, target_sharding) -> Restored:
    """Restores ``step`` with every array placed by ``target_sharding`` (the current mesh's).

    Raises DamagedCheckpoint when its files are missing or unreadable, CheckpointError when it
    cannot be restored for another reason.
    """
    target = _restore_target(abstract_state, target_sharding)
    self._check_readable(step)
    verify_digests(self.directory / str(step))
    self._check_metadata(step, target)
    item_names = {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}
    args = dict(state=ocp.args.StandardRestore(target), extras=ocp.args.JsonRestore())
    if 'data_iter' in item_names:
      args['data_iter'] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as error:
      if isinstance(error, (PermissionError, MemoryError)) or \
          any(text in str(error) for text in _NOT_DAMAGE):
        raise CheckpointError(f'checkpoint {step} in {self.directory} does not restore '
                              f'({_first_line(error)})') from None
      raise DamagedCheckpoint(f'{type(error).__name__}: {_first_line(error)}') from None
    state = restored['state']
    state = state.replace(key=jax.random.wrap_key_data(state.key))
    return Restored(step, state, restored['data_iter'] if 'data_iter' in args else None,
                    restored['extras'] or {})

  def restore_latest(self, abstract_state, target_sharding) -> Optional[Restored]:
    """The newest checkpoint that restores, or None if none is left.

    A damaged one is reported; the trainer sets it aside as ``<step>.damaged`` (process 0
    renames, every process waits at a barrier, then reloads), a reader only skips it.
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state, target_sharding)
      except DamagedCheckpoint as damage:
        aside = self.directory / f'{step}.damaged'
        action = 'skipped it' if self.read_only else f'set it aside as {aside}'
        message = f'checkpoint {step} is damaged ({damage}); {action} and trying the previous one'
        if sharding.is_main_process():
          print(f'warning: {message}', file=sys.stderr, flush=True)
        if self.read_only:
          continue
        sharding.barrier(f'checkpoint_{step}_tried')  # nobody is still reading it
        if sharding.is_main_process():
          (self.directory / str(step)).rename(aside)
        sharding.barrier(f'checkpoint_{step}_set_aside')  # renamed before anyone reloads
        with _library_errors_quiet():
          self.manager.reload()
    return None
