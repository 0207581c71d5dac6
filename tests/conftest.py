import os
import pathlib

import pytest

# Tests run on the CPU with float32, like CI.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


@pytest.fixture
def shared_data():
  """../shared/data beside the project root; tests that need it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent')
  return SHARED_DATA
