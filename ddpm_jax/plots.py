"""Figures a person reads: training loss, sample quality, series windows, labelled image rows and
the reverse process (matplotlib, no pyplot).

Figures are drawn on their own Agg canvas, so nothing here touches matplotlib's global state or
needs a display.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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
  axes.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, even for one point
    axes.grid(True, alpha=0.3)
  if names:
    figure.axes[0].set_title('sample quality of the EMA parameters')
  return save_figure(figure, path)


def window_panels(generated: np.ndarray, real: np.ndarray | None, names: Sequence[str],
                  path) -> pathlib.Path:
  """windows.png: one panel per channel of generated windows [N, L, C] (orange, dashed) beside
  real ones (blue, solid), in the data's units, on y-limits that fit both sets (the 1st to 99th
  percentile, padded) so that neither is squashed under the other's outliers."""
  num_channels = generated.shape[-1]
  figure = Figure(figsize=(9.0, 1.9 * num_channels + 0.4), layout='constrained')
  steps = np.arange(generated.shape[1])
  for c in range(num_channels):
    axes = figure.add_subplot(num_channels, 1, c + 1)
    values = generated[..., c] if real is None else np.concatenate([generated[..., c].ravel(),
                                                                    real[..., c].ravel()])
    low, high = np.percentile(values, [1, 99])
    pad = 0.1 * (high - low) or 1.0
    for i, window in enumerate(real if real is not None else []):
      axes.plot(steps, window[:, c], color=COLOURS[0], lw=1.2, label='real' if i == 0 else None)
    for i, window in enumerate(generated):
      axes.plot(steps, window[:, c], color=COLOURS[1], lw=1.2, ls='--',
                label='generated' if i == 0 else None)
    axes.set_ylim(low - pad, high + pad)
    axes.set_ylabel(f'{names[c]}\n(data units)', fontsize=8)
    axes.grid(True, alpha=0.3)
    if c == 0:
      axes.legend(fontsize=8, loc='upper right', ncols=2)
      axes.set_title(f'{len(generated)} generated' + (f' and {len(real)} real' if real is not None
                                                      else '') + ' windows, channel by channel')
  figure.axes[-1].set_xlabel('time step in the window')
  return save_figure(figure, path)


def image_rows(rows: Sequence[tuple[str, np.ndarray]], path, title: str = '',
               column_titles: Sequence[str] = ()) -> pathlib.Path:
  """A grid of uint8 images with a label per row: ``rows`` is [(label, images [n, H, W, C])]."""
  columns = max(len(images) for _, images in rows)
  cell = 0.55 if rows[0][1].shape[1] <= 16 else 1.0
  figure = Figure(figsize=(1.2 + cell * columns, 0.5 + cell * len(rows)), layout='constrained')
  grid = figure.add_gridspec(len(rows), columns, wspace=0.02, hspace=0.02)
  for r, (label, images) in enumerate(rows):
    for c in range(columns):
      axes = figure.add_subplot(grid[r, c])
      axes.set_xticks([])
      axes.set_yticks([])
      for spine in axes.spines.values():
        spine.set_visible(False)
      if c < len(images):
        image = images[c]
        axes.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0,
                    vmax=255, interpolation='nearest')
      if c == 0:
        axes.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=8)
      if r == 0 and c < len(column_titles):
        axes.set_title(column_titles[c], fontsize=7)
  if title:
    figure.suptitle(title, fontsize=9)
  return save_figure(figure, path)
