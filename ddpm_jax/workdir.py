"""A run's folder: its layout, its config.json (written and checked), its checkpoints and
distilled students, and loading it into a ``Run``.

  <workdir>/config.json         the resolved config (CONFIG)
  <workdir>/checkpoints/<step>/ orbax checkpoints (CHECKPOINTS)
  <workdir>/students/<N>_steps/ a distillation's stages, each a run (STUDENTS, STAGE_DONE)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from ddpm_jax import compilation_cache, config_lib, cpu_backend, sharding, train_state
from ddpm_jax.checkpointing import Checkpointer, DamagedCheckpoint
from ddpm_jax.errors import CheckpointError, InputError
from ddpm_jax.models import create_model

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run folder holds, loaded: its config, network, EMA parameters (a plain pytree,
  placed on the local devices), the checkpoint step, the folder, and the data statistics a
  series run saved (None for images)."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int
  workdir: pathlib.Path
  data_stats: Optional[dict]


MAX_CONFIG_BYTES = 1 << 20  # a run's config.json is a few KiB


def read_config(workdir) -> ml_collections.ConfigDict:
  """A run's config.json (a downloaded run's too: a bounded, well-formed JSON object)."""
  path = pathlib.Path(workdir) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: is {workdir} a ddpm_jax training workdir?')
  if path.stat().st_size > MAX_CONFIG_BYTES:
    raise InputError(f'{path} is larger than the {MAX_CONFIG_BYTES >> 10} KiB a run config needs')
  try:
    fields = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
    raise InputError(f'{path} is not valid JSON ({str(error)[:80]}); is the run complete?') \
        from None
  missing = [s for s in ('data', 'model', 'diffusion') if not isinstance(fields, dict)
             or not isinstance(fields.get(s), dict)]
  if missing:
    raise InputError(f'{path} is not a ddpm_jax run config: it has no {missing[0]} section')
  return ml_collections.ConfigDict(fields)


def check_config(workdir: pathlib.Path, config) -> None:
  """Checks that the config.json of a workdir with checkpoints fits ``config`` (creates the
  folder)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if (workdir / CONFIG).exists() and (workdir / CHECKPOINTS).is_dir() and \
      any(p.name.isdigit() for p in (workdir / CHECKPOINTS).iterdir()):
    saved = read_config(workdir)
    diffs = config_lib.checkpoint_differences(saved, config)
    if diffs:
      raise InputError(f'{workdir} holds checkpoints of another config ({"; ".join(diffs)}); '
                       f'use a new --workdir or the original settings')
    accum = [c.get('optim', {}).get('grad_accum_steps', 1) for c in (saved, config)]
    if accum[0] != accum[1] and sharding.is_main_process():
      print(f'resuming with optim.grad_accum_steps={accum[1]} (the checkpoints were written '
            f'with {accum[0]}): the same updates, in {accum[1]} micro-batch(es) per step',
            flush=True)


def write_config(workdir: pathlib.Path, config) -> None:
  """Writes config.json: only once every check of the resume has passed, so that a refused
  resume leaves the file describing the checkpoints it sits beside."""
  sharding.barrier('config_checked')  # nobody reads config.json while process 0 writes it
  if sharding.is_main_process():
    (workdir / CONFIG).write_text(config_lib.to_json(config))


def resolve_checkpoint(path) -> tuple[pathlib.Path, Optional[int]]:
  """A workdir, its checkpoints folder or one step folder -> (workdir, step or None = newest)."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f'--ckpt {path} does not exist')
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    return path.parent.parent, int(path.name)
  if path.name == 'checkpoints':
    return path.parent, None
  return path, None


# A distillation workdir (ddpm_jax.distiller) holds one run per stage: students/<N>_steps/,
# each with STAGE_DONE once its stage has finished.
STUDENTS = 'students'
STAGE_DONE = 'distilled.json'


def student_folder(workdir, num_steps: int) -> pathlib.Path:
  return pathlib.Path(workdir) / STUDENTS / f'{num_steps}_steps'


def finished_students(workdir) -> dict:
  """{steps: folder} of the finished stages of a distillation workdir."""
  folder = pathlib.Path(workdir) / STUDENTS
  found = {}
  if folder.is_dir():
    for path in folder.iterdir():
      steps = path.name[:-len('_steps')]
      if path.name.endswith('_steps') and steps.isdigit() and (path / STAGE_DONE).is_file():
        found[int(steps)] = path
  return found


def pick_student(workdir, num_steps: Optional[int]) -> pathlib.Path:
  """The finished student of a distillation workdir with ``num_steps`` steps (None: the one
  with the fewest)."""
  found = finished_students(workdir)
  if not found:
    raise FileNotFoundError(f'{workdir} is a distillation run whose first stage has not finished '
                            f'yet; sample one of {workdir / STUDENTS}/*/ or wait')
  if num_steps is None:
    return found[min(found)]
  if num_steps not in found:
    raise InputError(f'{workdir} has students for {", ".join(map(str, sorted(found)))} steps; '
                     f'--num_steps={num_steps} is none of them')
  return found[num_steps]


def check_finite_params(params, source: str) -> None:
  """One line naming the first parameter with a NaN or infinity (a downloaded run, say), which
  would otherwise sample black images without a word."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  finite = sharding.to_host(jax.jit(train_state.finite_leaves)(params))
  if not finite.all():
    name = jax.tree_util.keystr(leaves[int(np.argmin(finite))][0])
    raise InputError(f'{source}: parameter {name} holds NaN or infinite values; the run is '
                     'not usable (train it again, or use an earlier checkpoint)')


def load_run(path, step: Optional[int] = None, student_steps: Optional[int] = None) -> Run:
  """Loads a run's config, network and EMA parameters.

  ``path``: the workdir, ``<workdir>/checkpoints`` or one ``<workdir>/checkpoints/<step>``. A
  distillation workdir stands for its finished student of ``student_steps`` steps (None: the
  fewest), whose config samples with its own step count. Without a step, the newest checkpoint
  that restores is used (a damaged newer one is reported and skipped; nothing is renamed). The
  parameters are placed on every local device (on every device of every process in a
  multi-process run), whatever topology wrote them. Turns on JAX's persistent compilation
  cache (``ddpm_jax.compilation_cache``) unless it is switched off, and XLA:CPU's own
  convolutions when no JAX backend has started yet (``ddpm_jax.cpu_backend``).
  """
  compilation_cache.enable()
  cpu_backend.configure()
  workdir, path_step = resolve_checkpoint(path)
  if (workdir / STUDENTS).is_dir():
    workdir = pick_student(workdir, student_steps)
  config = read_config(workdir)
  model = create_model(config)
  abstract = train_state.abstract_state(config, model)
  replicated = sharding.replicated(sharding.make_mesh())
  checkpointer = Checkpointer(workdir / CHECKPOINTS, read_only=True)
  try:
    steps = checkpointer.all_steps()
    wanted = step if step is not None else path_step
    if not steps:
      raise FileNotFoundError(f'{workdir / "checkpoints"} holds no complete checkpoint')
    if wanted is not None and wanted not in steps:
      raise FileNotFoundError(f'no complete checkpoint {wanted} in {workdir / "checkpoints"} '
                              f'(complete: {steps})')
    if wanted is not None:
      try:
        restored = checkpointer.restore(wanted, abstract, replicated)
      except DamagedCheckpoint as damage:
        raise CheckpointError(f'checkpoint {wanted} in {workdir / "checkpoints"} is damaged '
                              f'({damage}); pass the workdir to use the newest one that '
                              f'restores') from None
    else:
      restored = checkpointer.restore_latest(abstract, replicated)
      if restored is None:
        raise CheckpointError(f'none of the checkpoints {steps} in {workdir / "checkpoints"} '
                              f'restores: all are damaged')
  finally:
    checkpointer.close()
  check_finite_params(restored.state.ema_params, f'checkpoint {restored.step} in {workdir}')
  return Run(config=config, model=model, params=restored.state.ema_params, step=restored.step,
             workdir=workdir, data_stats=restored.extras.get('data_stats'))


