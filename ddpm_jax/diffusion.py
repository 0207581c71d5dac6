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

# v = alpha eps - sigma x0 (Salimans & Ho 2022); velocity = d x_t / dt = alpha' x0 + sigma' eps
# (the flow's eps - x0), for continuous schedules.
PREDICTIONS = ('eps', 'x0', 'v', 'velocity', 'score')


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
  """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps, each of t's shape (VP: sqrt(abar_t),
  sqrt(1 - abar_t))."""
  if schedules_lib.is_continuous(schedule):
    t = jnp.asarray(t, jnp.float32)
    return schedule.mean_coef(t), schedule.std(t)
  t = jnp.asarray(t)
  return schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]


def log_snr(schedule, t):
  """log(alpha_t² / sigma_t²), t's shape."""
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
  """Draws x_t ~ q(x_t | x0) = N(alpha_t x0, sigma_t² I) with the given noise (VP: alpha_t =
  sqrt(abar_t), sigma_t = sqrt(1 - abar_t); the flow: 1 - t and t).

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


def alpha_sigma_rates(schedule, t):
  """(d alpha / dt, d sigma / dt) of a continuous schedule, each of t's shape (forward-mode
  derivatives of alpha_sigma: one formula for every path)."""
  if not schedules_lib.is_continuous(schedule):
    raise InputError('d alpha / dt needs a continuous schedule (vp_linear, vp_cosine, '
                     'rectified_flow); a discrete one has no time derivative')
  t = jnp.asarray(t, jnp.float32)
  return jax.jvp(lambda u: alpha_sigma(schedule, u), (t,), (jnp.ones_like(t),))[1]


def split_prediction(value, x_t, alpha, sigma, prediction: str, rates=None):
  """(x0, eps) implied by a network output under ``prediction``; alpha, sigma broadcast to x_t.

  Holds on any path x_t = alpha x0 + sigma eps: from v, x0 = (alpha x_t - sigma v) / (alpha² +
  sigma²) (VP: alpha x_t - sigma v). ``rates`` = (d alpha/dt, d sigma/dt), broadcast like alpha,
  is needed by 'velocity' only: x0 = (sigma' x_t - sigma u) / D, eps = (alpha u - alpha' x_t) / D
  with D = alpha sigma' - sigma alpha' (the flow: D = 1).
  """
  if prediction == 'eps':
    return (x_t - sigma * value) / alpha, value
  if prediction == 'x0':
    return value, (x_t - alpha * value) / sigma
  if prediction == 'v':
    norm = alpha ** 2 + sigma ** 2
    return (alpha * x_t - sigma * value) / norm, (sigma * x_t + alpha * value) / norm
  if prediction == 'velocity':
    d_alpha, d_sigma = _need_rates(rates)
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * value) / det, (alpha * value - d_alpha * x_t) / det
  if prediction == 'score':
    eps = -sigma * value
    return (x_t - sigma * eps) / alpha, eps
  check_prediction(prediction)


def _need_rates(rates):
  if rates is None:
    raise InputError("the 'velocity' prediction needs d alpha/dt and d sigma/dt (a continuous "
                     "schedule)")
  return rates


def join_prediction(x0, eps, alpha, sigma, target: str, rates=None):
  """The quantity ``target`` from (x0, eps); alpha, sigma (and ``rates`` for 'velocity')
  broadcast to x0."""
  if target == 'eps':
    return eps
  if target == 'x0':
    return x0
  if target == 'v':
    return alpha * eps - sigma * x0
  if target == 'velocity':
    d_alpha, d_sigma = _need_rates(rates)
    return d_alpha * x0 + d_sigma * eps
  if target == 'score':
    return -eps / sigma
  check_prediction(target)


def coefficients(schedule, t, x, with_rates: bool):
  """(alpha, sigma, rates) at t [B] broadcast to x [B, ...]; rates (d alpha/dt, d sigma/dt) or
  None."""
  alpha, sigma = alpha_sigma(schedule, t)
  rates = tuple(per_example(r, x) for r in alpha_sigma_rates(schedule, t)) if with_rates \
      else None
  return per_example(alpha, x), per_example(sigma, x), rates


def regression_target(schedule, x0, noise, t, target: str):
  """What a network trained for ``target`` regresses at x_t = alpha x0 + sigma noise: [B, ...]."""
  alpha, sigma, rates = coefficients(schedule, t, x0, target == 'velocity')
  return join_prediction(x0, noise, alpha, sigma, target, rates)


def convert_prediction(schedule, x_t, t, value, *, source: str, target: str):
  """Converts a network output between eps, x0, v (= alpha eps - sigma x0), the velocity
  (= d x_t / dt) and the score (= -eps / sigma), given x_t [B, ...] and t [B]."""
  check_prediction(source)
  check_prediction(target)
  alpha, sigma, rates = coefficients(schedule, t, x_t, 'velocity' in (source, target))
  x0, eps = split_prediction(value, x_t, alpha, sigma, source, rates)
  return join_prediction(x0, eps, alpha, sigma, target, rates)
