"""What several benchmarks share: the training step that vs_pytorch.py times and profile_step.py
dissects, the image shape of a config whose data fields are left at 0, what a finished run's
metrics.jsonl says about its training time, and the machine a result was measured on."""

import json
import os
import pathlib
import platform
import subprocess

import jax
import optax

from ddpm_jax import input_pipeline, losses
from ddpm_jax.models import model_apply


def fill_image_shape(config) -> None:
  """Sets data.image_size and data.channels where ``config`` leaves them at 0, from its data."""
  if not config.data.image_size or not config.data.channels:
    shape = input_pipeline.create_source(config.data).info().shape  # (H, W, C)
    config.data.image_size, config.data.channels = shape[0], shape[-1]


def adam_diffusion_step(model, schedule, x0, tx):
  """(params, opt_state, key) -> (params, opt_state, loss): x_t at random t from the fixed batch
  x0 [B, H, W, C], the network in train mode (dropout), the eps MSE, gradients and ``tx``."""

  def step(params, opt_state, key):
    def loss_fn(p):
      apply_fn = lambda p_, x_t, t, k: model_apply(model, p_, x_t, t, None, True, k)
      return losses.diffusion_loss(apply_fn, p, x0, key, schedule)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def training_record(workdir: pathlib.Path) -> dict:
  """From a run's metrics.jsonl: the last step, steps/s over the logged steps, the seconds to
  compile and run the first step of each session (0 where a run did not log them), the last
  logged loss, and the minutes of training. A resumed run's sessions each start with their
  compile record and are timed apart, so the time between a stop and its resume is not
  counted; within a session, the steps before its first logged one (under 1%) are left out."""
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  records = [json.loads(line) for line in lines]
  sessions, compile_s = [[]], 0.0
  for record in records:
    if 'compile_and_first_step_s' in record:
      compile_s += record['compile_and_first_step_s']
      sessions.append([])
    if 'time' in record:
      sessions[-1].append(record)
  timed = [s for s in sessions if len(s) > 1]
  span = sum(s[-1]['time'] - s[0]['time'] for s in timed)
  steps = sum(s[-1]['step'] - s[0]['step'] for s in timed)
  last = [r for s in sessions for r in s]
  return dict(step=max(r['step'] for r in records),
              rate=steps / span if span > 0 else float('nan'),
              compile_s=compile_s, loss=last[-1]['loss'] if last else float('nan'),
              minutes=(span + compile_s) / 60.0 if timed else float('nan'))


def machine() -> str:
  """The GPUs' names where nvidia-smi answers, else the processor, with the CPU cores this process
  may use (found without starting JAX, which would take a GPU's memory from the runs)."""
  cores = len(os.sched_getaffinity(0))
  try:
    names = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                           capture_output=True, text=True, check=True).stdout.split('\n')
    return ', '.join(n for n in names if n) + f' ({cores} CPU cores)'
  except (OSError, subprocess.CalledProcessError):
    return f'{platform.processor() or platform.machine()} ({cores} cores)'
