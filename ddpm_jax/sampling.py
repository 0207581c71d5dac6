"""Reverse-process samplers, each one ``jax.lax.scan`` over its steps.

Model-agnostic: ``model_fn(x_t, t)`` returns the network output under ``prediction`` (eps, x0
or v) for x_t [B, ...] and t [B] (integer timesteps for discrete schedules, floats in [0, 1]
for continuous ones). Works with any network or with an analytic denoiser. No Flax, no config.

Methods and their network calls (NFE):
  ddpm            discrete; ancestral sampling over all T steps; NFE = T.
  ddim            num_steps strided steps (Song et al. 2021), eta in [0, 1]; NFE = num_steps.
  dpm_solver++    multistep second-order DPM-Solver++(2M) (Lu et al. 2022), steps uniform in
                  log-SNR; NFE = num_steps.
  dpm_solver++3m  the third-order multistep variant, DPM-Solver++(3M); NFE = num_steps.
  heun            EDM's second-order sampler (Karras et al. 2022) on the probability-flow ODE,
                  Karras-spaced noise levels, the last step Euler; NFE = 2 num_steps - 1.
  euler           continuous; Euler's method on the probability-flow ODE dx/dt = alpha'(t) x0 +
                  sigma'(t) eps (the flow's ODE on rectified_flow), to t = 0; NFE = num_steps.
  adaptive        continuous; the same ODE solved by diffrax (``solver``: Bosh3 by default,
                  Tsit5, Dopri5 or Heun; PID step-size control at ``rtol``/``atol``), then one
                  denoising call at t_min; NFE as it took.
  euler_maruyama  continuous; the reverse SDE, last step without noise; NFE = num_steps.
  ode             continuous; Heun's method on the probability-flow ODE in (x, t), steps
                  uniform in t; NFE = 2 num_steps.

Every method is written in alpha(t), sigma(t) (and their time derivatives) of x_t = alpha x0 +
sigma eps, so the variance-preserving schedules and the flow path are one family.

Every method that takes a step list takes ``spacing`` (METHOD_SPACINGS; 'karras' with ``rho``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import diffrax
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import schedules as schedules_lib
from ddpm_jax.errors import InputError

METHODS = ('ddpm', 'ddim', 'dpm_solver++', 'dpm_solver++3m', 'heun', 'euler', 'adaptive',
           'euler_maruyama', 'ode')
MULTISTEP_ORDER = {'dpm_solver++': 2, 'dpm_solver++3m': 3}
DISCRETE_ONLY = ('ddpm',)
# These integrate in continuous time (d alpha / dt): a discrete schedule has no such view here.
CONTINUOUS_ONLY = ('euler', 'adaptive', 'euler_maruyama', 'ode')
# The adaptive solve's diffrax solvers: (the solver, network calls per step tried, calls before
# the first step). The FSAL ones (first stage the same as the last of the step before) make one
# call fewer than their stages a step, and one at the start for the first. A low order takes
# fewer calls at a sampler's tolerances: on the digits flow run at
# rtol = atol = 1e-3, Bosh3 (order 3) took 53 calls to Tsit5's 116 for the same quality
# (docs/sampling.md), hence the default.
ADAPTIVE_SOLVERS = {'bosh3': (diffrax.Bosh3, 3, 1), 'tsit5': (diffrax.Tsit5, 6, 1),
                    'dopri5': (diffrax.Dopri5, 6, 1), 'heun': (diffrax.Heun, 2, 0)}
ADAPTIVE_DEFAULTS = dict(rtol=1e-3, atol=1e-3, solver='bosh3')
ADAPTIVE_MAX_STEPS = 1000
# How each method may space its steps, its default first: uniform / quadratic in t, uniform in
# log-SNR, or Karras et al.'s (2022) sigma_i = (smax^1/rho + i/(N-1) (smin^1/rho - smax^1/rho))^rho
# in the noise level sigma = sigma_t / alpha_t; or 'trailing': t_i = i/N of the way, i = N..1,
# so the N-step list is every other point of the 2N-step one (what progressive distillation
# halves; diffusers' timestep_spacing='trailing').
METHOD_SPACINGS = {'ddpm': ('uniform',),
                   'ddim': ('uniform', 'quadratic', 'karras', 'trailing'),
                   'dpm_solver++': ('logsnr', 'karras'), 'dpm_solver++3m': ('logsnr', 'karras'),
                   'heun': ('karras', 'logsnr', 'uniform'),
                   'euler': ('trailing', 'karras', 'logsnr'), 'adaptive': ('uniform',),
                   'euler_maruyama': ('uniform',), 'ode': ('uniform',)}
SPACINGS = ('uniform', 'quadratic', 'logsnr', 'karras', 'trailing')
DEFAULT_RHO = 7.0

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _identity(value):
  return value


class Plan(NamedTuple):
  """A sampler: ``step(carry, xs_i) -> (carry, (x_t, x0_pred))`` scanned over ``xs``, starting
  from ``init(x_T)``; ``final(carry)`` is x_0. Multistep solvers carry more than x."""
  step: Callable
  xs: dict
  nfe: int
  init: Callable = _identity
  final: Callable = _identity


def check_method(method: str, schedule, num_steps: Optional[int]) -> int:
  """Validates a method for a schedule; returns the number of steps it will take."""
  if method not in METHODS:
    raise InputError(f'unknown sampling method {method!r}; choose one of {", ".join(METHODS)}')
  continuous = schedules_lib.is_continuous(schedule)
  if continuous and method in DISCRETE_ONLY:
    raise InputError(f'{method!r} needs a discrete schedule; with a continuous one use one of '
                     f'{", ".join(m for m in METHODS if m not in DISCRETE_ONLY)}')
  if not continuous and method in CONTINUOUS_ONLY:
    raise InputError(f'{method!r} integrates in continuous time and needs a continuous schedule '
                     f'(vp_linear, vp_cosine, rectified_flow); with a discrete one use one of '
                     f'{", ".join(m for m in METHODS if m not in CONTINUOUS_ONLY)}')
  if method == 'ddpm':
    if num_steps not in (None, schedule.num_timesteps):
      raise InputError(f'ddpm always takes all T = {schedule.num_timesteps} steps; got '
                       f'num_steps={num_steps} (use ddim or dpm_solver++ for fewer)')
    return schedule.num_timesteps
  if method == 'adaptive':  # the solver chooses its steps
    if num_steps is not None:
      raise InputError(f'the adaptive solve chooses its own steps; drop num_steps={num_steps} '
                       f'(set rtol and atol instead)')
    return 1
  if num_steps is None:
    raise InputError(f'{method} needs num_steps')
  if int(num_steps) != num_steps or num_steps < 1:
    raise InputError(f'num_steps must be a positive integer, got {num_steps!r}')
  # The dpm_solver++ methods also evaluate the schedule at the end of their last step: N + 1
  # distinct times.
  most = None if continuous else schedule.num_timesteps - (method in MULTISTEP_ORDER)
  if most is not None and num_steps > most:
    raise InputError(f'num_steps={num_steps} is larger than {method} can take on the schedule\'s '
                     f'T = {schedule.num_timesteps} steps; choose 1..{most}')
  return int(num_steps)


def check_spacing(method: str, spacing: Optional[str], rho: float = DEFAULT_RHO) -> str:
  """The spacing ``method`` will use: ``spacing``, or the method's default for None / ''; a
  spacing the method does not take is one line naming those it does."""
  accepted = METHOD_SPACINGS[method]
  if not spacing:
    return accepted[0]
  if spacing not in accepted:
    raise InputError(f'{method} does not take spacing={spacing!r}; it takes '
                     f'{", ".join(accepted)}')
  if spacing == 'karras' and not rho > 0:
    raise InputError(f'the karras spacing needs rho > 0, got {rho}')
  return spacing


def _strictly_decreasing_ints(values, num_timesteps: int) -> np.ndarray:
  """Rounds descending times to distinct integers in [0, T) (a too-close pair is pushed apart)."""
  if len(values) > num_timesteps:  # would push a time below 0, which indexes from the end
    raise InputError(f'{len(values)} distinct timesteps do not fit in T = {num_timesteps}')
  ints = np.clip(np.round(values).astype(np.int64), 0, num_timesteps - 1)
  ints = np.sort(ints)
  for i in range(1, len(ints)):  # push duplicates up...
    ints[i] = max(ints[i], ints[i - 1] + 1)
  overflow = ints[-1] - (num_timesteps - 1)
  if overflow > 0:  # ...and, near T, back down
    ints[-1] = num_timesteps - 1
    for i in range(len(ints) - 2, -1, -1):
      ints[i] = min(ints[i], ints[i + 1] - 1)
  return ints[::-1].copy()


def timesteps(schedule, num_points: int, spacing: str = 'uniform',
              rho: float = DEFAULT_RHO) -> np.ndarray:
  """``num_points`` times from the noisiest to the cleanest, descending, in ``spacing``.

  Discrete: distinct integers from T-1 down to 0 (Karras and log-SNR spacings are mapped to the
  nearest distinct timesteps, as diffusers' use_karras_sigmas does). Continuous: floats from
  t_max down to t_min.
  """
  if spacing not in SPACINGS:
    raise InputError(f'unknown spacing {spacing!r}; choose one of {", ".join(SPACINGS)}')
  if spacing in ('logsnr', 'karras'):
    table = _log_snr_table(schedule)
    lam_max, lam_min = table[1][0], table[1][-1]  # at t = 0 (t_min) and T - 1 (t_max)
    if spacing == 'logsnr':  # descending times: ascending log-SNR
      lam = np.linspace(lam_min, lam_max, num_points) if num_points > 1 else np.full(1, lam_min)
    else:  # sigma = exp(-lam / 2), spaced in sigma^(1 / rho)
      unit = np.linspace(0.0, 1.0, num_points) if num_points > 1 else np.zeros(1)
      s_max, s_min = np.exp(-lam_min / 2), np.exp(-lam_max / 2)
      sigma = (s_max ** (1 / rho) + unit * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
      lam = -2.0 * np.log(sigma)
    return _times_at_log_snr(schedule, table, lam)
  if spacing == 'trailing':
    return trailing_timesteps(schedule, num_points)
  unit = np.linspace(1.0, 0.0, num_points) if num_points > 1 else np.ones(1)
  if spacing == 'quadratic':
    unit = unit ** 2
  if schedules_lib.is_continuous(schedule):
    return (schedule.t_min + unit * (schedule.t_max - schedule.t_min)).astype(np.float32)
  return _strictly_decreasing_ints((schedule.num_timesteps - 1) * unit, schedule.num_timesteps)


def trailing_timesteps(schedule, num_steps: int) -> np.ndarray:
  """The times i/N of the way from clean to t_max, i = N..1 (descending): discrete
  T i // N - 1, continuous t_max i / N (at least t_min). Nested: the N-step list is the 2N-step one's even
  entries, so two teacher steps span exactly one student step."""
  fractions = np.arange(num_steps, 0, -1)
  if schedules_lib.is_continuous(schedule):
    return np.maximum(schedule.t_max * fractions / num_steps, schedule.t_min).astype(np.float32)
  if num_steps > schedule.num_timesteps:
    raise InputError(f'{num_steps} trailing timesteps do not fit in T = {schedule.num_timesteps}')
  return (schedule.num_timesteps * fractions // num_steps - 1).astype(np.int64)


def log_snr_timesteps(schedule, num_steps: int) -> np.ndarray:
  """num_steps + 1 times from the noisiest to the cleanest, uniform in log-SNR, descending."""
  return timesteps(schedule, num_steps + 1, 'logsnr')


def _log_snr_table(schedule):
  """(times ascending, their log-SNR, decreasing) on a dense grid, float64."""
  if schedules_lib.is_continuous(schedule):
    dense = np.linspace(schedule.t_min, schedule.t_max, 20001)
    with jax.ensure_compile_time_eval():
      lam = np.asarray(schedule.log_snr(jnp.asarray(dense)), np.float64)
    return dense, lam
  with jax.ensure_compile_time_eval():
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
  return np.arange(len(abar), dtype=np.float64), np.log(abar) - np.log1p(-abar)


def _times_at_log_snr(schedule, table, lam_targets: np.ndarray) -> np.ndarray:
  """The times whose log-SNR are ``lam_targets`` (ascending log-SNR: descending times), read
  off ``table`` (``_log_snr_table``)."""
  times, lam = table
  t_float = np.interp(lam_targets, lam[::-1], times[::-1])  # lam decreases in t
  if schedules_lib.is_continuous(schedule):
    return t_float.astype(np.float32)
  return _strictly_decreasing_ints(t_float, schedule.num_timesteps)


def _time_at_or_above_noise(schedule, sigma: np.ndarray) -> np.ndarray:
  """For each noise level sigma (= sigma_t / alpha_t), the time with that level; on a discrete
  schedule the first timestep whose level is at least sigma (capped at T - 1)."""
  times, lam = _log_snr_table(schedule)
  lam_target = -2.0 * np.log(sigma)
  if schedules_lib.is_continuous(schedule):
    t = np.interp(lam_target, lam[::-1], times[::-1])
    return np.clip(t, schedule.t_min, schedule.t_max).astype(np.float32)
  index = np.searchsorted(-lam, -lam_target - 1e-12)  # -lam increases with t
  return np.minimum(index, schedule.num_timesteps - 1).astype(np.int64)


def grid_alpha_sigma(schedule, t: np.ndarray):
  """(alpha, sigma) float32 numpy arrays at a fixed grid of times ``t``."""
  # The grid is fixed before sampling starts: evaluate it now even inside a caller's jit.
  with jax.ensure_compile_time_eval():
    alpha, sigma = diffusion.alpha_sigma(schedule, jnp.asarray(t))
  return np.asarray(alpha, np.float32), np.asarray(sigma, np.float32)


def denoise(model_fn, x, t, alpha, sigma, prediction: str, clip_x0: bool):
  """Calls the network once at time t (a scalar, or [B]) and returns (x0, eps); alpha and
  sigma broadcast to x.

  With clip_x0, x0 is clipped to [-1, 1] and eps recomputed from it, as guided-diffusion does.
  """
  out = model_fn(x, jnp.broadcast_to(t, (x.shape[0],))).astype(x.dtype)
  x0, eps = diffusion.split_prediction(out, x, alpha, sigma, prediction)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - alpha * x0) / sigma
  return x0, eps


def _ddpm_plan(model_fn, schedule, key, prediction, clip_x0, variance):
  num_timesteps = schedule.num_timesteps
  log_variance = diffusion.reverse_log_variance(schedule, variance)

  def step(x, xs):
    t = xs['t']
    x0, _ = denoise(model_fn, x, t, schedule.sqrt_alphas_cumprod[t],
                     schedule.sqrt_one_minus_alphas_cumprod[t], prediction, clip_x0)
    mean = schedule.posterior_mean_coef1[t] * x0 + schedule.posterior_mean_coef2[t] * x
    noise = jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype)
    x = mean + jnp.where(t > 0, jnp.exp(0.5 * log_variance[t]), 0.0) * noise
    return x, (x, x0)

  t = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
  # Where each step lands (t - 1; clean data after t = 0), for replacement conditioning.
  alpha_next = jnp.append(schedule.sqrt_alphas_cumprod[:-1][::-1], 1.0)
  sigma_next = jnp.append(schedule.sqrt_one_minus_alphas_cumprod[:-1][::-1], 0.0)
  return Plan(step, {'t': t, 'alpha_next': alpha_next, 'sigma_next': sigma_next}, num_timesteps)


def _ddim_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, eta, spacing, rho):
  ts = timesteps(schedule, num_steps, spacing, rho)
  alpha, sigma = grid_alpha_sigma(schedule, ts)
  # After the last call the chain lands on clean data: abar = 1.
  alpha_next = np.append(alpha[1:], 1.0).astype(np.float32)
  sigma_next = np.append(sigma[1:], 0.0).astype(np.float32)

  def step(x, xs):
    x0, eps = denoise(model_fn, x, xs['t'], xs['alpha'], xs['sigma'], prediction, clip_x0)
    # sigma_eta² = eta² sigma_next² (1 - SNR / SNR_next): DDIM's eq. 16 on any path (on a VP
    # one, eta² (1 - abar_next)/(1 - abar) (1 - abar/abar_next)).
    ratio = (xs['alpha'] * xs['sigma_next'] / (xs['alpha_next'] * xs['sigma'])) ** 2
    noise_std = eta * xs['sigma_next'] * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0))
    direction = jnp.sqrt(jnp.maximum(xs['sigma_next'] ** 2 - noise_std ** 2, 0.0))
    noise = jax.random.normal(jax.random.fold_in(key, xs['i']), x.shape, x.dtype)
    x = xs['alpha_next'] * x0 + direction * eps + noise_std * noise
    return x, (x, x0)

  xs = dict(i=jnp.arange(num_steps), t=jnp.asarray(ts), alpha=jnp.asarray(alpha),
            sigma=jnp.asarray(sigma), alpha_next=jnp.asarray(alpha_next),
            sigma_next=jnp.asarray(sigma_next))
  return Plan(step, xs, num_steps)


def _dpm_solver_plan(model_fn, schedule, num_steps, prediction, clip_x0, order: int,
                     spacing: str = 'logsnr', rho: float = DEFAULT_RHO):
  """DPM-Solver++ multistep of ``order`` 2 or 3 on steps uniform in log-SNR (lambda).

  The exact update from lambda to lambda + h integrates the data prediction f(lambda):
    x_next = sigma_next / sigma x + alpha_next int_0^h e^(u - h) f(lambda + u) du.
  2M (Lu et al. 2022, Alg. 2) uses the previous prediction; 3M fits the parabola through the
  last three predictions (Newton divided differences, any spacing) and integrates it exactly.
  The first steps have fewer predictions and are of lower order.
  """
  ts = timesteps(schedule, num_steps + 1, spacing, rho)  # [N + 1]
  alpha, sigma = grid_alpha_sigma(schedule, ts)
  lam = np.log(alpha.astype(np.float64)) - np.log(sigma.astype(np.float64))
  h = np.diff(lam)  # [N], h_i = lambda_{i+1} - lambda_i > 0
  h_prev = np.append(h[0], h[:-1])  # lambda_i - lambda_{i-1}; unused at the first step
  h_prev2 = np.append(h_prev[0], h_prev[:-1])  # lambda_{i-1} - lambda_{i-2}
  # int_0^h e^(u - h) u^k du for k = 0, 1, 2 (float64 here: they cancel badly for small h).
  phi0 = -np.expm1(-h)
  phi1 = h - phi0
  phi2 = h ** 2 - 2 * phi1

  # The first steps lack earlier predictions. (Lowering the order of the last steps below 15
  # steps, as DPM-Solver can, made sampler_accuracy.py's 10-call errors larger, not smaller.)
  step_order = np.minimum(np.arange(1, num_steps + 1), order)

  def step(carry, xs):
    x, x0_prev, x0_prev2 = carry
    x0, _ = denoise(model_fn, x, xs['t'], xs['alpha'], xs['sigma'], prediction, clip_x0)
    if order == 2:
      half_inv_r = 0.5 * xs['h'] / xs['h_prev']
      d = jnp.where(xs['order'] == 1, x0, (1 + half_inv_r) * x0 - half_inv_r * x0_prev)
      integral = xs['phi0'] * d
    else:
      slope = (x0 - x0_prev) / xs['h_prev']  # divided differences of f in lambda
      curvature = (slope - (x0_prev - x0_prev2) / xs['h_prev2']) / (xs['h_prev'] + xs['h_prev2'])
      curvature = jnp.where(xs['order'] == 3, curvature, 0.0)
      # f(lambda + u) ~ x0 + (slope + h_prev curvature) u + curvature u^2
      first = jnp.where(xs['order'] >= 2, slope + xs['h_prev'] * curvature, 0.0)
      integral = xs['phi0'] * x0 + xs['phi1'] * first + xs['phi2'] * curvature
    x = xs['sigma_next'] / xs['sigma'] * x + xs['alpha_next'] * integral
    return (x, x0, x0_prev), (x, x0)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xs = dict(order=jnp.asarray(step_order), t=jnp.asarray(ts[:-1]), alpha=f32(alpha[:-1]),
            sigma=f32(sigma[:-1]), alpha_next=f32(alpha[1:]), sigma_next=f32(sigma[1:]),
            h=f32(h), h_prev=f32(h_prev), h_prev2=f32(h_prev2), phi0=f32(phi0),
            phi1=f32(phi1), phi2=f32(phi2))
  # The carry holds the two previous data predictions beside x.
  return Plan(step, xs, num_steps, init=lambda x: (x, jnp.zeros_like(x), jnp.zeros_like(x)),
              final=lambda carry: carry[0])


def ode_velocity(model_fn, schedule, x, t, prediction: str, clip_x0: bool):
  """The probability-flow ODE's dx/dt = alpha'(t) x0 + sigma'(t) eps at x [B, ...] and a scalar
  t (E[d x_t / dt | x_t] on any path; on VP schedules -1/2 beta (x + score)), with the
  denoiser's (x0, eps): one network call."""
  alpha, sigma = diffusion.alpha_sigma(schedule, t)
  d_alpha, d_sigma = diffusion.alpha_sigma_rates(schedule, t)
  x0, eps = denoise(model_fn, x, t, alpha, sigma, prediction, clip_x0)
  return d_alpha * x0 + d_sigma * eps, x0, eps


def _sde_plan(model_fn, schedule, key, num_steps, prediction, method):
  """euler_maruyama on the reverse SDE, or ode: Heun on the probability-flow ODE in (x, t);
  steps uniform in t.

  The forward SDE of x_t = alpha x0 + sigma eps has drift f x with f = alpha'/alpha and
  diffusion g² = 2 sigma (sigma' - f sigma) (VP: f = -beta/2, g² = beta); the reverse SDE's
  drift is the ODE's velocity less g²/2 times the score (= -eps / sigma).
  """
  grid = np.linspace(schedule.t_max, schedule.t_min, num_steps + 1).astype(np.float32)
  t, t_next = grid[:-1], grid[1:]

  def diffusion_sq(t):
    alpha, sigma = diffusion.alpha_sigma(schedule, t)
    d_alpha, d_sigma = diffusion.alpha_sigma_rates(schedule, t)
    return 2.0 * sigma * (d_sigma - d_alpha / alpha * sigma), sigma

  def drift(x, t):
    velocity, x0, eps = ode_velocity(model_fn, schedule, x, t, prediction, clip_x0=False)
    if method == 'euler_maruyama':
      g_sq, sigma = diffusion_sq(t)
      return velocity + 0.5 * g_sq * eps / sigma, x0
    return velocity, x0

  def step(x, xs):
    dt = xs['t_next'] - xs['t']  # negative: time runs backwards
    d, x0 = drift(x, xs['t'])
    if method == 'euler_maruyama':
      noise = jax.random.normal(jax.random.fold_in(key, xs['i']), x.shape, x.dtype)
      noise_std = jnp.where(xs['last'], 0.0, jnp.sqrt(diffusion_sq(xs['t'])[0] * -dt))
      x = x + d * dt + noise_std * noise
    else:  # Heun: average the slopes at both ends of the step
      x_euler = x + d * dt
      d_next, _ = drift(x_euler, xs['t_next'])
      x = x + 0.5 * (d + d_next) * dt
    return x, (x, x0)

  alpha_next, sigma_next = grid_alpha_sigma(schedule, t_next)  # where each step lands
  xs = dict(i=jnp.arange(num_steps), t=jnp.asarray(t), t_next=jnp.asarray(t_next),
            last=jnp.arange(num_steps) == num_steps - 1, alpha_next=jnp.asarray(alpha_next),
            sigma_next=jnp.asarray(sigma_next))
  return Plan(step, xs, num_steps * (2 if method == 'ode' else 1))


def _euler_plan(model_fn, schedule, num_steps, prediction, clip_x0, spacing, rho):
  """Euler's method on the probability-flow ODE (ode_velocity) from t_max to t = 0 through the
  ``num_steps`` times of ``spacing`` ('trailing': uniform in t); the network is never called
  at t = 0, where every path is clean data (alpha = 1, sigma = 0)."""
  ts = timesteps(schedule, num_steps, spacing, rho)  # [N], descending, > 0
  t_next = np.append(ts[1:], 0.0).astype(np.float32)
  alpha_next, sigma_next = grid_alpha_sigma(schedule, t_next)

  def step(x, xs):
    velocity, x0, _ = ode_velocity(model_fn, schedule, x, xs['t'], prediction, clip_x0)
    x = x + (xs['t_next'] - xs['t']) * velocity
    return x, (x, x0)

  xs = dict(t=jnp.asarray(ts), t_next=jnp.asarray(t_next), alpha_next=jnp.asarray(alpha_next),
            sigma_next=jnp.asarray(sigma_next))
  return Plan(step, xs, num_steps)


def _max_rms_norm(y):
  """The controller's error norm: each example's RMS, the worst example's (so one shared step
  size meets the tolerance for every example of the batch)."""
  return jnp.max(jnp.sqrt(jnp.mean(jnp.square(y).reshape(y.shape[0], -1), axis=1)))


def adaptive_sample(model_fn: ModelFn, schedule, x_T, *, prediction: str = 'eps',
                    clip_x0: bool = True, rtol: float = ADAPTIVE_DEFAULTS['rtol'],
                    atol: float = ADAPTIVE_DEFAULTS['atol'],
                    solver: str = ADAPTIVE_DEFAULTS['solver']):
  """The probability-flow ODE (ode_velocity) from x_T [B, ...] at t_max to t_min, solved by
  diffrax's ``solver`` (ADAPTIVE_SOLVERS) with a PID step-size controller at ``rtol``/``atol``
  (every example held to them: _max_rms_norm), then x0 predicted at t_min (score_sde's final
  denoising step).

  Jit-able; one solve for the whole batch. Returns (x0 [B, ...], network calls it took: int32
  scalar).
  """
  check_tolerances(rtol, atol)
  check_solver(solver)
  model_fn, prediction = as_v_prediction(model_fn, schedule, prediction)

  def vector_field(t, x, args):
    return ode_velocity(model_fn, schedule, x, t, prediction, clip_x0)[0]

  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), ADAPTIVE_SOLVERS[solver][0](), t0=schedule.t_max,
      t1=schedule.t_min, dt0=None, y0=x_T, saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=_max_rms_norm),
      max_steps=ADAPTIVE_MAX_STEPS)
  x = solution.ys[0]
  alpha, sigma = diffusion.alpha_sigma(schedule, jnp.float32(schedule.t_min))
  x0, _ = denoise(model_fn, x, jnp.float32(schedule.t_min), alpha, sigma, prediction, clip_x0)
  return x0, adaptive_calls(solution.stats, solver) + 1


def adaptive_calls(stats, solver: str) -> jax.Array:
  """Network calls of a diffrax solve by ``solver`` from its step counts (ADAPTIVE_SOLVERS;
  counted against the calls themselves in tests/test_flow.py)."""
  _, per_step, at_start = ADAPTIVE_SOLVERS[solver]
  return per_step * stats['num_steps'] + at_start


def check_solver(solver: str) -> None:
  """One line unless ``solver`` names one of ADAPTIVE_SOLVERS."""
  if solver not in ADAPTIVE_SOLVERS:
    raise InputError(f'unknown adaptive solver {solver!r}; choose one of '
                     f'{", ".join(ADAPTIVE_SOLVERS)}')


def check_tolerances(rtol, atol, solve: str = 'the adaptive solve') -> None:
  """One line unless both tolerances of an ODE solve (``solve`` names it) are positive."""
  if not (rtol > 0 and atol > 0):
    raise InputError(f'{solve} needs rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}')


class Churn(NamedTuple):
  """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): before each step whose noise
  level lies in [s_tmin, s_tmax], noise is added to raise it by gamma = min(s_churn / N,
  sqrt(2) - 1), with standard deviation s_noise. s_churn = 0 is the deterministic Algorithm 1."""
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = float('inf')
  s_noise: float = 1.0


def _heun_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, spacing, rho,
               churn: Churn):
  """EDM's Heun sampler (Karras et al. 2022, Algorithm 1; with ``churn``, Algorithm 2) on the
  probability-flow ODE written in the noise level s = sigma_t / alpha_t and y = x / alpha_t,
  where it reads dy/ds = (y - x0(y, s)) / s: second-order steps between the ``num_steps`` levels
  of ``spacing``, then an Euler step from the last one to s = 0 (clean data). 2N - 1 calls.

  The carry stays x in the schedule's own (variance-preserving) scale, so conditioning by
  replacement works as for the other samplers.
  """
  ts = timesteps(schedule, num_steps, spacing, rho)  # [N], descending
  alpha, sigma = (a.astype(np.float64) for a in grid_alpha_sigma(schedule, ts))
  level = sigma / alpha
  gamma = np.where((level >= churn.s_tmin) & (level <= churn.s_tmax),
                   min(churn.s_churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)
  # The raised level must be one the network was trained at: on a discrete schedule, the first
  # timestep at or above it.
  churned = bool((gamma > 0).any())
  t_hat = np.where(gamma > 0, _time_at_or_above_noise(schedule, level * (1.0 + gamma)), ts) \
      if churned else ts
  alpha_hat, sigma_hat = (a.astype(np.float64) for a in grid_alpha_sigma(schedule, t_hat))
  level_hat = sigma_hat / alpha_hat
  t_next = np.append(ts[1:], ts[-1])
  alpha_next = np.append(alpha[1:], 1.0)
  sigma_next = np.append(sigma[1:], 0.0)
  level_next = sigma_next / alpha_next

  def x0_at(y, t, alpha_t, sigma_t):
    return denoise(model_fn, alpha_t * y, t, alpha_t, sigma_t, prediction, clip_x0)[0]

  def step(x, xs):
    y = x / xs['alpha']
    if churned:  # Algorithm 2: raise the level to s_hat with fresh noise
      noise = jax.random.normal(jax.random.fold_in(key, xs['i']), x.shape, x.dtype)
      y = y + xs['churn_std'] * noise
    x0 = x0_at(y, xs['t_hat'], xs['alpha_hat'], xs['sigma_hat'])
    slope = (y - x0) / xs['level_hat']
    y_euler = y + (xs['level_next'] - xs['level_hat']) * slope

    def heun(_):
      x0_next = x0_at(y_euler, xs['t_next'], xs['alpha_next'], xs['sigma_next'])
      slope_next = (y_euler - x0_next) / xs['level_next']
      return y + (xs['level_next'] - xs['level_hat']) * 0.5 * (slope + slope_next)

    y = jax.lax.cond(xs['last'], lambda _: y_euler, heun, None)  # the last step: Euler, to s = 0
    x = xs['alpha_next'] * y
    return x, (x, x0)

  f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
  churn_std = level * np.sqrt(np.maximum((level_hat / level) ** 2 - 1.0, 0.0)) * churn.s_noise
  xs = dict(i=jnp.arange(num_steps), t=jnp.asarray(ts), alpha=f32(alpha), t_hat=jnp.asarray(t_hat),
            alpha_hat=f32(alpha_hat), sigma_hat=f32(sigma_hat), level_hat=f32(level_hat),
            churn_std=f32(churn_std), t_next=jnp.asarray(t_next), alpha_next=f32(alpha_next),
            sigma_next=f32(sigma_next), level_next=f32(np.maximum(level_next, 1e-30)),
            last=jnp.arange(num_steps) == num_steps - 1)
  return Plan(step, xs, 2 * num_steps - 1)


_REPLACE_INDEX = 'replace_index'


def _replacing(plan: Plan, replace, key) -> Plan:
  """The plan with the observed entries of x put back after every step, noised to the level the
  step lands on: x = mask * (alpha_next observed + sigma_next z) + (1 - mask) x (RePaint's
  replacement, without its resampling). For an unconditional model it is the conditioning, made
  without training (the hidden part is only approximately from the conditional law); for a
  network that takes the observations it keeps x_t at observed entries as training drew it.
  ``replace``: (observed, mask), each shaped like x, in model space."""
  observed, mask = replace

  def step(carry, xs):
    xs = dict(xs)
    index = xs.pop(_REPLACE_INDEX)  # the step's number: one noise key per step, never reused
    carry, (_, x0) = plan.step(carry, xs)
    x = carry[0] if isinstance(carry, tuple) else carry
    noise = jax.random.normal(jax.random.fold_in(key, index), x.shape, x.dtype)
    x = jnp.where(mask > 0, xs['alpha_next'] * observed + xs['sigma_next'] * noise, x)
    return ((x,) + tuple(carry[1:]) if isinstance(carry, tuple) else x), (x, x0)

  xs = {**plan.xs, _REPLACE_INDEX: jnp.arange(num_plan_steps(plan), dtype=jnp.int32)}
  return plan._replace(step=step, xs=xs)


def as_v_prediction(model_fn: ModelFn, schedule, prediction: str):
  """(model_fn, prediction) for the samplers: a velocity network is read as a v network (v =
  alpha eps - sigma x0 splits into x0 and eps dividing by alpha² + sigma² >= 1/2 on every path,
  where the velocity's eps would divide by alpha near the noise end). Others pass through."""
  if prediction != 'velocity':
    return model_fn, prediction
  return (lambda x, t: diffusion.convert_prediction(schedule, x, t, model_fn(x, t),
                                                    source='velocity', target='v')), 'v'


def make_plan(model_fn: ModelFn, schedule, key, *, method: str, num_steps: Optional[int] = None,
              eta: float = 0.0, prediction: str = 'eps', clip_x0: bool = True,
              variance: str = 'small', spacing: Optional[str] = None, rho: float = DEFAULT_RHO,
              churn: Churn = Churn(), replace=None) -> Plan:
  """The steps of a sampler, for ``sample`` to scan (or a caller to scan in chunks).

  ``spacing`` None takes the method's default (METHOD_SPACINGS); ``rho`` is Karras's; ``churn``
  applies to heun. ``replace=(observed, mask)`` conditions on observed entries by replacement
  (``_replacing``).
  """
  if replace is not None:
    plan = make_plan(model_fn, schedule, key, method=method, num_steps=num_steps, eta=eta,
                     prediction=prediction, clip_x0=clip_x0, variance=variance, spacing=spacing,
                     rho=rho, churn=churn)
    return _replacing(plan, replace, jax.random.fold_in(key, 0x5EED))
  diffusion.check_prediction(prediction, ('eps', 'x0', 'v', 'velocity'))
  num_steps = check_method(method, schedule, num_steps)
  if method == 'adaptive':
    raise InputError('the adaptive solve chooses its own steps: call sampling.sample or '
                     'adaptive_sample, not make_plan (nor with observed values to condition on)')
  model_fn, prediction = as_v_prediction(model_fn, schedule, prediction)
  spacing = check_spacing(method, spacing, rho)
  if not 0.0 <= eta <= 1.0:
    raise InputError(f'eta must lie in [0, 1], got {eta}')
  if churn != Churn() and method != 'heun':
    raise InputError(f'churn (s_churn, s_tmin, s_tmax, s_noise) is heun\'s; {method} takes none')
  if not (churn.s_churn >= 0 and churn.s_noise >= 0 and churn.s_tmin <= churn.s_tmax):
    raise InputError(f'churn needs s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got {churn}')
  if method == 'ddpm':
    return _ddpm_plan(model_fn, schedule, key, prediction, clip_x0, variance)
  if method == 'ddim':
    return _ddim_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, eta, spacing, rho)
  if method in MULTISTEP_ORDER:
    return _dpm_solver_plan(model_fn, schedule, num_steps, prediction, clip_x0,
                            MULTISTEP_ORDER[method], spacing, rho)
  if method == 'heun':
    return _heun_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, spacing, rho,
                      churn)
  if method == 'euler':
    return _euler_plan(model_fn, schedule, num_steps, prediction, clip_x0, spacing, rho)
  return _sde_plan(model_fn, schedule, key, num_steps, prediction, method)


def _plan(model_fn, schedule, key, method, num_steps, eta, prediction, clip_x0, variance, spacing,
          rho=DEFAULT_RHO, churn=Churn(), replace=None):
  """The plan for ``key`` (the step noise comes from its second half, as in ``sample``)."""
  _, step_key = jax.random.split(key)
  return make_plan(model_fn, schedule, step_key, method=method, num_steps=num_steps, eta=eta,
                   prediction=prediction, clip_x0=clip_x0, variance=variance, spacing=spacing,
                   rho=rho, churn=churn, replace=replace)


def network_calls(schedule, method: str, num_steps: Optional[int], spacing: Optional[str] = None,
                  rho: float = DEFAULT_RHO) -> int:
  """The network calls (NFE) of a fixed-step method: its plan's count."""
  return make_plan(lambda x, t: x, schedule, jax.random.key(0), method=method,
                   num_steps=num_steps, spacing=spacing, rho=rho).nfe


def num_plan_steps(plan: Plan) -> int:
  return next(iter(plan.xs.values())).shape[0]


def _plan_options(options: dict) -> dict:
  defaults = dict(num_steps=None, eta=0.0, prediction='eps', clip_x0=True, variance='small',
                  spacing=None, rho=DEFAULT_RHO, churn=Churn(), replace=None)
  unknown = set(options) - set(defaults) - {'method'}
  if unknown:
    raise TypeError(f'unknown sampling options {sorted(unknown)}')
  return {**defaults, **options}


def _start(plan: Plan, key, shape, x_T):
  if x_T is None:
    x_T = jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
  elif tuple(x_T.shape) != tuple(shape):
    raise InputError(f'x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}')
  return plan.init(x_T)


def _steps(plan: Plan, carry, start, length: int, return_trajectory: bool, progress):
  xs = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, length), plan.xs)

  def body(carry, xs_i):
    carry, out = plan.step(carry, xs_i[0])
    if progress is not None:
      jax.debug.callback(progress, xs_i[1])
    return carry, (out if return_trajectory else None)

  carry, trajectory = jax.lax.scan(body, carry, (xs, start + jnp.arange(length)))
  return (carry, trajectory) if return_trajectory else carry


def sample_start(model_fn: ModelFn, schedule, key, shape, *, x_T=None, **options):
  """The sampler's carry before its first step: x_T ~ N(0, I) of ``shape`` (or ``x_T``).

  With ``sample_steps`` and ``sample_finish`` this runs the reverse process in pieces, e.g. to
  report progress between jitted calls (no host callbacks, so the persistent compilation cache
  keeps them); the pieces give exactly what ``sample`` gives for the same key and options.
  """
  return _start(_plan(model_fn, schedule, key, **_plan_options(options)), key, shape, x_T)


def sample_steps(model_fn: ModelFn, schedule, key, carry, start, length: int, *,
                 return_trajectory: bool = False, progress=None, **options):
  """Steps ``start .. start + length`` of the reverse process (``start`` may be traced, so one
  compilation serves every piece of the same length). Returns the carry (and the trajectory
  of these steps with ``return_trajectory``)."""
  plan = _plan(model_fn, schedule, key, **_plan_options(options))
  return _steps(plan, carry, start, length, return_trajectory, progress)


def sample_finish(model_fn: ModelFn, schedule, key, carry, **options):
  """x_0 in model space from the carry after the last step."""
  return _plan(model_fn, schedule, key, **_plan_options(options)).final(carry)


def sample(model_fn: ModelFn, schedule, key, shape, *, method: str,
           num_steps: Optional[int] = None, eta: float = 0.0, prediction: str = 'eps',
           clip_x0: bool = True, x_T=None, variance: str = 'small',
           spacing: Optional[str] = None, rho: float = DEFAULT_RHO, churn: Churn = Churn(),
           return_trajectory: bool = False, progress: Optional[Callable[[int], None]] = None,
           replace=None, rtol: Optional[float] = None, atol: Optional[float] = None,
           solver: Optional[str] = None):
  """Runs the reverse process from x_T ~ N(0, I) of ``shape`` and returns x_0 in model space.

  ``x_T`` fixes the starting noise. ``return_trajectory`` also returns (x_t, predicted x0), each
  [num_steps, *shape], after every step. ``progress(i)`` is called from the device after step i
  (a host callback: for progress bars; a computation with one is never kept in JAX's persistent
  compilation cache). Jit-able; ``key`` draws x_T and all step noise. ``replace=(observed,
  mask)`` conditions on observed entries by replacement (see ``make_plan``). ``spacing`` (None:
  the method's default), ``rho`` and ``churn``: see METHOD_SPACINGS and make_plan. ``rtol``,
  ``atol`` and ``solver`` (None: ADAPTIVE_DEFAULTS) are the adaptive solve's (adaptive_sample).
  """
  if method == 'adaptive':
    x_T = check_adaptive(schedule, key, shape, x_T, num_steps, spacing, return_trajectory,
                         replace, progress)
    return adaptive_sample(model_fn, schedule, x_T, prediction=prediction, clip_x0=clip_x0,
                           **adaptive_settings(rtol, atol, solver))[0]
  check_no_adaptive_settings(method, rtol, atol, solver)
  plan = _plan(model_fn, schedule, key, method, num_steps, eta, prediction, clip_x0, variance,
               spacing, rho, churn, replace)  # one plan for all the steps
  result = _steps(plan, _start(plan, key, shape, x_T), 0, num_plan_steps(plan),
                  return_trajectory, progress)
  carry, trajectory = result if return_trajectory else (result, None)
  x = plan.final(carry)
  return (x, trajectory) if return_trajectory else x


def adaptive_settings(rtol: Optional[float], atol: Optional[float],
                      solver: Optional[str]) -> dict:
  """{'rtol', 'atol', 'solver'}: the given ones, ADAPTIVE_DEFAULTS for None; checked."""
  given = dict(rtol=rtol, atol=atol, solver=solver)
  settings = {name: ADAPTIVE_DEFAULTS[name] if value is None else value
              for name, value in given.items()}
  check_tolerances(settings['rtol'], settings['atol'])
  check_solver(settings['solver'])
  return settings


def check_no_adaptive_settings(method: str, rtol, atol, solver) -> None:
  """One line if a method other than the adaptive solve is given one of its settings."""
  if rtol is not None or atol is not None or solver is not None:
    raise InputError(f'rtol, atol and solver are the adaptive solve\'s; {method} takes none')


def check_adaptive(schedule, key, shape, x_T, num_steps, spacing, return_trajectory, replace,
                   progress):
  """x_T for the adaptive solve (drawn from the key's first half, as for the other methods),
  after one-line errors for what it does not take."""
  check_method('adaptive', schedule, num_steps)
  check_spacing('adaptive', spacing)
  if return_trajectory or replace is not None or progress is not None:
    raise InputError('the adaptive solve returns the final samples only: no trajectory, '
                     'progress or conditioning by replacement; use euler or heun for those')
  if x_T is None:
    return jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
  if tuple(x_T.shape) != tuple(shape):
    raise InputError(f'x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}')
  return x_T
