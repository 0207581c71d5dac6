"""The full-width DDPM CIFAR-10 network (35,746,307 parameters) against diffusers' UNet2DModel.

Needs torch and diffusers, which the project does not depend on; in an environment of their own:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers
  /tmp/torchenv/bin/pip install -e .
  JAX_PLATFORMS=cpu /tmp/torchenv/bin/python benchmarks/diffusers_parity.py

Builds the google/ddpm-cifar10-32 layout with random weights, saves it as diffusers does, converts
it with ``ddpm_jax.interop.load_diffusers``, runs both forward passes on the same inputs and
timesteps, prints the largest absolute difference and appends it to
benchmarks/results/diffusers_parity.md.
"""

import math
import pathlib
import platform
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
  import torch
  from diffusers import DDPMScheduler, UNet2DModel
except ImportError:
  sys.exit('benchmarks/diffusers_parity.py needs torch and diffusers, in an environment of their '
           'own: see this file\'s docstring')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax.configs import default  # noqa: E402
from ddpm_jax import config_lib, interop  # noqa: E402

# The google/ddpm-cifar10-32 layout (benchmarks/vs_pytorch.py uses it too).
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
               layers_per_block=2,
               down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
               up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
               attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
               norm_eps=1e-6)


def randomize(unet) -> None:
  """Every tensor random, none left at zero (diffusers' own init zeroes some, hiding mistakes)."""
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if p.ndim == 1:
        p.copy_((1.0 if 'norm' in name and name.endswith('weight') else 0.0) +
                0.1 * torch.randn(p.shape))
      else:
        p.copy_(torch.randn(p.shape) / math.sqrt(p[0].numel()))


def main():
  torch.manual_seed(0)
  unet = UNet2DModel(**CIFAR10).eval()
  randomize(unet)
  count = sum(p.numel() for p in unet.parameters())
  x = torch.randn(4, 3, 32, 32)
  t = torch.tensor([0, 10, 500, 999])
  with torch.no_grad():
    reference = unet(x, t).sample.numpy()
  with tempfile.TemporaryDirectory() as folder:
    unet.save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(variance_type='fixed_large').save_pretrained(folder)
    config, model, params = interop.load_diffusers(folder, default.get_config())
    alphas_cumprod = DDPMScheduler.from_pretrained(folder).alphas_cumprod.numpy()
  ours = np.asarray(model.apply({'params': params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                jnp.asarray(t.numpy()))).transpose(0, 3, 1, 2)
  difference = float(np.abs(ours - reference).max())
  schedule_difference = float(np.abs(
      np.asarray(config_lib.schedule_from_config(config).alphas_cumprod) - alphas_cumprod).max())
  row = (f'| DDPM CIFAR-10 (diffusers UNet2DModel, random weights) | {count:,} | 4 x 32x32x3, '
         f't = 0, 10, 500, 999 | {float(np.abs(reference).max()):.3f} | {difference:.2e} | '
         f'{schedule_difference:.1e} | {platform.machine()} CPU, float32, torch '
         f'{torch.__version__} |')
  header = ('| network | parameters | inputs | max abs output | max abs difference | '
            'alphas_cumprod difference | where |\n|---|---|---|---|---|---|---|')
  print(header)
  print(row)
  results = REPO / 'benchmarks' / 'results' / 'diffusers_parity.md'
  if not results.exists():
    results.write_text(header + '\n')
  with open(results, 'a') as f:
    f.write(row + '\n')


if __name__ == '__main__':
  main()
