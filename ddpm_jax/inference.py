"""A jitted ``sample_fn`` over a trained network, and loading one from a training workdir."""

from __future__ import annotations

import functools
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import (compilation_cache, config_lib, cpu_backend, diffusion, masking, sampling,
                      series_data, sharding, train_state)
from ddpm_jax.checkpointing import Checkpointer, DamagedCheckpoint
from ddpm_jax.errors import CheckpointError, InputError
from ddpm_jax.models import create_model, model_apply


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
  values = diffusion.concrete_or_none(labels)
  if values is not None and (values.min() < 0 or values.max() >= model.num_classes):
    raise InputError(f'labels must lie in [0, {model.num_classes - 1}], got range '
                     f'[{values.min()}, {values.max()}]')


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
  progress=None)``.

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
    """Observed entries exactly as given; everything in data space."""
    if condition is not None:
      x = jnp.where(condition['mask'] > 0, condition['observed'], x)
    return to_data_space(x, config, data_stats)

  def initial_noise(key, shape):
    x_T = jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
    if jax.device_count() > 1 and shape[0] % jax.device_count() == 0:
      x_T = jax.lax.with_sharding_constraint(x_T, sharding.batch_sharding(sharding.make_mesh()))
    return x_T

  @functools.partial(jax.jit, static_argnames=static + ('return_trajectory',))
  def jitted(params, key, num_samples, *, method, num_steps, eta, labels, guidance_scale,
             spacing, rho, condition, return_trajectory):
    model_fn, sample_key, shape, options = setup(params, key, num_samples, labels, method,
                                                 num_steps, eta, guidance_scale, spacing, rho,
                                                 condition)
    result = sampling.sample(model_fn, schedule, sample_key, shape,
                             x_T=initial_noise(key, shape), return_trajectory=return_trajectory,
                             **options)
    if return_trajectory:
      x, (x_t, x0) = result
      return (finish(x, condition),
              (to_data_space(x_t, config, data_stats), to_data_space(x0, config, data_stats)))
    return finish(result, condition)

  @functools.partial(jax.jit, static_argnames=static)
  def start_piece(params, key, num_samples, *, method, num_steps, eta, labels, guidance_scale,
                  spacing, rho, condition):
    model_fn, sample_key, shape, options = setup(params, key, num_samples, labels, method,
                                                 num_steps, eta, guidance_scale, spacing, rho,
                                                 condition)
    return sampling.sample_start(model_fn, schedule, sample_key, shape,
                                 x_T=initial_noise(key, shape), **options)

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
                progress=None, observed=None, mask=None):
    method, num_steps, total = resolve_method(config, schedule, method, num_steps)
    spacing, rho = resolve_spacing(config, method, spacing, rho)
    # Checked here, where labels are still concrete, unless the caller's own jit traces them.
    check_labels(model, labels, num_samples)
    condition = check_condition(observed, mask, (num_samples,) + tuple(example_shape))
    options = dict(method=method, num_steps=num_steps, eta=eta, labels=labels,
                   guidance_scale=guidance_scale, spacing=spacing, rho=rho, condition=condition)
    if progress is None or return_trajectory:
      return jitted(params, key, num_samples, return_trajectory=return_trajectory, **options)
    carry = start_piece(params, key, num_samples, **options)
    length = progress_chunk(total)
    for start in range(0, total, length):
      carry = steps_piece(params, key, carry, start, num_samples, length=length, **options)
      jax.block_until_ready(carry)
      progress(start + length)
    return finish_piece(params, key, carry, num_samples, **options)

  return sample_fn


def resolve_checkpoint(path) -> tuple[pathlib.Path, Optional[int]]:
  """A workdir, its checkpoints folder or one step folder -> (workdir, step or None = newest)."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f'--ckpt {path} does not exist')
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    return path.parent.parent, int(path.name)
  if path.name == 'checkpoints':
    return path.parent, None
  return path, None


# A distillation workdir (ddpm_jax.distiller) holds one run per stage: students/<N>_steps/,
# each with STAGE_DONE once its stage has finished.
STUDENTS = 'students'
STAGE_DONE = 'distilled.json'


def student_folder(workdir, num_steps: int) -> pathlib.Path:
  return pathlib.Path(workdir) / STUDENTS / f'{num_steps}_steps'


def finished_students(workdir) -> dict:
  """{steps: folder} of the finished stages of a distillation workdir."""
  folder = pathlib.Path(workdir) / STUDENTS
  found = {}
  if folder.is_dir():
    for path in folder.iterdir():
      steps = path.name[:-len('_steps')]
      if path.name.endswith('_steps') and steps.isdigit() and (path / STAGE_DONE).is_file():
        found[int(steps)] = path
  return found


def pick_student(workdir, num_steps: Optional[int]) -> pathlib.Path:
  """The finished student of a distillation workdir with ``num_steps`` steps (None: the one
  with the fewest)."""
  found = finished_students(workdir)
  if not found:
    raise FileNotFoundError(f'{workdir} is a distillation run whose first stage has not finished '
                            f'yet; sample one of {workdir / STUDENTS}/*/ or wait')
  if num_steps is None:
    return found[min(found)]
  if num_steps not in found:
    raise InputError(f'{workdir} has students for {", ".join(map(str, sorted(found)))} steps; '
                     f'--num_steps={num_steps} is none of them')
  return found[num_steps]


def check_finite_params(params, source: str) -> None:
  """One line naming the first parameter with a NaN or infinity (a downloaded run, say), which
  would otherwise sample black images without a word."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  finite = sharding.to_host(jax.jit(train_state.finite_leaves)(params))
  if not finite.all():
    name = jax.tree_util.keystr(leaves[int(np.argmin(finite))][0])
    raise InputError(f'{source}: parameter {name} holds NaN or infinite values; the run is '
                     'not usable (train it again, or use an earlier checkpoint)')


def load_sampler(path, step: Optional[int] = None, student_steps: Optional[int] = None):
  """Loads the EMA parameters of a training run and a jitted sample_fn for them.

  ``path``: the workdir, ``<workdir>/checkpoints`` or one ``<workdir>/checkpoints/<step>``. A
  distillation workdir stands for its finished student of ``student_steps`` steps (None: the
  fewest), whose config samples with its own step count.
  Without a step, the newest checkpoint that restores is used (a damaged newer one is reported
  and skipped; nothing is renamed). The parameters are placed on every local device (on every
  device of every process in a multi-process run), whatever topology wrote them. Returns
  ``(sample_fn, ema_params)``; ``sample_fn.config``, ``.model``, ``.step`` and ``.data_stats``
  describe what was loaded. Turns on JAX's persistent compilation cache
  (``ddpm_jax.compilation_cache``) unless it is switched off, and XLA:CPU's own convolutions
  when no JAX backend has started yet (``ddpm_jax.cpu_backend``).
  """
  compilation_cache.enable()
  cpu_backend.configure()
  workdir, path_step = resolve_checkpoint(path)
  if (workdir / STUDENTS).is_dir():
    workdir = pick_student(workdir, student_steps)
  config = config_lib.read_workdir_config(workdir)
  model = create_model(config)
  abstract = train_state.abstract_state(config, model)
  replicated = sharding.replicated(sharding.make_mesh())
  checkpointer = Checkpointer(workdir / 'checkpoints', read_only=True)
  try:
    steps = checkpointer.all_steps()
    wanted = step if step is not None else path_step
    if not steps:
      raise FileNotFoundError(f'{workdir / "checkpoints"} holds no complete checkpoint')
    if wanted is not None and wanted not in steps:
      raise FileNotFoundError(f'no complete checkpoint {wanted} in {workdir / "checkpoints"} '
                              f'(complete: {steps})')
    if wanted is not None:
      try:
        restored = checkpointer.restore(wanted, abstract, replicated)
      except DamagedCheckpoint as damage:
        raise CheckpointError(f'checkpoint {wanted} in {workdir / "checkpoints"} is damaged '
                              f'({damage}); pass the workdir to use the newest one that '
                              f'restores') from None
    else:
      restored = checkpointer.restore_latest(abstract, replicated)
      if restored is None:
        raise CheckpointError(f'none of the checkpoints {steps} in {workdir / "checkpoints"} '
                              f'restores: all are damaged')
  finally:
    checkpointer.close()
  check_finite_params(restored.state.ema_params, f'checkpoint {restored.step} in {workdir}')
  data_stats = restored.extras.get('data_stats')
  sample_fn = make_sample_fn(model, config, data_stats)
  sample_fn.config, sample_fn.model, sample_fn.step = config, model, restored.step
  sample_fn.workdir = workdir
  sample_fn.data_stats = data_stats
  return sample_fn, restored.state.ema_params


def sample_in_batches(sample_fn, params, key, num_samples: int, batch_size: int, **kwargs):
  """Draws num_samples in batches of at most batch_size (numpy [num_samples, ...]); batch i
  uses fold_in(key, i), so a run is reproducible for a fixed batch size. ``labels``,
  ``observed`` and ``mask`` are split with the samples."""
  outputs = []
  for i, start in enumerate(range(0, num_samples, batch_size)):
    n = min(batch_size, num_samples - start)
    call_kwargs = dict(kwargs)
    for name in ('labels', 'observed', 'mask'):  # one row per sample
      if kwargs.get(name) is not None:
        call_kwargs[name] = jnp.asarray(kwargs[name])[start:start + n]
    outputs.append(sharding.to_host(sample_fn(params, jax.random.fold_in(key, i), n,
                                                **call_kwargs)))
  return np.concatenate(outputs)
