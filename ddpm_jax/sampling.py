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
  euler_maruyama  continuous; the reverse VP-SDE, last step without noise; NFE = num_steps.
  ode             continuous; the probability-flow ODE with Heun's method; NFE = 2 num_steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import schedules as schedules_lib
from ddpm_jax.errors import InputError

METHODS = ('ddpm', 'ddim', 'dpm_solver++', 'dpm_solver++3m', 'euler_maruyama', 'ode')
MULTISTEP_ORDER = {'dpm_solver++': 2, 'dpm_solver++3m': 3}
DISCRETE_ONLY = ('ddpm',)
CONTINUOUS_ONLY = ('euler_maruyama', 'ode')
SPACINGS = ('uniform', 'quadratic')

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
    raise InputError(f'{method!r} needs a continuous (vp_*) schedule; with a discrete one use one '
                     f'of {", ".join(m for m in METHODS if m not in CONTINUOUS_ONLY)}')
  if method == 'ddpm':
    if num_steps not in (None, schedule.num_timesteps):
      raise InputError(f'ddpm always takes all T = {schedule.num_timesteps} steps; got '
                       f'num_steps={num_steps} (use ddim or dpm_solver++ for fewer)')
    return schedule.num_timesteps
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


def timesteps(schedule, num_steps: int, spacing: str = 'uniform') -> np.ndarray:
  """The num_steps model-call times for ddim / euler / ode, descending.

  Discrete: distinct integers from T-1 down to 0, uniform or quadratic (dense near t = 0).
  Continuous: floats from t_max down to t_min.
  """
  if spacing not in SPACINGS:
    raise InputError(f'unknown spacing {spacing!r}; choose one of {", ".join(SPACINGS)}')
  unit = np.linspace(1.0, 0.0, num_steps) if num_steps > 1 else np.ones(1)
  if spacing == 'quadratic':
    unit = unit ** 2
  if schedules_lib.is_continuous(schedule):
    return (schedule.t_min + unit * (schedule.t_max - schedule.t_min)).astype(np.float32)
  return _strictly_decreasing_ints((schedule.num_timesteps - 1) * unit, schedule.num_timesteps)


def log_snr_timesteps(schedule, num_steps: int) -> np.ndarray:
  """num_steps + 1 times from the noisiest to the cleanest, uniform in log-SNR, descending."""
  if schedules_lib.is_continuous(schedule):
    dense = np.linspace(schedule.t_min, schedule.t_max, 20001)
    with jax.ensure_compile_time_eval():
      lam = np.asarray(schedule.log_snr(jnp.asarray(dense)), np.float64)  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], num_steps + 1)
    return np.interp(targets, lam[::-1], dense[::-1]).astype(np.float32)
  with jax.ensure_compile_time_eval():
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
  lam = np.log(abar) - np.log1p(-abar)
  targets = np.linspace(lam[-1], lam[0], num_steps + 1)
  # lam decreases in t: interpolate t as a function of lam on the reversed table.
  t_float = np.interp(targets, lam[::-1], np.arange(len(lam))[::-1].astype(np.float64))
  return _strictly_decreasing_ints(t_float, schedule.num_timesteps)


def _alpha_sigma_np(schedule, t: np.ndarray):
  # The grid is fixed before sampling starts: evaluate it now even inside a caller's jit.
  with jax.ensure_compile_time_eval():
    alpha, sigma = diffusion.alpha_sigma(schedule, jnp.asarray(t))
  return np.asarray(alpha, np.float32), np.asarray(sigma, np.float32)


def _denoise(model_fn, x, t, alpha, sigma, prediction: str, clip_x0: bool):
  """Calls the network once at time t (a scalar) and returns (x0, eps).

  With clip_x0, x0 is clipped to [-1, 1] and eps recomputed from it, as guided-diffusion does.
  """
  out = model_fn(x, jnp.full((x.shape[0],), t)).astype(x.dtype)
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
    x0, _ = _denoise(model_fn, x, t, schedule.sqrt_alphas_cumprod[t],
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


def _ddim_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, eta, spacing):
  ts = timesteps(schedule, num_steps, spacing)
  alpha, sigma = _alpha_sigma_np(schedule, ts)
  # After the last call the chain lands on clean data: abar = 1.
  alpha_next = np.append(alpha[1:], 1.0).astype(np.float32)
  sigma_next = np.append(sigma[1:], 0.0).astype(np.float32)

  def step(x, xs):
    x0, eps = _denoise(model_fn, x, xs['t'], xs['alpha'], xs['sigma'], prediction, clip_x0)
    # sigma_eta² = eta² (1 - abar_next)/(1 - abar) (1 - abar/abar_next)  (DDIM eq. 16)
    ratio = (xs['alpha'] / xs['alpha_next']) ** 2
    noise_std = eta * xs['sigma_next'] / xs['sigma'] * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0))
    direction = jnp.sqrt(jnp.maximum(xs['sigma_next'] ** 2 - noise_std ** 2, 0.0))
    noise = jax.random.normal(jax.random.fold_in(key, xs['i']), x.shape, x.dtype)
    x = xs['alpha_next'] * x0 + direction * eps + noise_std * noise
    return x, (x, x0)

  xs = dict(i=jnp.arange(num_steps), t=jnp.asarray(ts), alpha=jnp.asarray(alpha),
            sigma=jnp.asarray(sigma), alpha_next=jnp.asarray(alpha_next),
            sigma_next=jnp.asarray(sigma_next))
  return Plan(step, xs, num_steps)


def _dpm_solver_plan(model_fn, schedule, num_steps, prediction, clip_x0, order: int):
  """DPM-Solver++ multistep of ``order`` 2 or 3 on steps uniform in log-SNR (lambda).

  The exact update from lambda to lambda + h integrates the data prediction f(lambda):
    x_next = sigma_next / sigma x + alpha_next int_0^h e^(u - h) f(lambda + u) du.
  2M (Lu et al. 2022, Alg. 2) uses the previous prediction; 3M fits the parabola through the
  last three predictions (Newton divided differences, any spacing) and integrates it exactly.
  The first steps have fewer predictions and are of lower order.
  """
  ts = log_snr_timesteps(schedule, num_steps)  # [N + 1]
  alpha, sigma = _alpha_sigma_np(schedule, ts)
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
    x0, _ = _denoise(model_fn, x, xs['t'], xs['alpha'], xs['sigma'], prediction, clip_x0)
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


def _sde_plan(model_fn, schedule, key, num_steps, prediction, method):
  grid = np.linspace(schedule.t_max, schedule.t_min, num_steps + 1).astype(np.float32)
  t, t_next = grid[:-1], grid[1:]

  def drift(x, t):
    """dx/dt of the reverse SDE (-1/2 beta x - beta score) or the PF ODE (half the score term)."""
    alpha, sigma = schedule.mean_coef(t), schedule.std(t)
    _, eps = _denoise(model_fn, x, t, alpha, sigma, prediction, clip_x0=False)
    score = -eps / sigma
    beta = schedule.beta(t)
    score_weight = 1.0 if method == 'euler_maruyama' else 0.5
    return -0.5 * beta * x - score_weight * beta * score, eps

  def step(x, xs):
    dt = xs['t_next'] - xs['t']  # negative: time runs backwards
    d, eps = drift(x, xs['t'])
    if method == 'euler_maruyama':
      noise = jax.random.normal(jax.random.fold_in(key, xs['i']), x.shape, x.dtype)
      noise_std = jnp.where(xs['last'], 0.0, jnp.sqrt(schedule.beta(xs['t']) * -dt))
      x = x + d * dt + noise_std * noise
    else:  # Heun: average the slopes at both ends of the step
      x_euler = x + d * dt
      d_next, _ = drift(x_euler, xs['t_next'])
      x = x + 0.5 * (d + d_next) * dt
    alpha, sigma = schedule.mean_coef(xs['t']), schedule.std(xs['t'])
    return x, (x, (x - sigma * eps) / alpha)

  alpha_next, sigma_next = _alpha_sigma_np(schedule, t_next)  # where each step lands
  xs = dict(i=jnp.arange(num_steps), t=jnp.asarray(t), t_next=jnp.asarray(t_next),
            last=jnp.arange(num_steps) == num_steps - 1, alpha_next=jnp.asarray(alpha_next),
            sigma_next=jnp.asarray(sigma_next))
  return Plan(step, xs, num_steps * (2 if method == 'ode' else 1))


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


def make_plan(model_fn: ModelFn, schedule, key, *, method: str, num_steps: Optional[int] = None,
              eta: float = 0.0, prediction: str = 'eps', clip_x0: bool = True,
              variance: str = 'small', spacing: str = 'uniform', replace=None) -> Plan:
  """The steps of a sampler, for ``sample`` to scan (or a caller to scan in chunks).

  ``replace=(observed, mask)`` conditions on observed entries by replacement (``_replacing``).
  """
  if replace is not None:
    plan = make_plan(model_fn, schedule, key, method=method, num_steps=num_steps, eta=eta,
                     prediction=prediction, clip_x0=clip_x0, variance=variance, spacing=spacing)
    return _replacing(plan, replace, jax.random.fold_in(key, 0x5EED))
  diffusion.check_prediction(prediction, ('eps', 'x0', 'v'))
  num_steps = check_method(method, schedule, num_steps)
  if not 0.0 <= eta <= 1.0:
    raise InputError(f'eta must lie in [0, 1], got {eta}')
  if method == 'ddpm':
    return _ddpm_plan(model_fn, schedule, key, prediction, clip_x0, variance)
  if method == 'ddim':
    return _ddim_plan(model_fn, schedule, key, num_steps, prediction, clip_x0, eta, spacing)
  if method in MULTISTEP_ORDER:
    return _dpm_solver_plan(model_fn, schedule, num_steps, prediction, clip_x0,
                            MULTISTEP_ORDER[method])
  return _sde_plan(model_fn, schedule, key, num_steps, prediction, method)


def _plan(model_fn, schedule, key, method, num_steps, eta, prediction, clip_x0, variance, spacing,
          replace=None):
  """The plan for ``key`` (the step noise comes from its second half, as in ``sample``)."""
  _, step_key = jax.random.split(key)
  return make_plan(model_fn, schedule, step_key, method=method, num_steps=num_steps, eta=eta,
                   prediction=prediction, clip_x0=clip_x0, variance=variance, spacing=spacing,
                   replace=replace)


def num_plan_steps(plan: Plan) -> int:
  return next(iter(plan.xs.values())).shape[0]


def _plan_options(options: dict) -> dict:
  defaults = dict(num_steps=None, eta=0.0, prediction='eps', clip_x0=True, variance='small',
                  spacing='uniform', replace=None)
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
           clip_x0: bool = True, x_T=None, variance: str = 'small', spacing: str = 'uniform',
           return_trajectory: bool = False, progress: Optional[Callable[[int], None]] = None,
           replace=None):
  """Runs the reverse process from x_T ~ N(0, I) of ``shape`` and returns x_0 in model space.

  ``x_T`` fixes the starting noise. ``return_trajectory`` also returns (x_t, predicted x0), each
  [num_steps, *shape], after every step. ``progress(i)`` is called from the device after step i
  (a host callback: for progress bars; a computation with one is never kept in JAX's persistent
  compilation cache). Jit-able; ``key`` draws x_T and all step noise. ``replace=(observed,
  mask)`` conditions on observed entries by replacement (see ``make_plan``).
  """
  plan = _plan(model_fn, schedule, key, method, num_steps, eta, prediction, clip_x0, variance,
               spacing, replace)  # one plan for all the steps
  result = _steps(plan, _start(plan, key, shape, x_T), 0, num_plan_steps(plan),
                  return_trajectory, progress)
  carry, trajectory = result if return_trajectory else (result, None)
  x = plan.final(carry)
  return (x, trajectory) if return_trajectory else x
