"""Long runs: python -m pytest -m slow (the whole slow pass, this file and the slow tests of the
others: 20 minutes with -n 2 on 2 cores, 2026-12-02)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax.configs import digits
from ddpm_jax import sharding, train_state, trainer
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.models import create_model
from ddpm_jax import workdir as workdir_lib
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

ARGS = ['--config.training.num_steps=600', '--config.training.checkpoint_every=100',
        '--config.training.sample_every=10000', '--config.training.log_every=20']


def _start(workdir, config):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, 'train.py', f'--config={config}', *ARGS,
                           f'--workdir={workdir}'],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  config = workdir_lib.read_config(workdir)
  model = create_model(config)
  checkpointer = Checkpointer(workdir / 'checkpoints', read_only=True)
  restored = checkpointer.restore(checkpointer.all_steps()[-1],
                                  train_state.abstract_state(config, model),
                                  sharding.replicated(sharding.make_mesh()))
  return restored.step, restored.state


def _kill_when(process, condition, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      process.send_signal(signal.SIGKILL)
      process.wait()
      return
    time.sleep(0.01)
  process.kill()
  raise AssertionError('the condition to kill never came')


# The diffusion run and the flow-matching run (continuous t, velocity target): both draw their
# t and noise from fold_in(key, step), so a resumed run repeats exactly what was lost.
@pytest.mark.parametrize('config', ['configs/digits.py', 'configs/digits_flow.py'])
def test_kill_9_mid_run_and_during_a_save_then_resume_matches_uninterrupted(tmp_path, config):
  start = lambda workdir: _start(workdir, config)
  straight = tmp_path / 'straight'
  assert start(straight).wait() == 0
  interrupted = tmp_path / 'interrupted'
  checkpoints = interrupted / 'checkpoints'
  steps = lambda: [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
  # 1. mid-run, between saves: after checkpoint 200 is complete.
  _kill_when(start(interrupted), lambda: '200' in steps())
  # 2. during a save: as soon as a temporary step folder appears.
  process = start(interrupted)
  _kill_when(process, lambda: any('tmp' in name for name in steps()))
  completed = sorted(int(n) for n in steps() if n.isdigit())
  result = start(interrupted)
  output, _ = result.communicate(timeout=900)
  assert result.returncode == 0, output[-3000:]
  assert f'resuming {interrupted} from checkpoint {completed[-1]}' in output
  step_a, state_a = _final_state(straight)
  step_b, state_b = _final_state(interrupted)
  assert step_a == step_b == 600
  for a, b in zip(jax.tree.leaves((state_a.params, state_a.ema_params)),
                  jax.tree.leaves((state_b.params, state_b.ema_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _digits_run(workdir, dtype, seed):
  """200 digits steps; returns (losses of steps 105..200, the final digits quality)."""
  config = digits.get_config()
  config.model.dtype = dtype
  config.training.seed = seed
  config.training.num_steps = 200
  config.training.log_every = 5
  config.training.checkpoint_every = 200
  config.training.sample_every = 10_000
  config.training.eval_every = 200
  trainer.train(config, workdir)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = np.array([r['loss'] for r in records if 'loss' in r and r['step'] > 100])
  quality = next(r for r in records if 'eval_fd' in r and r['step'] == 200)
  return losses, quality


def test_bfloat16_training_ends_within_seed_noise_of_float32(tmp_path):
  """bfloat16 compute (float32 parameters, optimiser state and EMA) trains like float32: after
  200 digits steps its loss and its samples' quality differ from float32's by no more than two
  float32 runs with different seeds differ, or than the loss's own step-to-step spread allows."""
  f32, f32_other, bf16 = (_digits_run(tmp_path / name, dtype, seed) for name, dtype, seed in
                          [('f32', 'float32', 0), ('f32_seed1', 'float32', 1),
                           ('bf16', 'bfloat16', 0)])
  loss = lambda run: run[0].mean()
  standard_error = max(np.std(run[0], ddof=1) / np.sqrt(len(run[0])) for run in (f32, bf16))
  loss_noise = max(abs(loss(f32_other) - loss(f32)), 2 * standard_error)
  assert abs(loss(bf16) - loss(f32)) <= 2 * loss_noise, (loss(f32), loss(f32_other), loss(bf16))
  for name in ('eval_fd', 'eval_confidence'):
    seed_noise = abs(f32_other[1][name] - f32[1][name])
    assert abs(bf16[1][name] - f32[1][name]) <= 2 * seed_noise, (
        name, f32[1][name], f32_other[1][name], bf16[1][name])
