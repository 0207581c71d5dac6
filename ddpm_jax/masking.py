"""Which values of a window are observed: masks for training and for the forecast and impute
tasks, and the network input that carries them (CSDI's recipe; no Flax, no config).

A mask has the window's shape [..., L, C] and is 1 where a value is observed, 0 where it is to
be generated. An all-zero mask is unconditional generation, so one model serves all tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ddpm_jax.errors import InputError

MASK_KINDS = ('none', 'points', 'block', 'horizon')


def training_masks(key, shape: tuple, mix, horizon: int = 0) -> jax.Array:
  """float32 masks [B, L, C], one kind per window drawn with probabilities ``mix`` over
  MASK_KINDS:
    none     nothing observed (unconditional);
    points   each value observed with probability u ~ U(0.1, 0.9) (one u per window);
    block    one block of U{1..L/2} consecutive steps hidden in every channel, the rest observed;
    horizon  the last U{1..L/2} steps hidden in every channel (forecasting), or exactly the
             last ``horizon`` steps when it is > 0 (a run made for one horizon).
  """
  batch, length = shape[0], shape[1]
  kind_key, rate_key, point_key, size_key, start_key = jax.random.split(key, 5)
  kind = jax.random.choice(kind_key, len(MASK_KINDS), (batch,), p=jnp.asarray(mix, jnp.float32))
  rate = jax.random.uniform(rate_key, (batch, 1, 1), minval=0.1, maxval=0.9)
  points = jax.random.uniform(point_key, shape) < rate
  steps = jnp.arange(length)[None, :, None]  # [1, L, 1]
  size = jax.random.randint(size_key, (batch, 1, 1), 1, length // 2 + 1)
  start = jax.random.randint(start_key, (batch, 1, 1), 0, length) % (length - size + 1)
  block = (steps < start) | (steps >= start + size)
  hidden_steps = size if horizon <= 0 else horizon
  final = steps < length - hidden_steps
  masks = jnp.stack([jnp.zeros(shape, bool), points,
                     jnp.broadcast_to(block, shape), jnp.broadcast_to(final, shape)])
  return jnp.take_along_axis(masks, kind[None, :, None, None], axis=0)[0].astype(jnp.float32)


def condition_input(x_t, observed, mask):
  """The network's input [B, L, 3C]: the noisy window, the observed values (0 where hidden) and
  the mask."""
  return jnp.concatenate([x_t, observed * mask, mask], axis=-1)


def forecast_horizon(mask, horizon: int) -> jax.Array:
  """bool [B, L, 1]: the last ``horizon`` steps of each window whose mask [B, L, C] is a
  forecast of exactly that horizon (the steps before it observed, those after hidden)."""
  length = mask.shape[1]
  is_forecast = (jnp.all(mask[:, :length - horizon] > 0, axis=(1, 2), keepdims=True)
                 & jnp.all(mask[:, length - horizon:] == 0, axis=(1, 2), keepdims=True))
  return is_forecast & (jnp.arange(length) >= length - horizon)[None, :, None]


def linear_base(observed, weights) -> jax.Array:
  """[B, L, C]: the linear map's forecast from each window's first L - H steps ``observed``
  [B, L, C] (model space) in its last H; 0 before. ``weights`` [C, L - H + 1, H]
  (series_data.fit_linear_map on the normalised training rows)."""
  horizon = weights.shape[-1]
  past = observed[:, :observed.shape[1] - horizon]
  forecast = (jnp.einsum('blc,clh->bhc', past, weights[:, :-1]) + weights[:, -1].T[None])
  return jnp.concatenate([jnp.zeros_like(past), forecast], axis=1)


def observed_mean(observed, mask) -> jax.Array:
  """[B, 1, C]: each channel's mean over a window's observed entries (0 where none are)."""
  count = jnp.sum(mask, axis=1, keepdims=True)
  return jnp.sum(observed * mask, axis=1, keepdims=True) / jnp.maximum(count, 1.0)


def window_shift(observed, mask, base_weights=None, center: bool = False) -> jax.Array:
  """[B, L, C]: what the network's space subtracts from each window, computed from what is
  observed alone.

  ``center``: each channel's observed mean (RevIN's instance normalisation without the scale,
  Kim et al. 2022): the network sees shapes, not levels the training months may not have had.
  ``base_weights``: in a forecast of their horizon, the horizon's shift is the linear map's
  forecast instead (linear_base; TimeDiff's linear initialisation, Shen & Kwok 2023), so the
  network models the map's error.
  """
  shift = observed_mean(observed, mask) * jnp.ones_like(observed) if center else \
      jnp.zeros_like(observed)
  if base_weights is not None:
    shift = jnp.where(forecast_horizon(mask, base_weights.shape[-1]),
                      linear_base(observed, base_weights), shift)
  return shift


def loss_mask(mask):
  """The entries the loss covers: the hidden ones (every entry of an unconditional window)."""
  return 1.0 - mask


def forecast_mask(length: int, channels: int, horizon: int) -> np.ndarray:
  """[L, C]: the first L - horizon steps observed."""
  if not 0 < horizon < length:
    raise InputError(f'--horizon must lie in 1..{length - 1} (the window is {length} steps, and '
                     f'the forecast needs context before it), got {horizon}')
  mask = np.ones((length, channels), np.float32)
  mask[length - horizon:] = 0.0
  return mask


def evaluation_mask(rng: np.random.Generator, shape: tuple, missing: float,
                    block: int) -> np.ndarray:
  """[N, L, C] test masks that hide a fraction ``missing`` of points at random, or (block > 0)
  one block of ``block`` steps per window in every channel at a random place."""
  count, length, _ = shape
  if block > 0:
    if block >= length:
      raise InputError(f'--block must be shorter than the window ({length} steps), got {block}')
    starts = rng.integers(0, length - block + 1, count)
    steps = np.arange(length)[None, :, None]
    mask = ~((steps >= starts[:, None, None]) & (steps < starts[:, None, None] + block))
    return np.broadcast_to(mask, shape).astype(np.float32)
  if not 0.0 < missing < 1.0:
    raise InputError(f'--missing must lie in (0, 1), got {missing}')
  mask = (rng.random(shape) >= missing).astype(np.float32)
  for n in range(count):  # at least one hidden value per window, so every window is scored
    if mask[n].all():
      mask[n].flat[rng.integers(mask[n].size)] = 0.0
  return mask
