"""ddpm_jax: denoising diffusion probabilistic models in JAX and Flax.

Public names: ``schedules`` (linear, cosine, from_betas, vp_linear, vp_cosine), ``sampling``,
``q_sample``, ``q_posterior``, ``convert_prediction``, ``diffusion_loss``,
``distillation_loss``, ``train`` (a run from a config), ``distill`` (progressive distillation
of a run), ``load_run`` (a run folder as a ``Run``: config, model, EMA parameters, step),
``load_sampler``,
``make_sample_fn``, ``LazyWindows`` and ``interop`` (the diffusers format). They are
imported on first use, so that ``import ddpm_jax.series_outputs`` (say) does not pull in Flax
and orbax.
"""

import importlib

__version__ = '0.1.0'

_NAMES = {
    'schedules': ('ddpm_jax.schedules', None),
    'sampling': ('ddpm_jax.sampling', None),
    'q_sample': ('ddpm_jax.diffusion', 'q_sample'),
    'q_posterior': ('ddpm_jax.diffusion', 'q_posterior'),
    'convert_prediction': ('ddpm_jax.diffusion', 'convert_prediction'),
    'diffusion_loss': ('ddpm_jax.losses', 'diffusion_loss'),
    'distillation_loss': ('ddpm_jax.distillation', 'distillation_loss'),
    'train': ('ddpm_jax.trainer', 'train'),
    'distill': ('ddpm_jax.distiller', 'distill'),
    'load_sampler': ('ddpm_jax.inference', 'load_sampler'),
    'load_run': ('ddpm_jax.workdir', 'load_run'),
    'Run': ('ddpm_jax.workdir', 'Run'),
    'make_sample_fn': ('ddpm_jax.inference', 'make_sample_fn'),
    'LazyWindows': ('ddpm_jax.series_data', 'LazyWindows'),
    'interop': ('ddpm_jax.interop', None),
}
__all__ = sorted(_NAMES)


def __getattr__(name):
  if name not in _NAMES:
    raise AttributeError(f'module ddpm_jax has no attribute {name!r}')
  module_name, attribute = _NAMES[name]
  module = importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value
  return value


def __dir__():
  return __all__
