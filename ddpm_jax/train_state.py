"""The train state, the optimiser, and the jitted data-parallel train step."""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import config_lib, distillation, losses, masking
from ddpm_jax.models import model_apply
from ddpm_jax.errors import InputError

class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: updates applied or skipped so far
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array  # typed PRNG key; step s uses fold_in(key, s)
  nonfinite_total: jax.Array  # int32: updates skipped for a non-finite loss or gradient
  nonfinite_streak: jax.Array  # int32: of them, how many in a row up to now
  loss_history: Any = None  # losses.LossHistory for importance sampling of t


def learning_rate_schedule(optim):
  """A linear warm-up to ``optim.learning_rate`` (DDPM's recipe), then constant, or with
  ``optim.decay_steps`` > 0 linearly down to zero over that many steps (progressive
  distillation's per-stage schedule). A constant rate is a float: Adam then keeps no count."""
  warmup, decay = optim.warmup_steps, optim.get('decay_steps', 0)
  if warmup <= 0 and decay <= 0:
    return optim.learning_rate
  pieces, boundaries = [], []
  if warmup > 0:
    pieces.append(optax.linear_schedule(0.0, optim.learning_rate, warmup))
    boundaries.append(warmup)
  pieces.append(optax.linear_schedule(optim.learning_rate, 0.0, decay) if decay > 0
                else optax.constant_schedule(optim.learning_rate))
  return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)


def make_optimizer(optim) -> optax.GradientTransformation:
  """Clip by global norm, then Adam at ``learning_rate_schedule(optim)``."""
  learning_rate = learning_rate_schedule(optim)
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                     optax.adam(learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps))


def run_keys(seed: int):
  """The independent key streams of a run: (parameter init, training steps, sample grids)."""
  return tuple(jax.random.split(jax.random.key(seed), 3))


def create_train_state(model, tx, seed: int, example_shape, loss_history=None) -> TrainState:
  """Initialises parameters for examples of ``example_shape`` ((H, W, C) or (L, C)); the state
  keeps the seed's training key."""
  init_key, state_key, _ = run_keys(seed)
  x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  params = model.init(init_key, x, jnp.zeros((1,), jnp.int32), labels)['params']
  return state_from_params(params, tx, state_key, loss_history)


def state_from_params(params, tx, key, loss_history=None) -> TrainState:
  """A state at step 0 whose parameters and EMA are ``params`` (a new run's, or a teacher's for
  its student), with fresh optimiser state and the training key ``key``."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params),
                    key=key, nonfinite_total=zero, nonfinite_streak=zero,
                    loss_history=loss_history)


def initial_state_fn(config, model, tx, schedule, example_shape):
  """A function of no arguments that builds the initial state; for jit or ``jax.eval_shape``."""
  losses.check_timestep_sampling(schedule, config.diffusion.timestep_sampling)
  losses.check_coupling(schedule, config_lib.coupling(config))
  loss_history = None
  if config.diffusion.timestep_sampling == 'importance':
    loss_history = losses.init_loss_history(schedule.num_timesteps)
  network_shape = config_lib.network_input_shape(config, example_shape)
  return lambda: create_train_state(model, tx, config.training.seed, network_shape, loss_history)


def abstract_state(config, model):
  """The train state's shapes and dtypes (no arrays, no sharding): what a restore fills in.

  ``config`` is a resolved config (the data fields filled in, as in a workdir's config.json).
  """
  tx = make_optimizer(config.optim)
  schedule = config_lib.schedule_from_config(config)
  init = initial_state_fn(config, model, tx, schedule, config_lib.data_shape(config))
  return jax.eval_shape(init)


def finite_leaves(tree) -> jax.Array:
  """bool [number of leaves]: whether each leaf of ``tree`` is all finite."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])


def _all_finite(tree) -> jax.Array:
  return jnp.all(finite_leaves(tree))


def flip_images(key, x0):
  """Each image of x0 [B, H, W, C] mirrored left to right with probability 1/2."""
  if x0.ndim != 4:
    raise InputError(f'random_flip mirrors images [B, H, W, C]; got shape {list(x0.shape)}')
  flip = jax.random.bernoulli(key, 0.5, (x0.shape[0], 1, 1, 1))
  return jnp.where(flip, jnp.flip(x0, axis=2), x0)


def drop_labels(key, labels, rate: float, num_classes: int):
  """labels [B] with each replaced by the null label ``num_classes`` with probability ``rate``
  (classifier-free guidance's unconditional examples)."""
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, num_classes, labels)


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, target: str,
               weighting: str, min_snr_gamma: float, ema_decay: float, random_flip: bool,
               label_dropout: float, mask_mix=None, mask_horizon: int = 0, base_weights=None,
               center_observed: bool = False, grad_accum_steps: int = 1,
               logit_normal_t: bool = False, coupling: str = 'independent'):
  """One update from a global batch {'x': [B, ...], 'label': [B]}; returns (state, metrics).

  An optional ``batch['stop']`` (int32 [B]) comes back as ``metrics['stop']``, its maximum: how
  the processes of a run agree to stop at the same step.

  With ``mask_mix`` (a network with observed input) each window gets a mask drawn from that mix
  (masking.training_masks; ``mask_horizon`` > 0 fixes the steps a 'horizon' mask hides); the
  network sees the observed values and the mask, and the loss
  covers the hidden entries (CSDI's recipe). ``base_weights`` (model.forecast_base) and
  ``center_observed`` shift each window first (masking.window_shift).

  ``logit_normal_t`` draws continuous t logit-normally (losses.sample_timesteps);
  ``coupling='minibatch_ot'`` pairs the batch with its noise by optimal transport.

  ``grad_accum_steps`` = K > 1 computes the gradient in K micro-batches of B / K examples
  (accumulated_value_and_grad): the same examples, t and noise, one optimiser and EMA update.

  A non-finite loss or gradient leaves params, optimiser state and EMA unchanged and is counted.
  """
  step_key = jax.random.fold_in(state.key, state.step)
  flip_key, label_key, loss_key = jax.random.split(step_key, 3)
  # A separate stream, so runs without masks keep the keys they always had.
  mask_key = jax.random.fold_in(step_key, 1)
  x0 = flip_images(flip_key, batch['x']) if random_flip else batch['x']
  labels = drop_labels(label_key, batch['label'], label_dropout, model.num_classes) \
      if model.num_classes else None

  mask = None
  if mask_mix is not None:
    mask = masking.training_masks(mask_key, x0.shape, mask_mix, mask_horizon)
    x0 = x0 - masking.window_shift(x0, mask, base_weights, center_observed)
  # Everything random is drawn for the global batch before any split into micro-batches.
  draw, model_key = losses.draw_training_noise(loss_key, schedule, x0, state.loss_history,
                                               logit_normal_t, coupling)
  examples = {'x0': x0, 'draw': draw, 'labels': labels, 'mask': mask}  # each [B, ...] or None

  def loss_fn(params, ex):
    observed = ex['mask'] is not None  # CSDI: the network sees the observed values and the mask
    network_input = (lambda x_t: masking.condition_input(x_t, ex['x0'], ex['mask'])) \
        if observed else (lambda x_t: x_t)
    apply_fn = lambda p, x_t, t, key: model_apply(model, p, network_input(x_t), t, ex['labels'],
                                                  True, key)
    return losses.denoising_loss(apply_fn, params, ex['x0'], ex['draw'], model_key, schedule,
                                 target=target, weighting=weighting, min_snr_gamma=min_snr_gamma,
                                 loss_mask=masking.loss_mask(ex['mask']) if observed else None)

  (loss, aux), grads = accumulated_value_and_grad(loss_fn, state.params, examples,
                                                  grad_accum_steps)
  loss_history = state.loss_history
  if loss_history is not None:
    loss_history = losses.update_loss_history(loss_history, aux['t'], aux['per_example'])
  return apply_gradients(state, batch, loss, grads, tx=tx, ema_decay=ema_decay,
                         loss_history=loss_history)


def split_micro_batches(a, num_micro: int):
  """[B, ...] -> [K, B / K, ...]: micro-batch m holds rows m, m + K, m + 2K, ... Each device's
  contiguous block of the data-sharded batch gives every micro-batch an equal share of its
  rows, so the split moves no data between devices."""
  return a.reshape((a.shape[0] // num_micro, num_micro) + a.shape[1:]).swapaxes(0, 1)


def join_micro_batches(a):
  """The inverse of split_micro_batches: [K, B / K, ...] -> [B, ...] in the original order."""
  a = a.swapaxes(0, 1)
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def accumulated_value_and_grad(loss_fn, params, examples, num_micro: int):
  """((loss, aux), grads) of ``loss_fn(params, examples)``, a mean over the examples' leading
  axis [B], computed as the mean over ``num_micro`` micro-batches (a scan: the activations of
  one micro-batch are alive at a time). aux holds per-example arrays [B], in the batch's order.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, examples)

  def body(total, micro):
    (loss, aux), grads = grad_fn(params, micro)
    return jax.tree.map(lambda acc, v: acc + v / num_micro, total, (loss, grads)), aux

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  micro_batches = jax.tree.map(lambda a: split_micro_batches(a, num_micro), examples)
  (loss, grads), aux = jax.lax.scan(body, zeros, micro_batches)
  return (loss, jax.tree.map(join_micro_batches, aux)), grads


def check_grad_accum(grad_accum_steps, global_batch_size: int, num_devices: int) -> int:
  """optim.grad_accum_steps as an int, or a one-line error when it cannot split each device's
  share of the batch into equal micro-batches."""
  k = grad_accum_steps
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise InputError(f'optim.grad_accum_steps must be a positive integer, got {k!r}')
  per_device = global_batch_size // num_devices
  if per_device % k:
    fits = [d for d in range(1, per_device + 1) if per_device % d == 0]
    raise InputError(f'optim.grad_accum_steps={k} does not divide the {per_device} examples '
                     f'each of {num_devices} device(s) gets of training.batch_size='
                     f'{global_batch_size}; choose one of {", ".join(map(str, fits))}')
  return k


def apply_gradients(state: TrainState, batch: dict, loss, grads, *, tx, ema_decay: float,
                    loss_history=None):
  """The optimiser and EMA update of one step; returns (state, metrics).

  A non-finite loss or gradient leaves params, optimiser state, EMA and ``loss_history``
  unchanged and is counted; ``batch['stop']`` comes back as ``metrics['stop']`` (see
  train_step).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params,
                            params)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      ema_params=keep(ema_params, state.ema_params),
      opt_state=keep(opt_state, state.opt_state),
      loss_history=keep(loss_history, state.loss_history),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
  )
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'finite': finite}
  if 'stop' in batch:  # int32 [B]: each process's stop vote in its rows (see trainer)
    metrics['stop'] = jnp.max(batch['stop'])
  return state, metrics


def make_train_step(config, model, tx, schedule, state_sharding, batch_sharding,
                    metrics_sharding, data_stats: Optional[dict] = None):
  """``train_step`` jitted over the mesh: batch sharded, state replicated and donated.
  ``data_stats``: the data's (input_pipeline), whose linear map model.forecast_base takes."""
  step = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, target=config.diffusion.target,
      weighting=config.diffusion.weighting, min_snr_gamma=config.diffusion.min_snr_gamma,
      ema_decay=config.optim.ema_decay, random_flip=config.data.random_flip,
      label_dropout=config.training.label_dropout,
      mask_mix=(tuple(config.training.mask_mix) if config_lib.observed_input(config) else None),
      mask_horizon=config.data.get('horizon', 0),
      base_weights=config_lib.base_weights(config, data_stats),
      center_observed=config_lib.center_observed(config),
      grad_accum_steps=config.optim.get('grad_accum_steps', 1),
      logit_normal_t=config.diffusion.timestep_sampling == 'logit_normal',
      coupling=config_lib.coupling(config))
  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, metrics_sharding), donate_argnums=0)


def distill_step(state: TrainState, batch: dict, teacher_params, *, model, tx, grid,
                 teacher_prediction: str, student_prediction: str, clip_x0: bool,
                 ema_decay: float, random_flip: bool):
  """One progressive-distillation update of the student in ``state`` from a global batch
  {'x': [B, ...]}: it learns one DDIM step of ``grid`` from two of the teacher (the same
  network, at ``teacher_params``). Returns (state, metrics) as ``train_step`` does."""
  flip_key, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  x0 = flip_images(flip_key, batch['x']) if random_flip else batch['x']
  teacher_fn = lambda x_t, t: model_apply(model, teacher_params, x_t, t)

  def loss_fn(params):
    student_fn = lambda p, x_t, t, key: model_apply(model, p, x_t, t, None, True, key)
    return distillation.distillation_loss(
        student_fn, params, teacher_fn, x0, loss_key, grid,
        teacher_prediction=teacher_prediction, student_prediction=student_prediction,
        clip_x0=clip_x0)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return apply_gradients(state, batch, loss, grads, tx=tx, ema_decay=ema_decay)
