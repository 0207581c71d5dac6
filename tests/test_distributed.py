"""Several processes (subprocesses with a localhost coordinator, one CPU device each) and several
host devices: what the README claims for multi-process training and topology-free checkpoints."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax import inference, sharding, train_state, trainer
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.errors import LaunchError
from ddpm_jax.models import create_model
from ddpm_jax import workdir as workdir_lib
from tests.helpers import REPO_ROOT, tiny_config

TINY = ['train.py', '--config=tests/tiny_config.py']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices=1, **extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _start_processes(num, args, port=None, started=None, timeout_s=60):
  """Starts ``started`` (default all) of ``num`` train.py processes of one launch."""
  port = port or _free_port()
  processes = []
  for i in started if started is not None else range(num):
    env = _env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=num,
               JAX_PROCESS_ID=i, DDPM_JAX_INIT_TIMEOUT=timeout_s)
    processes.append(subprocess.Popen([sys.executable, *TINY, *args], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return processes


def _run(args, devices=1, timeout=300):
  result = subprocess.run([sys.executable, *TINY, *args], cwd=REPO_ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _final_state(workdir):
  """The newest checkpoint of a run, restored here (one device, whatever wrote it)."""
  config = workdir_lib.read_config(workdir)
  model = create_model(config)
  checkpointer = Checkpointer(workdir / 'checkpoints', read_only=True)
  try:
    steps = checkpointer.all_steps()
    restored = checkpointer.restore(steps[-1], train_state.abstract_state(config, model),
                                    sharding.replicated(sharding.make_mesh()))
  finally:
    checkpointer.close()
  return restored.step, restored.state


def _assert_same_params(a, b, rtol=1e-4):
  for x, y in zip(jax.tree.leaves((a.params, a.ema_params)), jax.tree.leaves((b.params, b.ema_params))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


@pytest.mark.slow  # two minutes of two-process training: with the long runs
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  args = ['--config.training.num_steps=4', '--config.training.sample_every=2']
  processes = _start_processes(2, args + [f'--workdir={tmp_path / "two"}'])
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  _run(args + [f'--workdir={tmp_path / "one"}'], devices=2)
  step_two, two = _final_state(tmp_path / 'two')
  step_one, one = _final_state(tmp_path / 'one')
  assert step_two == step_one == 4
  _assert_same_params(two, one)
  # Both processes drew the grids (a jitted sampler over both devices); process 0 wrote them.
  assert sorted(p.name for p in (tmp_path / 'two' / 'samples').iterdir()) == \
      ['step_0000002.png', 'step_0000004.png']
  assert 'in 2 process(es)' in outputs[0][0] and 'step 4/4' in outputs[0][0]
  assert 'step 4/4' not in outputs[1][0]  # only process 0 prints progress
  records = (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()
  assert len(records) == len(set(records))  # appended once, not once per process
  # A damaged newest checkpoint: process 0 sets it aside between barriers, both go on from 2.
  for f in (tmp_path / 'two' / 'checkpoints' / '4').rglob('*'):
    if f.is_file():
      f.write_bytes(b'')
  processes = _start_processes(2, ['--config.training.num_steps=6', '--config.training.sample_every=100',
                                   f'--workdir={tmp_path / "two"}'])
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert 'checkpoint 4 is damaged' in outputs[0][1]
  assert f'resuming {tmp_path / "two"} from checkpoint 2' in outputs[0][0]
  assert (tmp_path / 'two' / 'checkpoints' / '4.damaged').is_dir()
  assert _final_state(tmp_path / 'two')[0] == 6


@pytest.mark.slow  # 75 s on the 2-core CI machine: in the slow pass
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  workdir = tmp_path / 'run'
  processes = _start_processes(2, [f'--workdir={workdir}', '--config.training.num_steps=100000',
                                   '--config.training.log_every=1',
                                   '--config.training.sample_every=100000'])
  for line in processes[0].stdout:
    if line.startswith('step 5/'):
      break
  processes[1].send_signal(signal.SIGTERM)
  start = time.time()
  errors = [p.communicate(timeout=120)[1] for p in processes]
  assert time.time() - start < 120
  messages = [[l for l in err.splitlines() if l.startswith('train.py:')] for err in errors]
  for p, err, lines in zip(processes, errors, messages):
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert len(lines) == 1 and 'stopped by SIGTERM' in lines[0], err[-2000:]
  steps = [int(lines[0].split('at step ')[1].split(';')[0]) for lines in messages]
  assert steps[0] == steps[1] >= 5
  assert '(at another process)' in messages[0][0] and 'another' not in messages[1][0]
  assert (workdir / 'checkpoints' / str(steps[0])).is_dir()
  assert _final_state(workdir)[0] == steps[0]


@pytest.mark.parametrize('started,message', [
    ([0], 'multi-process JAX did not start within 5 s'),  # process 1 never comes
    ([1], 'no coordinator answers at JAX_COORDINATOR_ADDRESS=127.0.0.1:'),
])
def test_bad_launch_fails_within_the_timeout_with_one_line(tmp_path, started, message):
  start = time.time()
  (process,) = _start_processes(2, [f'--workdir={tmp_path}'], started=started, timeout_s=5)
  _, err = process.communicate(timeout=120)
  elapsed = time.time() - start
  assert process.returncode == 1, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith('train.py:')]
  assert len(lines) == 1 and lines[0].startswith(f'train.py: error: {message}'), err[-2000:]
  assert elapsed < 60
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('environ,message', [
    (dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234'), 'JAX_NUM_PROCESSES and JAX_PROCESS_ID are '
                                                     'not'),
    (dict(JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='0'), 'JAX_NUM_PROCESSES and JAX_PROCESS_ID set '
                                                      'but JAX_COORDINATOR_ADDRESS is not'),
    (dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='2'),
     'JAX_PROCESS_ID=2 but JAX_NUM_PROCESSES=2'),
    (dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_NUM_PROCESSES='two', JAX_PROCESS_ID='0'),
     "JAX_NUM_PROCESSES='two' is not an integer"),
    (dict(JAX_COORDINATOR_ADDRESS='localhost', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='0'),
     "JAX_COORDINATOR_ADDRESS='localhost' is not host:port"),
])
def test_launch_variables_that_disagree_are_named(environ, message):
  with pytest.raises(LaunchError, match=message):
    sharding.launch_settings(environ)


def test_launch_settings():
  assert sharding.launch_settings({}) is None
  settings = sharding.launch_settings(dict(JAX_COORDINATOR_ADDRESS='10.0.0.1:99',
                                           JAX_NUM_PROCESSES='4', JAX_PROCESS_ID='3',
                                           DDPM_JAX_INIT_TIMEOUT='7'))
  assert settings == dict(address='10.0.0.1:99', num_processes=4, process_id=3, timeout=7)
  assert sharding.launch_settings(dict(DDPM_JAX_DISTRIBUTED='1'))['address'] is None


@pytest.mark.slow  # 100 s on the 2-core CI machine: in the slow pass
def test_train_on_four_devices_resume_on_two_sample_on_one(tmp_path):
  straight, moved = tmp_path / 'straight', tmp_path / 'moved'
  _run([f'--workdir={straight}', '--config.training.num_steps=6'], devices=4)
  _run([f'--workdir={moved}', '--config.training.num_steps=4'], devices=4)
  resumed = _run([f'--workdir={moved}', '--config.training.num_steps=6'], devices=2)
  assert f'resuming {moved} from checkpoint 4' in resumed.stdout
  assert 'damaged' not in resumed.stderr
  assert not any(p.name.endswith('.damaged') for p in (moved / 'checkpoints').iterdir())
  step_a, a = _final_state(straight)
  step_b, b = _final_state(moved)
  assert step_a == step_b == 6
  _assert_same_params(a, b)
  # ...and samples on the one device of this process.
  sample_fn, params = inference.load_sampler(moved)
  samples = sample_fn(params, jax.random.key(0), 4, num_steps=3)
  assert samples.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(samples)).all()


def test_resume_with_another_global_batch_is_refused(tmp_path):
  config = tiny_config(name='digits')
  config.training.num_steps = 2
  trainer.train(config, tmp_path)
  config.training.num_steps, config.training.batch_size = 4, 16
  with pytest.raises(ValueError, match='checkpoint 2 was written with training.batch_size=8'):
    trainer.train(config, tmp_path)
  # The refused resume leaves config.json describing the checkpoints beside it.
  assert workdir_lib.read_config(tmp_path).training.batch_size == 8
