import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, inference, schedules, train_state, trainer
from ddpm_jax.models import create_model
from ddpm_jax import workdir as workdir_lib
from tests.helpers import REPO_ROOT, error_lines, run_script, tiny_config


def _params_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.slow  # 50 s on the 2-core CI machine: in the slow pass
def test_end_to_end_tfds_mock_then_restore(tmp_path):
  import tensorflow_datasets as tfds
  config = tiny_config(name='cifar10', random_flip=True)
  config.model.num_classes = 10
  with tfds.testing.mock_data(num_examples=16):
    state = trainer.train(config, tmp_path)
  assert int(state.step) == 4
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['data']['image_size'] == 32 and saved['data']['channels'] == 3
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']
  assert (tmp_path / 'samples' / 'step_0000004.png').is_file()
  assert (tmp_path / 'loss.png').is_file()
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4]
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  sample_fn, params = inference.load_sampler(tmp_path)
  assert workdir_lib.load_run(tmp_path).step == 4
  _params_close(params, state.ema_params, 0)
  samples = sample_fn(params, jax.random.key(0), 2, labels=jnp.array([1, 2]))
  assert samples.shape == (2, 32, 32, 3) and 0 <= samples.min() and samples.max() <= 1


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
  path = tmp_path / 'digits.npz'
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  config.training.num_steps = 6
  config.training.sample_every = 0  # only at the last step
  straight = trainer.train(config, tmp_path / 'straight')
  assert [p.name for p in (tmp_path / 'straight' / 'samples').iterdir()] == ['step_0000006.png']
  config.training.num_steps = 3
  trainer.train(config, tmp_path / 'resumed')
  # As if killed during step 3: only checkpoint 2 is complete.
  import shutil
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '3')
  config.training.num_steps = 6
  resumed = trainer.train(config, tmp_path / 'resumed')
  _params_close(resumed.params, straight.params, 1e-6)
  _params_close(resumed.ema_params, straight.ema_params, 1e-6)


def test_nonfinite_updates_are_skipped_and_counted():
  config = tiny_config()
  model = create_model(_with_channels(config))
  tx = train_state.make_optimizer(config.optim)
  schedule = schedules.linear(100, 1e-4, 0.2)
  state = train_state.initial_state_fn(config, model, tx, schedule, (8, 8, 1))()
  step = jax.jit(lambda s, b: train_state.train_step(
      s, b, model=model, tx=tx, schedule=schedule, target='eps', weighting='simple',
      min_snr_gamma=5.0, ema_decay=0.9, random_flip=False, label_dropout=0.0))
  good = {'x': jnp.zeros((4, 8, 8, 1))}
  bad = {'x': jnp.full((4, 8, 8, 1), jnp.nan)}
  state, metrics = step(state, good)
  assert bool(metrics['finite'])
  before = state
  state, metrics = step(state, bad)
  assert not bool(metrics['finite'])
  for field in ('params', 'ema_params', 'opt_state'):
    _params_close(getattr(state, field), getattr(before, field), 0)
  assert int(state.step) == 2 and int(state.nonfinite_total) == 1
  assert int(state.nonfinite_streak) == 1
  state, _ = step(state, bad)
  assert int(state.nonfinite_streak) == 2
  state, _ = step(state, good)
  assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2


def _with_channels(config):
  config.data.image_size, config.data.channels = 8, 1
  return config


def test_diverging_run_stops_naming_the_steps_and_keeps_its_checkpoint(tmp_path):
  path = tmp_path / 'd.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  config.optim.learning_rate = 1e30
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 1e30
  config.training.num_steps = 30
  config.training.log_every = 1
  config.training.checkpoint_every = 1
  config.training.max_nonfinite_steps = 3
  with pytest.raises(trainer.TrainingError, match=r'3 updates in a row .*steps (\d+)\.\.(\d+).*'
                                                   r'Checkpoint \d+ is intact'):
    trainer.train(config, tmp_path / 'run')
  run = workdir_lib.load_run(tmp_path / 'run')  # what was saved still restores
  assert run.step >= 1


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  path = tmp_path / 'd.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  trainer.train(config, tmp_path / 'run')
  state_dir = tmp_path / 'run' / 'checkpoints' / '4' / 'state'
  for f in state_dir.rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'metadata' not in f.name.lower():
      f.write_bytes(b'\0' * f.stat().st_size)  # damage every data file
  config.training.num_steps = 6
  state = trainer.train(config, tmp_path / 'run')
  captured = capsys.readouterr()
  assert 'checkpoint 4 is damaged' in captured.err and 'set it aside' in captured.err
  assert f'resuming {tmp_path / "run"} from checkpoint 2' in captured.out
  assert int(state.step) == 6
  assert (tmp_path / 'run' / 'checkpoints' / '4.damaged').is_dir()


DEVICE_RUN = textwrap.dedent('''
    import sys, numpy as np, jax
    sys.path.insert(0, {root!r})
    from tests.helpers import tiny_config
    from ddpm_jax import trainer
    assert jax.device_count() == {devices}, jax.devices()
    config = tiny_config(name='digits')
    config.model.dropout = 0.3
    config.data.random_flip = True
    config.training.num_steps = 3
    config.training.sample_every = 100
    state = trainer.train(config, {workdir!r})
    from ddpm_jax import inference
    sample_fn, params = inference.load_sampler({workdir!r})
    samples = sample_fn(params, jax.random.key(0), 8, num_steps=3)
    assert len(samples.sharding.device_set) == {devices}, samples.sharding  # split over devices
    leaves = jax.tree.leaves(state.params)
    np.savez({out!r}, *[np.asarray(x) for x in leaves])
''')


def _run_on_devices(devices, tmp_path):
  out = tmp_path / f'params_{devices}.npz'
  code = DEVICE_RUN.format(root=str(REPO_ROOT), devices=devices, workdir=str(tmp_path / str(devices)),
                           out=str(out))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    return [f[k] for k in sorted(f, key=lambda k: int(k.split('_')[1]))]


@pytest.mark.slow  # 70 s on the 2-core CI machine: in the slow pass
def test_one_and_four_devices_give_the_same_parameters(tmp_path):
  one, four = _run_on_devices(1, tmp_path), _run_on_devices(4, tmp_path)
  for a, b in zip(one, four):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_that_devices_cannot_split_fails_before_compiling(tmp_path):
  result = run_script('train.py', '--config=configs/digits.py', f'--workdir={tmp_path}',
                      '--config.training.batch_size=6',
                      env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert result.returncode == 1
  assert 'train.py: error: training.batch_size=6 cannot be split over 4 devices; use a multiple ' \
         'of 4 (e.g. 4)' in error_lines(result)


@pytest.mark.parametrize('args,message', [
    ([], 'train.py: error: --workdir is required'),
    (['--config.data.name=no_such_set'], "train.py: error: unknown dataset 'no_such_set'"),
    (['--config.data.name=images', '--config.data.path=/no/such/dir'],
     'train.py: error: data.path /no/such/dir does not exist'),
    (['--config.model.ch_mult=(1,2,2,2,2)'], 'train.py: error: input spatial size (8, 8) is not '
                                             'divisible by 16'),
    # Flag parsing (cli.parse_flags): were 40-53-line ml_collections tracebacks.
    (['--config.training.num_step=3'], 'train.py: error: no such config field: \'num_step\' Did '
                                       'you mean "num_steps" instead of "num_step"?'),
    (['--config=configs/nosuch.py'], "train.py: error: --config: [Errno 2] No such file or "
                                     "directory: 'configs/nosuch.py'"),
    (['--config.training.num_steps=many'], 'train.py: error: flag --config.training.num_steps='
                                           'many: invalid literal for int()'),
    (['--no_such_flag=1'], "train.py: error: Unknown command line flag 'no_such_flag'"),
])
def test_bad_input_gives_one_line(tmp_path, args, message):
  workdir = [] if not args else [f'--workdir={tmp_path}']
  result = run_script('train.py', '--config=configs/digits.py', *workdir, *args)
  assert result.returncode == 1
  lines = error_lines(result)
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]


def test_failed_checkpoint_write_is_one_clear_error(tmp_path, monkeypatch):
  from ddpm_jax.checkpointing import Checkpointer
  from ddpm_jax.errors import CheckpointError
  config = tiny_config()
  model = create_model(_with_channels(config))
  tx = train_state.make_optimizer(config.optim)
  state = train_state.initial_state_fn(config, model, tx, schedules.linear(100, 1e-4, 0.2),
                                       (8, 8, 1))()
  checkpointer = Checkpointer(tmp_path / 'checkpoints')
  checkpointer.save(1, state, None, {})
  checkpointer.wait()

  def disk_full():
    raise ValueError('Error writing to file: No space left on device')
  monkeypatch.setattr(checkpointer.manager, 'wait_until_finished', disk_full)
  # orbax reports the failure from save() or from the wait after it, whichever comes first.
  with pytest.raises(CheckpointError, match=r'writing checkpoint 2 .* failed \(Error writing.*No '
                                            r'space left on device\); checkpoint 1 is intact'):
    checkpointer.save(2, state, None, {})
    checkpointer.wait()
  monkeypatch.undo()
  assert checkpointer.all_steps()[0] == 1
  # the previous one still restores
  checkpointer.restore(1, jax.eval_shape(lambda: state), jax.sharding.SingleDeviceSharding(jax.devices()[0]))


@pytest.mark.slow  # 35 s on the 2-core CI machine: in the slow pass
def test_sigterm_saves_then_exits(tmp_path):
  import signal
  args = ['train.py', '--config=configs/digits.py', f'--workdir={tmp_path}',
          '--config.model.ch=16', '--config.model.num_res_blocks=1',
          '--config.training.num_steps=100000', '--config.training.log_every=1']
  process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith('step 5/'):
      break
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  message = [l for l in stderr.splitlines() if l.startswith('train.py:')]
  assert len(message) == 1 and 'stopped by SIGTERM at step' in message[0]
  step = int(message[0].split('at step ')[1].split(';')[0])
  assert step >= 5 and (tmp_path / 'checkpoints' / str(step)).is_dir()


def _two_checkpoints(tmp_path):
  path = tmp_path / 'd.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  trainer.train(config, tmp_path / 'run')
  return config, tmp_path / 'run' / 'checkpoints'


def _truncate_every_file(folder):
  for f in folder.rglob('*'):
    if f.is_file():
      f.write_bytes(b'')


def test_truncated_newest_checkpoint_reader_warns_and_renames_nothing_trainer_sets_it_aside(
    tmp_path, capsys):
  config, checkpoints = _two_checkpoints(tmp_path)
  _truncate_every_file(checkpoints / '4')
  capsys.readouterr()
  # A reader (load_sampler, sample.py) uses checkpoint 2 and changes no files.
  assert workdir_lib.load_run(tmp_path / 'run').step == 2
  err = capsys.readouterr().err
  assert 'checkpoint 4 is damaged' in err and 'skipped it' in err
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2', '4']
  # Asked for by step, the damaged one is a one-line error.
  from ddpm_jax.errors import CheckpointError
  with pytest.raises(CheckpointError, match='checkpoint 4 in .* is damaged'):
    inference.load_sampler(checkpoints / '4')
  # The trainer sets it aside and goes on from checkpoint 2.
  config.training.num_steps = 6
  state = trainer.train(config, tmp_path / 'run')
  assert int(state.step) == 6
  assert (checkpoints / '4.damaged').is_dir()
  # metrics.jsonl: the steps redone after the fallback are not logged twice.
  records = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [2, 4, 6]


def test_checkpoint_of_another_model_is_an_error_and_is_not_renamed(tmp_path):
  from ddpm_jax import sharding
  from ddpm_jax.checkpointing import Checkpointer
  from ddpm_jax.errors import CheckpointError
  config, checkpoints = _two_checkpoints(tmp_path)
  other = workdir_lib.read_config(tmp_path / 'run')
  other.model.ch = 24
  checkpointer = Checkpointer(checkpoints)
  abstract = train_state.abstract_state(other, create_model(other))
  with pytest.raises(CheckpointError, match=r'checkpoint 4 .* holds other arrays than this '
                                            r"config's model .*use the config it was written"):
    checkpointer.restore_latest(abstract, sharding.replicated(sharding.make_mesh()))
  checkpointer.close()
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2', '4']


def test_workdir_check_names_what_changes_the_checkpoint_and_not_compute_settings():
  saved = tiny_config(name='digits')
  current = tiny_config(name='digits')
  # Compute precision, dropout and how layers are computed change how a run computes; the
  # float32 arrays are the same.
  current.model.dtype, current.model.dropout = 'bfloat16', saved.model.dropout + 0.1
  current.model.subpixel_upsample = current.model.fused_group_norm = False
  current.model.fast_dropout = False
  assert config_lib.checkpoint_differences(saved, current) == []
  current.model.ch = saved.model.ch * 2
  assert config_lib.checkpoint_differences(saved, current) == [
      f'model.ch: {saved.model.ch} in the workdir, {current.model.ch} now']


def test_config_is_not_changed_by_training(tmp_path):
  config = tiny_config(name='digits')
  config.training.num_steps = 1
  before = config.to_json()
  trainer.train(config, tmp_path)
  assert config.to_json() == before  # the run's resolved copy went to config.json
  assert json.loads((tmp_path / 'config.json').read_text())['data']['image_size'] == 8


def test_random_draws_for_the_global_batch_do_not_depend_on_its_sharding():
  """JAX's default since 0.5 (the project no longer sets it at import); the 1-vs-4-device
  equality above rests on it."""
  assert jax.config.jax_threefry_partitionable
  key = jax.random.key(0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharded = jax.jit(lambda k: jax.random.normal(k, (8, 3)), out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data')))(key)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.random.normal(key, (8, 3))))
