"""Where a train step's time goes: XLA's executed ops, grouped by kind and by pass.

  python benchmarks/profile_step.py                      # CIFAR-10 UNet, batch 16, ~2 minutes
  python benchmarks/profile_step.py --config=configs/digits.py --batch=64

Traces --steps calls of the train step that benchmarks/vs_pytorch.py times (x_t at random t,
the network in train mode, MSE to the noise, gradients, Adam) and of the eval forward pass with
the JAX profiler (a Perfetto trace, read here without extra packages), then maps every executed
XLA op back to the compiled HLO: its kind (convolution, matmul, reduction such as GroupNorm's
statistics, elementwise / copy) from the ops inside it, and its pass from the JAX name stack
(``transpose(jvp(...))`` is the backward pass, ``jvp(...)`` the forward, the rest loss and Adam).
Prints a table of milliseconds per step and writes it to benchmarks/results/profile_step.md.

Runs with XLA:CPU's default (YNNPACK) convolutions, unlike train.py (ddpm_jax.cpu_backend):
XLA's own convolutions leave no events in the trace, so their time would be missing here.
"""

import collections
import gzip
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402
from ddpm_jax import config_lib  # noqa: E402
from ddpm_jax.models import create_model, model_apply  # noqa: E402

config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'cifar10.py'), 'Config file.',
                                lock_config=True)
flags.DEFINE_integer('batch', 16, 'Batch size.')
flags.DEFINE_integer('steps', 3, 'Traced (and, apart, timed) calls of each function.')
flags.DEFINE_string('results', str(REPO / 'benchmarks' / 'results' / 'profile_step.md'),
                    'Markdown file to write.')

# The first of these opcodes found inside an executed op names its kind.
KINDS = (('convolution', 'convolution'), ('dot', 'matmul (dot)'), ('reduce', 'reduction'),
         ('reduce-window', 'reduction'))
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+.*?\s([\w\-]+)\(')
CALLS = re.compile(r'calls=%?([\w.\-]+)')
OP_NAME = re.compile(r'op_name="([^"]*)"')
COMPUTATION = re.compile(r'^%?([\w.\-]+)\s.*\{\s*$|^ENTRY\s+%?([\w.\-]+)')
PHASES = ('forward', 'backward', 'loss, Adam, other')


def hlo_index(hlo_text: str) -> dict:
  """{instruction name: (kind, pass)} for every instruction of the compiled HLO module."""
  opcodes_of = collections.defaultdict(set)  # computation -> opcodes inside (transitively later)
  calls_of = collections.defaultdict(set)
  instructions = {}
  computation = None
  for line in hlo_text.splitlines():
    header = COMPUTATION.match(line)
    if header and '=' not in line.split('{')[0]:
      computation = header.group(1) or header.group(2)
      continue
    match = INSTRUCTION.match(line)
    if not match or computation is None:
      continue
    name, opcode = match.groups()
    opcodes_of[computation].add(opcode)
    called = CALLS.findall(line)
    calls_of[computation].update(called)
    op_name = OP_NAME.search(line)
    instructions[name] = (opcode, called, op_name.group(1) if op_name else '')

  def all_opcodes(comp, seen=()):
    found = set(opcodes_of[comp])
    for callee in calls_of[comp] - set(seen):
      found |= all_opcodes(callee, seen + (comp,))
    return found

  index = {}
  for name, (opcode, called, op_name) in instructions.items():
    inside = {opcode}.union(*(all_opcodes(c) for c in called)) if called else {opcode}
    kind = next((label for op, label in KINDS if op in inside), 'elementwise / copy')
    if 'transpose(' in op_name:
      phase = 'backward'
    elif 'jvp(' in op_name:
      phase = 'forward'
    else:
      phase = 'loss, Adam, other'
    index[name] = (kind, phase)
  return index


def profile(fn, args, steps: int) -> tuple[collections.Counter, float]:
  """Microseconds per call by (kind, pass), summed over XLA's threads, over ``steps`` traced
  calls of jitted ``fn``; and the median wall time of ``steps`` untraced calls (s)."""
  index = hlo_index(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  wall = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn(*args))
    trace_file = next(pathlib.Path(folder).rglob('perfetto_trace.json.gz'))
    events = json.load(gzip.open(trace_file))
  events = events['traceEvents'] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event['name'] in index:
      totals[index[event['name']]] += event.get('dur', 0) / steps
  return totals, float(np.median(wall))


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  config_name = os.path.relpath(config_flags.get_config_filename(f['config']), REPO)
  common.fill_image_shape(config)
  model = create_model(config)
  shape = (f.batch,) + config_lib.data_shape(config)  # [B, H, W, C]
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, shape), jnp.float32)
  t = jnp.arange(f.batch, dtype=jnp.int32) * 37 % 1000
  params = model.init(jax.random.key(0), x0, t)['params']
  schedule = config_lib.schedule_from_config(config)
  tx = optax.adam(2e-4)

  def forward(params, x, t):
    return model_apply(model, params, x, t)

  train_step = jax.jit(common.adam_diffusion_step(model, schedule, x0, tx))
  train, train_wall = profile(train_step, (params, tx.init(params), jax.random.key(1)), f.steps)
  evaluation, eval_wall = profile(jax.jit(forward), (params, x0, t), f.steps)
  machine = f'{platform.machine()} CPU, {jax.devices()[0].platform}, jax {jax.__version__}'
  kinds = ['convolution', 'matmul (dot)', 'reduction', 'elementwise / copy']
  lines = [f'{config_name}, batch {f.batch}, {machine}. Milliseconds per call (mean of '
           f'{f.steps} traced calls) by kind of XLA op and pass, summed over the threads XLA '
           f'runs ops on (independent ops overlap, so a sum can exceed the wall time: median '
           f'{train_wall * 1e3:.0f} ms per train step, {eval_wall * 1e3:.0f} ms per eval forward, '
           'untraced).', '',
           '| kind | train: forward | train: backward | train: loss, Adam, other | train total '
           '| share | eval forward |', '|---|---|---|---|---|---|---|']
  train_total = sum(train.values())
  for kind in kinds:
    cells = [train[(kind, phase)] / 1e3 for phase in PHASES]
    row_total = sum(cells)
    eval_ms = sum(v for (k, _), v in evaluation.items() if k == kind) / 1e3
    lines.append(f'| {kind} | ' + ' | '.join(f'{c:.0f}' for c in cells) +
                 f' | {row_total:.0f} | {row_total / (train_total / 1e3):.0%} | {eval_ms:.0f} |')
  phase_totals = [sum(v for (_, p), v in train.items() if p == phase) / 1e3
                  for phase in PHASES]
  lines.append('| all | ' + ' | '.join(f'{c:.0f}' for c in phase_totals) +
               f' | {train_total / 1e3:.0f} | 100% | {sum(evaluation.values()) / 1e3:.0f} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  pathlib.Path(f.results).write_text(text)


if __name__ == '__main__':
  app.run(main)
