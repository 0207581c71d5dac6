"""Every config in configs/ loads, resolves against data of its kind, and builds its model and
abstract train state (configs/mnist.py, digits_cond.py and power.py were never loaded before)."""

import importlib

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli, config_lib, distiller, train_state
from ddpm_jax.models import create_model
from tests.helpers import REPO_ROOT

CONFIGS = sorted(p.stem for p in (REPO_ROOT / 'configs').glob('*.py') if p.stem != '__init__')
# One example of the data each config names (the series configs' CSV has 7 columns).
SHAPES = {'digits': ((8, 8, 1), 10), 'cifar10': ((32, 32, 3), 10), 'mnist': ((28, 28, 1), 10)}


def test_the_list_is_every_config():
  assert CONFIGS == ['cifar10', 'default', 'digits', 'digits_cond', 'digits_flow', 'distill', 'ett',
                     'mnist',
                     'power', 'power_small']


@pytest.mark.parametrize('name', [name for name in CONFIGS if name != 'distill'])
def test_config_resolves_and_builds_its_model_and_state(name):
  config = importlib.import_module(f'ddpm_jax.configs.{name}').get_config()
  if config_lib.is_series(config):
    shape, classes = (config.data.window, 7), 0
  else:
    shape, classes = SHAPES[config.data.name]
  resolved = config_lib.resolve(config, shape, classes)
  model = create_model(resolved)
  example = config_lib.data_shape(resolved)
  model.check_input((1,) + tuple(example))
  state = train_state.abstract_state(resolved, model)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  assert count > 0 and int(state.step.size) == 1
  assert (state.loss_history is None) == (resolved.diffusion.timestep_sampling == 'uniform')
  assert model.num_classes == resolved.model.num_classes
  assert resolved.data.channels == shape[-1]  # filled in from the data where left at 0


def test_the_distill_config_makes_student_configs_of_a_digits_run():
  distill = importlib.import_module('ddpm_jax.configs.distill').get_config()
  teacher = config_lib.resolve(importlib.import_module('ddpm_jax.configs.digits').get_config(), (8, 8, 1),
                               10)
  assert distiller.stage_steps(distill.distill) == [32, 16, 8, 4, 2, 1]
  student = distiller.student_config(teacher, distill, 4, 2, {'path': 'runs/digits'})
  assert (student.sampling.method, student.sampling.num_steps, student.sampling.spacing) == \
      ('ddim', 4, 'trailing')
  assert student.diffusion.target == 'v' and teacher.diffusion.target == 'eps'  # a copy
  assert student.training.eval_steps == 4 and student.training.eval_every == \
      distill.distill.steps_per_stage
  model = create_model(student)
  state = train_state.abstract_state(student, model)
  assert jax.tree.structure(state.params) == jax.tree.structure(
      train_state.abstract_state(teacher, model).params)
  rate = train_state.learning_rate_schedule(student.optim)
  assert float(rate(0)) == pytest.approx(distill.optim.learning_rate)
  assert float(rate(distill.distill.steps_per_stage)) == 0.0


def test_a_warm_up_longer_than_the_run_or_a_slow_ema_is_a_one_line_warning():
  for name in CONFIGS:  # every config, the defaults alone included, trains without a trap
    config = importlib.import_module(f'ddpm_jax.configs.{name}').get_config()
    if 'data' in config:
      assert config_lib.training_warnings(config) == [], name
  config = importlib.import_module('ddpm_jax.configs.default').get_config()
  config.optim.update(warmup_steps=5000, ema_decay=0.9999)
  config.training.num_steps = 3000
  lines = config_lib.training_warnings(config)
  assert len(lines) == 2 and 'never reaches optim.learning_rate=0.001' in lines[0]
  # 0.9999 ** 3000 = 0.741: the share of the initial weights left in the final EMA.
  assert 'still 74% initial random weights after 3000 steps' in lines[1]
  assert lines[1].endswith('set --config.optim.ema_decay=0.9967 or train longer')


def test_a_run_stores_its_data_path_absolute_without_changing_the_callers_config(tmp_path,
                                                                                 monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = importlib.import_module('ddpm_jax.configs.power_small').get_config()
  config.data.path = 'data/ETTh1.csv'
  resolved = config_lib.resolve(config, (config.data.window, 7), 0)
  assert resolved.data.path == str(tmp_path / 'data' / 'ETTh1.csv')
  assert config.data.path == 'data/ETTh1.csv'


def test_config_paths_find_the_installed_copy_outside_a_checkout(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ['ddpm-train', '--config=configs/digits.py', '--config.training.num_steps=3']
  found = cli._find_configs(argv)
  assert found[0] == argv[0] and found[2] == argv[2]
  assert found[1] == f'--config={cli.CONFIG_DIR / "digits.py"}'
  packaged = (cli.CONFIG_DIR / 'digits.py').read_text()
  assert packaged == (REPO_ROOT / 'configs' / 'digits.py').read_text()
  # A file of the user's own of that name wins; a name with no installed copy is left alone.
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'digits.py').write_text('')
  assert cli._find_configs(argv) == argv
  nosuch = ['x', '--config=configs/nosuch.py']
  assert cli._find_configs(nosuch) == nosuch


@pytest.mark.parametrize('name', ['ett', 'digits_flow'])
def test_a_num_steps_override_moves_the_decay_with_it(name):
  """configs that decay the rate over training (default.decay_over_training) still end at zero
  when the command line changes training.num_steps or optim.warmup_steps."""
  argv = ['train.py', f'--config={REPO_ROOT / "configs" / name}.py',
          '--config.training.num_steps=3000', '--config.optim.warmup_steps=100']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  optim = values.config.optim
  assert optim.decay_steps == 2900
  rate = train_state.learning_rate_schedule(optim)
  assert float(rate(100)) == pytest.approx(optim.learning_rate)
  assert float(rate(1550)) == pytest.approx(optim.learning_rate / 2)
  assert float(rate(3000)) == 0.0
