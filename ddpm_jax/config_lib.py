"""The boundary between an ml_collections config and the typed values the library uses."""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import ml_collections
import numpy as np

from ddpm_jax import schedules as schedules_lib
from ddpm_jax import series_data
from ddpm_jax.errors import InputError

# Sections a checkpoint depends on: resuming with other values here cannot work.
CHECKPOINT_SECTIONS = ('model', 'diffusion')
CHECKPOINT_DATA_FIELDS = ('image_size', 'channels', 'window', 'columns', 'normalization')
SERIES = 'series'
# Fields of those sections that change how a run trains or computes, not what a checkpoint holds:
# dtype is the compute precision; parameters, Adam and EMA are float32 whatever it is.
# subpixel_upsample and fused_group_norm only change how the up path's convolutions and the
# GroupNorm gradients are computed, fast_dropout how dropout's random draws are made.
COMPUTE_ONLY_FIELDS = (('model', 'dropout'), ('model', 'dtype'), ('model', 'subpixel_upsample'),
                       ('model', 'fused_group_norm'), ('model', 'fast_dropout'))
# Model fields added after runs were written; a config.json without them means these values.
MODEL_FIELD_DEFAULTS = dict(
    flip_sin_to_cos=False,  # time embedding: cos before sin (diffusers' flip_sin_to_cos)
    freq_shift=1.0,  # time embedding: the frequency offset (diffusers' freq_shift)
    norm_eps=1e-6,  # GroupNorm epsilon
    attention_head_dim=0,  # > 0: heads of this width instead of num_heads
    downsample_padding=0,  # strided conv's padding before each axis: 0 the paper's, 1 diffusers' later default
    subpixel_upsample=True,  # upsample + 3x3 conv as four 2x2 convs (same outputs, faster)
    fused_group_norm=True,  # GroupNorm + SiLU with a hand-written backward pass
    fast_dropout=True,  # dropout from 16-bit draws (same law, other draws)
)
# Model fields outside the network's own options, with the value a config.json without them means.
# observed_input: the network also takes the observed values and their mask (series tasks).
MODEL_INPUT_DEFAULTS = dict(
    observed_input=False,  # the network also takes observed values and their mask (series tasks)
    # 'linear_map' (with observed_input and data.horizon): a forecast's horizon is modelled as
    # its difference from the least-squares linear map of its lookback, fitted on the training
    # rows (TimeDiff's linear initialisation, Shen & Kwok 2023); 'nlinear_map': from the same
    # map fitted relative to the last past value (NLinear), which follows a level the training
    # rows never had; '': the values themselves
    forecast_base='',
    # True (with observed_input): each window less each channel's mean over its observed entries
    # (RevIN's instance normalisation without the scale, Kim et al. 2022); samples get it back
    center_observed=False,
)
FORECAST_BASES = ('',) + tuple(series_data.LINEAR_MAPS)


# Ranges of the sizes a config (or a downloaded run's config.json, or a diffusers config.json)
# may declare, checked before anything is built: beyond them a typo or a hostile file would
# allocate for minutes or exhaust memory. (section, field): (low, high); sequences per entry.
LIMITS = {
    ('model', 'ch'): (1, 4096),
    ('model', 'ch_mult'): (1, 64),
    ('model', 'num_res_blocks'): (1, 32),
    ('model', 'num_heads'): (1, 256),
    ('model', 'num_groups'): (1, 4096),
    ('model', 'num_classes'): (0, 100_000),
    ('model', 'attention_head_dim'): (0, 4096),
    ('diffusion', 'num_timesteps'): (1, 100_000),
    ('data', 'image_size'): (0, 4096),
    ('data', 'channels'): (0, 4096),
    ('training', 'batch_size'): (1, 1 << 20),
    ('sampling', 'batch_size'): (1, 1 << 20),
}
MAX_LEVELS = 8  # entries of model.ch_mult


def check_limits(config) -> None:
  """One line naming the first field of ``LIMITS`` that is not an integer in its range."""
  for (section, field), (low, high) in LIMITS.items():
    if section not in config or field not in config[section]:
      continue
    value = config[section][field]
    entries = list(value) if isinstance(value, (tuple, list)) else [value]
    if isinstance(value, (tuple, list)) and not 1 <= len(entries) <= MAX_LEVELS:
      raise InputError(f'{section}.{field} has {len(entries)} entries; it takes 1 to '
                       f'{MAX_LEVELS}')
    for entry in entries:
      if isinstance(entry, bool) or not isinstance(entry, int) or not low <= entry <= high:
        raise InputError(f'{section}.{field}={value!r} is out of range: it takes integers from '
                         f'{low} to {high}')


def schedule_from_config(config):
  """The noise schedule that ``config.diffusion`` names."""
  d = config.diffusion
  if d.schedule == 'linear':
    return schedules_lib.linear(d.num_timesteps, d.beta_start, d.beta_end)
  if d.schedule == 'cosine':
    return schedules_lib.cosine(d.num_timesteps, s=d.cosine_s)
  if d.schedule == 'vp_linear':
    return schedules_lib.vp_linear(d.vp_beta_min, d.vp_beta_max)
  if d.schedule == 'vp_cosine':
    return schedules_lib.vp_cosine(s=d.cosine_s)
  if d.schedule == 'rectified_flow':
    return schedules_lib.rectified_flow()
  return schedules_lib.get_schedule(d.schedule)  # raises the ValueError naming the choices


def resolve(config, example_shape: tuple, num_classes: int) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the data's shape filled in (the caller's copy is not changed).

  ``example_shape``: one example of the data, (H, W, C) or (window, C); ``num_classes``: how
  many labels the data has (0: none). data.image_size / data.channels left at 0 are taken from
  the data; other values must agree with it.
  """
  resolved = ml_collections.ConfigDict(config.to_dict())
  check_limits(resolved)
  data = resolved.data
  for field in ('path', 'data_dir'):  # a run's config.json must find its data from any folder
    if data.get(field):
      data[field] = str(pathlib.Path(data[field]).expanduser().absolute())
  if resolved.training.eval_every and data.name != 'digits':
    raise InputError(f'training.eval_every measures digits samples, but the data is {data.name}; '
                     'set --config.training.eval_every=0 and score images with sample.py --eval')
  if data.random_flip and is_series(resolved):
    raise InputError('data.random_flip mirrors images left to right; series windows have no such '
                     'symmetry: set --config.data.random_flip=False')
  if is_series(resolved):
    data.channels = example_shape[-1]
    horizon = data.get('horizon', 0)
    if horizon and not 0 < horizon < data.window:
      raise InputError(f'data.horizon={horizon} must be shorter than the window '
                       f'({data.window} steps)')
    base = forecast_base(resolved)
    if base not in FORECAST_BASES:
      raise InputError(f'unknown model.forecast_base {base!r}; choose one of '
                       f'{", ".join(repr(b) for b in FORECAST_BASES)}')
    if base and not (observed_input(resolved) and horizon):
      raise InputError(f'model.forecast_base={base!r} forecasts data.horizon steps from the '
                       'observed lookback: set --config.model.observed_input=True and '
                       '--config.data.horizon')
    if center_observed(resolved) and not observed_input(resolved):
      raise InputError('model.center_observed shifts each window by its observed values: set '
                       '--config.model.observed_input=True')
    if data.get('protocol') == 'ett' and data.window != data.lookback + data.horizon:
      raise InputError(f'data.protocol=ett cuts windows of lookback + horizon = '
                       f'{data.lookback + data.horizon} steps, but data.window={data.window}; '
                       'leave data.window to configs/ett.py')
    return resolved
  if observed_input(resolved) or forecast_base(resolved) or center_observed(resolved):
    raise InputError('model.observed_input, forecast_base and center_observed (forecasting and '
                     'imputation) need series data')
  height, width, channels = example_shape
  if height != width:
    raise InputError(f'images are {height}x{width}; the model takes square images')
  for field, actual in (('image_size', height), ('channels', channels)):
    wanted = data[field]
    if wanted and wanted != actual:
      raise InputError(f'data.{field}={wanted} but the {data.name} data has {field} {actual}; '
                       f'set --config.data.{field}={actual} (or 0 to take it from the data)')
    data[field] = actual
  if resolved.model.num_classes and not num_classes:
    raise InputError(f'model.num_classes={resolved.model.num_classes} but the {data.name} data '
                     'has no labels; set --config.model.num_classes=0')
  if resolved.model.num_classes and num_classes > resolved.model.num_classes:
    raise InputError(f'the {data.name} data has {num_classes} classes but '
                     f'model.num_classes={resolved.model.num_classes}')
  return resolved


def training_warnings(config) -> list[str]:
  """One line for each setting that trains without error but leaves the run worse than it
  looks: a warm-up longer than the run, or an EMA (what sample.py uses) that would still hold
  much of the initial random weights at the end."""
  optim, steps = config.optim, config.training.num_steps
  lines = []
  if optim.warmup_steps > steps:
    lines.append(f'optim.warmup_steps={optim.warmup_steps} is longer than the run '
                 f'(training.num_steps={steps}): the learning rate never reaches '
                 f'optim.learning_rate={optim.learning_rate:g}')
  initial_share = optim.ema_decay ** steps if 0 < optim.ema_decay < 1 else 0.0
  if initial_share > 0.05:
    suggested = 1 - 10 / steps if steps > 10 else 0.0
    lines.append(f'with optim.ema_decay={optim.ema_decay:g} the EMA parameters that sample.py '
                 f'uses are still {initial_share:.0%} initial random weights after {steps} steps;'
                 f' set --config.optim.ema_decay={suggested:.4g} or train longer')
  return lines


def forecast_base(config) -> str:
  """The base forecast a run's network models the horizon's difference from ('' for none)."""
  return config.model.get('forecast_base', MODEL_INPUT_DEFAULTS['forecast_base'])


def base_weights(config, data_stats: Optional[dict]) -> Optional[np.ndarray]:
  """float32 [C, lookback + 1, H]: the linear map a run with model.forecast_base models the
  horizon against (None without one), from the data statistics saved with the run."""
  base = forecast_base(config)
  if not base:
    return None
  if not data_stats or base not in data_stats:
    raise InputError(f'model.forecast_base={base} needs that linear map of the training rows in '
                     f'the data statistics; the series source fits it when data.horizon > 0')
  return np.asarray(data_stats[base], np.float32)


def center_observed(config) -> bool:
  """Whether the network sees each window less its observed entries' mean per channel."""
  return bool(config.model.get('center_observed', MODEL_INPUT_DEFAULTS['center_observed']))


def coupling(config) -> str:
  """How training pairs data with noise (losses.COUPLINGS); runs saved before the field
  existed drew them independently."""
  return config.diffusion.get('coupling', 'independent')


def observed_input(config) -> bool:
  """Whether the network takes observed values and a mask beside x_t (masking.condition_input)."""
  return bool(config.model.get('observed_input', MODEL_INPUT_DEFAULTS['observed_input']))


def network_input_shape(config, shape: Optional[tuple] = None) -> tuple:
  """One example of the network's input: the data's shape (``shape``, else the config's), with
  3x the channels when the network also takes observed values and their mask."""
  shape = tuple(data_shape(config) if shape is None else shape)
  return shape[:-1] + (3 * shape[-1],) if observed_input(config) else shape


def is_series(config) -> bool:
  return config.data.name == SERIES


def data_shape(config) -> tuple:
  """One example's shape: (H, W, C) for images, (window, C) for series."""
  if is_series(config):
    return (config.data.window, config.data.channels)
  return (config.data.image_size, config.data.image_size, config.data.channels)


def to_json(config) -> str:
  return config.to_json(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def checkpoint_differences(saved, current) -> list[str]:
  """Fields that must agree between a workdir's saved config and the current one, where they differ."""
  saved = json.loads(to_json(saved))
  current = json.loads(to_json(current))
  diffs = []
  for section in CHECKPOINT_SECTIONS:
    keys = sorted(set(saved.get(section, {})) | set(current.get(section, {})))
    for key in keys:
      # A field one side lacks (added later) stands for its default.
      default = ({**MODEL_FIELD_DEFAULTS, **MODEL_INPUT_DEFAULTS}.get(key) if section == 'model'
                 else None)
      a = saved.get(section, {}).get(key, default)
      b = current.get(section, {}).get(key, default)
      if a != b and (section, key) not in COMPUTE_ONLY_FIELDS:
        diffs.append(f'{section}.{key}: {a!r} in the workdir, {b!r} now')
  for key in CHECKPOINT_DATA_FIELDS:
    a, b = saved.get('data', {}).get(key), current.get('data', {}).get(key)
    if a != b and (key in ('image_size', 'channels') or current['data'].get('name') == SERIES):
      diffs.append(f'data.{key}: {a!r} in the workdir, {b!r} now')
  return diffs
