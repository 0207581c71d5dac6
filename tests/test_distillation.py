"""Progressive distillation: the target against the sampler's own DDIM steps, the loss, a short
distillation of a tiny network, runs with stages and resume, and picking a student."""

import json
import pathlib
import re
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from ddpm_jax.configs import distill as distill_config
from ddpm_jax import (distillation, distiller, inference, sampling, schedules, train_state,
                      trainer)
from ddpm_jax.errors import InputError
from ddpm_jax import workdir as workdir_lib
from tests.analytic import gaussian_mixture_eps
from tests.helpers import REPO_ROOT, error_lines, run_script, tiny_config

MIXTURE = ([0.3, 0.7], [-0.6, 0.5], [0.15, 0.25])
SCHEDULES = [schedules.linear(1000), schedules.cosine(1000), schedules.vp_linear()]


def test_trailing_steps_are_nested_and_end_at_the_last_step():
  schedule = schedules.linear(1000)
  for n in (1, 2, 4, 8, 16, 32):
    steps = sampling.timesteps(schedule, n, 'trailing')
    assert steps[0] == 999 and steps[-1] == 1000 // n - 1 and len(set(steps)) == n
    np.testing.assert_array_equal(sampling.timesteps(schedule, 2 * n, 'trailing')[::2], steps)
  np.testing.assert_allclose(sampling.timesteps(schedules.vp_linear(), 4, 'trailing'),
                             [1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize('schedule', SCHEDULES, ids=['linear', 'cosine', 'vp_linear'])
@pytest.mark.parametrize('num_steps', [1, 2, 4])
def test_one_student_step_with_the_target_lands_where_two_sampler_steps_land(schedule,
                                                                             num_steps):
  # The sampler's DDIM (sampling.py) is the oracle: its trajectory at 2N trailing steps, read
  # at even points, is where each student step must land.
  teacher = gaussian_mixture_eps(schedule, *MIXTURE)
  x_T = jax.random.normal(jax.random.key(0), (64, 3))
  _, (points, _) = sampling.sample(teacher, schedule, jax.random.key(1), x_T.shape, method='ddim',
                                   num_steps=2 * num_steps, spacing='trailing', clip_x0=False,
                                   x_T=x_T, return_trajectory=True)
  points = jnp.concatenate([x_T[None], points])  # [2N + 1, B, D]: before each step, and x_0
  grid = distillation.stage_grid(schedule, num_steps)
  for k in range(num_steps):
    z = points[2 * k]
    ks = jnp.full((z.shape[0],), k)
    for prediction in distillation.STUDENT_PREDICTIONS:
      value = distillation.distillation_target(teacher, z, ks, grid, teacher_prediction='eps',
                                               student_prediction=prediction, clip_x0=False)
      landed = distillation.ddim_step(
          lambda x, t: value, z, grid.t[k], grid.alpha[k], grid.sigma[k], grid.alpha_next[k],
          grid.sigma_next[k], prediction, False)
      np.testing.assert_allclose(landed, points[2 * k + 2], atol=2e-4, rtol=1e-4)


def test_a_student_that_is_two_teacher_steps_has_zero_loss():
  schedule = schedules.linear(1000)
  teacher = gaussian_mixture_eps(schedule, *MIXTURE)
  grid = distillation.stage_grid(schedule, 4)
  plan = sampling.make_plan(teacher, schedule, jax.random.key(0), method='ddim', num_steps=8,
                            spacing='trailing', clip_x0=False)

  def two_steps(z, t):  # the sampler's own steps 2k and 2k + 1, one example at a time
    k = jnp.argmax(jnp.asarray(grid.t) == t)
    xs = lambda i: jax.tree.map(lambda a: a[i], plan.xs)
    z_next, _ = plan.step(plan.step(z[None], xs(2 * k))[0], xs(2 * k + 1))
    return z_next[0]

  def student(params, z, t, key):  # v that makes one DDIM step land on two_steps(z)
    z_next = jax.vmap(two_steps)(z, t)
    k = jnp.argmax(jnp.asarray(grid.t)[None, :] == t[:, None], axis=1)
    a, s, a2, s2 = (jnp.asarray(v)[k][:, None] for v in
                    (grid.alpha, grid.sigma, grid.alpha_next, grid.sigma_next))
    x0 = (z_next - s2 / s * z) / (a2 - s2 / s * a)
    return a * (z - a * x0) / s - s * x0

  x0 = jax.random.normal(jax.random.key(2), (128, 3)) * 0.3
  loss, aux = distillation.distillation_loss(student, None, teacher, x0, jax.random.key(3), grid,
                                             teacher_prediction='eps', student_prediction='v',
                                             clip_x0=False)
  assert set(np.asarray(aux['t'])) == set(grid.t)  # every student step was drawn
  assert float(loss) < 1e-8
  wrong, _ = distillation.distillation_loss(
      lambda p, z, t, key: student(p, z, t, key) + 0.05, None, teacher, x0, jax.random.key(3),
      grid, teacher_prediction='eps', student_prediction='v', clip_x0=False)
  np.testing.assert_allclose(float(wrong), 0.05 ** 2, rtol=1e-3)


class TinyNet(nn.Module):
  """A two-layer network of x and t, small enough to compile in a moment."""
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, labels=None, train=False):
    features = jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 9))
    h = nn.gelu(nn.Dense(64)(jnp.concatenate([x.reshape(len(x), -1), features], -1)))
    return nn.Dense(x[0].size)(h).reshape(x.shape)


def test_distilling_a_tiny_network_brings_one_step_closer_to_two_teacher_steps():
  model = TinyNet()
  schedule = schedules.linear(100, 1e-4, 0.2)
  tx = optax.adam(2e-3)
  teacher = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))['params']
  grid = distillation.stage_grid(schedule, 2)
  data = jax.random.uniform(jax.random.key(3), (64, 8, 8, 1), minval=-1, maxval=1)
  teacher_fn = lambda x, t: model.apply({'params': teacher}, x, t)
  # The distillation loss on noise and steps that training never draws: the mean squared
  # distance of the student's one step to the teacher's two, in v.
  distance = jax.jit(lambda params: distillation.distillation_loss(
      lambda p, x, t, key: model.apply({'params': p}, x, t), params, teacher_fn, data,
      jax.random.key(99), grid, teacher_prediction='v', student_prediction='v',
      clip_x0=False)[0])
  state = train_state.state_from_params(teacher, tx, jax.random.key(2))
  step = jax.jit(lambda s, b: train_state.distill_step(
      s, b, teacher, model=model, tx=tx, grid=grid, teacher_prediction='v',
      student_prediction='v', clip_x0=False, ema_decay=0.0, random_flip=False))
  before = float(distance(state.params))
  for _ in range(200):
    state, metrics = step(state, {'x': data})
  assert bool(metrics['finite'])
  assert float(distance(state.params)) < 0.6 * before  # 0.44 here


# Students of 4 and 2 steps from 8 teacher steps, 4 updates per stage: docs/distillation.md's
# commands at test size, on the tiny teacher of the fixture.
TEST_SIZE = dict(start_steps=8, final_steps=2, steps_per_stage=4)
TEST_TRAINING = dict(batch_size=8, log_every=2, checkpoint_every=2, keep_checkpoints=3,
                     num_sample_images=4, eval_quality=False)


def _distill_config(**distill):
  config = distill_config.get_config()
  config.distill.update({**TEST_SIZE, **distill})
  config.training.update(TEST_TRAINING)
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('teacher')
  trainer.train(tiny_config(name='digits'), workdir)
  return workdir


@pytest.fixture(scope='module')
def straight(teacher, tmp_path_factory):
  """An uninterrupted distillation of the teacher: {steps: student folder}."""
  return distiller.distill(_distill_config(), str(teacher),
                           str(tmp_path_factory.mktemp('straight') / 'distilled'))


def _params(folder):
  return inference.load_sampler(folder)[1]


def _leaves_close(a, b, rtol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.slow  # 140 s on the 2-core CI machine: in the slow pass
def test_stages_are_runs_and_a_resumed_distillation_equals_an_uninterrupted_one(
    teacher, straight, tmp_path):
  assert sorted(straight) == [2, 4]
  for steps, folder in straight.items():
    saved = json.loads((folder / 'config.json').read_text())
    assert saved['sampling']['num_steps'] == steps and saved['sampling']['spacing'] == 'trailing'
    assert saved['diffusion']['target'] == 'v' and saved['distill']['teacher_steps'] == 2 * steps
    assert (folder / 'samples' / 'step_0000004.png').is_file()
    assert json.loads((folder / workdir_lib.STAGE_DONE).read_text())['step'] == 4

  config = _distill_config()
  resumed = tmp_path / 'resumed'
  distiller.distill(config, str(teacher), str(resumed))
  # As if killed (kill -9) during the last stage's step 3: only its checkpoint 2 is complete.
  last = workdir_lib.student_folder(resumed, 2)
  (last / workdir_lib.STAGE_DONE).unlink()
  shutil.rmtree(last / 'checkpoints' / '4')
  distiller.distill(config, str(teacher), str(resumed))
  for steps in (4, 2):
    _leaves_close(_params(straight[steps]), _params(workdir_lib.student_folder(resumed, steps)))

  # The workdir stands for its fewest-step student, which samples with its own steps.
  run = workdir_lib.load_run(resumed)
  assert run.config.sampling.num_steps == 2 and run.workdir == last
  assert run.config.sampling.method == 'ddim'
  sample_fn, params = inference.load_sampler(resumed)
  images = sample_fn(params, jax.random.key(0), 3)
  assert images.shape == (3, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
  assert workdir_lib.load_run(resumed, student_steps=4).workdir == \
      workdir_lib.student_folder(resumed, 4)

  with pytest.raises(InputError, match='other settings'):
    distiller.distill(_distill_config(steps_per_stage=6), str(teacher), str(resumed))


@pytest.mark.slow  # 110 s on the 2-core CI machine: in the slow pass
def test_the_docs_commands_on_two_devices_give_the_students_and_sample_py_picks_one(
    teacher, straight, tmp_path):
  text = (REPO_ROOT / 'docs' / 'distillation.md').read_text()
  block = re.search(r'```bash\n(.*?)```', text, re.S).group(1)
  commands = [shlex.split(line.replace('runs/', f'{tmp_path}/runs/'))
              for line in block.splitlines() if line.strip()]
  assert [c[1] for c in commands] == ['distill.py', 'sample.py', 'sample.py']
  shutil.copytree(teacher, tmp_path / 'runs' / 'digits')
  workdir = tmp_path / 'runs' / 'digits_distilled'
  overrides = [f'--config.distill.{k}={v}' for k, v in TEST_SIZE.items()] + [
      f'--config.training.{k}={v}' for k, v in TEST_TRAINING.items()]
  two_devices = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  result = run_script(*commands[0][1:], *overrides, env=two_devices)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'stage 2/2 (4 -> 2 steps)' in result.stdout and '2 cpu device(s)' in result.stdout
  assert sorted(workdir_lib.finished_students(workdir)) == [2, 4]
  # The batch split over two devices: the students of the one-device run.
  _leaves_close(_params(workdir_lib.student_folder(workdir, 2)), _params(straight[2]), 1e-4)
  for command, steps in ((commands[1], 2), (commands[2], 4)):
    result = run_script(*command[1:], '--num_samples=4')
    assert result.returncode == 0, result.stderr[-2000:]
    out = pathlib.Path(dict(arg[2:].split('=', 1) for arg in command[2:])['out'])
    assert np.load(out / 'samples.npz')['arr_0'].shape == (4, 8, 8, 1)
    assert f'students/{steps}_steps (checkpoint 4) with ddim ({steps} steps, trailing spacing)' in result.stdout
  result = run_script('sample.py', f'--ckpt={workdir}', '--num_steps=3', f'--out={tmp_path}/x')
  assert result.returncode == 1
  assert error_lines(result)[-1].endswith('has students for 2, 4 steps; --num_steps=3 is '
                                          'none of them')


def test_bad_teachers_are_one_line(teacher, tmp_path):
  config = _distill_config()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    distiller.distill(config, str(tmp_path / 'nosuch'), str(tmp_path / 'a'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    distiller.distill(config, str(tmp_path / 'empty'), str(tmp_path / 'b'))
  with pytest.raises(InputError, match='power of two'):
    distiller.distill(_distill_config(start_steps=6), str(teacher), str(tmp_path / 'c'))
  conditional = tmp_path / 'conditional'
  cond_config = tiny_config(name='digits')
  cond_config.model.num_classes = 10
  cond_config.training.num_steps = 2
  trainer.train(cond_config, conditional)
  with pytest.raises(InputError, match='holds a training run, not a distillation'):
    distiller.distill(config, str(teacher), str(conditional))
  with pytest.raises(InputError, match='class-conditional teachers are not distilled yet'):
    distiller.distill(config, str(conditional), str(tmp_path / 'e'))
