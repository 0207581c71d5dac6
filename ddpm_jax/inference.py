"""A jitted ``sample_fn`` over a trained network (``make_sample_fn``), and one over a run's EMA
parameters (``load_sampler``; the run itself is loaded by ``ddpm_jax.workdir``)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import config_lib, masking, sampling, series_data, sharding
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import InputError
from ddpm_jax.models import model_apply
from ddpm_jax.models.unet import check_label_range


def to_data_space(x, config, data_stats: Optional[dict] = None):
  """Model space -> data space: images to [0, 1]; series back to their original units."""
  if config_lib.is_series(config):
    return series_data.denormalize(x, data_stats)
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def check_labels(model, labels, num_samples: int) -> None:
  if labels is None:
    return
  if not model.num_classes:
    raise InputError('labels were given but the model is unconditional (model.num_classes = 0)')
  if tuple(jnp.shape(labels)) != (num_samples,):
    raise InputError(f'labels must have shape ({num_samples},), got {tuple(jnp.shape(labels))}')
  check_label_range(labels, model.num_classes, allow_null=False)


def check_condition(observed, mask, shape) -> Optional[dict]:
  """{'observed', 'mask'} float32 arrays of ``shape``, or None when neither is given."""
  if observed is None and mask is None:
    return None
  if observed is None or mask is None:
    raise InputError('observed values and their mask go together: give both or neither')
  for name, value in (('observed', observed), ('mask', mask)):
    if tuple(jnp.shape(value)) != tuple(shape):
      raise InputError(f'{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(value))}')
  return {'observed': jnp.asarray(observed, jnp.float32), 'mask': jnp.asarray(mask, jnp.float32)}


def resolve_method(config, schedule, method: Optional[str], num_steps: Optional[int]):
  """Fills unset sampling options from ``config.sampling`` and validates them.

  Returns (method, num_steps to pass on: None for ddpm, steps the scan takes).
  """
  method = method or config.sampling.method
  if method == 'ddpm':
    return method, None, sampling.check_method(method, schedule, num_steps)
  if method == 'adaptive':  # no num_steps from the config: the solver chooses
    return method, None, sampling.check_method(method, schedule, num_steps)
  num_steps = config.sampling.num_steps if num_steps is None else num_steps
  return method, num_steps, sampling.check_method(method, schedule, num_steps)


def resolve_spacing(config, method: str, spacing: Optional[str], rho: Optional[float]):
  """(spacing, rho) a sampling call uses: an explicit ``spacing`` is checked against the method
  (one line naming those it takes); otherwise ``sampling.spacing`` where the method takes it,
  else the method's own default. ``rho`` defaults to ``sampling.rho``."""
  rho = float(config.sampling.get('rho', sampling.DEFAULT_RHO) if rho is None else rho)
  if spacing:
    return sampling.check_spacing(method, spacing, rho), rho
  configured = config.sampling.get('spacing', '')
  if configured and configured not in sampling.SPACINGS:
    raise InputError(f'sampling.spacing={configured!r} is unknown; choose one of '
                     f'{", ".join(sampling.SPACINGS)} (or \'\' for each method\'s default)')
  if configured in sampling.METHOD_SPACINGS[method]:
    return sampling.check_spacing(method, configured, rho), rho
  return sampling.METHOD_SPACINGS[method][0], rho


def resolve_adaptive(config, method: str, rtol: Optional[float], atol: Optional[float],
                     solver: Optional[str]) -> dict:
  """{'rtol', 'atol', 'solver'} of the adaptive solve (unset: sampling.rtol / atol / solver),
  checked; all None for the other methods, where setting any is one line."""
  if method != 'adaptive':
    sampling.check_no_adaptive_settings(method, rtol, atol, solver)
    return dict(rtol=None, atol=None, solver=None)
  given = dict(rtol=rtol, atol=atol, solver=solver)
  # A run saved before a setting existed has none in its config: the library default.
  return sampling.adaptive_settings(**{
      name: config.sampling.get(name, None) if value is None else value
      for name, value in given.items()})


def resolve_antithetic(config, antithetic: Optional[bool]) -> bool:
  """Whether x_T comes in mirrored pairs (unset: sampling.antithetic)."""
  return bool(config.sampling.get('antithetic', False) if antithetic is None else antithetic)


def churn_from_config(config) -> sampling.Churn:
  """heun's stochastic churn from sampling.s_churn, s_tmin, s_tmax, s_noise (off by default)."""
  fields = {name: float(config.sampling[name]) for name in sampling.Churn._fields
            if name in config.sampling}
  return sampling.Churn(**fields)


def guided_model_fn(model, params, labels, guidance_scale: float):
  """model_fn(x_t, t) with classifier-free guidance: out = null + w (cond - null)."""
  apply = lambda x, t, y: model_apply(model, params, x, t, y)
  if labels is None or not model.num_classes:
    return lambda x, t: apply(x, t, None)
  null = jnp.full_like(labels, model.num_classes)
  if guidance_scale == 1.0:
    return lambda x, t: apply(x, t, labels)
  if guidance_scale == 0.0:
    return lambda x, t: apply(x, t, null)

  def model_fn(x, t):
    both = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance_scale * (cond - uncond)
  return model_fn


def progress_chunk(num_steps: int, pieces: int = 10) -> int:
  """Steps per jitted piece when progress is reported: the largest divisor of ``num_steps``
  that gives at least ``pieces`` pieces (so every piece has one length and one compilation)."""
  return max(d for d in range(1, num_steps + 1) if num_steps % d == 0 and d <= max(
      1, num_steps // pieces))


def make_sample_fn(model, config, data_stats: Optional[dict] = None):
  """Returns ``sample_fn(params, key, num_samples, *, method=None, num_steps=None,
  eta=None, labels=None, guidance_scale=None, spacing=None, rho=None, return_trajectory=False,
  progress=None, observed=None, mask=None, rtol=None, atol=None, solver=None, antithetic=None,
  return_nfe=False)``.

  ``antithetic`` (unset: sampling.antithetic) draws x_T in mirrored pairs (z, -z), samples 2k
  and 2k + 1 (an odd batch's last sample unpaired); each sample is still an exact draw, and the
  mean or median of an ensemble made of such pairs has a smaller Monte Carlo error (forecasts:
  docs/time_series.md).

  Unset options take ``config.sampling``'s values (a spacing: see ``resolve_spacing``). The
  result is float samples in data space [num_samples, *example_shape] (images in [0, 1], series
  in original units), computed by one jitted function (compiled once per static option set).
  With several devices the samples are split across them. Composes with a caller's jax.jit and
  jax.vmap.

  ``observed`` and ``mask`` ([num_samples, *example_shape], model space; mask 1 = observed)
  condition the samples on observed values: through the network for a run trained with
  ``model.observed_input``, else by replacement (sampling.make_plan); in both, the observed
  entries of x_t are put back after each step, noised as training noised them, and come back
  as given at the end.

  ``progress(steps_done)``: the same samples, computed in about ten jitted pieces with
  ``progress`` called on the host after each; nothing compiled holds a host callback, so JAX's
  persistent compilation cache keeps every piece.
  """
  schedule = config_lib.schedule_from_config(config)
  example_shape = config_lib.data_shape(config)
  defaults = config.sampling
  static = ('num_samples', 'method', 'num_steps', 'eta', 'guidance_scale', 'spacing', 'rho')
  observed_input = config_lib.observed_input(config)

  churn = churn_from_config(config)
  base_weights = config_lib.base_weights(config, data_stats)
  center = config_lib.center_observed(config)
  shift_of = lambda condition: masking.window_shift(condition['observed'], condition['mask'],
                                                    base_weights, center)

  def setup(params, key, num_samples, labels, method, num_steps, eta, guidance_scale, spacing,
            rho, condition):
    """(model_fn, the key of the steps, x_T's shape, the sampling options)."""
    scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    model_fn = guided_model_fn(model, params, labels, scale)
    options = dict(method=method, num_steps=num_steps, eta=defaults.eta if eta is None else eta,
                   prediction=config.diffusion.target,
                   clip_x0=defaults.clip_x0 and not config_lib.is_series(config),
                   variance=defaults.variance, spacing=spacing, rho=rho,
                   churn=churn if method == 'heun' else sampling.Churn())
    shape = (num_samples,) + tuple(example_shape)
    if condition is not None and (base_weights is not None or center):
      # The network's space: the observed values less the window's shift (see finish).
      condition = {'observed': (condition['observed'] - shift_of(condition)) * condition['mask'],
                   'mask': condition['mask']}
    if condition is not None:
      # Either route puts the observed entries of x_t back, noised to the step's level. For a
      # network trained without masks that is the conditioning (replacement). A masked network
      # saw x_t = alpha x0 + sigma z at observed entries in training but was never scored there,
      # so left to itself the sampler would feed it its own untrained predictions at those
      # entries: on ETTh1 that doubled the imputation error of scattered points.
      options['replace'] = (condition['observed'], condition['mask'])
    if observed_input:  # the network takes the observations (all hidden: plain generation)
      if condition is None:
        condition = {'observed': jnp.zeros(shape), 'mask': jnp.zeros(shape)}
      network = model_fn
      model_fn = lambda x, t: network(
          masking.condition_input(x, condition['observed'], condition['mask']), t)
    return model_fn, jax.random.split(key)[1], shape, options

  def finish(x, condition):
    """The window's shift added back (masking.window_shift) and the observed entries exactly
    as given; everything in data space."""
    if condition is not None:
      if base_weights is not None or center:
        x = x + shift_of(condition)
      x = jnp.where(condition['mask'] > 0, condition['observed'], x)
    return to_data_space(x, config, data_stats)

  def initial_noise(key, shape, antithetic: bool):
    """x_T [shape]; ``antithetic``: in mirrored pairs, x_T[2k + 1] = -x_T[2k] (an odd batch's
    last draw has no partner: every sample is still an exact draw)."""
    noise_key = jax.random.split(key)[0]
    if antithetic:
      pairs = (shape[0] + 1) // 2
      half = jax.random.normal(noise_key, (pairs,) + shape[1:], jnp.float32)
      x_T = jnp.stack([half, -half], axis=1).reshape((2 * pairs,) + shape[1:])[:shape[0]]
    else:
      x_T = jax.random.normal(noise_key, shape, jnp.float32)
    if jax.device_count() > 1 and shape[0] % jax.device_count() == 0:
      x_T = jax.lax.with_sharding_constraint(x_T, sharding.batch_sharding(sharding.make_mesh()))
    return x_T

  @functools.partial(jax.jit,
                     static_argnames=static + ('return_trajectory', 'rtol', 'atol', 'solver',
                                               'antithetic'))
  def jitted(params, key, num_samples, *, method, num_steps, eta, labels, guidance_scale,
             spacing, rho, condition, return_trajectory, rtol, atol, solver, antithetic):
    """(samples, or (samples, trajectory); the network calls they took)."""
    model_fn, sample_key, shape, options = setup(params, key, num_samples, labels, method,
                                                 num_steps, eta, guidance_scale, spacing, rho,
                                                 condition)
    if method == 'adaptive':
      x_T = sampling.check_adaptive(schedule, sample_key, shape,
                                    initial_noise(key, shape, antithetic), None,
                                    spacing, return_trajectory, options.get('replace'), None)
      x, calls = sampling.adaptive_sample(model_fn, schedule, x_T,
                                          prediction=options['prediction'],
                                          clip_x0=options['clip_x0'], rtol=rtol, atol=atol,
                                          solver=solver)
      return finish(x, condition), calls
    calls = sampling.network_calls(schedule, method, num_steps, spacing, rho)
    result = sampling.sample(model_fn, schedule, sample_key, shape,
                             x_T=initial_noise(key, shape, antithetic),
                             return_trajectory=return_trajectory,
                             **options)
    if return_trajectory:
      x, (x_t, x0) = result
      return (finish(x, condition), (to_data_space(x_t, config, data_stats),
                                     to_data_space(x0, config, data_stats))), calls
    return finish(result, condition), calls

  @functools.partial(jax.jit, static_argnames=static + ('antithetic',))
  def start_piece(params, key, num_samples, *, method, num_steps, eta, labels, guidance_scale,
                  spacing, rho, condition, antithetic):
    model_fn, sample_key, shape, options = setup(params, key, num_samples, labels, method,
                                                 num_steps, eta, guidance_scale, spacing, rho,
                                                 condition)
    return sampling.sample_start(model_fn, schedule, sample_key, shape,
                                 x_T=initial_noise(key, shape, antithetic), **options)

  @functools.partial(jax.jit, static_argnames=static + ('length',))
  def steps_piece(params, key, carry, start, num_samples, *, length, method, num_steps, eta,
                  labels, guidance_scale, spacing, rho, condition):
    model_fn, sample_key, _, options = setup(params, key, num_samples, labels, method, num_steps,
                                             eta, guidance_scale, spacing, rho, condition)
    return sampling.sample_steps(model_fn, schedule, sample_key, carry, start, length, **options)

  @functools.partial(jax.jit, static_argnames=static)
  def finish_piece(params, key, carry, num_samples, *, method, num_steps, eta, labels,
                   guidance_scale, spacing, rho, condition):
    model_fn, sample_key, _, options = setup(params, key, num_samples, labels, method, num_steps,
                                             eta, guidance_scale, spacing, rho, condition)
    return finish(sampling.sample_finish(model_fn, schedule, sample_key, carry, **options),
                  condition)

  def sample_fn(params, key, num_samples: int, *, method: Optional[str] = None,
                num_steps: Optional[int] = None, eta: Optional[float] = None, labels=None,
                guidance_scale: Optional[float] = None, spacing: Optional[str] = None,
                rho: Optional[float] = None, return_trajectory: bool = False,
                progress=None, observed=None, mask=None, rtol: Optional[float] = None,
                atol: Optional[float] = None, solver: Optional[str] = None,
                antithetic: Optional[bool] = None, return_nfe: bool = False):
    method, num_steps, total = resolve_method(config, schedule, method, num_steps)
    antithetic = resolve_antithetic(config, antithetic)
    spacing, rho = resolve_spacing(config, method, spacing, rho)
    adaptive = resolve_adaptive(config, method, rtol, atol, solver)
    # Checked here, where labels are still concrete, unless the caller's own jit traces them.
    check_labels(model, labels, num_samples)
    condition = check_condition(observed, mask, (num_samples,) + tuple(example_shape))
    options = dict(method=method, num_steps=num_steps, eta=eta, labels=labels,
                   guidance_scale=guidance_scale, spacing=spacing, rho=rho, condition=condition)
    if progress is None or return_trajectory or method == 'adaptive':
      out, calls = jitted(params, key, num_samples, return_trajectory=return_trajectory,
                          antithetic=antithetic, **adaptive, **options)
      if progress is not None:  # the adaptive solve is one piece
        jax.block_until_ready(out)
        progress(total)
      return (out, calls) if return_nfe else out
    carry = start_piece(params, key, num_samples, antithetic=antithetic, **options)
    length = progress_chunk(total)
    for start in range(0, total, length):
      carry = steps_piece(params, key, carry, start, num_samples, length=length, **options)
      jax.block_until_ready(carry)
      progress(start + length)
    out = finish_piece(params, key, carry, num_samples, **options)
    if return_nfe:
      return out, sampling.network_calls(schedule, method, num_steps, spacing, rho)
    return out

  return sample_fn


def load_sampler(path, step: Optional[int] = None, student_steps: Optional[int] = None):
  """A jitted ``sample_fn`` over the EMA parameters of a run: ``(sample_fn, params)``.

  ``path``, ``step`` and ``student_steps`` are those of ``ddpm_jax.workdir.load_run``, which
  gives the config, model and step as well.
  """
  run = workdir_lib.load_run(path, step, student_steps)
  return make_sample_fn(run.model, run.config, run.data_stats), run.params


def sample_in_batches(sample_fn, params, key, num_samples: int, batch_size: int, calls=None,
                      **kwargs):
  """Draws num_samples in batches of at most batch_size (numpy [num_samples, ...]); batch i
  uses fold_in(key, i), so a run is reproducible for a fixed batch size. ``labels``,
  ``observed`` and ``mask`` are split with the samples. ``calls``, a list, gets each batch's
  network calls (sample_fn's return_nfe)."""
  outputs = []
  for i, start in enumerate(range(0, num_samples, batch_size)):
    n = min(batch_size, num_samples - start)
    call_kwargs = dict(kwargs)
    for name in ('labels', 'observed', 'mask'):  # one row per sample
      if kwargs.get(name) is not None:
        # Sliced before it becomes a device array: converting all of it for every batch cost
        # as much as the sampling itself for 285,700 forecasts.
        call_kwargs[name] = jnp.asarray(kwargs[name][start:start + n])
    out = sample_fn(params, jax.random.fold_in(key, i), n, return_nfe=calls is not None,
                    **call_kwargs)
    if calls is not None:
      out, nfe = out
      calls.append(int(nfe))
    outputs.append(sharding.to_host(out))
  return np.concatenate(outputs)
