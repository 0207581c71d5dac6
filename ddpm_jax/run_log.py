"""What a training run records beside its checkpoints: metrics.jsonl, loss.png (and quality.png
when the run measures sample quality), TensorBoard event files under ``<workdir>/tensorboard``
(written without TensorFlow: ``tensorboard --logdir runs/``), and the libraries' own log
(``<workdir>/train.log``), so a failed checkpoint write shows the user one line, not orbax's
background tracebacks.

Only process 0 writes; ``MetricsLog`` keeps the curve in memory, so an 800k-step run appends one
line per record and redraws the PNGs only when asked (at checkpoint times).
"""

from __future__ import annotations

import json
import logging as python_logging
import pathlib
import sys

from absl import logging
from tensorboardX import SummaryWriter

from ddpm_jax import plots

LIBRARY_LOG = 'train.log'


class MetricsLog:
  """Appends records to ``<workdir>/metrics.jsonl`` and TensorBoard, and draws ``loss.png`` and
  ``quality.png`` from memory."""

  def __init__(self, workdir: pathlib.Path, resume_step: int, write: bool):
    """Reads an existing file once; records past ``resume_step`` (steps a crashed run did before
    its last checkpoint, about to be redone) are dropped from it."""
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.loss_png = pathlib.Path(workdir) / 'loss.png'
    self.quality_png = pathlib.Path(workdir) / 'quality.png'
    self.write = write
    self.records = []
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
          continue
        if record.get('step', 0) <= resume_step:
          kept.append(record)
      self.records = kept
      if write:
        self.path.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    self._file = open(self.path, 'a') if write else None
    # purge_step: TensorBoard drops the events a crashed run wrote past the resumed checkpoint.
    self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'),
                                      purge_step=resume_step + 1) if write else None

  def append(self, record: dict) -> None:
    self.records.append(record)
    if self._file is not None:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
      for key, value in record.items():
        if key not in ('step', 'time') and isinstance(value, (int, float)):
          self._tensorboard.add_scalar(key, value, record['step'], walltime=record.get('time'))

  def plot(self) -> None:
    """loss.png and, once the run has measured quality, quality.png from the records held."""
    if not self.write:
      return
    points = [(r['step'], r['loss']) for r in self.records if 'loss' in r]
    plots.loss_curve([p[0] for p in points], [p[1] for p in points], self.loss_png)
    evaluations = [r for r in self.records if any(k.startswith('eval_') for k in r)]
    if evaluations:
      plots.quality_curve(evaluations, self.quality_png)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
      self._tensorboard.close()


def _is_closed_loop_noise(exc_type, exc_value) -> bool:
  """orbax closes its asyncio loop when a write fails while tensorstore still completes other
  writes; each completion then reports this RuntimeError as unraisable (about 700 lines)."""
  return exc_type is RuntimeError and 'Event loop is closed' in str(exc_value)


class LibraryLogToFile:
  """While active, absl / Python logging (orbax's saves, restores and failures) goes to ``path``
  instead of stderr, and so do the closed-event-loop errors orbax's threads report after a
  failed write. Our own one-line messages still reach the user. The file gets INFO and up
  (orbax's saves and restores), though the terminal's default is warnings only."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, 'a')
    handler = logging.get_absl_handler().python_handler
    self.previous_stream, handler.stream = handler.stream, self.file
    # absl's logger (orbax logs through it) writes INFO and up to the file alone: not to the
    # terminal, whether or not absl's handler is installed (train.py) or not (the Python API).
    self.absl_logger = python_logging.getLogger('absl')
    self.previous = (self.absl_logger.level, self.absl_logger.propagate)
    self.file_handler = python_logging.StreamHandler(self.file)
    self.file_handler.setFormatter(logging.PythonFormatter())
    self.absl_logger.addHandler(self.file_handler)
    self.absl_logger.setLevel(min(self.absl_logger.getEffectiveLevel(), python_logging.INFO))
    self.absl_logger.propagate = False
    self.previous_hook = sys.unraisablehook

    def hook(unraisable):
      if _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
        self.file.write(f'{unraisable.exc_type.__name__}: {unraisable.exc_value} (reported by a '
                        f'background thread after a failed write)\n')
        return
      self.previous_hook(unraisable)
    sys.unraisablehook = hook
    return self

  def __exit__(self, *exc_info):
    logging.get_absl_handler().python_handler.stream = self.previous_stream
    self.absl_logger.removeHandler(self.file_handler)
    self.absl_logger.setLevel(self.previous[0])
    self.absl_logger.propagate = self.previous[1]
    sys.unraisablehook = self.previous_hook
    self.file.close()
    return False


def silence_library_output() -> None:
  """For a process about to exit with a one-line error: what orbax's threads and asyncio still
  report (at exit, too) goes nowhere; it was logged to the run's log file already."""
  # Not a devnull stream: logging.shutdown() closes handler streams at exit, before asyncio's
  # last reports of the failed write, which would then fail to print, loudly.
  python_logging.disable(python_logging.CRITICAL)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)
  sys.unraisablehook = hook
