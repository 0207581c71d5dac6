"""The noise-prediction network and its construction from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax import config_lib, schedules
from ddpm_jax.config_lib import MODEL_FIELD_DEFAULTS
from ddpm_jax.errors import InputError
from ddpm_jax.models.unet import UNet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# 'auto': bfloat16 where the matrix units run it natively, float32 on CPU, where XLA emulates
# bfloat16 arithmetic and it is slower, not faster.
ACCELERATOR_BACKENDS = ('gpu', 'tpu')


def compute_dtype(name: str, backend: str | None = None):
  """The network's compute dtype for ``model.dtype`` (parameters stay float32 in every case)."""
  if name == 'auto':
    backend = backend or jax.default_backend()
    return jnp.bfloat16 if backend in ACCELERATOR_BACKENDS else jnp.float32
  if name not in DTYPES:
    raise InputError(f'unknown model.dtype {name!r}; choose auto or one of {", ".join(DTYPES)}')
  return DTYPES[name]


def create_model(config) -> UNet:
  """Builds the UNet from a full config (the ConfigDict that ``configs/*.py`` return)."""
  config_lib.check_limits(config)
  model = config.model
  dtype = compute_dtype(model.dtype)
  if model.spatial_dims not in (1, 2):
    raise InputError(f'model.spatial_dims must be 1 (windows) or 2 (images), got {model.spatial_dims}')
  continuous = schedules.is_continuous(config_lib.schedule_from_config(config))
  return UNet(
      ch=model.ch,
      ch_mult=tuple(model.ch_mult),
      num_res_blocks=model.num_res_blocks,
      attn_resolutions=tuple(model.attn_resolutions),
      dropout=model.dropout,
      num_heads=model.num_heads,
      num_groups=model.num_groups,
      out_channels=config.data.channels,
      num_classes=model.num_classes,
      spatial_dims=model.spatial_dims,
      time_scale=1000.0 if continuous else 1.0,
      dtype=dtype,
      **{name: type(default)(model.get(name, default))
         for name, default in MODEL_FIELD_DEFAULTS.items()},
  )


def model_apply(model, params, x_t, t, labels=None, train=False, dropout_key=None):
  """The network's output for x_t [B, ...] at t [B] (labels [B] for a class-conditional model)."""
  rngs = {'dropout': dropout_key} if dropout_key is not None else None
  return model.apply({'params': params}, x_t, t, labels, train=train, rngs=rngs)


__all__ = ['UNet', 'compute_dtype', 'create_model', 'model_apply']
