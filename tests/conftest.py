import os
import pathlib

import pytest

from tests.helpers import skip_unless_ci

# Tests run on the CPU with float32, like CI.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """../shared/data beside the project root; tests that need it skip when it is absent (and
  fail under CI, which has it)."""
  if not SHARED_DATA.is_dir():
    skip_unless_ci(f'{SHARED_DATA} is absent')
  return SHARED_DATA

# Many tests compile the same tiny networks, in this process and in the subprocesses they start:
# a persistent compilation cache (inherited through the environment) compiles each once.
_CACHE = pathlib.Path(os.environ.get('PYTEST_JAX_CACHE', '/tmp/ddpm_jax_test_jax_cache'))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_CACHE))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
