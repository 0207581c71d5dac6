"""Training throughput of a config on random data of its shape: compile time, steps/s, images/s.

  python benchmarks/train_throughput.py --config=configs/cifar10.py --steps=20
  python benchmarks/train_throughput.py --config=configs/digits.py --steps=200
  # the memory of one step as 1, 2 or 4 micro-batches (gradient accumulation); --steps=0
  # only compiles, which is all XLA's memory analysis needs:
  for k in 1 2 4; do python benchmarks/train_throughput.py --config=configs/cifar10.py --steps=0 \
    --config.optim.grad_accum_steps=$k; done

Several processes: start one per process with the launch variables train.py takes, e.g. on one
machine with two processes of one CPU device each:
  for i in 0 1; do JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    python benchmarks/train_throughput.py --config=configs/digits.py --steps=300 & done; wait

Uses data.name=synthetic (uint8 noise of the config's image shape), the real jitted train step
with its sharding over every local device, and prints a Markdown table row that is also
appended to benchmarks/results/train_throughput.md, with XLA's cost and memory analysis of a
train step and of one network call (what a sampler step costs) at the same batch: FLOPs, the
FLOP rate achieved, and the memory of the buffers XLA assigns (arguments, outputs and
temporaries: the step's peak memory, up to the runtime's own overhead). On a GPU, XLA's FLOP
count comes out far below XLA:CPU's for the same step (a twelfth for cifar10.py on an H200):
take the FLOPs from a CPU row (docs/performance.md).
"""

import os
import pathlib
import platform
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed steps after the first (compiling) one; 0 compiles '
                     'the step and reports XLA\'s analysis without running it.')
flags.DEFINE_string('results', str(pathlib.Path(__file__).parent / 'results' /
                                   'train_throughput.md'), 'Markdown file to append to.')
flags.mark_flags_as_required(['config'])


def buffer_bytes(compiled) -> int:
  """The bytes of every buffer XLA assigned to ``compiled``: its arguments, outputs and
  temporaries (activations kept for the backward pass among them), less what outputs share with
  arguments. XLA:CPU's own peak_memory_in_bytes leaves the temporaries out (measured: it equals
  arguments + outputs), which hides what gradient accumulation saves."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)


def main(argv):
  del argv
  from ddpm_jax import cpu_backend
  cpu_backend.configure()  # as train.py does, before JAX starts its backend
  import jax
  from benchmarks import common
  from ddpm_jax import config_lib, input_pipeline, sharding, train_state
  from ddpm_jax.models import create_model, model_apply
  sharding.initialize_distributed()
  config = flags.FLAGS.config
  config_name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).name
  common.fill_image_shape(config)
  config.data.name = 'synthetic'
  config.data.num_examples = max(config.training.batch_size * 4, 256)
  mesh = sharding.make_mesh()
  sharding.check_global_batch(config.training.batch_size, mesh)
  source = input_pipeline.create_source(config.data)
  model = create_model(config)
  schedule = config_lib.schedule_from_config(config)
  tx = train_state.make_optimizer(config.optim)
  init = train_state.initial_state_fn(config, model, tx, schedule, config_lib.data_shape(config))
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=state_sharding)()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  step_fn = train_state.make_train_step(config, model, tx, schedule, state_sharding,
                                        sharding.batch_sharding(mesh), replicated)
  iterator = input_pipeline.make_iterator(source, config.training.batch_size, 0)
  batches = [sharding.to_global(next(iterator), sharding.batch_sharding(mesh)) for _ in range(4)]
  start = time.time()
  step_fn = step_fn.lower(state, batches[0]).compile()  # timed below: the same executable
  if flags.FLAGS.steps:
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
  compile_s = time.time() - start
  accum = config.optim.get('grad_accum_steps', 1)
  # XLA's own accounting of one train step and of one network call (a sampler step's cost).
  # XLA counts a loop's body once: with K micro-batches the scan's body is 1/K of the step (the
  # optimiser's update, outside it, is a fraction of a percent and counted K times here).
  train_flops = step_fn.cost_analysis()['flops'] * accum
  train_peak = buffer_bytes(step_fn)
  x = jax.numpy.zeros((config.training.batch_size,) + config_lib.data_shape(config))
  t = jax.numpy.zeros((config.training.batch_size,), jax.numpy.int32)
  forward = jax.jit(lambda p, x, t: model_apply(model, p, x, t)).lower(state.ema_params, x,
                                                                       t).compile()
  call_flops = forward.cost_analysis()['flops']
  call_peak = buffer_bytes(forward)
  start = time.time()
  for i in range(flags.FLAGS.steps):
    state, metrics = step_fn(state, batches[i % 4])
    if (i + 1) % max(1, flags.FLAGS.steps // 10) == 0:
      jax.block_until_ready(metrics)
      rate = (i + 1) / (time.time() - start)
      print(f'  {i + 1}/{flags.FLAGS.steps} steps, {rate:.3f} steps/s', flush=True)
  jax.block_until_ready(state)
  elapsed = time.time() - start
  steps_per_s = flags.FLAGS.steps / elapsed if flags.FLAGS.steps else float('nan')
  device = jax.devices()[0]
  device_name = f'{jax.process_count()} process(es) x {jax.local_device_count()} ' \
      f'{device.device_kind}' + \
      (f' ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
       if device.platform == 'cpu' else '')
  row = (f'| {config_name} | {num_params / 1e6:.2f}M | '
         f'{config.training.batch_size} | {accum} | {device_name} | {compile_s:.1f} | '
         f'{flags.FLAGS.steps} | '
         f'{steps_per_s:.3f} | {steps_per_s * config.training.batch_size:.1f} | '
         f'{train_flops / 1e9:.1f} | {train_flops * steps_per_s / 1e9:.1f} | '
         f'{train_peak / 2 ** 20:.0f} | {call_flops / 1e9:.2f} | {call_peak / 2 ** 20:.0f} |')
  header = ('| config | params | batch | grad accum K | device | compile + first step (s) | '
            'timed steps | steps/s | images/s | GFLOP / train step | achieved GFLOP/s | '
            'XLA buffers MiB / train step | GFLOP / sampler step (one network call) | '
            'XLA buffers MiB / sampler step |\n'
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  if not sharding.is_main_process():
    return
  print(header)
  print(row)
  results = pathlib.Path(flags.FLAGS.results)
  results.parent.mkdir(parents=True, exist_ok=True)
  if not results.exists() or header.splitlines()[0] not in results.read_text():
    with open(results, 'a') as f:
      f.write(('\n' if results.exists() else '') + header + '\n')
  with open(results, 'a') as f:
    f.write(row + '\n')


if __name__ == '__main__':
  app.run(main)
