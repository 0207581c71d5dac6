"""optim.grad_accum_steps: a step computed in K micro-batches is the unsplit step (the same
examples, t and noise, one update), on one device and on two; bad K is one line; resuming with
another K is allowed and said."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, input_pipeline, sharding, train_state, trainer
from ddpm_jax.models import create_model
from tests.helpers import REPO_ROOT, error_lines, run_script, tiny_config


def train_steps(grad_accum_steps: int, num_steps: int = 30, batch_size: int = 64,
                observed: bool = False):
  """The parameters after ``num_steps`` real (jitted, data-sharded) train steps over every
  local device, as numpy arrays."""
  if observed:  # series windows with CSDI's masks: mask, observed values and loss mask split too
    config = tiny_config(name='synthetic')
    config.model.spatial_dims, config.model.observed_input = 1, True
    example_shape = (16, 2)
  else:
    config = tiny_config(name='digits')
    example_shape = (8, 8, 1)
  config.optim.grad_accum_steps = grad_accum_steps
  config.optim.warmup_steps = 0
  config.training.batch_size = batch_size
  config.data.image_size, config.data.channels = 8, 1
  model = create_model(config)
  schedule = config_lib.schedule_from_config(config)
  tx = train_state.make_optimizer(config.optim)
  mesh = sharding.make_mesh()
  train_state.check_grad_accum(grad_accum_steps, batch_size, mesh.devices.size)
  init = train_state.initial_state_fn(config, model, tx, schedule, example_shape)
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=state_sharding)()
  step = train_state.make_train_step(config, model, tx, schedule, state_sharding,
                                     sharding.batch_sharding(mesh), replicated)
  if observed:
    x = np.asarray(jax.random.normal(jax.random.key(1), (4 * batch_size,) + example_shape))
  else:
    x = np.asarray(input_pipeline.digits_source().get_batch(np.arange(4 * batch_size))['x'])
  for i in range(num_steps):
    rows = slice((i % 4) * batch_size, (i % 4 + 1) * batch_size)
    batch = {'x': x[rows], 'label': np.zeros((batch_size,), np.int32)}
    state, metrics = step(state, sharding.to_global(batch, sharding.batch_sharding(mesh)))
  assert bool(metrics['finite'])
  return [np.asarray(a) for a in jax.tree.leaves((state.params, state.ema_params))]


def _assert_same(a, b):
  # Adam divides by the gradient's own scale, so where a gradient is ~0 its rounding moves the
  # parameter by up to ~lr (1e-3): atol 1e-5 is 1% of one update.
  moved = 0.0
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    moved = max(moved, float(np.max(np.abs(x))))
  assert moved > 0


# The image case is the slow pass's (60 s on the 2-core CI machine); the masked series case,
# which also splits the observation mask, stays in the default suite.
@pytest.mark.parametrize('observed', [pytest.param(False, id='images', marks=pytest.mark.slow),
                                      pytest.param(True, id='masked_series')])
def test_four_micro_batches_of_16_train_like_one_batch_of_64(observed):
  whole, split = train_steps(1, observed=observed), train_steps(4, observed=observed)
  _assert_same(split, whole)
  # The check has teeth: one step fewer moves the parameters by far more than the tolerance.
  fewer = train_steps(1, num_steps=29, observed=observed)
  assert max(np.max(np.abs(a - b)) for a, b in zip(fewer, whole)) > 1e-4


TWO_DEVICES = '''
import sys, numpy as np, jax
sys.path.insert(0, {root!r})
assert jax.device_count() == 2, jax.devices()
from tests.test_grad_accum import train_steps
np.savez({out!r}, *train_steps(4))
'''


@pytest.mark.slow  # 55 s on the 2-core CI machine: in the slow pass
def test_accumulation_on_two_devices_equals_one_device_unsplit(tmp_path):
  out = tmp_path / 'two.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, '-c', TWO_DEVICES.format(root=str(REPO_ROOT),
                                                                     out=str(out))],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    two = [f[k] for k in sorted(f, key=lambda k: int(k.split('_')[1]))]
  _assert_same(two, train_steps(1))


def test_micro_batch_split_gives_each_device_an_equal_share_and_joins_back():
  rows = jnp.arange(16)  # 2 devices x 8 rows, K = 4
  micro = train_state.split_micro_batches(rows, 4)
  assert micro.shape == (4, 4)
  for m in range(4):  # rows 0-7 live on device 0, 8-15 on device 1: two of each per micro-batch
    assert sorted(int(r) // 8 for r in micro[m]) == [0, 0, 1, 1]
  np.testing.assert_array_equal(train_state.join_micro_batches(micro), rows)


@pytest.mark.parametrize('k, message', [
    (3, 'optim.grad_accum_steps=3 does not divide the 64 examples each of 1 device(s) gets of '
        'training.batch_size=64; choose one of 1, 2, 4, 8, 16, 32, 64'),
    (0, 'optim.grad_accum_steps must be a positive integer, got 0')])
def test_grad_accum_steps_that_cannot_split_the_batch_is_one_line(k, message):
  with pytest.raises(Exception, match='^' + message.replace('(', r'\(').replace(')', r'\)')):
    train_state.check_grad_accum(k, 64, 1)


@pytest.mark.slow  # a train.py subprocess; check_grad_accum's one line is tested above
def test_train_py_refuses_a_bad_grad_accum_steps_before_compiling(tmp_path):
  result = run_script('train.py', '--config=configs/digits.py', f'--workdir={tmp_path}',
                      '--config.optim.grad_accum_steps=5')
  assert result.returncode == 1
  assert error_lines(result) == [
      'train.py: error: optim.grad_accum_steps=5 does not divide the 64 examples each of 1 '
      'device(s) gets of training.batch_size=64; choose one of 1, 2, 4, 8, 16, 32, 64']


@pytest.mark.slow  # 25 s on the 2-core CI machine: in the slow pass
def test_resume_with_another_grad_accum_steps_continues_and_says_so(tmp_path, capsys):
  config = tiny_config(name='digits')
  config.training.num_steps = 2
  trainer.train(config, tmp_path / 'run')
  config.training.num_steps, config.optim.grad_accum_steps = 4, 2
  state = trainer.train(config, tmp_path / 'run')
  out = capsys.readouterr().out
  assert 'resuming with optim.grad_accum_steps=2 (the checkpoints were written with 1)' in out
  assert int(state.step) == 4
