"""What ``sample.py`` does: load a run, draw samples in batches with a progress bar, write files."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import (config_lib, evaluation, file_checks, images, inference, masking, plots,
                      progress, series_outputs, series_tasks)
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.errors import InputError


class SampleProgress(progress.Progress):
  """Counts samples as the sampler's pieces finish: a batch of n samples that has run s of its
  S reverse steps counts n s / S. One object serves every batch, so each piece is compiled
  once."""

  def __init__(self, num_samples: int, batch_size: int, steps: int):
    super().__init__(num_samples, 'sampling', 'sample')
    self.batch_size, self.steps = batch_size, steps
    self._batch_start, self._batch_done = 0, 0  # samples of the finished batches; steps done

  def __call__(self, steps_done: int) -> None:
    """steps_done in the current batch, as sample_fn reports it; a count no larger than the
    last one starts a new batch."""
    if steps_done <= self._batch_done:
      self._batch_start += min(self.batch_size, self.total - self._batch_start)
    self._batch_done = steps_done
    batch = min(self.batch_size, self.total - self._batch_start)
    self.advance(self._batch_start + batch * steps_done / self.steps - self.done)


def parse_labels(text: str, num_samples: int) -> Optional[np.ndarray]:
  """'' -> None; '3' -> all 3; '0,1,2' -> cycled over the samples."""
  if not text:
    return None
  try:
    values = [int(v) for v in text.split(',')]
  except ValueError:
    raise InputError(f'--labels takes integers separated by commas, got {text!r}') from None
  return np.resize(np.asarray(values, np.int32), num_samples)


def _uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def plot_trajectory(x_t: np.ndarray, x0: np.ndarray, path, columns: int = 10) -> None:
  """trajectory.png: for each sample, x_t (upper row) and the predicted x0 (lower row) after
  ``columns`` evenly spaced reverse steps, each column titled with its step. Inputs [steps, N,
  H, W, C] in [0, 1]."""
  picks = np.unique(np.linspace(0, x_t.shape[0] - 1, columns).round().astype(int))
  rows = []
  for n in range(x_t.shape[1]):
    rows += [(f'sample {n}: x_t', _uint8(x_t[picks, n])),
             (f'sample {n}: x0', _uint8(x0[picks, n]))]
  plots.image_rows(rows, path, column_titles=[f'step {k + 1}/{x_t.shape[0]}' for k in picks],
                   title='the reverse process: x_t and the predicted x0 after each step')


def save_class_grid(uint8: np.ndarray, labels: np.ndarray, path, per_row: int = 16) -> None:
  """grid.png of a class-conditional run: one row per requested class (in the order given),
  its label drawn, up to ``per_row`` of its samples."""
  order = list(dict.fromkeys(labels.tolist()))
  plots.image_rows([(f'class {label}', uint8[labels == label][:per_row]) for label in order],
                   path, title='samples by class')


def _series_task(sample_fn, run, task, out, *, num_samples, method, num_steps, eta,
                 seed, batch_size, evaluate, horizon, series, num_windows, missing, block,
                 season, spacing, rho) -> pathlib.Path:
  """sample.py --task=forecast|impute: checked, then run by ddpm_jax.series_tasks."""
  config = run.config
  if task == 'forecast':  # checked before anything is sampled or written
    masking.forecast_mask(config.data.window, config.data.channels, horizon)
  method, num_steps, steps = inference.resolve_method(
      config, config_lib.schedule_from_config(config), method, num_steps or None)
  batch_size = batch_size or config.sampling.batch_size
  out = pathlib.Path(out).expanduser()
  common = dict(series_path=series, evaluate=evaluate, num_windows=num_windows,
                num_samples=num_samples, season=season, seed=seed, batch_size=batch_size,
                progress_factory=lambda total: SampleProgress(total, batch_size, steps),
                method=method, num_steps=num_steps, eta=None if eta < 0 else eta,
                spacing=spacing, rho=rho)
  if task == 'forecast':
    result = series_tasks.forecast(sample_fn, run.params, config, run.data_stats, out,
                                   horizon=horizon, **common)
  else:
    result = series_tasks.impute(sample_fn, run.params, config, run.data_stats, out,
                                 missing=missing, block=block, **common)
  if result:
    print(series_tasks.format_scores(result))
  print(f'wrote {out}')
  return out


def generate(ckpt: str, out: str, *, num_samples: int = 64, method: str = '',
             num_steps: int = 0, eta: float = -1.0, seed: int = 0, batch_size: int = 0,
             png_dir: str = '', trajectory: bool = False, labels: str = '',
             guidance_scale: float = -1.0, evaluate: bool = False, fid_stats: str = '',
             inception_weights: str = '', task: str = 'generate', horizon: int = 0,
             series: str = '', num_windows: int = 100, missing: float = 0.3, block: int = 0,
             season: int = 24, overwrite: bool = False,
             allow_unknown_weights: bool = False, spacing: str = '',
             rho: float = 0.0) -> pathlib.Path:
  """Draws samples from the checkpoint at ``ckpt`` and writes them to ``out``.

  Images: grid.png and samples.npz (uint8 [N, H, W, C] under arr_0); series: samples.npy,
  samples.csv and windows.png. Unset options (empty, 0 or negative) take the run's
  config.sampling values. ``evaluate`` also writes metrics.json: FID / KID (images; against
  ``fid_stats`` or the run's data) or the series metrics. ``task`` forecast / impute: see
  ddpm_jax.series_tasks (``num_samples`` is then the samples per window). ``out`` (and
  ``png_dir``) must be new, empty or written by ddpm_jax before, unless ``overwrite``.
  """
  if num_samples < 1:
    raise InputError(f'--num_samples must be at least 1, got {num_samples}')
  # A distillation workdir: --num_steps picks its student (default: the fewest steps).
  run = workdir_lib.load_run(ckpt, student_steps=num_steps or None)
  config, params = run.config, run.params
  sample_fn = inference.make_sample_fn(run.model, config, run.data_stats)
  # Validated before anything is written: sample_fn checks the same again per batch.
  method, num_steps, steps = inference.resolve_method(
      config, config_lib.schedule_from_config(config), method, num_steps or None)
  if task not in series_tasks.TASKS:
    raise InputError(f'unknown --task={task}; choose one of {", ".join(series_tasks.TASKS)}')
  spacing, rho = inference.resolve_spacing(config, method, spacing, rho or None)
  if task != 'generate':
    if not config_lib.is_series(config):
      raise InputError(f'--task={task} needs a time-series run; {ckpt} models images')
    file_checks.check_output_folder(out, overwrite, '--out')
    return _series_task(sample_fn, run, task, out, num_samples=num_samples,
                        method=method, num_steps=num_steps, eta=eta, seed=seed,
                        batch_size=batch_size, evaluate=evaluate, horizon=horizon, series=series,
                        num_windows=num_windows, missing=missing, block=block, season=season,
                        spacing=spacing, rho=rho)
  if evaluate and not config_lib.is_series(config):
    evaluation.check_before_sampling(config, fid_stats, inception_weights, allow_unknown_weights)
  label_array = parse_labels(labels, num_samples)
  inference.check_labels(run.model, label_array, num_samples)
  batch_size = min(batch_size or config.sampling.batch_size, num_samples)
  kwargs = dict(method=method, num_steps=num_steps, spacing=spacing, rho=rho,
                eta=None if eta < 0 else eta,
                guidance_scale=None if guidance_scale < 0 else guidance_scale)
  if label_array is not None:
    kwargs['labels'] = label_array
  out = file_checks.check_output_folder(out, overwrite, '--out')
  if png_dir:
    file_checks.check_output_folder(png_dir, overwrite, '--png_dir')
  progress = SampleProgress(num_samples, batch_size, steps)
  start = time.time()
  try:
    samples = inference.sample_in_batches(sample_fn, params, jax.random.key(seed), num_samples,
                                          batch_size, progress=progress, **kwargs)
  finally:
    progress.close()
  elapsed = time.time() - start
  print(f'{num_samples} samples from {run.workdir} (checkpoint {run.step}) with '
        f'{method} ({steps} steps) in {elapsed:.1f} s, compilation included')
  file_checks.create_output_folder(out)

  if config_lib.is_series(config):
    series_outputs.write_series_outputs(samples, config, run.data_stats, out, evaluate)
  else:
    uint8 = np.round(samples * 255).astype(np.uint8)
    np.savez(out / 'samples.npz', uint8)
    if label_array is None:
      images.save_grid(uint8[:256], out / 'grid.png')
    else:
      save_class_grid(uint8, label_array, out / 'grid.png')
    if png_dir:
      folder = file_checks.create_output_folder(png_dir)
      for i, image in enumerate(uint8):
        images.save_png(image, folder / f'{i:06d}.png')
    if evaluate:
      scores = evaluation.evaluate_images(uint8, config, run.workdir, label_array,
                                          fid_stats, inception_weights, allow_unknown_weights)
      scores.update(method=method, steps=steps, checkpoint=run.step)
      (out / 'metrics.json').write_text(json.dumps(scores, indent=2) + '\n')
      print('  '.join(f'{k} {v:.4g}' for k, v in scores.items() if isinstance(v, float)))
  if trajectory and config_lib.is_series(config):
    print('--trajectory draws image strips only; skipped for a time-series run')
  elif trajectory:
    count = min(8, num_samples)
    traj_kwargs = dict(kwargs)
    if label_array is not None:
      traj_kwargs['labels'] = jnp.asarray(label_array[:count])
    _, (x_t, x0) = sample_fn(params, jax.random.key(seed), count, return_trajectory=True,
                             **traj_kwargs)
    plot_trajectory(np.asarray(x_t), np.asarray(x0), out / 'trajectory.png')
  (out / 'timing.txt').write_text(f'{method} {steps} steps ({spacing} spacing) {num_samples} '
                                  f'samples {elapsed:.2f} s\n')
  print(f'wrote {out}')
  return out
