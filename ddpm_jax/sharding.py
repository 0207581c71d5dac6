"""Data parallelism over every device of every process, and starting multi-process JAX.

A 1-D ``data`` mesh spans all devices; the batch is sharded over it and the train state
replicated, so ``jax.jit`` inserts the gradient all-reduce. Each process feeds its own rows of
the global batch. Every process takes part in every jitted computation; ``to_host`` brings a
result that spans other processes' devices back to each of them, and ``barrier`` keeps file
operations in step.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.errors import InputError, LaunchError

DATA_AXIS = 'data'
LAUNCH_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
AUTO_VARIABLE = 'DDPM_JAX_DISTRIBUTED'  # =1: let jax.distributed detect SLURM / Cloud TPU
TIMEOUT_VARIABLE = 'DDPM_JAX_INIT_TIMEOUT'  # seconds every process waits for the others
DEFAULT_INIT_TIMEOUT_S = 300


def _int_variable(environ, name: str, minimum: int) -> int:
  text = environ.get(name, '')
  try:
    value = int(text)
  except ValueError:
    raise LaunchError(f'{name}={text!r} is not an integer') from None
  if value < minimum:
    raise LaunchError(f'{name}={value} must be at least {minimum}')
  return value


def launch_settings(environ=None) -> Optional[dict]:
  """The multi-process launch the environment asks for, checked; None for a single process.

  ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``; or ``DDPM_JAX_DISTRIBUTED=1`` for jax.distributed's own detection (SLURM,
  Open MPI, Cloud TPU). ``DDPM_JAX_INIT_TIMEOUT`` bounds how long a process waits for the others.
  """
  environ = os.environ if environ is None else environ
  address = environ.get('JAX_COORDINATOR_ADDRESS', '')
  auto = environ.get(AUTO_VARIABLE, '') == '1'
  given = [name for name in LAUNCH_VARIABLES[1:] if environ.get(name)]
  if not address and not auto:
    if given:
      raise LaunchError(f'{" and ".join(given)} set but JAX_COORDINATOR_ADDRESS is not; set it to '
                        'host:port of process 0 (the same on every process)')
    return None
  timeout = DEFAULT_INIT_TIMEOUT_S
  if environ.get(TIMEOUT_VARIABLE):
    timeout = _int_variable(environ, TIMEOUT_VARIABLE, 1)
  if not address:  # auto-detection fills in all three
    return dict(address=None, num_processes=None, process_id=None, timeout=timeout)
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise LaunchError(f'JAX_COORDINATOR_ADDRESS={address!r} is not host:port (e.g. '
                      '10.0.0.1:1234, the address of process 0)')
  missing = [name for name in LAUNCH_VARIABLES[1:] if not environ.get(name)]
  if missing and not auto:
    raise LaunchError(f'JAX_COORDINATOR_ADDRESS is set but {" and ".join(missing)} '
                      f'{"is" if len(missing) == 1 else "are"} not; set '
                      'JAX_NUM_PROCESSES to the number of processes and JAX_PROCESS_ID to 0, 1, '
                      '... on each (or DDPM_JAX_DISTRIBUTED=1 under SLURM / Cloud TPU)')
  if missing:
    return dict(address=address, num_processes=None, process_id=None, timeout=timeout)
  num_processes = _int_variable(environ, 'JAX_NUM_PROCESSES', 1)
  process_id = _int_variable(environ, 'JAX_PROCESS_ID', 0)
  if process_id >= num_processes:
    raise LaunchError(f'JAX_PROCESS_ID={process_id} but JAX_NUM_PROCESSES={num_processes}: '
                      f'process ids run from 0 to {num_processes - 1}')
  return dict(address=address, num_processes=num_processes, process_id=process_id,
              timeout=timeout)


def _wait_for_coordinator(address: str, deadline: float) -> bool:
  """True once something accepts TCP connections at host:port, False at the deadline."""
  host, _, port = address.rpartition(':')
  while time.time() < deadline:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=1.0):
        return True
    except OSError:
      time.sleep(0.2)
  return False


def _exit_with(message: str) -> None:
  """Ends the process with one line: jax.distributed aborts (SIGABRT, a C++ stack) when it
  times out, and the call that would time out cannot be interrupted from Python."""
  print(f'{os.path.basename(sys.argv[0]) or "python"}: error: {message}', file=sys.stderr,
        flush=True)
  os._exit(1)


def initialize_distributed(environ=None) -> None:
  """Starts multi-process JAX when the launch variables ask for it (see ``launch_settings``).

  Bounded: when the coordinator cannot be reached, or not every process registers, within
  ``DDPM_JAX_INIT_TIMEOUT`` seconds, the process ends with a one-line error and exit code 1.
  """
  settings = launch_settings(environ)
  if settings is None or jax.distributed.is_initialized():
    return
  timeout, address = settings['timeout'], settings['address']
  deadline = time.time() + timeout
  if address and settings['process_id'] not in (None, 0):
    if not _wait_for_coordinator(address, deadline):
      raise LaunchError(f'no coordinator answers at JAX_COORDINATOR_ADDRESS={address} after '
                        f'{timeout} s; start process 0 (JAX_PROCESS_ID=0) on that host:port, or '
                        f'fix the address')
  done = threading.Event()

  def watchdog():
    if not done.wait(max(1.0, deadline - time.time())):
      who = (f'process {settings["process_id"]} of JAX_NUM_PROCESSES='
             f'{settings["num_processes"]}' if settings['num_processes'] else 'this process')
      _exit_with(f'multi-process JAX did not start within {timeout} s ({TIMEOUT_VARIABLE}): '
                 f'{who} waited at {address or "the detected coordinator"} for the others; '
                 f'start every process with the same JAX_COORDINATOR_ADDRESS and '
                 f'JAX_NUM_PROCESSES and a distinct JAX_PROCESS_ID')

  threading.Thread(target=watchdog, daemon=True, name='distributed-init-watchdog').start()
  try:
    # JAX's own limit comes later than the watchdog's, which ends the process with one line.
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=settings['num_processes'],
                               process_id=settings['process_id'],
                               initialization_timeout=timeout + 30)
  except Exception as error:  # e.g. no cluster detected with DDPM_JAX_DISTRIBUTED=1
    raise LaunchError(f'jax.distributed.initialize failed: {str(error).splitlines()[0]}') \
        from None
  finally:
    done.set()


def is_main_process() -> bool:
  """Process 0 writes files, prints progress and appends metrics; the others compute only."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """The whole of a jax.Array as numpy on every process, also when it spans other processes'
  devices (np.asarray would raise there)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
    raise InputError(f'training.batch_size={global_batch_size} cannot be split over {num_devices} '
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
