"""The denoising training loss as a pure function of an ``apply_fn``, and timestep sampling.

Training never runs the reverse chain: it draws one t per example, noises x0 in one shot with
``q_sample`` and regresses the chosen target.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion
from ddpm_jax import schedules as schedules_lib
from ddpm_jax.errors import InputError

TARGETS = ('eps', 'x0', 'v', 'velocity')
WEIGHTINGS = ('simple', 'snr', 'min_snr')
TIMESTEP_SAMPLINGS = ('uniform', 'importance', 'logit_normal')
COUPLINGS = ('independent', 'minibatch_ot')

# apply_fn(params, x_t [B, ...], t [B], key) -> prediction [B, ...]
ApplyFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


class LossHistory(NamedTuple):
  """Running per-timestep statistics for importance sampling of t (Nichol & Dhariwal 2021)."""
  mean_sq_loss: jax.Array  # [T] exponential moving average of the squared loss at each t
  counts: jax.Array  # [T] int32, how many examples at each t have been seen


def init_loss_history(num_timesteps: int) -> LossHistory:
  return LossHistory(jnp.zeros((num_timesteps,), jnp.float32),
                     jnp.zeros((num_timesteps,), jnp.int32))


def update_loss_history(history: LossHistory, t, losses, decay: float = 0.9) -> LossHistory:
  """Folds a batch's per-example losses [B] at timesteps t [B] into the history."""
  num_timesteps = history.counts.shape[0]
  batch_sum = jax.ops.segment_sum(losses ** 2, t, num_segments=num_timesteps)
  batch_count = jax.ops.segment_sum(jnp.ones_like(t), t, num_segments=num_timesteps)
  batch_mean = batch_sum / jnp.maximum(batch_count, 1)
  first = history.counts == 0
  blended = jnp.where(first, batch_mean, decay * history.mean_sq_loss + (1 - decay) * batch_mean)
  mean_sq = jnp.where(batch_count > 0, blended, history.mean_sq_loss)
  return LossHistory(mean_sq, history.counts + batch_count.astype(jnp.int32))


def importance_probabilities(history: LossHistory, warmup: int = 10, uniform_prob: float = 1e-3):
  """p(t) ∝ sqrt(E[L_t²]) mixed with a little uniform mass; uniform until every t was seen
  ``warmup`` times. Returns [T]."""
  num_timesteps = history.counts.shape[0]
  weights = jnp.sqrt(history.mean_sq_loss)
  probs = weights / jnp.maximum(weights.sum(), 1e-20)
  probs = probs * (1 - uniform_prob) + uniform_prob / num_timesteps
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
  warm = jnp.all(history.counts >= warmup)
  return jnp.where(warm, probs, uniform)


def check_timestep_sampling(schedule, sampling: str) -> None:
  """One line for a diffusion.timestep_sampling the schedule cannot serve (or an unknown one)."""
  if sampling not in TIMESTEP_SAMPLINGS:
    raise InputError(f'unknown diffusion.timestep_sampling {sampling!r}; choose one of '
                     f'{", ".join(TIMESTEP_SAMPLINGS)}')
  continuous = schedules_lib.is_continuous(schedule)
  if sampling == 'importance' and continuous:
    raise InputError("diffusion.timestep_sampling='importance' needs a discrete schedule "
                     "(linear, cosine); use 'uniform' or 'logit_normal' with continuous ones")
  if sampling == 'logit_normal' and not continuous:
    raise InputError("diffusion.timestep_sampling='logit_normal' draws continuous t; use it "
                     "with a continuous schedule (rectified_flow, vp_linear, vp_cosine)")


def sample_timesteps(key, schedule, batch_size: int,
                     loss_history: Optional[LossHistory] = None, logit_normal: bool = False):
  """Draws t for each example and the importance weight that keeps the loss unbiased.

  Discrete: integers uniform over [0, T) (the paper's 1..T), or from ``loss_history``.
  Continuous: floats uniform on [t_min, 1], or with ``logit_normal`` t_min + (1 - t_min)
  sigmoid(n), n ~ N(0, 1) (Esser et al. 2024: more of the training where the path is hardest
  to predict; a reweighting of the loss over t, so its weights stay 1). Returns (t [B],
  weights [B]).
  """
  check_timestep_sampling(schedule, 'importance' if loss_history is not None else
                          'logit_normal' if logit_normal else 'uniform')
  if schedules_lib.is_continuous(schedule):
    if logit_normal:
      t = schedule.t_min + (1.0 - schedule.t_min) * jax.nn.sigmoid(
          jax.random.normal(key, (batch_size,)))
    else:
      t = jax.random.uniform(key, (batch_size,), minval=schedule.t_min, maxval=1.0)
    return t, jnp.ones((batch_size,))
  num_timesteps = schedule.num_timesteps
  if loss_history is None:
    t = jax.random.randint(key, (batch_size,), 0, num_timesteps)
    return t, jnp.ones((batch_size,))
  probs = importance_probabilities(loss_history)
  t = jax.random.choice(key, num_timesteps, (batch_size,), p=probs)
  return t, 1.0 / (num_timesteps * probs[t])


def check_target(schedule, target: str, weighting: str) -> None:
  """One line for a target the schedule or the weighting cannot serve."""
  if target not in TARGETS:
    raise InputError(f'unknown target {target!r}; choose one of {", ".join(TARGETS)}')
  if target == 'velocity':
    if not schedules_lib.is_continuous(schedule):
      raise InputError("diffusion.target='velocity' (d x_t / dt) needs a continuous schedule "
                       "(rectified_flow, vp_linear, vp_cosine)")
    if weighting != 'simple':
      raise InputError(f"diffusion.target='velocity' trains with weighting='simple' (flow "
                       f"matching's plain MSE), not {weighting!r}")
  if target == 'v' and weighting != 'simple' and not schedules_lib.is_variance_preserving(schedule):
    raise InputError(f"weighting={weighting!r} carries x0-space weights to v with 1 + SNR, which "
                     f"holds on variance-preserving schedules only; use weighting='simple'")


def loss_weight(log_snr, target: str, weighting: str, min_snr_gamma: float = 5.0):
  """Per-example weight on the squared error of ``target``, from log-SNR [B].

  Weightings are defined on the x0-space error and carried to the target's space, using
  |eps err|² = SNR |x0 err|² and |v err|² = (1 + SNR) |x0 err|²:
  ``simple``: plain MSE on the target (DDPM's L_simple for eps);
  ``snr``: x0-space weight SNR(t) (what eps-MSE is);
  ``min_snr``: x0-space weight min(SNR(t), gamma) (Hang et al. 2023).
  """
  if weighting not in WEIGHTINGS:
    raise InputError(f'unknown loss weighting {weighting!r}; choose one of {", ".join(WEIGHTINGS)}')
  if target not in TARGETS:
    raise InputError(f'unknown target {target!r}; choose one of {", ".join(TARGETS)}')
  if weighting == 'simple':
    return jnp.ones_like(log_snr)
  snr = jnp.exp(log_snr)
  x0_weight = snr if weighting == 'snr' else jnp.minimum(snr, min_snr_gamma)
  to_target = {'eps': snr, 'x0': jnp.ones_like(snr), 'v': snr + 1.0}[target]
  return x0_weight / to_target


class TrainingDraw(NamedTuple):
  """What one training step draws per example, apart from the network's own dropout."""
  t: jax.Array  # [B] timesteps
  importance: jax.Array  # [B] weights that keep an importance-sampled loss unbiased
  noise: jax.Array  # [B, ...] like x0


def check_coupling(schedule, coupling: str) -> None:
  """One line for a diffusion.coupling the schedule cannot serve (or an unknown one)."""
  if coupling not in COUPLINGS:
    raise InputError(f'unknown diffusion.coupling {coupling!r}; choose one of '
                     f'{", ".join(COUPLINGS)}')
  if coupling == 'minibatch_ot' and not isinstance(schedule, schedules_lib.RectifiedFlow):
    # A coupled pair is only a valid training example for a path sampled by its ODE from
    # the noise end; the ancestral and SDE samplers of the VP schedules assume independence.
    raise InputError("diffusion.coupling='minibatch_ot' pairs data with noise along the "
                     "straight path; use it with diffusion.schedule='rectified_flow'")


def ot_pairing(x0, noise):
  """``noise`` [B, ...] reordered so that the pairs (x0_i, noise_i) have the least total
  squared distance over all orderings of the batch (minibatch optimal transport: Tong et al.
  2023, Pooladian et al. 2023). The set of noise draws is unchanged, so each is still N(0, I);
  the flow between paired points crosses less, so its ODE is straighter."""
  flat_x0, flat_noise = x0.reshape(x0.shape[0], -1), noise.reshape(noise.shape[0], -1)
  cost = (jnp.sum(flat_x0 ** 2, 1)[:, None] + jnp.sum(flat_noise ** 2, 1)[None, :]
          - 2.0 * flat_x0 @ flat_noise.T)  # [B, B]
  rows, cols = optax.assignment.hungarian_algorithm(cost)
  return noise[cols[jnp.argsort(rows)]]


def draw_training_noise(key, schedule, x0, loss_history: Optional[LossHistory] = None,
                        logit_normal: bool = False, coupling: str = 'independent'):
  """t, importance weights and noise for a batch x0 [B, ...], and the network's dropout key.

  Drawn for the whole global batch at once, so a step that computes its gradient in
  micro-batches (optim.grad_accum_steps) trains on exactly the examples, t and noise of the
  unsplit step, and the minibatch-OT pairing (``coupling``) is over the global batch.
  Returns (TrainingDraw, model_key).
  """
  check_coupling(schedule, coupling)
  t_key, noise_key, model_key = jax.random.split(key, 3)
  t, importance = sample_timesteps(t_key, schedule, x0.shape[0], loss_history, logit_normal)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  if coupling == 'minibatch_ot':
    noise = ot_pairing(x0, noise)
  return TrainingDraw(t, importance, noise), model_key


def denoising_loss(apply_fn: ApplyFn, params, x0, draw: TrainingDraw, model_key, schedule, *,
                   target: str = 'eps', weighting: str = 'simple', min_snr_gamma: float = 5.0,
                   loss_mask=None):
  """The mean denoising loss of x0 [B, ...] at the drawn t and noise (see diffusion_loss).
  Returns (loss scalar, aux)."""
  check_target(schedule, target, weighting)
  x_t = diffusion.q_sample(schedule, x0, draw.t, draw.noise)
  wanted = diffusion.regression_target(schedule, x0, draw.noise, draw.t, target)
  prediction = apply_fn(params, x_t, draw.t, model_key).astype(jnp.float32)
  axes = tuple(range(1, x0.ndim))
  if loss_mask is None:
    squared_error = jnp.mean((prediction - wanted) ** 2, axis=axes)
  else:
    squared_error = (jnp.sum(loss_mask * (prediction - wanted) ** 2, axis=axes)
                     / jnp.maximum(jnp.sum(loss_mask, axis=axes), 1.0))
  per_example = loss_weight(diffusion.log_snr(schedule, draw.t), target, weighting,
                            min_snr_gamma) * squared_error
  return jnp.mean(draw.importance * per_example), {'per_example': per_example, 't': draw.t}


def diffusion_loss(apply_fn: ApplyFn, params, x0, key, schedule, *, target: str = 'eps',
                   weighting: str = 'simple', min_snr_gamma: float = 5.0,
                   loss_history: Optional[LossHistory] = None, loss_mask=None):
  """Mean denoising loss over a batch x0 [B, ...]; with ``loss_mask`` [B, ...] (1 = scored) the
  squared error is averaged over the scored entries of each example only.

  Draws t and noise, forms x_t with ``q_sample``, calls ``apply_fn(params, x_t, t, key)`` and
  regresses ``target``. Returns (loss scalar, aux) where aux holds ``per_example`` [B] losses
  (before importance weights) and ``t`` [B].
  """
  draw, model_key = draw_training_noise(key, schedule, x0, loss_history)
  return denoising_loss(apply_fn, params, x0, draw, model_key, schedule, target=target,
                        weighting=weighting, min_snr_gamma=min_snr_gamma, loss_mask=loss_mask)
