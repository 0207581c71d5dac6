"""What ``sample.py`` does: load a run, draw samples in batches with a progress bar, write files."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import (config_lib, evaluation, file_checks, images, inference, plots,
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


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """What sample.py is asked for. ``None`` means the run's own setting (config.sampling)."""
  ckpt: str
  out: str = ''  # '' -> <workdir>/generated/<method> (or <task>[_eval]/<method>)
  num_samples: int = 64  # forecast / impute: samples per window
  method: Optional[str] = None
  num_steps: Optional[int] = None  # a distillation workdir: which student
  spacing: Optional[str] = None
  rho: Optional[float] = None
  rtol: Optional[float] = None  # adaptive only
  atol: Optional[float] = None
  solver: Optional[str] = None
  antithetic: Optional[bool] = None
  eta: Optional[float] = None
  guidance_scale: Optional[float] = None
  seed: int = 0
  batch_size: Optional[int] = None
  png_dir: str = ''
  trajectory: bool = False
  labels: str = ''  # '3' or '0,1,2' (cycled over the samples)
  evaluate: bool = False
  fid_stats: str = ''
  inception_weights: str = ''
  allow_unknown_weights: bool = False
  task: str = 'generate'  # generate | forecast | impute
  horizon: Optional[int] = None  # None: the run's data.horizon, else 24
  series: str = ''
  num_windows: int = 100
  eval_part: str = 'test'  # forecast / impute --eval: test | validation
  missing: float = 0.3
  block: int = 0
  season: int = 24
  overwrite: bool = False

  @classmethod
  def from_flags(cls, flags) -> SampleRequest:
    """sample.py's flags, whose 'unset' values ('' / 0 / negative) become None here, once."""
    return cls(
        ckpt=flags.ckpt, out=flags.out, num_samples=flags.num_samples,
        method=flags.method or None, num_steps=flags.num_steps or None,
        spacing=flags.spacing or None, rho=flags.rho or None, rtol=flags.rtol, atol=flags.atol,
        solver=flags.solver or None, antithetic=flags.antithetic,
        eta=None if flags.eta < 0 else flags.eta,
        guidance_scale=None if flags.guidance_scale < 0 else flags.guidance_scale,
        seed=flags.seed, batch_size=flags.batch_size or None, png_dir=flags.png_dir,
        trajectory=flags.trajectory, labels=flags.labels, evaluate=flags.eval,
        fid_stats=flags.fid_stats, inception_weights=flags.inception_weights,
        allow_unknown_weights=flags.allow_unknown_weights, task=flags.task,
        horizon=flags.horizon or None, series=flags.series, num_windows=flags.num_windows,
        eval_part=flags.eval_part,
        missing=flags.missing, block=flags.block, season=flags.season,
        overwrite=flags.overwrite)

  def default_out(self) -> pathlib.Path:
    folder = ('generated' if self.task == 'generate' else
              self.task + ('_eval' if self.evaluate else '')
              + ('_validation' if self.evaluate and self.eval_part == 'validation' else ''))
    return workdir_lib.resolve_checkpoint(self.ckpt)[0] / folder / (self.method or 'default')


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A request's sampling options, resolved against the run's config and checked, once."""
  method: str
  num_steps: Optional[int]  # what sample_fn takes (None for ddpm)
  steps: int  # the reverse steps the scan takes
  spacing: str
  rho: float
  eta: Optional[float]
  guidance_scale: Optional[float]
  batch_size: int
  rtol: Optional[float] = None  # adaptive only
  atol: Optional[float] = None
  solver: Optional[str] = None
  antithetic: Optional[bool] = None

  def kwargs(self) -> dict:
    """The options every sample_fn call of the request passes."""
    return dict(method=self.method, num_steps=self.num_steps, spacing=self.spacing,
                rho=self.rho, eta=self.eta, guidance_scale=self.guidance_scale,
                rtol=self.rtol, atol=self.atol, solver=self.solver, antithetic=self.antithetic)

  def describe(self) -> str:
    """The method and its steps (or tolerances), for the console and timing.txt."""
    if self.method == 'adaptive':
      return f'adaptive ({self.solver}, rtol {self.rtol:g}, atol {self.atol:g})'
    return f'{self.method} ({self.steps} steps, {self.spacing} spacing)'


def resolve_sampler(request: SampleRequest, config) -> Sampler:
  method, num_steps, steps = inference.resolve_method(
      config, config_lib.schedule_from_config(config), request.method, request.num_steps)
  spacing, rho = inference.resolve_spacing(config, method, request.spacing, request.rho)
  adaptive = inference.resolve_adaptive(config, method, request.rtol, request.atol,
                                        request.solver)
  batch_size = request.batch_size or config.sampling.batch_size
  if request.task == 'generate':
    batch_size = min(batch_size, request.num_samples)
  return Sampler(method, num_steps, steps, spacing, rho, request.eta, request.guidance_scale,
                 batch_size, **adaptive, antithetic=request.antithetic)


def _series_task(sample_fn, run, request: SampleRequest, sampler: Sampler,
                 out: pathlib.Path) -> pathlib.Path:
  """sample.py --task=forecast|impute: checked, then run by ddpm_jax.series_tasks."""
  config = run.config
  horizon = None
  if request.task == 'forecast':  # checked before anything is sampled or written
    horizon = series_tasks.resolve_horizon(config, request.horizon)
  options = sampler.kwargs()
  options.pop('guidance_scale')
  common = dict(series_path=request.series, evaluate=request.evaluate,
                num_windows=request.num_windows, eval_part=request.eval_part,
                num_samples=request.num_samples,
                season=request.season, seed=request.seed, batch_size=sampler.batch_size,
                progress_factory=lambda total: SampleProgress(total, sampler.batch_size,
                                                              sampler.steps), **options)
  if request.task == 'forecast':
    result = series_tasks.forecast(sample_fn, run.params, config, run.data_stats, out,
                                   horizon=horizon, **common)
  else:
    result = series_tasks.impute(sample_fn, run.params, config, run.data_stats, out,
                                 missing=request.missing, block=request.block, **common)
  if result:
    print(series_tasks.format_scores(result))
  print(f'wrote {out}')
  return out


def generate(request: SampleRequest) -> pathlib.Path:
  """Draws what ``request`` asks for from its run and writes it to ``request.out``.

  Images: grid.png and samples.npz (uint8 [N, H, W, C] under arr_0); series: samples.npy,
  samples.csv and windows.png. ``evaluate`` also writes metrics.json: FID / KID (images; against
  ``fid_stats`` or the run's data) or the series metrics. ``task`` forecast / impute: see
  ddpm_jax.series_tasks. ``out`` (and ``png_dir``) must be new, empty or written by ddpm_jax
  before, unless ``overwrite``. Everything is checked before anything is sampled or written.
  """
  if request.num_samples < 1:
    raise InputError(f'--num_samples must be at least 1, got {request.num_samples}')
  if request.task not in series_tasks.TASKS:
    raise InputError(f'unknown --task={request.task}; choose one of '
                     f'{", ".join(series_tasks.TASKS)}')
  out = pathlib.Path(request.out).expanduser() if request.out else request.default_out()
  # A distillation workdir: --num_steps picks its student (default: the fewest steps).
  run = workdir_lib.load_run(request.ckpt, student_steps=request.num_steps)
  config = run.config
  sampler = resolve_sampler(request, config)
  sample_fn = inference.make_sample_fn(run.model, config, run.data_stats)
  if request.task != 'generate':
    if not config_lib.is_series(config):
      raise InputError(f'--task={request.task} needs a time-series run; {request.ckpt} models '
                       'images')
    file_checks.check_output_folder(out, request.overwrite, '--out')
    return _series_task(sample_fn, run, request, sampler, out)
  if request.evaluate and not config_lib.is_series(config):
    evaluation.check_before_sampling(config, request.fid_stats, request.inception_weights,
                                     request.allow_unknown_weights)
  label_array = parse_labels(request.labels, request.num_samples)
  inference.check_labels(run.model, label_array, request.num_samples)
  kwargs = sampler.kwargs()
  if label_array is not None:
    kwargs['labels'] = label_array
  out = file_checks.check_output_folder(out, request.overwrite, '--out')
  if request.png_dir:
    file_checks.check_output_folder(request.png_dir, request.overwrite, '--png_dir')
  progress = SampleProgress(request.num_samples, sampler.batch_size, sampler.steps)
  start, calls = time.time(), []
  try:
    samples = inference.sample_in_batches(sample_fn, run.params, jax.random.key(request.seed),
                                          request.num_samples, sampler.batch_size,
                                          progress=progress, calls=calls, **kwargs)
  finally:
    progress.close()
  elapsed = time.time() - start
  calls_text = f'{np.mean(calls):.1f} network calls (mean over batches)'
  print(f'{request.num_samples} samples from {run.workdir} (checkpoint {run.step}) with '
        f'{sampler.describe()}, {calls_text}, in {elapsed:.1f} s, compilation included')
  file_checks.create_output_folder(out)

  if config_lib.is_series(config):
    series_outputs.write_series_outputs(samples, config, run.data_stats, out, request.evaluate)
  else:
    uint8 = np.round(samples * 255).astype(np.uint8)
    np.savez(out / 'samples.npz', uint8)
    if label_array is None:
      images.save_grid(uint8[:256], out / 'grid.png')
    else:
      save_class_grid(uint8, label_array, out / 'grid.png')
    if request.png_dir:
      folder = file_checks.create_output_folder(request.png_dir)
      for i, image in enumerate(uint8):
        images.save_png(image, folder / f'{i:06d}.png')
    if request.evaluate:
      scores = evaluation.evaluate_images(uint8, config, run.workdir, label_array,
                                          request.fid_stats, request.inception_weights,
                                          request.allow_unknown_weights)
      scores.update(method=sampler.method, steps=sampler.steps, checkpoint=run.step)
      (out / 'metrics.json').write_text(json.dumps(scores, indent=2) + '\n')
      print('  '.join(f'{k} {v:.4g}' for k, v in scores.items() if isinstance(v, float)))
  if request.trajectory and config_lib.is_series(config):
    print('--trajectory draws image strips only; skipped for a time-series run')
  elif request.trajectory:
    count = min(8, request.num_samples)
    traj_kwargs = dict(kwargs)
    if label_array is not None:
      traj_kwargs['labels'] = jnp.asarray(label_array[:count])
    _, (x_t, x0) = sample_fn(run.params, jax.random.key(request.seed), count,
                             return_trajectory=True, **traj_kwargs)
    plot_trajectory(np.asarray(x_t), np.asarray(x0), out / 'trajectory.png')
  (out / 'timing.txt').write_text(f'{sampler.describe()} {request.num_samples} samples '
                                  f'{elapsed:.2f} s, {calls_text}\n')
  print(f'wrote {out}')
  return out
