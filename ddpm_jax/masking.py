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


def linear_base(observed, mask, weights) -> jax.Array:
  """[B, L, C]: the linear map's forecast of the horizon where a window is a forecast (its
  first L - H steps observed, the last H hidden), 0 elsewhere and in every other window.

  ``observed`` [B, L, C] model space; ``weights`` [C, L - H + 1, H] (series_data.fit_linear_map
  on the normalised training rows). A network modelling ``x - base`` learns the map's error.
  """
  horizon = weights.shape[-1]
  lookback = observed.shape[1] - horizon
  past = observed[:, :lookback]
  forecast = (jnp.einsum('blc,clh->bhc', past, weights[:, :lookback])
              + weights[:, lookback].T[None])
  is_forecast = (jnp.all(mask[:, :lookback] > 0, axis=(1, 2))
                 & jnp.all(mask[:, lookback:] == 0, axis=(1, 2)))[:, None, None]
  base = jnp.concatenate([jnp.zeros_like(past), forecast], axis=1)
  return jnp.where(is_forecast, base, 0.0)


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
