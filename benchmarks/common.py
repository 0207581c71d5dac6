"""What several benchmarks share: the training step that vs_pytorch.py times and profile_step.py
dissects, and the image shape of a config whose data fields are left at 0."""

import jax
import optax

from ddpm_jax import input_pipeline, losses
from ddpm_jax.models import model_apply


def fill_image_shape(config) -> None:
  """Sets data.image_size and data.channels where ``config`` leaves them at 0, from its data."""
  if not config.data.image_size or not config.data.channels:
    shape = input_pipeline.create_source(config.data).info().shape  # (H, W, C)
    config.data.image_size, config.data.channels = shape[0], shape[-1]


def adam_diffusion_step(model, schedule, x0, tx):
  """(params, opt_state, key) -> (params, opt_state, loss): x_t at random t from the fixed batch
  x0 [B, H, W, C], the network in train mode (dropout), the eps MSE, gradients and ``tx``."""

  def step(params, opt_state, key):
    def loss_fn(p):
      apply_fn = lambda p_, x_t, t, k: model_apply(model, p_, x_t, t, None, True, k)
      return losses.diffusion_loss(apply_fn, p, x0, key, schedule)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
