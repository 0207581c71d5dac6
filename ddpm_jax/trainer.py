"""The training loop: data, state, the jitted step, checkpoints, progress and sample grids.

``train_and_evaluate(config, workdir)`` is all ``train.py`` calls. Starting again with the same
workdir resumes from the newest complete checkpoint, with the data iterator where it was.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import threading
import time

import jax
import numpy as np

from ddpm_jax import (config_lib, images, inference, input_pipeline, sharding, train_state)
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.models import create_model


class TrainingError(RuntimeError):
  """The run cannot go on (diverged, or a checkpoint could not be written)."""


class Interrupted(Exception):
  """SIGTERM or SIGINT arrived; the state was saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step}; checkpoint {step} '
                     f'saved; run the same command to resume')
    self.signum = signum


def resolve_data_fields(config, info: input_pipeline.DataInfo) -> None:
  """Fills data.image_size / data.channels left at 0 from the data; rejects ones that disagree."""
  data = config.data
  if config_lib.is_series(config):
    data.channels = info.shape[-1]
    return
  height, width, channels = info.shape
  if height != width:
    raise ValueError(f'images are {height}x{width}; the model takes square images')
  for field, actual in (('image_size', height), ('channels', channels)):
    wanted = data[field]
    if wanted and wanted != actual:
      raise ValueError(f'data.{field}={wanted} but the {data.name} data has {field} {actual}; '
                       f'set --config.data.{field}={actual} (or 0 to take it from the data)')
    data[field] = actual
  if config.model.num_classes and not info.num_classes:
    raise ValueError(f'model.num_classes={config.model.num_classes} but the {data.name} data has '
                     'no labels; set --config.model.num_classes=0')
  if config.model.num_classes and info.num_classes > config.model.num_classes:
    raise ValueError(f'the {data.name} data has {info.num_classes} classes but '
                     f'model.num_classes={config.model.num_classes}')


def prepare_workdir(workdir: pathlib.Path, config) -> None:
  """Writes config.json, or checks that the one there fits the checkpoints it describes."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  if path.exists() and (workdir / 'checkpoints').is_dir() and \
      any(p.name.isdigit() for p in (workdir / 'checkpoints').iterdir()):
    diffs = config_lib.checkpoint_differences(config_lib.from_json(path.read_text()), config)
    if diffs:
      raise ValueError(f'{workdir} holds checkpoints of another config ({"; ".join(diffs)}); '
                       f'use a new --workdir or the original settings')
  if jax.process_index() == 0:
    path.write_text(config_lib.to_json(config))


class Progress:
  """A tqdm bar on a terminal, plain log lines elsewhere: step, loss, steps/s, images/s, ETA."""

  def __init__(self, start: int, total: int, batch_size: int):
    self.total, self.batch_size = total, batch_size
    self.start_step, self.start_time = start, time.time()
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, metrics: dict) -> str:
    elapsed = time.time() - self.start_time
    rate = (step - self.start_step) / max(elapsed, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    fields = dict(loss=f'{metrics["loss"]:.4f}', img_per_s=f'{rate * self.batch_size:.1f}')
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix(fields, refresh=True)
      return ''
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
    line = (f'step {step}/{self.total}  loss {fields["loss"]}  {rate:.2f} steps/s  '
            f'{fields["img_per_s"]} images/s  ETA {eta_text}')
    print(line, flush=True)
    return line

  def close(self):
    if self.bar is not None:
      self.bar.close()


class SignalFlag:
  """Turns the first SIGTERM / SIGINT into a flag the loop checks; a second one kills as usual."""

  def __init__(self):
    self.signum = None
    self.previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self.previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    self.signum = signum
    signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

  def restore(self):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)


def _append_metrics(workdir: pathlib.Path, record: dict) -> None:
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps(record) + '\n')


def plot_loss_curve(workdir: pathlib.Path) -> None:
  """<workdir>/loss.png from metrics.jsonl (log scale)."""
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()
             if line.strip()]
  steps = [r['step'] for r in records if 'loss' in r]
  loss = [r['loss'] for r in records if 'loss' in r]
  images.plot_lines([{'title': 'training loss (log scale) vs step',
                      'lines': [(steps, loss, 0)], 'log_y': True}], workdir / 'loss.png',
                    panel_height=240)


def write_samples(sample_fn, params, key, config, data_stats, path: pathlib.Path) -> None:
  """A PNG grid of samples (images) or a plot of generated windows (series)."""
  num = config.training.num_sample_images
  samples = np.asarray(sample_fn(params, key, num))
  if config_lib.is_series(config):
    from ddpm_jax import timeseries
    timeseries.plot_windows(samples[:4], None, path, (data_stats or {}).get('columns'))
  else:
    images.save_grid(np.round(samples * 255).astype(np.uint8), path)


def train_and_evaluate(config, workdir) -> train_state.TrainState:
  """Trains (or resumes) the run that ``config`` describes in ``workdir``; returns the final state."""
  if not workdir:
    raise ValueError('--workdir is required: the folder for checkpoints, samples and metrics')
  workdir = pathlib.Path(workdir).expanduser()
  sharding.maybe_initialize_distributed()
  training = config.training
  mesh = sharding.make_mesh()
  sharding.check_global_batch(training.batch_size, mesh)

  # Everything that can be wrong with the input is found before anything compiles.
  source = input_pipeline.create_source(config.data, seed=training.seed)
  info = source.info()
  resolve_data_fields(config, info)
  model = create_model(config)
  example_shape = config_lib.data_shape(config)
  model.check_input((1,) + tuple(example_shape))
  schedule = config_lib.schedule_from_config(config)
  tx = train_state.make_optimizer(config.optim)
  init = train_state.initial_state_fn(config, model, tx, schedule, example_shape)
  data_iter = input_pipeline.make_iterator(source, training.batch_size, training.seed)
  prepare_workdir(workdir, config)

  replicated = sharding.replicated(mesh)
  shapes = jax.eval_shape(init)
  state_sharding = jax.tree.map(lambda _: replicated, shapes)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          shapes)
  checkpointer = Checkpointer(workdir / 'checkpoints', training.keep_checkpoints)
  flag = SignalFlag()
  progress = None
  try:
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
      state = jax.jit(init, out_shardings=state_sharding)()
    else:
      state = restored.state
      if restored.data_iter is not None:
        data_iter.set_state(restored.data_iter)
      print(f'resuming {workdir} from checkpoint {restored.step}', flush=True)
    data_stats = info.stats
    extras = {'data_stats': data_stats} if data_stats else {}
    step_fn = train_state.make_train_step(config, model, tx, schedule, state_sharding,
                                          sharding.batch_sharding(mesh), replicated)
    sample_fn = inference.make_sample_fn(model, config, data_stats)
    sample_key = train_state.run_keys(training.seed)[2]

    step = int(state.step)
    progress = Progress(step, training.num_steps, training.batch_size)
    print(f'training {workdir} from step {step} to {training.num_steps} on {jax.device_count()} '
          f'{jax.devices()[0].platform} device(s); compiling the train step...', flush=True)
    compile_start, compiled = time.time(), False
    while step < training.num_steps:
      batch = sharding.to_global(next(data_iter), sharding.batch_sharding(mesh))
      state, metrics = step_fn(state, batch)
      step += 1
      if not compiled:
        jax.block_until_ready(state)
        first_step_s = round(time.time() - compile_start, 3)
        print(f'step {step}: compiled and ran the first step in {first_step_s} s', flush=True)
        if jax.process_index() == 0:
          _append_metrics(workdir, {'step': step, 'compile_and_first_step_s': first_step_s})
        compiled = True  # rates and ETA count from here, without compilation
        progress.start_step, progress.start_time = step, time.time()
      checkpoint_now = step % training.checkpoint_every == 0 or step == training.num_steps
      if step % training.log_every == 0 or checkpoint_now or flag.signum:
        record = {'step': step, 'loss': float(metrics['loss']),
                  'grad_norm': float(metrics['grad_norm']),
                  'nonfinite_total': int(state.nonfinite_total), 'time': round(time.time(), 3)}
        streak = int(state.nonfinite_streak)
        if streak >= training.max_nonfinite_steps:
          good = checkpointer.all_steps()
          raise TrainingError(
              f'{streak} updates in a row had a non-finite loss or gradient (steps '
              f'{step - streak + 1}..{step}, all skipped); stopping. '
              f'{f"Checkpoint {good[-1]} is intact" if good else "No checkpoint was written"}; '
              f'lower optim.learning_rate or check the data for NaNs')
        if jax.process_index() == 0:
          _append_metrics(workdir, record)
          plot_loss_curve(workdir)
        progress.update(step, record)
      if checkpoint_now or flag.signum:
        checkpointer.save(step, state, data_iter.get_state(), extras)
      if (step % training.sample_every == 0 or step == training.num_steps) and \
          jax.process_index() == 0:
        write_samples(sample_fn, state.ema_params, jax.random.fold_in(sample_key, step), config,
                      data_stats, workdir / 'samples' / f'step_{step:07d}.png')
      if flag.signum:
        checkpointer.wait()
        raise Interrupted(flag.signum, step)
    checkpointer.wait()
    return state
  finally:
    if progress is not None:
      progress.close()
    flag.restore()
    checkpointer.close()  # every exit path waits for the pending save
