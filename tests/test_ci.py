"""What CI runs is what the README says, and it does not skip what it provides."""

import re

import pytest

from tests.helpers import REPO_ROOT, skip_unless_ci


def test_a_skip_for_files_ci_provides_is_a_failure_under_ci(monkeypatch):
  monkeypatch.delenv('CI', raising=False)
  with pytest.raises(pytest.skip.Exception, match='weights absent'):
    skip_unless_ci('weights absent')
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(pytest.fail.Exception, match='under CI its absence is an error'):
    skip_unless_ci('weights absent')


def test_ci_runs_the_readme_test_commands_with_the_fid_weights():
  readme = (REPO_ROOT / 'README.md').read_text()
  section = readme[readme.index('## Tests'):]
  commands = re.findall(r'```bash\n(.*?)```', section, re.S)[0].strip().splitlines()
  script = (REPO_ROOT / '.ci' / 'run').read_text().splitlines()
  assert [c for c in commands if c.startswith('python -m pytest')], commands
  for command in commands:
    assert command in script, (command, script)
  assert any('DDPM_JAX_INCEPTION_WEIGHTS=' in line for line in script)
  assert any('-m slow' in line for line in commands)
