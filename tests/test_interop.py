"""The diffusers format: our forward pass against diffusers' own outputs (made by
tests/diffusers_reference/make_reference.py with torch, outside the suite), schedules, the
export round trip, and bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ddpm_jax.configs import default
from ddpm_jax import config_lib, interop
from tests.helpers import REPO_ROOT, error_lines

REFERENCE = pathlib.Path(__file__).resolve().parent / 'diffusers_reference'
CASES = ['cifar10_layout', 'modern_defaults']
# float32 forward passes in two frameworks (different convolution and reduction orders); the
# largest difference seen was 4.6e-6 on outputs of std ~0.6.
ATOL = 2e-5


def _unet_folder(case):
  folder = REFERENCE / case
  return folder / 'unet' if (folder / 'unet').is_dir() else folder


def _forward(model, params, reference):
  x = jnp.asarray(reference['x'].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  out = model.apply({'params': params}, x, jnp.asarray(reference['t']))
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('case', CASES)
def test_forward_pass_and_schedule_match_diffusers(case):
  reference = np.load(REFERENCE / case / 'reference.npz')
  config, model, params = interop.load_diffusers(REFERENCE / case, default.get_config())
  np.testing.assert_allclose(_forward(model, params, reference), reference['out'], rtol=0,
                             atol=ATOL)
  alphas_cumprod = config_lib.schedule_from_config(config).alphas_cumprod
  np.testing.assert_allclose(alphas_cumprod, reference['alphas_cumprod'], rtol=0, atol=1e-6)


def test_configs_map_onto_ours():
  config, _, _ = interop.load_diffusers(REFERENCE / 'cifar10_layout', default.get_config())
  assert (config.model.ch, tuple(config.model.ch_mult), config.model.attn_resolutions) == \
      (16, (1, 2, 2, 2), (16,))
  assert (config.diffusion.schedule, config.diffusion.target, config.sampling.variance) == \
      ('linear', 'eps', 'large')
  config, _, _ = interop.load_diffusers(REFERENCE / 'modern_defaults', default.get_config())
  assert (config.model.attention_head_dim, config.model.downsample_padding,
          config.model.flip_sin_to_cos, config.model.freq_shift, config.model.norm_eps) == \
      (8, 1, True, 0.0, 1e-5)
  assert (config.diffusion.schedule, config.diffusion.num_timesteps, config.diffusion.target) == \
      ('cosine', 200, 'v')


def test_older_attention_names_load_the_same(tmp_path):
  """The released google/ddpm-* folders name attention layers query/key/value/proj_attn."""
  folder = tmp_path / 'old'
  shutil.copytree(_unet_folder('cifar10_layout'), folder)
  shutil.copy(REFERENCE / 'cifar10_layout' / 'scheduler' / 'scheduler_config.json', folder)
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  tensors = load_file(folder / interop.WEIGHTS)
  renamed = {}
  for name, value in tensors.items():
    for new, old in renames.items():
      name = name.replace(f'.{new}.', f'.{old}.')
    renamed[name] = value
  save_file(renamed, folder / interop.WEIGHTS)
  reference = np.load(REFERENCE / 'cifar10_layout' / 'reference.npz')
  _, model, params = interop.load_diffusers(folder, default.get_config())
  np.testing.assert_allclose(_forward(model, params, reference), reference['out'], rtol=0,
                             atol=ATOL)


@pytest.mark.parametrize('case', CASES)
def test_export_round_trips_to_identical_arrays(tmp_path, case):
  config, _, params = interop.load_diffusers(REFERENCE / case, default.get_config())
  interop.save_diffusers(tmp_path / 'out', config, params)
  original, exported = load_file(_unet_folder(case) / interop.WEIGHTS), \
      load_file(tmp_path / 'out' / interop.WEIGHTS)
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
  again, _, params_again = interop.load_diffusers(tmp_path / 'out', default.get_config())
  assert again.model.to_dict() == config.model.to_dict()
  assert again.diffusion.to_dict() == config.diffusion.to_dict()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = json.loads((tmp_path / 'out' / 'scheduler_config.json').read_text())
  assert saved['_class_name'] == 'DDPMScheduler'


def _convert(*args):
  return subprocess.run([sys.executable, '-m', 'ddpm_jax.convert', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _broken_copy(tmp_path, edit_config=None, edit_tensors=None):
  folder = tmp_path / 'broken'
  shutil.copytree(REFERENCE / 'modern_defaults', folder)
  if edit_config:
    config = json.loads((folder / 'config.json').read_text())
    edit_config(config)
    (folder / 'config.json').write_text(json.dumps(config))
  if edit_tensors:
    tensors = load_file(folder / interop.WEIGHTS)
    edit_tensors(tensors)
    save_file(tensors, folder / interop.WEIGHTS)
  return folder


@pytest.mark.parametrize('break_it,message', [
    (dict(edit_tensors=lambda t: t.pop('mid_block.resnets.1.conv2.weight')),
     'the safetensors file has no tensor mid_block.resnets.1.conv2.weight'),
    (dict(edit_tensors=lambda t: t.update({'conv_in.weight': np.zeros((16, 1, 5, 5), np.float32)})),
     r'parameter conv_in/kernel: the weights give \(5, 5, 1, 16\), the model built from '
     r'config.json needs \(3, 3, 1, 16\)'),
    (dict(edit_tensors=lambda t: t.update({'extra.weight': np.zeros(3, np.float32)})),
     'tensor\\(s\\) this UNet2DModel config does not use, e.g. extra.weight'),
    (dict(edit_config=lambda c: c.update(down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'])),
     r"diffusers down_block_types\[0\]='CrossAttnDownBlock2D' has no counterpart"),
    (dict(edit_config=lambda c: c.update(_class_name='UNet2DConditionModel')),
     "diffusers _class_name='UNet2DConditionModel' is not a UNet2DModel"),
    (dict(edit_config=lambda c: c.update(resnet_time_scale_shift='scale_shift')),
     "diffusers resnet_time_scale_shift='scale_shift' has no counterpart"),
])
def test_bad_diffusers_folders_are_one_line_errors(tmp_path, break_it, message):
  folder = _broken_copy(tmp_path, **break_it)
  with pytest.raises(ValueError, match=message):
    interop.load_diffusers(folder, default.get_config())


def test_bad_input_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  run = tmp_path / 'run'
  result = _convert(f'--from_diffusers={empty}', f'--workdir={run}')
  assert result.returncode == 1
  lines = error_lines(result)
  assert len(lines) == 1 and lines[0].startswith(f'convert: error: {empty} has no config.json')
  assert not run.exists()
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'keep.txt').write_text('mine')
  result = _convert(f'--from_diffusers={REFERENCE / "modern_defaults"}', f'--workdir={busy}')
  assert result.returncode == 1
  assert error_lines(result) == [f'convert: error: --workdir {busy} exists and is not empty; '
                                 f'choose a new folder']
  assert [p.name for p in busy.iterdir()] == ['keep.txt']
  folder = _broken_copy(tmp_path, edit_config=lambda c: c.update(upsample_type='resnet'))
  result = _convert(f'--from_diffusers={folder}', f'--workdir={run}')
  assert result.returncode == 1
  assert error_lines(result) == ["convert: error: diffusers upsample_type='resnet' has no "
                                 'counterpart in the ddpm_jax UNet']
  assert not run.exists()
