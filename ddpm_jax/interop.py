"""The diffusers format (UNet2DModel + DDPMScheduler folders), read and written without torch.

``load_diffusers(folder, base_config)`` -> (config, model, params) and
``save_diffusers(folder, config, params)``. Weights are read with ``safetensors`` (no pickle: nothing in the file runs).
The DDPM UNet here and diffusers' UNet2DModel with DownBlock2D / AttnDownBlock2D blocks compute
the same function; each diffusers option either maps onto a model field or is refused in one
line naming the field and its value.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from ddpm_jax import config_lib, file_checks
from ddpm_jax.models import create_model
from ddpm_jax.errors import InputError

WEIGHTS = 'diffusion_pytorch_model.safetensors'
UNET_CONFIG = 'config.json'
SCHEDULER_CONFIG = 'scheduler_config.json'

# UNet2DModel options with one accepted value each: the DDPM network's.
_FIXED_UNET_OPTIONS = dict(center_input_sample=False, time_embedding_type='positional',
                           act_fn='silu', resnet_time_scale_shift='default', add_attention=True,
                           class_embed_type=None, num_class_embeds=None, mid_block_scale_factor=1,
                           downsample_type='conv', upsample_type='conv',
                           mid_block_type='UNetMidBlock2D')
_SCHEDULES = {'linear': 'linear', 'squaredcos_cap_v2': 'cosine'}
_TARGETS = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}
_VARIANCES = {'fixed_small': 'small', 'fixed_small_log': 'small', 'fixed_large': 'large',
              'fixed_large_log': 'large'}


def _refuse(field: str, value, what: str = 'has no counterpart in the ddpm_jax UNet') -> None:
  raise InputError(f'diffusers {field}={repr(value)[:80]} {what}')


def _integer(config: dict, field: str, default, low: int, high: int) -> int:
  """config[field] (or default) if it is an integer in [low, high], else one line."""
  value = config.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    _refuse(field, value, f'is not an integer from {low} to {high}')
  return value


def _number(config: dict, field: str, default, low: float, high: float) -> float:
  value = config.get(field, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or \
      not low <= value <= high:  # NaN fails too
    _refuse(field, value, f'is not a number from {low} to {high}')
  return float(value)


def _names(config: dict, field: str) -> list:
  value = config.get(field)
  if not isinstance(value, list) or not 1 <= len(value) <= config_lib.MAX_LEVELS or \
      not all(isinstance(v, str) for v in value):
    _refuse(field, value, f'is not a list of 1 to {config_lib.MAX_LEVELS} block names')
  return value


# --- configs -------------------------------------------------------------------------------

def model_fields_from_unet_config(unet: dict) -> dict:
  """UNet2DModel config -> {'model': fields, 'data': {image_size, channels}}."""
  if unet.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    _refuse('_class_name', unet['_class_name'], 'is not a UNet2DModel; only UNet2DModel converts')
  for field, accepted in _FIXED_UNET_OPTIONS.items():
    if field in unet and unet[field] != accepted:
      _refuse(field, unet[field])
  channels = unet.get('block_out_channels')
  low, high = config_lib.LIMITS[('model', 'ch')]
  if not isinstance(channels, list) or not 1 <= len(channels) <= config_lib.MAX_LEVELS or \
      not all(isinstance(c, int) and not isinstance(c, bool) and low <= c <= high
              for c in channels):
    _refuse('block_out_channels', channels, f'is not a list of 1 to {config_lib.MAX_LEVELS} '
            f'integers from {low} to {high}')
  ch = channels[0]
  if any(c % ch for c in channels):
    _refuse('block_out_channels', channels, 'is not a multiple of its first entry')
  down, up = _names(unet, 'down_block_types'), _names(unet, 'up_block_types')
  if len(down) != len(channels):
    _refuse('down_block_types', down, f'has {len(down)} blocks for {len(channels)} '
            'block_out_channels')
  for i, block in enumerate(down):
    if block not in ('DownBlock2D', 'AttnDownBlock2D'):
      _refuse(f'down_block_types[{i}]', block)
  mirror = [b.replace('Down', 'Up') for b in reversed(down)]
  if up != mirror:
    _refuse('up_block_types', up, f'does not mirror down_block_types (expected {mirror})')
  size = unet.get('sample_size', 32)
  if isinstance(size, list) and size:
    if len(set(map(str, size))) != 1:
      _refuse('sample_size', size, 'is not square')
    size = size[0]
  size = _integer({'sample_size': size}, 'sample_size', 32, 1,
                  config_lib.LIMITS[('data', 'image_size')][1])
  in_channels = _integer(unet, 'in_channels', 3, 1, 64)
  if _integer(unet, 'out_channels', 3, 1, 64) != in_channels:
    _refuse('out_channels', unet.get('out_channels'), f'differs from in_channels {in_channels}')
  groups = _integer(unet, 'norm_num_groups', 32, 1, ch)
  if unet.get('attn_norm_num_groups') not in (None, groups):
    _refuse('attn_norm_num_groups', unet['attn_norm_num_groups'])
  if unet.get('time_embedding_dim') not in (None, 4 * ch):
    _refuse('time_embedding_dim', unet['time_embedding_dim'])
  head_dim = unet.get('attention_head_dim', 8)  # diffusers' default; null: one head per layer
  if isinstance(head_dim, list) and head_dim:
    if len(set(map(str, head_dim))) != 1:
      _refuse('attention_head_dim', head_dim, 'differs between blocks')
    head_dim = head_dim[0]
  head_dim = _integer({'attention_head_dim': head_dim or 0}, 'attention_head_dim', 0, 0,
                      max(channels))
  if not isinstance(unet.get('flip_sin_to_cos', True), bool):
    _refuse('flip_sin_to_cos', unet['flip_sin_to_cos'], 'is not true or false')
  model = dict(
      ch=ch, ch_mult=tuple(c // ch for c in channels),
      num_res_blocks=_integer(unet, 'layers_per_block', 2, 1,
                              config_lib.LIMITS[('model', 'num_res_blocks')][1]),
      attn_resolutions=tuple(size // 2 ** level for level, block in enumerate(down)
                             if block.startswith('Attn')),
      dropout=_number(unet, 'dropout', 0.0, 0.0, 0.99), num_heads=1, num_groups=groups,
      num_classes=0, spatial_dims=2, dtype='float32',
      flip_sin_to_cos=unet.get('flip_sin_to_cos', True),
      freq_shift=_number(unet, 'freq_shift', 0, -1e3, 1e3),
      norm_eps=_number(unet, 'norm_eps', 1e-5, 1e-12, 1.0), attention_head_dim=head_dim,
      downsample_padding=_integer(unet, 'downsample_padding', 1, 0, 1))
  return {'model': model, 'data': dict(image_size=size, channels=in_channels)}


def fields_from_scheduler_config(scheduler: dict) -> dict:
  """DDPMScheduler config -> {'diffusion': fields, 'sampling': fields}."""
  schedule = scheduler.get('beta_schedule', 'linear')
  if scheduler.get('trained_betas') is not None:
    _refuse('trained_betas', '[...]', 'has no counterpart; use beta_schedule linear or '
            'squaredcos_cap_v2')
  if schedule not in _SCHEDULES:
    _refuse('beta_schedule', schedule)
  prediction = scheduler.get('prediction_type', 'epsilon')
  if prediction not in _TARGETS:
    _refuse('prediction_type', prediction)
  variance = scheduler.get('variance_type', 'fixed_small')
  if variance not in _VARIANCES:
    _refuse('variance_type', variance)
  for field in ('thresholding', 'rescale_betas_zero_snr'):
    if scheduler.get(field):
      _refuse(field, scheduler[field])
  diffusion = dict(schedule=_SCHEDULES[schedule],
                   num_timesteps=_integer(scheduler, 'num_train_timesteps', 1000, 1,
                                          config_lib.LIMITS[('diffusion', 'num_timesteps')][1]),
                   beta_start=_number(scheduler, 'beta_start', 1e-4, 0.0, 1.0),
                   beta_end=_number(scheduler, 'beta_end', 0.02, 0.0, 1.0),
                   target=_TARGETS[prediction])
  sampling = dict(variance=_VARIANCES[variance], clip_x0=bool(scheduler.get('clip_sample', True)))
  return {'diffusion': diffusion, 'sampling': sampling}


def unet_config_from_fields(model, data) -> dict:
  """The inverse of ``model_fields_from_unet_config`` (a UNet2DModel config)."""
  if model.spatial_dims != 2 or model.num_classes:
    raise InputError('only unconditional 2-D (image) models convert to a diffusers UNet2DModel; '
                     f'this one has spatial_dims={model.spatial_dims}, '
                     f'num_classes={model.num_classes}')
  levels = len(model.ch_mult)
  down = ['AttnDownBlock2D' if data.image_size // 2 ** level in model.attn_resolutions
          else 'DownBlock2D' for level in range(levels)]
  head_dim = model.get('attention_head_dim', 0)
  if not head_dim and model.num_heads != 1:
    raise InputError(f'model.num_heads={model.num_heads}: diffusers fixes the head width, not '
                     f'the count; only num_heads=1 or model.attention_head_dim converts')
  return {
      '_class_name': 'UNet2DModel', 'sample_size': data.image_size,
      'in_channels': data.channels, 'out_channels': data.channels,
      'block_out_channels': [model.ch * m for m in model.ch_mult],
      'layers_per_block': model.num_res_blocks, 'down_block_types': down,
      'up_block_types': [b.replace('Down', 'Up') for b in reversed(down)],
      'norm_num_groups': model.num_groups, 'norm_eps': model.get('norm_eps', 1e-6),
      'attention_head_dim': head_dim or None, 'dropout': model.dropout,
      'flip_sin_to_cos': bool(model.get('flip_sin_to_cos', False)),
      'freq_shift': model.get('freq_shift', 1.0),
      'downsample_padding': model.get('downsample_padding', 0),
      **_FIXED_UNET_OPTIONS}


def scheduler_config_from_fields(diffusion, sampling) -> dict:
  """A DDPMScheduler config for a discrete linear or cosine schedule."""
  schedules = {ours: theirs for theirs, ours in _SCHEDULES.items()}
  if diffusion.schedule not in schedules:
    raise InputError(f'diffusion.schedule={diffusion.schedule!r} has no DDPMScheduler '
                     f'counterpart (linear and cosine do)')
  return {'_class_name': 'DDPMScheduler', 'num_train_timesteps': diffusion.num_timesteps,
          'beta_start': diffusion.beta_start, 'beta_end': diffusion.beta_end,
          'beta_schedule': schedules[diffusion.schedule],
          'prediction_type': {v: k for k, v in _TARGETS.items()}[diffusion.target],
          'variance_type': f'fixed_{sampling.variance}', 'clip_sample': bool(sampling.clip_x0)}


# --- weights -------------------------------------------------------------------------------

def _layout(model, image_size: int):
  """(our parameter path, diffusers prefix, kind) for every layer, in the UNet's creation order.

  kind: conv | dense | norm | resblock | attn. Resblock and attn entries expand to their layers.
  """
  entries = [(('conv_in',), 'conv_in', 'conv'),
             (('temb_dense0',), 'time_embedding.linear_1', 'dense'),
             (('temb_dense1',), 'time_embedding.linear_2', 'dense')]
  counters = dict(ResBlock=0, AttnBlock=0, Downsample=0, Upsample=0)

  def add(module: str, prefix: str, kind: str):
    entries.append(((f'{module}_{counters[module]}',), prefix, kind))
    counters[module] += 1

  resolution, levels = image_size, len(model.ch_mult)
  for level in range(levels):
    for j in range(model.num_res_blocks):
      add('ResBlock', f'down_blocks.{level}.resnets.{j}', 'resblock')
      if resolution in model.attn_resolutions:
        add('AttnBlock', f'down_blocks.{level}.attentions.{j}', 'attn')
    if level != levels - 1:
      add('Downsample', f'down_blocks.{level}.downsamplers.0', 'sample')
      resolution //= 2
  add('ResBlock', 'mid_block.resnets.0', 'resblock')
  add('AttnBlock', 'mid_block.attentions.0', 'attn')
  add('ResBlock', 'mid_block.resnets.1', 'resblock')
  for i, level in enumerate(reversed(range(levels))):
    for j in range(model.num_res_blocks + 1):
      add('ResBlock', f'up_blocks.{i}.resnets.{j}', 'resblock')
      if resolution in model.attn_resolutions:
        add('AttnBlock', f'up_blocks.{i}.attentions.{j}', 'attn')
    if level != 0:
      add('Upsample', f'up_blocks.{i}.upsamplers.0', 'sample')
      resolution *= 2
  entries += [(('norm_out',), 'conv_norm_out', 'norm'), (('conv_out',), 'conv_out', 'conv')]
  return entries


_RESBLOCK = (('norm1', 'norm1', 'norm'), ('conv1', 'conv1', 'conv'),
             ('temb_proj', 'time_emb_proj', 'dense'), ('norm2', 'norm2', 'norm'),
             ('conv2', 'conv2', 'conv'), ('shortcut', 'conv_shortcut', 'conv'))
# Attention: our names, diffusers' current names and the names of older saves (e.g. the
# released google/ddpm-* folders), which diffusers itself still reads.
_ATTENTION = (('q', 'to_q', 'query'), ('k', 'to_k', 'key'), ('v', 'to_v', 'value'),
              ('proj_out', 'to_out.0', 'proj_attn'))


def _leaves(model, image_size: int):
  """(our path, diffusers prefix, kind) per layer with weights; attention projections carry
  their role (q, k, v or proj_out) in the kind."""
  for path, prefix, kind in _layout(model, image_size):
    if kind == 'resblock':
      for ours, theirs, sub_kind in _RESBLOCK:
        yield path + (ours,), f'{prefix}.{theirs}', sub_kind
    elif kind == 'attn':
      yield path + ('norm',), f'{prefix}.group_norm', 'norm'
      for ours, new, old in _ATTENTION:
        yield path + (ours,), (f'{prefix}.{new}', f'{prefix}.{old}'), f'attn_{ours}'
    elif kind == 'sample':
      yield path + ('conv',), f'{prefix}.conv', 'conv'
    else:
      yield path, prefix, kind


def _num_heads(model, channels: int) -> int:
  head_dim = model.get('attention_head_dim', 0)
  return channels // head_dim if head_dim else model.num_heads


def params_from_diffusers(weights: dict, model, image_size: int) -> dict:
  """diffusers tensors {name: array} -> our params (nested dict of float32 arrays).

  Layers a model has or lacks (a 1x1 shortcut only where channels change) follow the weights;
  ``check_params`` then compares the result with the model's own shapes.
  """
  params, used = {}, set()

  def take(name):
    used.add(name)
    return np.asarray(weights[name], np.float32)

  for path, prefix, kind in _leaves(model, image_size):
    if kind.startswith('attn_'):
      prefix = next((p for p in prefix if f'{p}.weight' in weights), prefix[0])
    if f'{prefix}.weight' not in weights:
      if path[-1] == 'shortcut':
        continue
      raise InputError(f'the safetensors file has no tensor {prefix}.weight, which a UNet2DModel '
                       f'of this config has; is the file complete?')
    weight, bias = take(f'{prefix}.weight'), take(f'{prefix}.bias')
    if kind == 'conv':
      leaf = {'kernel': weight.transpose(tuple(range(2, weight.ndim)) + (1, 0)), 'bias': bias}
    elif kind == 'dense':
      leaf = {'kernel': weight.T, 'bias': bias}
    elif kind == 'norm':
      leaf = {'scale': weight, 'bias': bias}
    elif kind == 'attn_proj_out':
      channels = weight.shape[0]
      heads = _num_heads(model, channels)
      leaf = {'kernel': weight.T.reshape(heads, channels // heads, channels), 'bias': bias}
    else:  # q, k, v: [C_out, C_in] -> [C_in, heads, head_dim]
      channels = weight.shape[0]
      heads = _num_heads(model, channels)
      leaf = {'kernel': weight.T.reshape(weight.shape[1], heads, channels // heads),
              'bias': bias.reshape(heads, channels // heads)}
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  unused = sorted(set(weights) - used)
  if unused:
    raise InputError(f'the safetensors file has {len(unused)} tensor(s) this UNet2DModel config '
                     f'does not use, e.g. {unused[0]}; does config.json belong to these weights?')
  return params


def params_to_diffusers(params: dict, model, image_size: int) -> dict:
  """Our params -> diffusers tensors {name: float32 array} (current names)."""
  out = {}
  for path, prefix, kind in _leaves(model, image_size):
    node = params
    for name in path:
      node = node.get(name) if isinstance(node, dict) else None
      if node is None:
        break
    if node is None:
      if path[-1] == 'shortcut':
        continue
      raise InputError(f'the parameters have no {"/".join(path)}')
    if kind.startswith('attn_'):
      prefix = prefix[0]
    leaf = {k: np.asarray(v, np.float32) for k, v in node.items()}
    if kind == 'conv':
      kernel = leaf['kernel']
      weight = kernel.transpose((kernel.ndim - 1, kernel.ndim - 2) + tuple(range(kernel.ndim - 2)))
    elif kind == 'dense':
      weight = leaf['kernel'].T
    elif kind == 'norm':
      weight = leaf['scale']
    elif kind == 'attn_proj_out':
      heads, head_dim, channels = leaf['kernel'].shape
      weight = leaf['kernel'].reshape(heads * head_dim, channels).T
    else:
      channels_in, heads, head_dim = leaf['kernel'].shape
      weight = leaf['kernel'].reshape(channels_in, heads * head_dim).T
      leaf['bias'] = leaf['bias'].reshape(heads * head_dim)
    out[f'{prefix}.weight'] = np.ascontiguousarray(weight)
    out[f'{prefix}.bias'] = np.ascontiguousarray(leaf['bias'])
  return out


def check_params(params: dict, expected: dict) -> None:
  """One line naming the first parameter whose presence or shape differs from the model's."""
  flat = lambda tree, prefix=(): (
      {k: v for name, sub in tree.items() for k, v in flat(sub, prefix + (name,)).items()}
      if isinstance(tree, dict) else {'/'.join(prefix): tuple(np.shape(tree))})
  got, want = flat(params), flat(expected)
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      raise InputError(f'parameter {name}: the weights give {got.get(name, "nothing")}, the model '
                       f'built from config.json needs {want.get(name, "nothing")}')


# --- folders -------------------------------------------------------------------------------

MAX_JSON_BYTES = 1 << 20  # a diffusers config is a few hundred bytes


def _read_json(path: pathlib.Path) -> dict:
  """A JSON object from a small regular file, or one line saying why not."""
  file_checks.check_regular_file(path, 'config file')
  if path.stat().st_size > MAX_JSON_BYTES:
    raise InputError(f'{path} is larger than the {MAX_JSON_BYTES >> 10} KiB a config file needs')
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
    raise InputError(f'{path} is not valid JSON ({str(error)[:80]})') from None
  if not isinstance(value, dict):
    raise InputError(f'{path} holds a JSON {type(value).__name__}, not an object of fields')
  return value


def find_diffusers_files(folder) -> tuple[pathlib.Path, Optional[pathlib.Path]]:
  """(the UNet folder, the scheduler config or None) of a UNet or a pipeline folder."""
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f'--from_diffusers {folder} is not a folder')
  unet = folder / 'unet' if (folder / 'unet').is_dir() else folder
  for name in (UNET_CONFIG, WEIGHTS):
    if not (unet / name).is_file():
      bin_file = unet / 'diffusion_pytorch_model.bin'
      hint = (f'; only {bin_file.name} (a pickle) is there: convert it to safetensors where torch '
              f'is installed, or download the .safetensors file' if bin_file.exists() else '')
      raise FileNotFoundError(f'{unet} has no {name} (a diffusers UNet2DModel folder, as '
                              f'save_pretrained writes it, or a pipeline folder with unet/){hint}')
  for candidate in (folder / 'scheduler' / SCHEDULER_CONFIG, folder / SCHEDULER_CONFIG,
                    unet / SCHEDULER_CONFIG):
    if candidate.is_file():
      return unet, candidate
  return unet, None


def read_diffusers(folder) -> tuple[dict, dict, dict]:
  """(config sections {'model', 'data', 'diffusion', 'sampling'}, the UNet's weights, notes).

  Checks everything it can without building the model; a folder without a scheduler config
  gets the DDPM paper's schedule (linear, 1e-4 to 0.02, T = 1000), said in ``notes``.
  """
  unet_folder, scheduler_path = find_diffusers_files(folder)
  sections = model_fields_from_unet_config(_read_json(unet_folder / UNET_CONFIG))
  notes = {}
  if scheduler_path is None:
    notes['scheduler'] = 'no scheduler_config.json: the DDPM schedule (linear 1e-4..0.02, T=1000)'
    scheduler = {}
  else:
    scheduler = _read_json(scheduler_path)
  sections.update(fields_from_scheduler_config(scheduler))
  weights_path = file_checks.check_regular_file(unet_folder / WEIGHTS, 'weights file')
  try:
    weights = load_file(weights_path)
  except Exception as error:  # safetensors raises its own error types for damaged files
    raise InputError(f'{weights_path} cannot be read as safetensors ({error})') from None
  for name, value in weights.items():
    file_checks.check_finite(value, f'{weights_path}: tensor {name}')
  return sections, weights, notes


def write_diffusers(folder, model, data, diffusion, sampling, params: dict) -> pathlib.Path:
  """Writes ``folder`` as a diffusers pipeline-style pair: UNet2DModel files (config.json,
  diffusion_pytorch_model.safetensors) and scheduler_config.json beside them, which
  ``UNet2DModel.from_pretrained`` and ``DDPMScheduler.from_pretrained`` both read."""
  unet_config = unet_config_from_fields(model, data)
  scheduler_config = scheduler_config_from_fields(diffusion, sampling)
  tensors = params_to_diffusers(params, model, data.image_size)
  folder = pathlib.Path(folder).expanduser()
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, folder / WEIGHTS)
  (folder / UNET_CONFIG).write_text(json.dumps(unet_config, indent=2))
  (folder / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config, indent=2))
  return folder


# --- the library functions -------------------------------------------------------------------

def load_diffusers(folder, base_config) -> tuple[ml_collections.ConfigDict, object, dict]:
  """Reads a diffusers UNet2DModel (or pipeline) folder: returns (config, model, params).

  ``config`` is a copy of ``base_config`` (e.g. ``configs/default.py``'s, for the sections a
  diffusers folder does not describe: optim, training) with model, data shape, diffusion and
  sampling set from the folder; ``params`` is the plain pytree ``make_sample_fn(model, config)``
  and ``model.apply`` take.

    from ddpm_jax.configs import default
    config, model, params = interop.load_diffusers('ddpm-cifar10-32', default.get_config())
    sample_fn = ddpm_jax.make_sample_fn(model, config)
  """
  sections, weights, notes = read_diffusers(folder)
  config = ml_collections.ConfigDict(base_config.to_dict())
  config.model = ml_collections.ConfigDict(sections['model'])
  config.data.image_size = sections['data']['image_size']
  config.data.channels = sections['data']['channels']
  config.diffusion.update(sections['diffusion'])
  config.sampling.update(sections['sampling'])
  model = create_model(config)
  shape = (1,) + config_lib.data_shape(config)
  model.check_input(shape)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                               jnp.zeros((1,), jnp.int32)))['params']
  params = params_from_diffusers(weights, config.model, config.data.image_size)
  check_params(params, expected)
  for note in notes.values():
    print(f'note: {note}')
  return config, model, jax.tree.map(jnp.asarray, params)


def save_diffusers(folder, config, params) -> pathlib.Path:
  """Writes ``params`` of a model built from ``config`` as a diffusers folder (UNet2DModel
  files and scheduler_config.json)."""
  return write_diffusers(folder, config.model, config.data, config.diffusion, config.sampling,
                         jax.tree.map(np.asarray, params))
