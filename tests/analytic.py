"""Exact optimal noise predictions for Gaussian and two-Gaussian-mixture data (test oracles)."""

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion


def gaussian_mixture_eps(schedule, weights, means, stds):
  """eps*(x_t, t) = E[eps | x_t] for x0 ~ sum_k w_k N(m_k, s_k²), each coordinate independent.

  With x_t = a x0 + s eps, component k gives x_t ~ N(a m_k, a² s_k² + s²) and
  E[eps | x_t, k] = s (x_t - a m_k) / (a² s_k² + s²); responsibilities weight the components.
  """
  weights, means, stds = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))

  def model_fn(x_t, t):
    alpha, sigma = diffusion.alpha_sigma(schedule, t)
    alpha = diffusion.per_example(alpha, x_t)[..., None]
    sigma = diffusion.per_example(sigma, x_t)[..., None]
    var = alpha ** 2 * stds ** 2 + sigma ** 2  # [B, ..., K]
    diff = x_t[..., None] - alpha * means
    log_p = jnp.log(weights) - 0.5 * jnp.log(var) - 0.5 * diff ** 2 / var
    resp = jax.nn.softmax(log_p, axis=-1)
    return jnp.sum(resp * sigma * diff / var, axis=-1)

  return model_fn


def gaussian_eps(schedule, mean, std):
  return gaussian_mixture_eps(schedule, [1.0], [mean], [std])


def correlated_gaussian_eps(schedule, mean, cov):
  """eps*(x_t, t) for x0 ~ N(mean, cov) in D dimensions (x_t [B, D]): with x_t = a x0 + s eps,
  E[eps | x_t] = s (a² cov + s² I)^-1 (x_t - a mean). Its Jacobian is not diagonal, so
  Hutchinson's probes do not recover its divergence exactly."""
  mean, cov = jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32)

  def model_fn(x_t, t):
    alpha, sigma = diffusion.alpha_sigma(schedule, t)
    alpha, sigma = alpha[:, None, None], sigma[:, None, None]  # [B, 1, 1]
    precision = jnp.linalg.inv(alpha ** 2 * cov + sigma ** 2 * jnp.eye(cov.shape[0]))
    diff = x_t - alpha[:, 0] * mean
    return sigma[:, 0] * jnp.einsum('bij,bj->bi', precision, diff)

  return model_fn
