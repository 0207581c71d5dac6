"""A config file for tests that run train.py itself: the tiny network of tests.helpers on the
offline digits (python train.py --config=tests/tiny_config.py --workdir=...)."""

from tests.helpers import tiny_config


def get_config():
  return tiny_config(name='digits')
