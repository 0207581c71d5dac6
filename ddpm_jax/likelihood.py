"""The DDPM variational bound in bits per dimension (Ho et al. 2020, eq. 5; no Flax, no config).

For 8-bit data scaled to [-1, 1] and a discrete T-step schedule,

  -log p(x_0) <= L_T + sum_{t=2..T} L_{t-1} + L_0,
  L_T     = KL(q(x_T | x_0) || N(0, I))                        (the prior term)
  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      (T - 1 Gaussian KLs)
  L_0     = -log p(x_0 | x_1), a Gaussian integrated over each pixel's 1/255-wide bin
            (the outermost bins extend to infinity): the discretised decoder.

p(x_{t-1} | x_t) = N(posterior mean at the network's x_0, sigma_t^2), with sigma_t^2 the sampler's
choice (diffusion.reverse_log_variance: 'small' = beta-tilde_t, 'large' = beta_t). Each term
uses one draw of x_t ~ q(x_t | x_0), as in the DDPM and improved-diffusion code; the sum is an
unbiased estimate of the bound. In the code's indexing t = 0..T-1, index 0 is the decoder.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import schedules as schedules_lib

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
BIN_HALF_WIDTH = 1.0 / 255.0  # [-1, 1] holds 256 levels, 2 / 255 apart


def normal_kl(mean1, log_var1, mean2, log_var2):
  """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats, elementwise."""
  return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) elementwise for x on the 256-level grid of [-1, 1], under N(mean, e^(2 log_scale))
  integrated over x's bin; the bins at -1 and 1 take the tails."""
  inv_scale = jnp.exp(-log_scale)
  upper = (x - mean + BIN_HALF_WIDTH) * inv_scale
  lower = (x - mean - BIN_HALF_WIDTH) * inv_scale
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_survival_lower = jax.scipy.special.log_ndtr(-lower)
  # The middle bins: log(Phi(upper) - Phi(lower)), computed on the side of the mean where it
  # does not cancel.
  mid = jnp.where(lower > 0,
                  jnp.log(jnp.maximum(jax.scipy.special.ndtr(-lower)
                                      - jax.scipy.special.ndtr(-upper), 1e-30)),
                  jnp.log(jnp.maximum(jax.scipy.special.ndtr(upper)
                                      - jax.scipy.special.ndtr(lower), 1e-30)))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_survival_lower, mid))


def _per_example_bits(nats):  # [B, ...] -> [B]
  return jnp.mean(nats.reshape(nats.shape[0], -1), axis=1) / np.log(2.0)


def prior_bits(schedule: schedules_lib.DiscreteSchedule, x0):
  """L_T in bits per dimension [B]: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1))."""
  last = schedule.num_timesteps - 1
  mean = schedule.sqrt_alphas_cumprod[last] * x0
  log_var = jnp.log(1.0 - schedule.alphas_cumprod[last])
  return _per_example_bits(normal_kl(mean, log_var, 0.0, 0.0))


def term_bits(model_fn: ModelFn, schedule: schedules_lib.DiscreteSchedule, x0, t: int, noise, *,
              prediction: str, variance: str, clip_x0: bool):
  """The bound's term at code index t (a scalar) in bits per dimension [B]: the decoder's
  -log p(x0 | x_1) at t = 0, else KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)).

  x0, noise: [B, ...]; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
  """
  ts = jnp.full((x0.shape[0],), t, jnp.int32)
  x_t = diffusion.q_sample(schedule, x0, ts, noise)
  alpha, sigma = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
  x0_pred, _ = diffusion.split_prediction(model_fn(x_t, ts).astype(x0.dtype), x_t, alpha, sigma,
                                          prediction)
  if clip_x0:
    x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
  model_mean = schedule.posterior_mean_coef1[t] * x0_pred + schedule.posterior_mean_coef2[t] * x_t
  model_log_var = diffusion.reverse_log_variance(schedule, variance)[t]
  true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, ts)
  kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
  decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
  return _per_example_bits(jnp.where(t == 0, decoder_nll, kl))


class Bound(NamedTuple):
  """Per example, in bits per dimension."""
  total: np.ndarray  # [B] prior + decoder + every KL
  prior: np.ndarray  # [B] L_T
  decoder: np.ndarray  # [B] L_0
  terms: np.ndarray  # [B, T] index 0 the decoder, 1..T-1 the KLs


def terms_fn(model_fn_of_params: Callable, schedule, *, prediction: str, variance: str,
             clip_x0: bool) -> Callable:
  """A jitted ``terms(params, x0, key, ts) -> [B, len(ts)]``: the terms at the indices ``ts``,
  each with noise drawn from fold_in(key, t) (the same t gets the same noise in any chunking)."""

  @jax.jit
  def terms(params, x0, key, ts):
    model_fn = model_fn_of_params(params)

    def one(carry, t):
      noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
      return carry, term_bits(model_fn, schedule, x0, t, noise, prediction=prediction,
                              variance=variance, clip_x0=clip_x0)

    return jax.lax.scan(one, None, ts)[1].T

  return terms


def bound(terms: Callable, params, schedule, x0, key, chunk: int = 0,
          progress: Callable[[int], None] | None = None) -> Bound:
  """Every term of the bound for x0 [B, ...] in [-1, 1]; ``chunk`` timesteps per compiled call
  (0: T // 10), ``progress(timesteps_done)`` after each."""
  num_timesteps = schedule.num_timesteps
  chunk = chunk or max(1, -(-num_timesteps // 10))
  pieces = []
  for start in range(0, num_timesteps, chunk):
    ts = jnp.arange(start, min(start + chunk, num_timesteps), dtype=jnp.int32)
    if len(ts) < chunk:  # one compiled shape; the repeats are dropped below
      ts = jnp.concatenate([ts, jnp.full((chunk - len(ts),), ts[-1], jnp.int32)])
    pieces.append(np.asarray(terms(params, x0, key, ts))[:, :num_timesteps - start])
    if progress is not None:
      progress(min(chunk, num_timesteps - start))
  all_terms = np.concatenate(pieces, axis=1)
  prior = np.asarray(prior_bits(schedule, x0))
  return Bound(prior + all_terms.sum(axis=1), prior, all_terms[:, 0], all_terms)
