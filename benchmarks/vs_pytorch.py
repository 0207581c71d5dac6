"""Our DDPM CIFAR-10 UNet against diffusers' UNet2DModel with PyTorch, side by side in one run.

torch and diffusers are not project dependencies; in an environment of their own:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers
  /tmp/torchenv/bin/pip install -e .
  JAX_PLATFORMS=cpu /tmp/torchenv/bin/python benchmarks/vs_pytorch.py --batch=16

The same network (the google/ddpm-cifar10-32 layout, 35,746,307 parameters, dropout 0.1), with
the same weights (diffusers' initialisation converted by ddpm_jax.interop), batch, inputs and
process, and the same work per training step: x_t from x_0 and noise at random t, the network
(train mode), the MSE to the noise, gradients and an Adam update; and a forward pass (eval mode).
Medians over --steps timed calls after --warmup. Prints a table (ratio = PyTorch time / ours:
above 1 we are faster) and appends it to benchmarks/results/vs_pytorch.md.
"""

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
  import torch
  from diffusers import UNet2DModel
except ImportError:
  sys.exit('benchmarks/vs_pytorch.py compares against torch + diffusers, which are not installed '
           'here; set up an environment for them as this file\'s docstring says')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.diffusers_parity import CIFAR10 as CIFAR10_LAYOUT  # noqa: E402
from ddpm_jax.configs import default  # noqa: E402
from ddpm_jax import cpu_backend, interop, schedules  # noqa: E402
from ddpm_jax.models import model_apply  # noqa: E402

CIFAR10 = dict(CIFAR10_LAYOUT, dropout=0.1)  # the paper trains with dropout 0.1


def timed(fn, warmup: int, steps: int) -> tuple[float, float]:
  """(first call in s, median of ``steps`` calls after ``warmup`` more)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=5, help='timed calls per measurement')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--results', default=str(REPO / 'benchmarks' / 'results' / 'vs_pytorch.md'))
  args = parser.parse_args()
  cpu_backend.configure()  # as train.py and load_sampler do, before JAX starts its backend

  torch.manual_seed(0)
  unet = UNet2DModel(**CIFAR10)
  with tempfile.TemporaryDirectory() as folder:
    unet.save_pretrained(folder, safe_serialization=True)
    config, model, params = interop.load_diffusers(folder, default.get_config())
  count = sum(p.numel() for p in unet.parameters())
  schedule = schedules.linear(1000)
  rng = np.random.default_rng(0)
  x0_nchw = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  print(f'{count:,} parameters in both; batch {args.batch}; {os.cpu_count()} cores; '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} '
        f'on {jax.devices()[0].platform}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)

  # PyTorch: diffusers' network, the training step written as diffusers' examples write it.
  alphas_cumprod = torch.tensor(np.asarray(schedule.alphas_cumprod))
  x0_torch = torch.tensor(x0_nchw)
  optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)

  def torch_train_step():
    unet.train()
    noise = torch.randn_like(x0_torch)
    t = torch.randint(0, 1000, (args.batch,))
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0_torch + (1 - abar).sqrt() * noise
    loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  x_eval = torch.randn(args.batch, 3, 32, 32)
  t_eval = torch.randint(0, 1000, (args.batch,))

  def torch_forward():
    unet.eval()
    with torch.no_grad():
      unet(x_eval, t_eval)

  # Ours: the same work, jitted; the loss is ddpm_jax.losses.diffusion_loss (eps target).
  tx = optax.adam(2e-4)
  opt_state = tx.init(params)
  x0 = jnp.asarray(x0_nchw.transpose(0, 2, 3, 1))

  jax_train_step = jax.jit(common.adam_diffusion_step(model, schedule, x0, tx))

  forward = jax.jit(lambda p, x, t: model_apply(model, p, x, t))
  x_eval_jax = jnp.asarray(x_eval.numpy().transpose(0, 2, 3, 1))
  t_eval_jax = jnp.asarray(t_eval.numpy())
  state = {'params': params, 'opt_state': opt_state, 'step': 0}

  def ours_train_step():
    key = jax.random.fold_in(jax.random.key(0), state['step'])
    state['params'], state['opt_state'], loss = jax_train_step(state['params'],
                                                               state['opt_state'], key)
    state['step'] += 1
    loss.block_until_ready()

  def ours_forward():
    forward(params, x_eval_jax, t_eval_jax).block_until_ready()

  rows = []
  for what, torch_fn, ours_fn in (('train step (loss + grad + Adam)', torch_train_step,
                                   ours_train_step),
                                  ('forward (eval)', torch_forward, ours_forward)):
    torch_first, torch_s = timed(torch_fn, args.warmup, args.steps)
    ours_first, ours_s = timed(ours_fn, args.warmup, args.steps)
    rows.append(f'| {what} | {args.batch} | {torch_s:.3f} | {ours_s:.3f} | {torch_s / ours_s:.2f} '
                f'| {ours_first:.1f} | {platform.machine()} CPU, {os.cpu_count()} cores |')
    print(rows[-1], flush=True)
  header = ('| what | batch | PyTorch + diffusers (s) | ddpm_jax (s) | ratio (PyTorch / ours) | '
            'ours: first call, compile included (s) | machine |\n|---|---|---|---|---|---|---|')
  print(header)
  print('\n'.join(rows))
  results = pathlib.Path(args.results)
  results.parent.mkdir(parents=True, exist_ok=True)
  if not results.exists():
    results.write_text(header + '\n')
  with open(results, 'a') as f:
    f.write('\n'.join(rows) + '\n')


if __name__ == '__main__':
  main()
