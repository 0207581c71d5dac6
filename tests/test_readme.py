"""The README's first library snippet runs as written and prints what its comments say."""

import contextlib
import io
import re


from tests.helpers import REPO_ROOT


def test_readme_library_snippet_runs():
  text = (REPO_ROOT / 'README.md').read_text()
  section = text[text.index('## From Python'):]
  snippet = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(snippet, 'README.md', 'exec'), {})
  printed = out.getvalue().split()
  assert abs(float(printed[0]) - 4.04e-5) < 1e-6
  assert abs(float(printed[-1]) - 0.5) < 0.03
