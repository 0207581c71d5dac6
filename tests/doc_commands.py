"""The fenced commands of README.md and docs/*.md, and a sandbox to run them as written.

A sandbox is a folder with the checkout's scripts and configs/ linked in, so a command's
relative paths (runs/digits, my_images) land in the test's own folder. TINY holds the overrides
that make a command's training test-sized; a test appends them (absl applies the last value of
a flag), and says so where it does.
"""

import os
import pathlib
import re
import subprocess
import sys

from tests.helpers import REPO_ROOT

DOC_FILES = ['README.md'] + sorted(str(p.relative_to(REPO_ROOT))
                                   for p in (REPO_ROOT / 'docs').glob('*.md'))

# A 2-level UNet with 16 channels, T = 100, 4 steps of batch 8: seconds instead of minutes.
TINY = ('--config.model.ch=16 --config.model.ch_mult="(1, 2)" --config.model.num_res_blocks=1 '
        '--config.model.attn_resolutions="()" --config.model.num_groups=8 '
        '--config.diffusion.num_timesteps=100 --config.diffusion.beta_end=0.2 '
        '--config.optim.warmup_steps=2 --config.training.num_steps=4 '
        '--config.training.batch_size=8 --config.training.log_every=2 '
        '--config.training.checkpoint_every=2 --config.training.sample_every=4 '
        '--config.training.eval_every=0 --config.training.num_sample_images=4')


def fenced_blocks(path: str, language: str = 'bash') -> list[str]:
  """The text of every ```<language> block of one doc file, in order."""
  return re.findall(rf'^```{language}\n(.*?)^```', (REPO_ROOT / path).read_text(), re.S | re.M)


def commands(block: str) -> list[str]:
  """One block's commands: continuation lines joined, comment lines and trailing comments
  dropped."""
  joined = re.sub(r'\\\n\s*', '', block)
  found = []
  for line in joined.splitlines():
    line = re.sub(r'\s+#\s.*$', '', line).strip()
    if line and not line.startswith('#'):
      found.append(line)
  return found


def all_blocks() -> list[tuple[str, str, str]]:
  """(file, language, first command) of every fenced bash and python block of the docs."""
  found = []
  for path in DOC_FILES:
    for block in fenced_blocks(path, 'bash'):
      found.append((path, 'bash', commands(block)[0]))
    for block in fenced_blocks(path, 'python'):
      found.append((path, 'python', block.splitlines()[0]))
  return found


def doc_block(path: str, first: str) -> list[str]:
  """The commands of the bash block of ``path`` whose first command starts with ``first``."""
  matches = [commands(b) for b in fenced_blocks(path, 'bash') if commands(b)[0].startswith(first)]
  assert len(matches) == 1, (path, first, len(matches))
  return matches[0]


def python_block(path: str, first: str) -> str:
  """The python block of ``path`` whose first line starts with ``first``."""
  matches = [b for b in fenced_blocks(path, 'python') if b.startswith(first)]
  assert len(matches) == 1, (path, first, len(matches))
  return matches[0]


def sandbox(folder: pathlib.Path) -> pathlib.Path:
  """``folder`` with the checkout's commands and configs/ linked in."""
  folder.mkdir(parents=True, exist_ok=True)
  for name in ('train.py', 'sample.py', 'distill.py', 'configs'):
    (folder / name).symlink_to(REPO_ROOT / name)
  return folder


def run(command: str, cwd: pathlib.Path, env: dict | None = None, timeout: int = 600):
  """Runs one doc command with bash in ``cwd``; ``python`` is this interpreter."""
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', PATH=path, PYTHONPATH=str(REPO_ROOT),
                  **(env or {}))
  return subprocess.run(['bash', '-c', command], cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=timeout)
