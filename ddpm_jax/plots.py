"""Curves a person reads: training loss, sample quality, series windows (matplotlib, no pyplot).

Figures are drawn on their own Agg canvas, so nothing here touches matplotlib's global state or
needs a display.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')


def save_figure(figure: Figure, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=100)
  return path


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
  """TensorBoard's debiased exponential moving average of a curve [n]."""
  out, running = np.empty(len(values)), 0.0
  for i, value in enumerate(values):
    running = weight * running + (1 - weight) * value
    out[i] = running / (1 - weight ** (i + 1))
  return out


def loss_curve(steps: Sequence[int], loss: Sequence[float], path) -> pathlib.Path:
  """loss.png: the raw loss and its smoothed curve against the step, log scale."""
  figure = Figure(figsize=(8, 4), layout='constrained')
  axes = figure.add_subplot()
  steps, loss = np.asarray(steps), np.asarray(loss, np.float64)
  finite = np.isfinite(loss) & (loss > 0)
  axes.plot(steps[finite], loss[finite], color=COLOURS[0], alpha=0.3, lw=1, label='loss')
  if finite.any():
    axes.plot(steps[finite], smooth(loss[finite]), color=COLOURS[0], lw=2,
              label='smoothed (EMA 0.9)')
    axes.set_yscale('log')
  axes.set(xlabel='training step', ylabel='training loss', title='training loss')
  axes.grid(True, which='both', alpha=0.3)
  axes.legend()
  return save_figure(figure, path)


QUALITY_LABELS = {'eval_fd': 'feature FD (lower is better)', 'eval_confidence': 'mean confidence',
                  'eval_label_agreement': 'label agreement'}


def quality_curve(records: Sequence[dict], path) -> pathlib.Path:
  """quality.png: each 'eval_*' metric of the records against the step, one panel each."""
  names = sorted({key for r in records for key in r if key.startswith('eval_')})
  figure = Figure(figsize=(8, 2.6 * max(len(names), 1)), layout='constrained')
  for index, name in enumerate(names):
    axes = figure.add_subplot(len(names), 1, index + 1)
    points = [(r['step'], r[name]) for r in records if name in r]
    axes.plot([p[0] for p in points], [p[1] for p in points], 'o-', color=COLOURS[index + 1])
    axes.set(xlabel='training step', ylabel=QUALITY_LABELS.get(name, name[len('eval_'):]))
    axes.grid(True, alpha=0.3)
  if names:
    figure.axes[0].set_title('sample quality of the EMA parameters')
  return save_figure(figure, path)


def line_panels(panels: Sequence[dict], path, width: float = 9.0,
                panel_height: float = 1.8) -> pathlib.Path:
  """Stacked panels: each {'title', 'lines': [(x [n], y [n], colour index)], 'xlabel'}."""
  figure = Figure(figsize=(width, panel_height * len(panels)), layout='constrained')
  for index, panel in enumerate(panels):
    axes = figure.add_subplot(len(panels), 1, index + 1)
    for x, y, colour in panel['lines']:
      axes.plot(x, y, color=COLOURS[colour % len(COLOURS)], lw=1)
    axes.set_title(panel.get('title', ''), fontsize=9)
    axes.set_xlabel(panel.get('xlabel', ''))
    axes.grid(True, alpha=0.3)
  return save_figure(figure, path)
