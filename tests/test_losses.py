import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion, losses, schedules, train_state
from ddpm_jax.configs import digits
from ddpm_jax.errors import InputError


def _oracle(sched, x0, target):
  """An apply_fn that knows x0 and so returns the exact target for any x_t."""
  def apply_fn(params, x_t, t, key):
    alpha, sigma = (diffusion.per_example(c, x_t) for c in diffusion.alpha_sigma(sched, t))
    eps = (x_t - alpha * x0) / sigma
    return diffusion.join_prediction(x0, eps, alpha, sigma, target)
  return apply_fn


# The velocity target (continuous schedules, weighting simple only) is tested in test_flow.py.
VP_TARGETS = [t for t in losses.TARGETS if t != 'velocity']


@pytest.mark.parametrize('sched', [schedules.linear(), schedules.vp_linear()])
@pytest.mark.parametrize('target', VP_TARGETS)
@pytest.mark.parametrize('weighting', losses.WEIGHTINGS)
def test_loss_zero_for_oracle_positive_otherwise(sched, target, weighting):
  x0 = jax.random.uniform(jax.random.key(0), (16, 4, 4, 1), minval=-1, maxval=1)
  key = jax.random.key(1)
  loss_fn = jax.jit(losses.diffusion_loss, static_argnames=('apply_fn', 'target', 'weighting'))
  good, aux = loss_fn(_oracle(sched, x0, target), None, x0, key, sched, target=target,
                      weighting=weighting)
  assert float(good) < 1e-6
  assert aux['per_example'].shape == (16,)
  bad, _ = loss_fn(lambda p, x_t, t, k: jnp.zeros_like(x_t), None, x0, key, sched, target=target,
                   weighting=weighting)
  assert float(bad) > 1e-3


def test_simple_eps_loss_is_mse_against_drawn_noise():
  """With prediction 0, L_simple for eps is E|eps|² = 1 over many draws."""
  sched = schedules.linear()
  x0 = jnp.zeros((4096, 8))
  loss, aux = losses.diffusion_loss(lambda p, x, t, k: jnp.zeros_like(x), None, x0,
                                    jax.random.key(3), sched)
  np.testing.assert_allclose(loss, 1.0, atol=0.01)
  t = np.asarray(aux['t'])
  assert t.min() >= 0 and t.max() <= 999 and len(np.unique(t)) > 900


def test_min_snr_weights():
  log_snr = jnp.log(jnp.array([0.5, 5.0, 50.0]))
  snr = np.array([0.5, 5.0, 50.0])
  np.testing.assert_allclose(losses.loss_weight(log_snr, 'eps', 'min_snr'),
                             np.minimum(snr, 5) / snr, rtol=1e-5)
  np.testing.assert_allclose(losses.loss_weight(log_snr, 'x0', 'min_snr'),
                             np.minimum(snr, 5), rtol=1e-5)
  np.testing.assert_allclose(losses.loss_weight(log_snr, 'v', 'min_snr'),
                             np.minimum(snr, 5) / (snr + 1), rtol=1e-5)
  np.testing.assert_allclose(losses.loss_weight(log_snr, 'eps', 'snr'), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="'p2'.*simple, snr, min_snr"):
    losses.loss_weight(log_snr, 'eps', 'p2')
  with pytest.raises(ValueError, match="'noise'.*eps, x0, v"):
    losses.diffusion_loss(None, None, jnp.zeros((1, 2)), jax.random.key(0), schedules.linear(),
                          target='noise')


def test_importance_sampling_follows_history_and_is_unbiased():
  T = 4
  history = losses.init_loss_history(T)
  # Before every t has been seen, sampling is uniform.
  np.testing.assert_allclose(losses.importance_probabilities(history), 0.25)
  t = jnp.array([0, 1, 2, 3] * 20)
  per_t_loss = jnp.array([1.0, 1.0, 2.0, 4.0])
  history = losses.update_loss_history(history, t, per_t_loss[t])
  probs = losses.importance_probabilities(history)
  np.testing.assert_allclose(probs, np.array([1, 1, 2, 4]) / 8 * (1 - 1e-3) + 1e-3 / 4, rtol=1e-5)
  sched = schedules.linear(T, 0.1, 0.2)
  drawn, weights = losses.sample_timesteps(jax.random.key(0), sched, 100000, history)
  freq = np.bincount(np.asarray(drawn), minlength=T) / 100000
  np.testing.assert_allclose(freq, probs, atol=0.01)
  # E_p[w L] equals the uniform mean of L.
  np.testing.assert_allclose(np.mean(weights * per_t_loss[drawn]), per_t_loss.mean(), rtol=0.02)


def _exact_target(x0, x_t, alpha, sigma, target):
  """The regression target from the closed form x_t = alpha x0 + sigma eps, written out here
  (not with the code's join_prediction)."""
  eps = (x_t - alpha * x0) / sigma
  return {'eps': eps, 'x0': x0, 'v': alpha * eps - sigma * x0}[target]


def _expected_weight(snr, target, weighting, gamma=5.0):
  """Each weighting's weight on the target's squared error: x0-space weights 1 / SNR / min(SNR,
  gamma) carried over by |eps err|^2 = SNR |x0 err|^2, |v err|^2 = (1 + SNR) |x0 err|^2."""
  if weighting == 'simple':
    return np.ones_like(snr)
  x0_weight = snr if weighting == 'snr' else np.minimum(snr, gamma)
  return x0_weight / {'eps': snr, 'x0': np.ones_like(snr), 'v': 1.0 + snr}[target]


@pytest.mark.parametrize('sched', [schedules.cosine(), schedules.vp_cosine()])
@pytest.mark.parametrize('target', VP_TARGETS)
@pytest.mark.parametrize('weighting', losses.WEIGHTINGS)
def test_each_examples_loss_is_its_weight_times_the_squared_error(sched, target, weighting):
  """A predictor off by a known delta on every entry: each example's loss is the weighting at its
  log-SNR times delta^2 (a dropped or wrong weighting fails at some t)."""
  x0 = jax.random.uniform(jax.random.key(0), (64, 4, 4, 1), minval=-1, maxval=1)
  delta = 0.3

  def apply_fn(params, x_t, t, key):
    alpha, sigma = (diffusion.per_example(c, x_t) for c in diffusion.alpha_sigma(sched, t))
    return _exact_target(x0, x_t, alpha, sigma, target) + delta

  _, aux = losses.diffusion_loss(apply_fn, None, x0, jax.random.key(1), sched, target=target,
                                 weighting=weighting)
  alpha, sigma = (np.asarray(c, np.float64) for c in diffusion.alpha_sigma(sched, aux['t']))
  want = _expected_weight(alpha ** 2 / sigma ** 2, target, weighting) * delta ** 2
  np.testing.assert_allclose(np.asarray(aux['per_example']), want, rtol=2e-3)
  informative = weighting != 'simple' and not (weighting == 'snr' and target == 'eps')
  assert not informative or np.ptp(want) > 0  # the weights differ across the drawn t


def test_loss_mask_scores_hidden_entries_only():
  """The series recipe: entries with mask 1 (hidden) are scored, observed ones are not."""
  sched = schedules.linear()
  x0 = jax.random.normal(jax.random.key(0), (8, 16, 2))
  mask = jnp.zeros_like(x0).at[:, 10:].set(1.0)  # the last 6 steps hidden

  def off_where(where, delta=0.5):
    def apply_fn(params, x_t, t, key):
      alpha, sigma = (diffusion.per_example(c, x_t) for c in diffusion.alpha_sigma(sched, t))
      return _exact_target(x0, x_t, alpha, sigma, 'eps') + delta * where
    return apply_fn

  _, observed_off = losses.diffusion_loss(off_where(1 - mask), None, x0, jax.random.key(1), sched,
                                          loss_mask=mask)
  _, hidden_off = losses.diffusion_loss(off_where(mask), None, x0, jax.random.key(1), sched,
                                        loss_mask=mask)
  np.testing.assert_allclose(np.asarray(observed_off['per_example']), 0.0, atol=1e-8)
  np.testing.assert_allclose(np.asarray(hidden_off['per_example']), 0.25, rtol=1e-4)


def test_logit_normal_t_is_the_sigmoid_of_a_standard_normal():
  """Esser et al. 2024's draw: logit of t rescaled from [t_min, 1] is N(0, 1) (Kolmogorov-
  Smirnov), the weights stay 1; the uniform draw, scored the same way, is rejected."""
  sched = schedules.rectified_flow()
  key = jax.random.key(0)
  t, weights = losses.sample_timesteps(key, sched, 20000, logit_normal=True)
  unit = (np.asarray(t, np.float64) - sched.t_min) / (1 - sched.t_min)
  assert stats.kstest(np.log(unit / (1 - unit)), 'norm').pvalue > 1e-3
  np.testing.assert_array_equal(np.asarray(weights), 1.0)
  t, _ = losses.sample_timesteps(key, sched, 20000)
  unit = (np.asarray(t, np.float64) - sched.t_min) / (1 - sched.t_min)
  assert stats.kstest(np.log(unit / (1 - unit)), 'norm').pvalue < 1e-6


def test_logit_normal_t_on_a_discrete_schedule_is_one_line():
  with pytest.raises(InputError, match='draws continuous t; use it with a continuous schedule'):
    losses.sample_timesteps(jax.random.key(0), schedules.linear(), 4, logit_normal=True)
  config = digits.get_config()
  config.diffusion.timestep_sampling = 'logit_normal'
  with pytest.raises(InputError, match="timestep_sampling='logit_normal' draws continuous t"):
    train_state.initial_state_fn(config, None, None, schedules.linear(), (8, 8, 1))


def test_minibatch_ot_pairing_is_the_least_cost_permutation():
  """Against every one of the 720 orderings of a batch of 6: the pairing's total squared
  distance is the least of them, the noise rows are the same set, and a batch already in its
  optimal order comes back unchanged."""
  x0 = np.asarray(jax.random.normal(jax.random.key(0), (6, 3, 2)))
  noise = np.asarray(jax.random.normal(jax.random.key(1), (6, 3, 2)))
  paired = np.asarray(losses.ot_pairing(jnp.asarray(x0), jnp.asarray(noise)))
  cost = lambda order: sum(np.sum((x0[i] - noise[j]) ** 2) for i, j in enumerate(order))
  best = min(itertools.permutations(range(6)), key=cost)
  np.testing.assert_allclose(np.sum((x0 - paired) ** 2), cost(best), rtol=1e-5)
  np.testing.assert_array_equal(paired, noise[list(best)])
  np.testing.assert_array_equal(np.asarray(losses.ot_pairing(jnp.asarray(x0), jnp.asarray(paired))),
                                paired)
  assert np.sum((x0 - paired) ** 2) < np.sum((x0 - noise) ** 2)


def test_minibatch_ot_draw_pairs_the_noise_of_the_independent_draw():
  """The coupled draw keeps the independent draw's t and its set of noise rows."""
  sched = schedules.rectified_flow()
  x0 = jax.random.normal(jax.random.key(2), (8, 4, 4, 1))
  independent, _ = losses.draw_training_noise(jax.random.key(3), sched, x0)
  coupled, _ = losses.draw_training_noise(jax.random.key(3), sched, x0, coupling='minibatch_ot')
  np.testing.assert_array_equal(np.asarray(coupled.t), np.asarray(independent.t))
  np.testing.assert_array_equal(np.asarray(coupled.noise),
                                np.asarray(losses.ot_pairing(x0, independent.noise)))
  assert not np.array_equal(np.asarray(coupled.noise), np.asarray(independent.noise))


def test_minibatch_ot_off_the_flow_path_is_one_line():
  with pytest.raises(InputError, match="coupling='minibatch_ot' pairs data with noise"):
    losses.draw_training_noise(jax.random.key(0), schedules.vp_linear(), jnp.zeros((4, 2)),
                               coupling='minibatch_ot')
  config = digits.get_config()
  config.diffusion.coupling = 'minibatch_ot'
  with pytest.raises(InputError, match="use it with diffusion.schedule='rectified_flow'"):
    train_state.initial_state_fn(config, None, None, schedules.linear(), (8, 8, 1))
  config.diffusion.coupling = 'sinkhorn'
  with pytest.raises(InputError, match="unknown diffusion.coupling 'sinkhorn'"):
    train_state.initial_state_fn(config, None, None, schedules.linear(), (8, 8, 1))
