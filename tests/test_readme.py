"""The README's first library snippet runs as written and prints what its comments say."""

import contextlib
import io
import re

import jax

from tests.helpers import REPO_ROOT


def test_readme_library_snippet_runs():
  text = (REPO_ROOT / 'README.md').read_text()
  section = text[text.index('## Library API'):]
  snippet = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(snippet, 'README.md', 'exec'), {})
  printed = out.getvalue().split()
  assert abs(float(printed[0]) - 4.04e-5) < 1e-6
  assert abs(float(printed[-1]) - 0.5) < 0.03


def test_readme_diffusers_snippet_runs(tmp_path, monkeypatch):
  """The 'In your own code' snippet, on a reference folder instead of the downloaded one."""
  text = (REPO_ROOT / 'README.md').read_text()
  section = text[text.index('## Pretrained weights'):]
  snippet = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  reference = REPO_ROOT / 'tests' / 'diffusers_reference' / 'cifar10_layout'
  snippet = snippet.replace("'ddpm-cifar10-32'", repr(str(reference)))
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(snippet, 'README.md', 'exec'), namespace)
  assert (tmp_path / 'exported' / 'diffusion_pytorch_model.safetensors').is_file()
  samples = namespace['sample_fn'](namespace['params'], jax.random.key(0), 2, num_steps=2)
  assert samples.shape == (2, 32, 32, 3)
