"""Progress of a long count (reverse steps, images): a tqdm bar on a terminal, else log lines."""

from __future__ import annotations

import sys
import time


class CountProgress:
  """``advance(n)`` as work finishes; prints rate and ETA at every tenth when not on a terminal."""

  def __init__(self, total: int, label: str, unit: str):
    self.total, self.label, self.unit = total, label, unit
    self.done, self.start = 0, time.time()
    self.bar = None
    self.next_report = 0.1
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, unit=unit, desc=label, dynamic_ncols=True)

  def advance(self, count: int) -> None:
    self.done += count
    if self.bar is not None:
      self.bar.update(count)
    elif self.done / max(self.total, 1) >= self.next_report:
      elapsed = max(time.time() - self.start, 1e-9)
      eta = elapsed / self.done * (self.total - self.done)
      print(f'{self.label}: {self.done}/{self.total} {self.unit}s, '
            f'{self.done / elapsed:.1f} {self.unit}s/s, ETA {eta:.0f} s', flush=True)
      while self.next_report <= self.done / self.total:
        self.next_report += 0.1

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
