"""Progress of a long count (train steps, samples, images): a tqdm bar on a terminal, else log
lines; and ``write``, which prints a line without breaking a bar that is being drawn.

Rates and ETAs count from ``restart_clock()`` (the trainer calls it once the first step has
compiled), so compilation does not pull the rate down.
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

_ACTIVE_BARS: list = []


def write(line: str) -> None:
  """Prints ``line``; while a bar is drawn on the terminal, above it (tqdm.write)."""
  if _ACTIVE_BARS:
    tqdm.write(line)
  else:
    print(line, flush=True)


class Progress:
  """Counts ``done`` of ``total`` units.

  ``update(done, fields)`` sets the count (a train step, with loss etc. as ``fields``): off a
  terminal it prints a line each call. ``advance(n)`` adds to it (samples, images): off a
  terminal it prints at every tenth of the total. ``per_unit`` (e.g. ('image', 64): a batch
  of 64 images per step) adds that rate to the line.
  """

  def __init__(self, total: int, label: str, unit: str, start: int = 0,
               per_unit: tuple[str, int] | None = None):
    self.total, self.label, self.unit, self.per_unit = total, label, unit, per_unit
    self.done = start
    self.next_report = 0.1
    self.restart_clock()
    self.bar = None
    if sys.stderr.isatty():
      self.bar = tqdm(total=total, initial=start, unit=unit, desc=label or None,
                      dynamic_ncols=True)
      _ACTIVE_BARS.append(self.bar)

  def restart_clock(self) -> None:
    """Rates and the ETA count from now, and from the present count (the bar's too)."""
    self.clock_start, self.clock_done = time.time(), self.done
    bar = getattr(self, 'bar', None)
    if bar is not None:  # tqdm's rate is (n - initial) / (time since start_t)
      bar.start_t = bar.last_print_t = bar._time()
      bar.initial = self.done

  def _rate(self) -> float:
    return (self.done - self.clock_done) / max(time.time() - self.clock_start, 1e-9)

  def line(self, fields: dict | None = None) -> str:
    """``<label>: <unit> 40/100  <fields>  2.50 <unit>s/s  [160.0 <per>s/s]  ETA 00:00:24``."""
    rate = self._rate()
    eta = (self.total - self.done) / rate if rate > 0 else math.nan
    parts = [f'{self.label + ": " if self.label else ""}{self.unit} '
             f'{self.done:.0f}/{self.total}']
    parts += [f'{name} {value}' for name, value in (fields or {}).items()]
    parts.append(f'{rate:.2f} {self.unit}s/s')
    if self.per_unit:
      parts.append(f'{rate * self.per_unit[1]:.1f} {self.per_unit[0]}s/s')
    parts.append('ETA ' + (time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta)
                           else '?'))
    return '  '.join(parts)

  def update(self, done: float, fields: dict | None = None, report: bool = True) -> str:
    """Sets the count; returns the line printed ('' on a terminal, where the bar shows it)."""
    self.done = done
    if self.bar is not None:
      self.bar.n = done
      if fields:
        self.bar.set_postfix(fields, refresh=False)
      self.bar.refresh()
      self.bar.last_print_t = self.bar._time()  # as tqdm's own update() does; close() reads it
      return ''
    if not report:
      return ''
    text = self.line(fields)
    print(text, flush=True)
    return text

  def advance(self, count: float) -> None:
    done = self.done + count
    report = done / max(self.total, 1) >= self.next_report
    while self.next_report <= done / max(self.total, 1):
      self.next_report += 0.1
    self.update(done, report=report)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      _ACTIVE_BARS.remove(self.bar)
      self.bar = None
