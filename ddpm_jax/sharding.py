"""Data parallelism: a 1-D ``data`` mesh over every device of every process.

The batch is sharded over ``data`` and the train state replicated, so ``jax.jit`` inserts the
gradient all-reduce. Each process feeds its own rows of the global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Starts multi-host JAX when the environment asks for it.

  Set ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), or run
  under a launcher jax.distributed detects (SLURM, Cloud TPU) with ``DDPM_JAX_DISTRIBUTED=1``.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('DDPM_JAX_DISTRIBUTED') == '1':
    if not jax.distributed.is_initialized():
      jax.distributed.initialize()


def make_mesh() -> Mesh:
  # Auto axes, so with_sharding_constraint and NamedSharding inputs both work (../shared/NOTES.md).
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, mesh: Mesh) -> int:
  """Returns this process's share of the global batch; a clear error when devices cannot split it."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    fits = num_devices * max(1, global_batch_size // num_devices)
    raise ValueError(f'training.batch_size={global_batch_size} cannot be split over {num_devices} '
                     f'devices; use a multiple of {num_devices} (e.g. {fits})')
  return global_batch_size // jax.process_count()


def process_rows(global_batch_size: int) -> slice:
  """The rows of the global batch that this process loads."""
  local = global_batch_size // jax.process_count()
  start = jax.process_index() * local
  return slice(start, start + local)


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles every process's rows into global arrays sharded over ``data``."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
