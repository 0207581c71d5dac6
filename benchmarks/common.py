"""The training step both CIFAR-10 benchmarks time (vs_pytorch.py) or dissect (profile_step.py)."""

import jax
import optax

from ddpm_jax import losses
from ddpm_jax.models import model_apply


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
