"""ddpm_jax: denoising diffusion probabilistic models in JAX and Flax."""

from ddpm_jax import schedules
from ddpm_jax.diffusion import convert_prediction, q_posterior, q_sample
from ddpm_jax.losses import diffusion_loss

__version__ = '0.1.0'
