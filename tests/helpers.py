"""Tiny configs and subprocess helpers shared by the end-to-end tests."""

import os
import pathlib
import subprocess
import sys

import pytest

from ddpm_jax.configs import default

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def skip_unless_ci(reason: str):
  """Skips a test whose files (the FID weights, ../shared/data) are absent, except under CI
  (CI=true), whose script provides them: there the absence fails the test."""
  if os.environ.get('CI') == 'true':
    pytest.fail(f'{reason}; .ci/run provides this, so under CI its absence is an error')
  pytest.skip(reason)


def tiny_config(**data):
  """A config that trains in a few seconds: a 2-level UNet with 16 channels, T = 100."""
  config = default.get_config()
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.num_groups = 8
  config.diffusion.num_timesteps = 100
  config.diffusion.beta_end = 0.2
  config.optim.warmup_steps = 2
  config.optim.learning_rate = 1e-3
  config.optim.ema_decay = 0.9
  config.training.num_steps = 4
  config.training.batch_size = 8
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 4
  config.training.num_sample_images = 4
  config.sampling.num_steps = 5
  config.sampling.batch_size = 16
  for key, value in data.items():
    config.data[key] = value
  return config


def run_script(*args, env=None, timeout=300):
  """Runs a repo script (train.py / sample.py) in a subprocess; returns CompletedProcess."""
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def error_lines(result):
  """stderr lines that are not logging noise."""
  return [line for line in result.stderr.splitlines()
          if line.strip() and not line.startswith(('W', 'I')) or ': error:' in line]
