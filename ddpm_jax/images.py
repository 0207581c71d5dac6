"""Sample images as PNG: grids, single images, enlarged for small sizes (Pillow)."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image


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
