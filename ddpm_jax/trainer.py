"""The training loop: data, state, the jitted step, checkpoints, progress and sample grids.

``train(config, workdir)`` is all ``train.py`` calls. Starting again with the same
workdir resumes from the newest complete checkpoint, with the data iterator where it was.
"""

from __future__ import annotations

import pathlib
import signal
import threading
import time

import jax
import numpy as np

from ddpm_jax import (config_lib, digits_quality, file_checks, images, inference,
                      input_pipeline, plots, run_log, sharding, train_state)
from ddpm_jax import progress as progress_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.checkpointing import Checkpointer
from ddpm_jax.errors import InputError, Interrupted, TrainingError
from ddpm_jax.models import create_model


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


def write_samples(sample_fn, params, key, config, data_stats, path: pathlib.Path) -> None:
  """A PNG grid of samples (images) or a plot of generated windows (series).

  Every process computes (the sampler is one jitted computation over all devices); process 0
  gathers the result and writes it.
  """
  samples = sharding.to_host(sample_fn(params, key, config.training.num_sample_images))
  if not sharding.is_main_process():
    return
  if config_lib.is_series(config):
    names = (data_stats or {}).get('columns') or [str(c) for c in range(samples.shape[-1])]
    plots.window_panels(samples[:4], None, names, path)
  else:
    images.save_grid(np.round(samples * 255).astype(np.uint8), path)


def evaluate_quality(sample_fn, params, key, config, classifier) -> dict:
  """Digits quality of ``training.eval_samples`` DDIM samples (labels cycling 0..9 for a
  class-conditional model): {'eval_fd', 'eval_confidence'[, 'eval_label_agreement']}. Every
  process samples; the numbers are the same everywhere."""
  training = config.training
  labels = (np.arange(training.eval_samples) % config.model.num_classes
            if config.model.num_classes else None)
  kwargs = {} if labels is None else {'labels': labels}
  samples = sharding.to_host(sample_fn(params, key, training.eval_samples, method='ddim',
                                       num_steps=training.eval_steps, eta=0.0, **kwargs))
  uint8 = np.round(samples * 255).astype(np.uint8)
  scores = digits_quality.quality(uint8, labels, classifier)
  return {f'eval_{name}': round(value, 5) for name, value in scores.items()}


def check_data_order(saved: dict, config, step: int) -> None:
  """The saved data position counts global batches of one size and seed: resuming with another
  would silently change which examples come next."""
  for field in ('batch_size', 'seed'):
    was, now = saved.get(field), config.training[field]
    if was is not None and was != now:
      raise InputError(f'checkpoint {step} was written with training.{field}={was} and its data '
                       f'position counts batches of that run; resume with '
                       f'--config.training.{field}={was} (any device or process count that '
                       f'divides the batch works) or use a new --workdir')


def _library_log(workdir: pathlib.Path) -> pathlib.Path:
  index = jax.process_index()
  return workdir / (run_log.LIBRARY_LOG if index == 0 else f'train.process{index}.log')


def train(config, workdir) -> train_state.TrainState:
  """Trains (or resumes) the run that ``config`` describes in ``workdir``; returns the final state.

  ``config`` is not changed: the run uses a resolved copy (the data's shape filled in), which
  it writes to ``<workdir>/config.json``.
  """
  if not workdir:
    raise InputError('--workdir is required: the folder for checkpoints, samples and metrics')
  workdir = file_checks.check_writable_folder(workdir, '--workdir')
  sharding.initialize_distributed()
  mesh = sharding.make_mesh()
  sharding.check_global_batch(config.training.batch_size, mesh)
  train_state.check_grad_accum(config.optim.get('grad_accum_steps', 1),
                               config.training.batch_size, mesh.devices.size)

  # Everything that can be wrong with the input is found before anything compiles.
  source = input_pipeline.create_source(config.data, seed=config.training.seed)
  info = source.info()
  config = config_lib.resolve(config, info.shape, info.num_classes)
  if sharding.is_main_process():
    for line in config_lib.training_warnings(config):
      print(f'warning: {line}', flush=True)
  model = create_model(config)
  example_shape = config_lib.data_shape(config)
  model.check_input((1,) + tuple(example_shape))
  schedule = config_lib.schedule_from_config(config)
  tx = train_state.make_optimizer(config.optim)
  init = train_state.initial_state_fn(config, model, tx, schedule, example_shape)
  data_iter = input_pipeline.make_iterator(source, config.training.batch_size,
                                           config.training.seed)
  make_step = lambda state_sharding, batch_sharding, replicated: train_state.make_train_step(
      config, model, tx, schedule, state_sharding, batch_sharding, replicated, info.stats)
  return run_in_workdir(config, workdir, mesh, model, init, data_iter, info.stats, make_step)


def run_in_workdir(config, workdir: pathlib.Path, mesh, model, init, data_iter, data_stats,
                   make_step, label: str = '') -> train_state.TrainState:
  """Checks ``workdir``'s config.json against ``config``, then ``train_loop`` (which writes
  it) with orbax's log in train.log."""
  workdir_lib.check_config(workdir, config)
  with run_log.LibraryLogToFile(_library_log(workdir)):
    return train_loop(config, workdir, mesh, model, init, data_iter, data_stats, make_step,
                      label)


def train_loop(config, workdir, mesh, model, init, data_iter, data_stats, make_step,
               label: str = '') -> train_state.TrainState:
  """Steps ``make_step(state_sharding, batch_sharding, metrics_sharding)`` (a jitted
  ``(state, batch) -> (state, metrics)``) from ``init()`` or the newest checkpoint in
  ``workdir`` to ``config.training.num_steps`` (writing config.json once the resume is
  accepted), with checkpoints, progress (``label`` first), sample grids and digits quality as
  ``config.training`` asks; returns the final state."""
  training = config.training
  main = sharding.is_main_process()
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  shapes = jax.eval_shape(init)  # serves the state's shardings and the restore target
  state_sharding = jax.tree.map(lambda _: replicated, shapes)
  checkpointer = Checkpointer(workdir / 'checkpoints', training.keep_checkpoints)
  flag = SignalFlag()
  progress = metrics_log = None
  try:
    restored = checkpointer.restore_latest(shapes, replicated)
    if restored is None:
      state = jax.jit(init, out_shardings=state_sharding)()
    else:
      check_data_order(restored.extras.get('data_order', {}), config, restored.step)
      state = restored.state
      if restored.data_iter is not None:
        data_iter.set_state(restored.data_iter)
      if main:
        print(f'resuming {workdir} from checkpoint {restored.step}', flush=True)
    workdir_lib.write_config(workdir, config)
    extras = {'data_order': {'batch_size': training.batch_size, 'seed': training.seed}}
    if data_stats:
      extras['data_stats'] = data_stats
    step_fn = make_step(state_sharding, batch_sharding, replicated)
    sample_fn = inference.make_sample_fn(model, config, data_stats)
    sample_key = train_state.run_keys(training.seed)[2]
    classifier = digits_quality.load_classifier() if training.eval_every else None

    step = int(state.step)
    metrics_log = run_log.MetricsLog(workdir, step, write=main)
    if main:
      print(f'training {workdir} from step {step} to {training.num_steps} on '
            f'{jax.device_count()} {jax.devices()[0].platform} device(s) in '
            f'{jax.process_count()} process(es); compiling the train step...', flush=True)
    item = 'window' if config_lib.is_series(config) else 'image'
    progress = (progress_lib.Progress(training.num_steps, label, 'step', start=step,
                                      per_unit=(item, training.batch_size)) if main else None)
    compile_start, compiled = time.time(), False
    previous_vote = None  # the agreed stop vote of the step before, read one step late
    while step < training.num_steps:
      batch = next(data_iter)
      # Each process votes in its own rows; the step returns the maximum, so every process sees
      # a SIGTERM / SIGINT that reached any one of them, and at the same step.
      batch['stop'] = np.full(len(batch['x']), flag.signum or 0, np.int32)
      state, metrics = step_fn(state, sharding.to_global(batch, batch_sharding))
      step += 1
      stop_signum = int(previous_vote) if previous_vote is not None else 0
      previous_vote = metrics['stop']
      if not compiled:
        jax.block_until_ready(state)
        first_step_s = round(time.time() - compile_start, 3)
        if main:
          progress_lib.write(f'step {step}: compiled and ran the first step in {first_step_s} s')
        metrics_log.append({'step': step, 'compile_and_first_step_s': first_step_s})
        compiled = True  # rates and ETA count from here, without compilation
        if progress is not None:
          progress.update(step, report=False)
          progress.restart_clock()
      due = lambda every: step == training.num_steps or (every > 0 and step % every == 0)
      checkpoint_now = due(training.checkpoint_every)
      if due(training.log_every) or checkpoint_now or stop_signum:
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
        metrics_log.append(record)
        if progress is not None:
          progress.update(step, {'loss': f'{record["loss"]:.4f}'})
          if step == training.num_steps:
            progress.close()  # the bar's last line keeps the training rate, not the grids'
      if checkpoint_now or stop_signum:
        checkpointer.save(step, state, data_iter.get_state(), extras)
        metrics_log.plot()
      grid_key, eval_key = jax.random.split(jax.random.fold_in(sample_key, step))
      if due(training.sample_every):
        write_samples(sample_fn, state.ema_params, grid_key, config,
                      data_stats, workdir / 'samples' / f'step_{step:07d}.png')
      if training.eval_every and due(training.eval_every):
        quality = evaluate_quality(sample_fn, state.ema_params, eval_key, config, classifier)
        metrics_log.append({'step': step, **quality})
        metrics_log.plot()
        if main:
          progress_lib.write(f'step {step}: ' + '  '.join(f'{k[5:]} {v:.4g}'
                                                          for k, v in quality.items()))
      if stop_signum:
        checkpointer.wait()
        raise Interrupted(stop_signum, step, here=flag.signum is not None)
    checkpointer.wait()
    return state
  finally:
    if progress is not None:
      progress.close()
    if metrics_log is not None:
      metrics_log.close()
    flag.restore()
    checkpointer.close()  # every exit path waits for the pending save
