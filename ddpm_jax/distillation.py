"""Progressive distillation's target and loss (Salimans & Ho 2022, Algorithm 2), pure math.

A student that samples in N deterministic DDIM steps on the trailing grid
(``sampling.trailing_timesteps``) learns to take in one step what its teacher takes in two: from
the student's time t_k through the teacher's intermediate time to t_(k+1) (clean data after the
last). Then the student becomes the teacher of an N/2-step student. No Flax, no config.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, sampling
from ddpm_jax.errors import InputError

# What a student network predicts: v (the paper's choice; its squared error is the x0 error
# weighted by SNR + 1) or x0. Not eps: one step from pure noise would divide eps's error by
# alpha_T (about 0.006 on the linear schedule).
STUDENT_PREDICTIONS = ('v', 'x0')

# teacher_fn(z [B, ...], t [B]) -> the teacher's output under its own prediction.
TeacherFn = Callable[[jax.Array, jax.Array], jax.Array]
# student_fn(params, z [B, ...], t [B], dropout key) -> the student's output.
StudentFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


class StageGrid(NamedTuple):
  """A stage's N student steps, noisiest first, each [N]: from t through the teacher's t_mid to
  the next student time (whose alpha_next, sigma_next are 1, 0 after the last step)."""
  t: np.ndarray
  t_mid: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  alpha_mid: np.ndarray
  sigma_mid: np.ndarray
  alpha_next: np.ndarray
  sigma_next: np.ndarray


def stage_grid(schedule, num_steps: int) -> StageGrid:
  """The grid of a student with ``num_steps`` steps and its 2 ``num_steps``-step teacher."""
  if num_steps < 1:
    raise InputError(f'a student takes at least 1 step, got {num_steps}')
  teacher = sampling.timesteps(schedule, 2 * num_steps, 'trailing')
  t, t_mid = teacher[0::2], teacher[1::2]
  alpha, sigma = sampling.grid_alpha_sigma(schedule, t)
  alpha_mid, sigma_mid = sampling.grid_alpha_sigma(schedule, t_mid)
  alpha_next = np.append(alpha[1:], 1.0).astype(np.float32)
  sigma_next = np.append(sigma[1:], 0.0).astype(np.float32)
  return StageGrid(t, t_mid, alpha, sigma, alpha_mid, sigma_mid, alpha_next, sigma_next)


def ddim_step(model_fn: TeacherFn, z, t, alpha, sigma, alpha_next, sigma_next, prediction: str,
              clip_x0: bool):
  """One deterministic DDIM step (eta = 0) from z [B, ...] at t [B] to the next time; the
  coefficients broadcast to z."""
  x0, eps = sampling.denoise(model_fn, z, t, alpha, sigma, prediction, clip_x0)
  return alpha_next * x0 + sigma_next * eps


def distillation_target(teacher_fn: TeacherFn, z, k, grid: StageGrid, *,
                        teacher_prediction: str, student_prediction: str, clip_x0: bool):
  """What the student should output at z [B, ...] on its step k [B] (int): the x0 with which
  one DDIM step lands where two teacher steps land, in the student's prediction.

  x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)  (Algorithm 2), which is
  z'' itself on the last step (alpha'' = 1, sigma'' = 0).
  """
  at = lambda values: diffusion.per_example(jnp.asarray(values)[k], z)
  alpha, sigma, alpha_next, sigma_next = (at(grid.alpha), at(grid.sigma), at(grid.alpha_next),
                                          at(grid.sigma_next))
  z_mid = ddim_step(teacher_fn, z, jnp.asarray(grid.t)[k], alpha, sigma, at(grid.alpha_mid),
                    at(grid.sigma_mid), teacher_prediction, clip_x0)
  z_next = ddim_step(teacher_fn, z_mid, jnp.asarray(grid.t_mid)[k], at(grid.alpha_mid),
                     at(grid.sigma_mid), alpha_next, sigma_next, teacher_prediction, clip_x0)
  ratio = sigma_next / sigma
  x0 = (z_next - ratio * z) / (alpha_next - ratio * alpha)
  eps = (z - alpha * x0) / sigma
  return diffusion.join_prediction(x0, eps, alpha, sigma, student_prediction)


def distillation_loss(student_fn: StudentFn, params, teacher_fn: TeacherFn, x0, key,
                      grid: StageGrid, *, teacher_prediction: str, student_prediction: str,
                      clip_x0: bool):
  """Mean squared error of the student against ``distillation_target`` over a batch x0 [B, ...]
  noised to one student step each (drawn uniformly). Returns (loss, {'per_example' [B], 't'})."""
  if student_prediction not in STUDENT_PREDICTIONS:
    raise InputError(f'a student predicts one of {", ".join(STUDENT_PREDICTIONS)}, not '
                     f'{student_prediction!r}')
  k_key, noise_key, model_key = jax.random.split(key, 3)
  k = jax.random.randint(k_key, (x0.shape[0],), 0, len(grid.t))
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  alpha, sigma = (diffusion.per_example(jnp.asarray(v)[k], x0) for v in (grid.alpha, grid.sigma))
  z = alpha * x0 + sigma * noise
  target = jax.lax.stop_gradient(distillation_target(
      teacher_fn, z, k, grid, teacher_prediction=teacher_prediction,
      student_prediction=student_prediction, clip_x0=clip_x0))
  t = jnp.asarray(grid.t)[k]
  prediction = student_fn(params, z, t, model_key).astype(jnp.float32)
  per_example = jnp.mean((prediction - target) ** 2, axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_example), {'per_example': per_example, 't': t}
