"""JAX's persistent compilation cache for train.py, sample.py, convert and load_sampler.

A second identical run reads its compiled programs from disk instead of compiling them again.
The folder is ``DDPM_JAX_COMPILATION_CACHE`` (``off`` switches the cache off), else a folder the
user already gave JAX (``JAX_COMPILATION_CACHE_DIR``), else ``ddpm_jax/jax-compilation-cache``
in the user's cache folder (``$XDG_CACHE_HOME``, default ``~/.cache``).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax

from ddpm_jax import user_cache

VARIABLE = 'DDPM_JAX_COMPILATION_CACHE'
OFF = ('off', '0', 'false', 'no', 'none')
# Seconds a compilation must take to be kept: the sampler's pieces and the train step take
# longer; below this, reading the entry would cost about what compiling does.
MIN_COMPILE_TIME_S = 0.2


def default_folder(environ=None) -> pathlib.Path:
  return user_cache.folder(environ) / 'jax-compilation-cache'


def cache_folder(environ=None) -> Optional[pathlib.Path]:
  """Where compiled programs are kept, or None when the cache is off."""
  environ = os.environ if environ is None else environ
  setting = environ.get(VARIABLE, '').strip()
  if setting.lower() in OFF:
    return None
  if setting:
    return pathlib.Path(setting).expanduser()
  if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  return default_folder(environ)


def enable(environ=None) -> Optional[pathlib.Path]:
  """Turns the cache on (or leaves it off); takes effect for compilations from now on when
  nothing has been compiled in this process yet. Returns the folder or None."""
  folder = cache_folder(environ)
  if folder is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_compilation_cache_dir', str(folder))
  if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_TIME_S:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_TIME_S)
  return folder
