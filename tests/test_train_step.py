"""The train step against its formulas: Adam's first update, the EMA, clipping, warm-up, label
dropout, flips, and a run that learns. Each would fail for a sign-flipped update, a frozen EMA,
an ignored clip, a constant learning rate, ignored label dropout or a training loop that does
not descend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import config_lib, input_pipeline, losses, sharding, train_state, trainer
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.models import create_model, model_apply
from ddpm_jax import workdir as workdir_lib
from tests.helpers import tiny_config


def _digits(count: int) -> jnp.ndarray:
  """The first ``count`` of scikit-learn's digits in model space, [count, 8, 8, 1]."""
  return jnp.asarray(input_pipeline.digits_source().get_batch(np.arange(count))['x'])


def _setup(ema_decay=0.9, grad_clip=1e30, eps=1e-8, learning_rate=1e-3, warmup_steps=0):
  config = tiny_config(name='digits')
  config.data.image_size, config.data.channels = 8, 1
  config.optim.update(ema_decay=ema_decay, grad_clip=grad_clip, eps=eps,
                      learning_rate=learning_rate, warmup_steps=warmup_steps)
  model = create_model(config)
  schedule = config_lib.schedule_from_config(config)
  tx = train_state.make_optimizer(config.optim)
  state = train_state.create_train_state(model, tx, 0, (8, 8, 1))
  step = jax.jit(functools.partial(
      train_state.train_step, model=model, tx=tx, schedule=schedule, target='eps',
      weighting='simple', min_snr_gamma=5.0, ema_decay=ema_decay, random_flip=False,
      label_dropout=0.0))
  return config, model, schedule, state, step


def _gradient(model, schedule, state, x0):
  """The gradient the step takes, from the key it uses (fold_in(key, step), third split)."""
  _, _, loss_key = jax.random.split(jax.random.fold_in(state.key, state.step), 3)

  def loss(params):
    apply_fn = lambda p, x_t, t, key: model_apply(model, p, x_t, t, None, True, key)
    return losses.diffusion_loss(apply_fn, params, x0, loss_key, schedule)[0]

  return jax.grad(loss)(state.params)


def _assert_trees_close(got, want, atol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)


def test_first_step_is_adams_update_and_the_ema_follows():
  """p1 = p0 - lr g / (|g| + eps) (Adam's bias-corrected first step: m = g, v = g^2), and
  ema1 = d p0 + (1 - d) p1. Measured: agreement to ~1e-7 lr."""
  lr, decay = 1e-3, 0.9
  _, model, schedule, state, step = _setup(ema_decay=decay, learning_rate=lr)
  x0 = _digits(16)
  grads = _gradient(model, schedule, state, x0)
  new_state, metrics = step(state, {'x': x0})
  want = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), state.params, grads)
  _assert_trees_close(new_state.params, want, atol=lr * 1e-4)
  ema = jax.tree.map(lambda p0, p1: decay * p0 + (1 - decay) * p1, state.params,
                     new_state.params)
  _assert_trees_close(new_state.ema_params, ema, atol=lr * 1e-5)
  np.testing.assert_allclose(float(metrics['grad_norm']), float(optax.tree.norm(grads)),
                             rtol=1e-4)
  assert int(new_state.step) == 1


def test_clipping_scales_the_gradient_by_clip_over_norm():
  """With eps = 1 Adam's first step depends on the gradient's scale: -lr g_c / (|g_c| + 1) with
  g_c = g * clip / |g|, clip at half the norm (unclipped, every entry would differ)."""
  lr = 1e-3
  _, model, schedule, state, _ = _setup(eps=1.0, learning_rate=lr)
  x0 = _digits(16)
  grads = _gradient(model, schedule, state, x0)
  norm = float(optax.tree.norm(grads))
  *_, step = _setup(eps=1.0, learning_rate=lr, grad_clip=norm / 2)
  new_state, _ = step(state, {'x': x0})
  clipped = jax.tree.map(lambda g: g * 0.5, grads)
  want = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1.0), state.params, clipped)
  _assert_trees_close(new_state.params, want, atol=lr * 1e-5)


def test_warmup_learning_rate_at_steps_0_k_and_K():
  """A constant gradient makes Adam's bias-corrected step -lr_n g / (|g| + eps) at every n,
  so the update reads out the rate: 0 at step 0, lr k / K at k, lr from K on."""
  config = tiny_config()
  config.optim.update(learning_rate=0.1, warmup_steps=10, grad_clip=1e30)
  tx = train_state.make_optimizer(config.optim)
  params = {'w': jnp.ones(3)}
  grads = {'w': jnp.array([0.5, -2.0, 1.0])}
  opt_state = tx.init(params)
  rates = []
  for _ in range(13):
    updates, opt_state = tx.update(grads, opt_state, params)
    rates.append(float(-updates['w'][1] / (-2.0 / (2.0 + config.optim.eps))))
  # float32 bias corrections: measured within 7e-6 relative
  np.testing.assert_allclose([rates[0], rates[5], rates[10], rates[12]], [0.0, 0.05, 0.1, 0.1],
                             rtol=2e-5, atol=1e-9)


class _RecordingModel:
  """Stands in for the UNet: records the labels each call gets; output w * x_t."""
  num_classes = 10

  def __init__(self):
    self.labels = []

  def apply(self, variables, x_t, t, labels, train=False, rngs=None):
    self.labels.append(np.asarray(labels))
    return variables['params']['w'] * x_t


@pytest.mark.parametrize('rate', [0.0, 0.1, 0.5])
def test_label_dropout_replaces_labels_by_the_null_label_at_its_rate(rate):
  model = _RecordingModel()
  tx = optax.sgd(0.1)
  params = {'w': jnp.ones(())}
  zero = jnp.zeros((), jnp.int32)
  state = train_state.TrainState(step=zero, params=params, ema_params=params,
                                 opt_state=tx.init(params), key=jax.random.key(0),
                                 nonfinite_total=zero, nonfinite_streak=zero)
  n = 4000
  labels = jnp.arange(n) % 10
  train_state.train_step(state, {'x': jnp.zeros((n, 2)), 'label': labels}, model=model, tx=tx,
                         schedule=config_lib.schedule_from_config(tiny_config()), target='eps',
                         weighting='simple', min_snr_gamma=5.0, ema_decay=0.9,
                         random_flip=False, label_dropout=rate)
  (seen,) = model.labels
  dropped = seen == model.num_classes
  np.testing.assert_array_equal(seen[~dropped], np.asarray(labels)[~dropped])
  sigma = np.sqrt(rate * (1 - rate) / n)
  assert abs(dropped.mean() - rate) <= 5 * sigma + 1e-12, (dropped.mean(), rate)


def test_random_flip_mirrors_images_left_to_right_about_half_the_time():
  x0 = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (2000, 3, 4, 2))  # W varies
  out = np.asarray(train_state.flip_images(jax.random.key(0), x0))
  flipped = (out == np.asarray(x0)[:, :, ::-1]).all(axis=(1, 2, 3))
  kept = (out == np.asarray(x0)).all(axis=(1, 2, 3))
  assert (flipped ^ kept).all()  # each image exactly one of the two
  assert abs(flipped.mean() - 0.5) <= 5 * np.sqrt(0.25 / 2000)
  with pytest.raises(ValueError, match=r'mirrors images \[B, H, W, C\]'):
    train_state.flip_images(jax.random.key(0), jnp.zeros((4, 16, 3)))  # [B, L, C] windows


def test_training_on_fixed_digits_lowers_the_loss():
  """150 steps on 64 fixed digits: the mean loss of the last 20 is below 0.8x the first 20's
  (measured: 0.21x)."""
  _, _, _, state, step = _setup(learning_rate=2e-3)
  x0 = _digits(64)
  history = []
  for _ in range(150):
    state, metrics = step(state, {'x': x0})
    history.append(float(metrics['loss']))
  first, last = np.mean(history[:20]), np.mean(history[-20:])
  assert last < 0.8 * first, (first, last)


@pytest.mark.slow  # 30 s on the 2-core CI machine: in the slow pass
def test_importance_sampling_history_is_saved_and_restored(tmp_path):
  path = tmp_path / 'd.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  config.diffusion.timestep_sampling = 'importance'
  state = trainer.train(config, tmp_path / 'run')
  history = state.loss_history
  assert int(history.counts.sum()) == 4 * config.training.batch_size
  assert float(history.mean_sq_loss.max()) > 0
  resolved = workdir_lib.read_config(tmp_path / 'run')
  model = create_model(resolved)
  checkpointer = Checkpointer(tmp_path / 'run' / 'checkpoints', read_only=True)
  try:
    restored = checkpointer.restore(4, train_state.abstract_state(resolved, model),
                                    sharding.replicated(sharding.make_mesh()))
  finally:
    checkpointer.close()
  np.testing.assert_array_equal(restored.state.loss_history.counts, history.counts)
  np.testing.assert_array_equal(restored.state.loss_history.mean_sq_loss, history.mean_sq_loss)
