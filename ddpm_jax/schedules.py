"""Noise schedules: discrete DDPM tables, continuous-time VP-SDE schedules and the flow path.

Pure numpy / JAX: no Flax, no config objects.

Discrete convention: a timestep is an integer index ``t`` in ``[0, T)``; index ``t`` is the
paper's step ``t + 1`` (so ``alphas_cumprod[0] = 1 - beta_1`` and ``alphas_cumprod[T - 1]`` is
the paper's abar_T). Continuous convention: ``t`` is a float in ``[0, 1]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from ddpm_jax.errors import InputError

__all__ = [
    'DiscreteSchedule', 'VPLinear', 'VPCosine', 'Schedule', 'linear', 'cosine', 'from_betas',
    'vp_linear', 'vp_cosine', 'RectifiedFlow', 'rectified_flow', 'get_schedule',
    'SCHEDULE_NAMES', 'is_continuous', 'is_variance_preserving',
]


class DiscreteSchedule(NamedTuple):
  """All per-step tables of a T-step DDPM schedule, each float32 [T]. A pytree."""
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array  # beta-tilde_t; 0 at t = 0
  posterior_log_variance_clipped: jax.Array  # log beta-tilde, its t = 0 entry taken from t = 1
  posterior_mean_coef1: jax.Array  # multiplies x0 in the mean of q(x_{t-1} | x_t, x0)
  posterior_mean_coef2: jax.Array  # multiplies x_t

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def from_betas(betas) -> DiscreteSchedule:
  """Builds every table from arbitrary betas [T] in (0, 1], computed in float64."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise InputError(f'betas must be a non-empty 1-D array, got shape {betas.shape}')
  bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
  if bad.size:
    raise InputError(f'betas must lie in (0, 1]; betas[{bad[0]}] = {betas[bad[0]]}')
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # beta-tilde at t = 0 is 0; the clipped log takes the t = 1 value there, as in DDPM.
  log_var_source = np.append(posterior_variance[1], posterior_variance[1:]) if betas.size > 1 \
      else np.maximum(posterior_variance, 1e-20)
  tables = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(log_var_source),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
  )
  return DiscreteSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def _check_num_timesteps(num_timesteps: int) -> None:
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise InputError(f'num_timesteps must be a positive integer, got {num_timesteps!r}')


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4,
           beta_end: float = 0.02) -> DiscreteSchedule:
  """DDPM's linear schedule (Ho et al. 2020): betas evenly spaced from beta_start to beta_end."""
  _check_num_timesteps(num_timesteps)
  if not 0 < beta_start <= beta_end <= 1:
    raise InputError(f'linear schedule needs 0 < beta_start <= beta_end <= 1, got '
                     f'beta_start={beta_start}, beta_end={beta_end}')
  return from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
  """Nichol & Dhariwal (2021) cosine schedule: abar(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) π/2)."""
  _check_num_timesteps(num_timesteps)
  if s < 0 or not 0 < max_beta <= 1:
    raise InputError(f'cosine schedule needs s >= 0 and 0 < max_beta <= 1, got s={s}, '
                     f'max_beta={max_beta}')
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  alphas_cumprod = f / f[0]
  betas = np.clip(1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, max_beta)
  return from_betas(betas)


class _VPSchedule:
  """Marginals of a continuous VP-SDE, derived from the subclass's ``log_alpha_bar(t)``."""

  def alpha_bar(self, t):
    """abar(t), any shape."""
    return jnp.exp(self.log_alpha_bar(t))

  def mean_coef(self, t):
    """sqrt(abar(t)): the marginal mean is mean_coef(t) * x0."""
    return jnp.exp(0.5 * self.log_alpha_bar(t))

  def std(self, t):
    """sqrt(1 - abar(t)), computed without cancellation near t = 0."""
    return jnp.sqrt(-jnp.expm1(self.log_alpha_bar(t)))

  def log_snr(self, t):
    """log(abar / (1 - abar))."""
    log_abar = self.log_alpha_bar(t)
    return log_abar - jnp.log(-jnp.expm1(log_abar))


# Static pytrees: the hyper-parameters are compile-time constants under jit.
@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPLinear(_VPSchedule):
  """Continuous VP-SDE with beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1] (Song et al. 2021).

  abar(t) = exp(-∫_0^t beta(s) ds). ``t_min`` is where training draws and samplers stop; the
  default values match DDPM's linear schedule with T = 1000 in the limit.
  """
  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-3
  t_max: float = 1.0

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_alpha_bar(self, t):
    return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class VPCosine(_VPSchedule):
  """Continuous cosine schedule: abar(t) = cos²((t + s)/(1 + s) π/2) / cos²(s/(1 + s) π/2).

  abar(1) = 0, so samplers start at ``t_max`` < 1 (abar(t_max) is about 2.4e-6 by default).
  """
  s: float = 0.008
  t_min: float = 1e-3
  t_max: float = 0.999

  def _angle(self, t):
    return (t + self.s) / (1 + self.s) * (math.pi / 2)

  def beta(self, t):
    # beta(t) = -d/dt log abar(t)
    return math.pi / (1 + self.s) * jnp.tan(self._angle(t))

  def log_alpha_bar(self, t):
    return 2.0 * (jnp.log(jnp.cos(self._angle(t))) - math.log(math.cos(self._angle(0.0))))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
  """The straight path of flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023):
  x_t = (1 - t) x0 + t eps, so alpha(t) = 1 - t and sigma(t) = t, and d x_t / dt = eps - x0.

  Not variance preserving (alpha² + sigma² < 1 inside (0, 1)); the samplers and the loss use
  alpha(t), sigma(t) and their derivatives only, so it is one more member of the family. log-SNR
  is infinite at both ends: training draws t in [t_min, 1] and samplers run from t_max to t_min
  (or to 0, for methods that never call the network there).
  """
  t_min: float = 1e-3
  t_max: float = 0.999

  def mean_coef(self, t):
    return 1.0 - t

  def std(self, t):
    return jnp.asarray(t) * 1.0

  def log_snr(self, t):
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))


ContinuousSchedule = Union[VPLinear, VPCosine, RectifiedFlow]
Schedule = Union[DiscreteSchedule, VPLinear, VPCosine, RectifiedFlow]


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> VPLinear:
  if not 0 <= beta_min <= beta_max or beta_max <= 0:
    raise InputError(f'vp_linear needs 0 <= beta_min <= beta_max and beta_max > 0, got '
                     f'beta_min={beta_min}, beta_max={beta_max}')
  return VPLinear(beta_min=beta_min, beta_max=beta_max, t_min=t_min)


def vp_cosine(s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.999) -> VPCosine:
  if s < 0 or not 0 < t_max < 1:
    raise InputError(f'vp_cosine needs s >= 0 and 0 < t_max < 1, got s={s}, t_max={t_max}')
  return VPCosine(s=s, t_min=t_min, t_max=t_max)


def rectified_flow(t_min: float = 1e-3, t_max: float = 0.999) -> RectifiedFlow:
  if not 0 < t_min < t_max < 1:
    raise InputError(f'rectified_flow needs 0 < t_min < t_max < 1, got t_min={t_min}, '
                     f't_max={t_max}')
  return RectifiedFlow(t_min=t_min, t_max=t_max)


SCHEDULE_NAMES = ('linear', 'cosine', 'vp_linear', 'vp_cosine', 'rectified_flow')


def get_schedule(name: str, **kwargs) -> Schedule:
  """Looks a schedule up by name: one of SCHEDULE_NAMES, with that function's keyword arguments."""
  builders = dict(linear=linear, cosine=cosine, vp_linear=vp_linear, vp_cosine=vp_cosine,
                  rectified_flow=rectified_flow)
  if name not in builders:
    raise InputError(f'unknown schedule {name!r}; choose one of {", ".join(SCHEDULE_NAMES)}')
  return builders[name](**kwargs)


def is_continuous(schedule: Schedule) -> bool:
  return isinstance(schedule, (VPLinear, VPCosine, RectifiedFlow))


def is_variance_preserving(schedule: Schedule) -> bool:
  """alpha(t)² + sigma(t)² = 1 at every t (all but the flow path)."""
  return not isinstance(schedule, RectifiedFlow)
