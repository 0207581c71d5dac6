"""The forward process q and conversions between what a network can predict.

Pure functions over arrays and a schedule from ``ddpm_jax.schedules``; no Flax, no config.
Data may have any rank: images [B, H, W, C], series [B, L, C]; ``t`` is [B] (or a scalar).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import schedules as schedules_lib
from ddpm_jax.errors import InputError

PREDICTIONS = ('eps', 'x0', 'v', 'score')


def concrete_or_none(x):
  """``x`` as a numpy array when its value is known now, None while it is being traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_timesteps(schedule, t) -> None:
  """Raises ValueError for timesteps outside the schedule's range (only when t is concrete)."""
  t_value = concrete_or_none(t)
  if t_value is None:
    return
  if schedules_lib.is_continuous(schedule):
    if np.issubdtype(t_value.dtype, np.integer) or np.any((t_value < 0) | (t_value > 1)):
      raise InputError(f'continuous-time t must be float in [0, 1]; got dtype {t_value.dtype}, '
                       f'range [{t_value.min()}, {t_value.max()}]')
    return
  num_timesteps = schedule.num_timesteps
  if not np.issubdtype(t_value.dtype, np.integer):
    raise InputError(f'discrete timesteps must be integers in [0, {num_timesteps - 1}], '
                     f'got dtype {t_value.dtype}')
  if np.any((t_value < 0) | (t_value >= num_timesteps)):
    raise InputError(f'timesteps must lie in [0, {num_timesteps - 1}]; got range '
                     f'[{t_value.min()}, {t_value.max()}]')


def check_prediction(name: str, allowed=PREDICTIONS) -> None:
  if name not in allowed:
    raise InputError(f'unknown prediction target {name!r}; choose one of {", ".join(allowed)}')


def alpha_sigma(schedule, t):
  """(sqrt(abar_t), sqrt(1 - abar_t)), each of t's shape."""
  if schedules_lib.is_continuous(schedule):
    t = jnp.asarray(t, jnp.float32)
    return schedule.mean_coef(t), schedule.std(t)
  t = jnp.asarray(t)
  return schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]


def log_snr(schedule, t):
  """log(abar_t / (1 - abar_t)), t's shape."""
  if schedules_lib.is_continuous(schedule):
    return schedule.log_snr(jnp.asarray(t, jnp.float32))
  abar = schedule.alphas_cumprod[jnp.asarray(t)]
  return jnp.log(abar) - jnp.log1p(-abar)


def per_example(coef, x):
  """Reshapes a per-example coefficient [B] (or scalar) to broadcast over x [B, ...]."""
  coef = jnp.asarray(coef)
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def q_sample(schedule, x0, t, noise):
  """Draws x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise.

  x0, noise: [B, ...]; t: [B] integer (discrete) or float in [0, 1] (continuous).
  """
  check_timesteps(schedule, t)
  alpha, sigma = alpha_sigma(schedule, t)
  return per_example(alpha, x0) * x0 + per_example(sigma, x0) * noise


def q_posterior(schedule: schedules_lib.DiscreteSchedule, x0, x_t, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) for a discrete schedule.

  Returns (mean [B, ...], variance [B, 1...], log_variance [B, 1...]).
  """
  if schedules_lib.is_continuous(schedule):
    raise InputError('q_posterior needs a discrete schedule (linear, cosine or from_betas)')
  check_timesteps(schedule, t)
  t = jnp.asarray(t)
  mean = (per_example(schedule.posterior_mean_coef1[t], x0) * x0
          + per_example(schedule.posterior_mean_coef2[t], x0) * x_t)
  variance = per_example(schedule.posterior_variance[t], x0)
  log_variance = per_example(schedule.posterior_log_variance_clipped[t], x0)
  return mean, variance, log_variance


REVERSE_VARIANCES = ('small', 'large')


def reverse_log_variance(schedule: schedules_lib.DiscreteSchedule, variance: str):
  """log sigma_t^2 [T] of the reverse step p(x_{t-1} | x_t): 'small' is beta-tilde_t (the
  posterior's), 'large' is beta_t with its t = 0 entry from beta-tilde_1 (DDPM's fixedlarge)."""
  if variance == 'small':
    return schedule.posterior_log_variance_clipped
  if variance == 'large':
    return jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
  raise InputError(f'unknown reverse variance {variance!r}; choose one of '
                   f'{", ".join(REVERSE_VARIANCES)}')


def split_prediction(value, x_t, alpha, sigma, prediction: str):
  """(x0, eps) implied by a network output under ``prediction``; alpha, sigma broadcast to x_t.

  Uses alpha² + sigma² = 1: from v, x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v.
  """
  if prediction == 'eps':
    return (x_t - sigma * value) / alpha, value
  if prediction == 'x0':
    return value, (x_t - alpha * value) / sigma
  if prediction == 'v':
    return alpha * x_t - sigma * value, sigma * x_t + alpha * value
  if prediction == 'score':
    eps = -sigma * value
    return (x_t - sigma * eps) / alpha, eps
  check_prediction(prediction)


def join_prediction(x0, eps, alpha, sigma, target: str):
  """The quantity ``target`` from (x0, eps); alpha, sigma broadcast to x0."""
  if target == 'eps':
    return eps
  if target == 'x0':
    return x0
  if target == 'v':
    return alpha * eps - sigma * x0
  if target == 'score':
    return -eps / sigma
  check_prediction(target)


def convert_prediction(schedule, x_t, t, value, *, source: str, target: str):
  """Converts a network output between eps, x0, v (= sqrt(abar) eps - sqrt(1-abar) x0) and the
  score (= -eps / sqrt(1 - abar)), given x_t [B, ...] and t [B]."""
  check_prediction(source)
  check_prediction(target)
  alpha, sigma = alpha_sigma(schedule, t)
  alpha, sigma = per_example(alpha, x_t), per_example(sigma, x_t)
  x0, eps = split_prediction(value, x_t, alpha, sigma, source)
  return join_prediction(x0, eps, alpha, sigma, target)
