"""The per-user cache folder: ``~/.cache/ddpm_jax``, or ``$XDG_CACHE_HOME/ddpm_jax``.

It holds the FID network's weights (``inception/``), the digits classifier
(``digits_classifier_v1.npz``) and JAX's compiled programs (``jax-compilation-cache/``).
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional


def folder(environ: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  environ = os.environ if environ is None else environ
  root = environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(root) / 'ddpm_jax'
