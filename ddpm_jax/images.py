"""What a person looks at: sample grids, loss curves and line plots as PNG (Pillow only)."""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def make_grid(images: np.ndarray, columns: int = 0, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows (H + pad), columns (W + pad), C] mosaic."""
  num, height, width, channels = images.shape
  columns = columns or int(math.ceil(math.sqrt(num)))
  rows = int(math.ceil(num / columns))
  grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255,
                 np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    top, left = pad + r * (height + pad), pad + c * (width + pad)
    grid[top:top + height, left:left + width] = image
  return grid


def save_png(image: np.ndarray, path, scale: int = 1) -> pathlib.Path:
  """Writes uint8 [H, W, C] (C = 1 or 3); ``scale`` enlarges small images with nearest pixels."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  array = image[..., 0] if image.shape[-1] == 1 else image
  picture = Image.fromarray(array)
  if scale > 1:
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  picture.save(path)
  return path


def save_grid(images: np.ndarray, path, columns: int = 0) -> pathlib.Path:
  """A grid of uint8 [N, H, W, C], enlarged so that small images are easy to see."""
  grid = make_grid(images, columns)
  return save_png(grid, path, scale=max(1, 256 // max(images.shape[1], 1) // 2))


def _axes(draw, box, ylim, title):
  left, top, right, bottom = box
  draw.rectangle(box, outline=(0, 0, 0))
  draw.text((left, top - 12), title, fill=(0, 0, 0))
  draw.text((2, top), f'{ylim[1]:.3g}', fill=(0, 0, 0))
  draw.text((2, bottom - 10), f'{ylim[0]:.3g}', fill=(0, 0, 0))


def plot_lines(panels: Sequence[dict], path, width: int = 640, panel_height: int = 160,
               ) -> pathlib.Path:
  """Stacks line-plot panels in one PNG.

  Each panel: {'title': str, 'lines': [(x [n], y [n], colour index)], 'log_y': bool}.
  """
  height = panel_height * len(panels)
  picture = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(picture)
  for p, panel in enumerate(panels):
    top = p * panel_height + 14
    box = (56, top, width - 8, (p + 1) * panel_height - 16)
    lines = [(np.asarray(x, np.float64), np.asarray(y, np.float64), c) for x, y, c in panel['lines']
             if len(x)]
    transform = (lambda v: np.log10(np.maximum(v, 1e-12))) if panel.get('log_y') else (lambda v: v)
    ys = np.concatenate([transform(y) for _, y, _ in lines]) if lines else np.zeros(1)
    xs = np.concatenate([x for x, _, _ in lines]) if lines else np.zeros(1)
    finite = np.isfinite(ys)
    y_low, y_high = (ys[finite].min(), ys[finite].max()) if finite.any() else (0.0, 1.0)
    y_high = y_high if y_high > y_low else y_low + 1.0
    x_low, x_high = xs.min(), max(xs.max(), xs.min() + 1)
    shown = (10 ** y_low, 10 ** y_high) if panel.get('log_y') else (y_low, y_high)
    _axes(draw, box, shown, panel.get('title', ''))
    for x, y, colour in lines:
      y = transform(y)
      keep = np.isfinite(y)
      px = box[0] + (x[keep] - x_low) / (x_high - x_low) * (box[2] - box[0])
      py = box[3] - (y[keep] - y_low) / (y_high - y_low) * (box[3] - box[1])
      if len(px) > 1:
        draw.line(list(zip(px.tolist(), py.tolist())), fill=COLOURS[colour % len(COLOURS)],
                  width=1)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture.save(path)
  return path
