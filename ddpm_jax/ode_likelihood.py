"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021; no Flax, no config).

The ODE dx/dt = v(x, t) (sampling.ode_velocity) carries the data at t_min to the prior at t_max,
and the density along it obeys d log p(x(t), t) / dt = -div v (the instantaneous change of
variables), so

  log p_{t_min}(x) = log p_prior(x(t_max)) + int_{t_min}^{t_max} div v(x(t), t) dt,

solved forward by diffrax (Tsit5, PID step-size control) as one system for the batch. The
divergence is Hutchinson's estimate z^T (dv/dx) z with a fixed Rademacher probe per solve (one
Jacobian-vector product per probe), or exact (one per dimension, for small data). The prior is
N(0, (alpha² + sigma²)(t_max) I): the marginal at t_max of data of unit variance (VP: N(0, I)).
diffrax is JAX's maintained ODE library: adaptive solvers with error control that work under
jit and vmap, which a hand-written RK45 would have to re-derive.
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, sampling
from ddpm_jax.errors import InputError

MAX_STEPS = 2000
# A likelihood needs tight tolerances (1e-5), where a fifth-order solver takes the fewest calls.
SOLVER = 'tsit5'
# Data on 256 levels, dequantised to [-1, 1): each level's bin is 2/256 wide, so a density of
# log2 p bits per dimension is a probability of log2 p - 7 (score_sde's offset).
DEQUANTISED_BITS_OFFSET = 7.0


class ODELikelihood(NamedTuple):
  log_p: jax.Array  # [K, B] nats, one row per probe (K = 1 for the exact divergence)
  prior: jax.Array  # [K, B] log p_prior(x(t_max)) in nats
  nfe: jax.Array  # int32: vector-field evaluations (each is one network call per probe)


def prior_log_prob(schedule, x):
  """log N(x; 0, (alpha² + sigma²)(t_max) I) summed over each example [B]."""
  alpha, sigma = diffusion.alpha_sigma(schedule, jnp.float32(schedule.t_max))
  var = alpha ** 2 + sigma ** 2
  flat = x.reshape(x.shape[0], -1)
  return -0.5 * (flat.shape[1] * jnp.log(2 * jnp.pi * var) + jnp.sum(flat ** 2, axis=1) / var)


def hutchinson_divergence(fn, x, probes):
  """(fn(x), z^T (d fn / dx) z [K, B]) for probes z [K, B, ...]: one JVP per probe."""
  value = None
  estimates = []
  for z in probes:  # K is small and static
    value, tangent = jax.jvp(fn, (x,), (z,))
    estimates.append(jnp.sum((z * tangent).reshape(x.shape[0], -1), axis=1))
  return value, jnp.stack(estimates)


def exact_divergence(fn, x):
  """(fn(x), the trace of d fn / dx per example [1, B]): one JVP per dimension, each a basis
  vector in every example (fn acts on examples independently)."""
  size = int(np.prod(x.shape[1:]))
  value = fn(x)

  def diagonal(i):
    basis = jnp.zeros((size,), x.dtype).at[i].set(1.0).reshape(x.shape[1:])
    tangent = jax.jvp(fn, (x,), (jnp.broadcast_to(basis, x.shape),))[1]
    return tangent.reshape(x.shape[0], -1)[:, i]

  return value, jnp.sum(jax.lax.map(diagonal, jnp.arange(size)), axis=0)[None]


def ode_log_likelihood(model_fn, schedule, x, key, *, prediction: str = 'eps',
                       num_probes: int = 1, exact: bool = False, rtol: float = 1e-5,
                       atol: float = 1e-5) -> ODELikelihood:
  """log p(x) in nats for x [B, ...] in model space (taken as the state at t_min), through the
  probability-flow ODE of a network ``model_fn(x_t, t)`` that predicts ``prediction``.

  ``num_probes`` Rademacher probes from ``key``, each fixed over the solve, give one estimate
  each; ``exact`` computes the divergence exactly instead. Jit-able.
  """
  sampling.check_tolerances(rtol, atol, 'the likelihood solve')
  if not exact and num_probes < 1:
    raise InputError(f'num_probes must be >= 1, got {num_probes}')
  sampling.check_method('adaptive', schedule, None)  # continuous schedules only, one line
  model_fn, prediction = sampling.as_v_prediction(model_fn, schedule, prediction)
  probes = None if exact else jax.random.rademacher(
      key, (num_probes,) + tuple(x.shape), jnp.float32)

  def vector_field(t, state, args):
    y, _ = state
    velocity = lambda u: sampling.ode_velocity(model_fn, schedule, u, t, prediction, False)[0]
    value, divergence = exact_divergence(velocity, y) if exact else \
        hutchinson_divergence(velocity, y, probes)
    return value, divergence

  state0 = (x, jnp.zeros((1 if exact else num_probes, x.shape[0]), jnp.float32))
  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), sampling.ADAPTIVE_SOLVERS[SOLVER][0](), t0=schedule.t_min,
      t1=schedule.t_max, dt0=None, y0=state0, saveat=diffrax.SaveAt(t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=MAX_STEPS)
  x_end, integral = solution.ys[0][0], solution.ys[1][0]
  prior = jnp.broadcast_to(prior_log_prob(schedule, x_end), integral.shape)
  return ODELikelihood(prior + integral, prior, sampling.adaptive_calls(solution.stats, SOLVER))


def dequantise(images, key):
  """uint8 images [B, ...] -> model space [-1, 1): (image + u) / 256 with u ~ U[0, 1) per
  entry, then scaled by 2 and shifted by -1 (score_sde's uniform dequantisation)."""
  u = jax.random.uniform(key, images.shape, jnp.float32)
  return 2.0 * (jnp.asarray(images, jnp.float32) + u) / 256.0 - 1.0


def dequantised_bits_per_dim(log_p, num_dims: int):
  """Bits per dimension of 8-bit data from the density log_p (nats) of its dequantised copy
  in [-1, 1) (an upper bound on the discrete data's bits, tight as the density is smooth)."""
  return -log_p / (num_dims * np.log(2.0)) + DEQUANTISED_BITS_OFFSET
