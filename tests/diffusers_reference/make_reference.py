"""Writes the diffusers reference folders the interop tests convert and compare against.

Run once, outside the suite, where torch and diffusers are installed (they are not project
dependencies), from the repository root:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers safetensors
  /tmp/torchenv/bin/python tests/diffusers_reference/make_reference.py

Each folder is what ``save_pretrained`` writes, with random weights (seeded), plus
``reference.npz``: inputs x [B, C, H, W] and timesteps t [B], diffusers' UNet output on them
(``out``, [B, C, H, W]) and the scheduler's ``alphas_cumprod``. Written with diffusers 0.42.1 and
torch 2.13.0 (CPU, float32).
"""

import json
import math
import pathlib

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

HERE = pathlib.Path(__file__).resolve().parent

CASES = {
    # The DDPM CIFAR-10 layout (as google/ddpm-cifar10-32) at 1/8 width, as a pipeline folder.
    'cifar10_layout': dict(
        pipeline=True,
        unet=dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
                  layers_per_block=2,
                  down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                  norm_num_groups=8, attention_head_dim=None, downsample_padding=0,
                  flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, dropout=0.1),
        scheduler=dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                       beta_schedule='linear', variance_type='fixed_large', clip_sample=True),
        timesteps=[999, 10, 500]),
    # diffusers' later defaults: flipped embedding, no frequency shift, padding 1, heads of width 8,
    # eps 1e-5, attention at the first level; cosine schedule with v-prediction. A UNet folder
    # with the scheduler config beside it.
    'modern_defaults': dict(
        pipeline=False,
        unet=dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                  layers_per_block=1, down_block_types=('AttnDownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'AttnUpBlock2D'), norm_num_groups=8,
                  attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                  norm_eps=1e-5),
        scheduler=dict(num_train_timesteps=200, beta_schedule='squaredcos_cap_v2',
                       prediction_type='v_prediction', variance_type='fixed_small'),
        timesteps=[0, 77, 199]),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Every tensor random (diffusers' own init leaves some at zero, which would hide mistakes)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim == 1:
        p.copy_((1.0 if 'norm' in name and name.endswith('weight') else 0.0) + 0.1 * noise)
      else:
        p.copy_(noise / math.sqrt(p[0].numel()))


def main():
  for index, (name, case) in enumerate(CASES.items()):
    folder = HERE / name
    unet = UNet2DModel(**case['unet'])
    randomize(unet, seed=index)
    unet.eval()
    scheduler = DDPMScheduler(**case['scheduler'])
    unet_dir = folder / 'unet' if case['pipeline'] else folder
    unet.save_pretrained(unet_dir, safe_serialization=True)
    scheduler.save_pretrained(folder / 'scheduler' if case['pipeline'] else folder)
    generator = torch.Generator().manual_seed(100 + index)
    c, size = case['unet']['in_channels'], case['unet']['sample_size']
    t = torch.tensor(case['timesteps'])
    x = torch.randn((len(t), c, size, size), generator=generator)
    with torch.no_grad():
      out = unet(x, t).sample
    np.savez(folder / 'reference.npz', x=x.numpy(), t=t.numpy(), out=out.numpy(),
             alphas_cumprod=scheduler.alphas_cumprod.numpy())
    print(name, 'parameters', sum(p.numel() for p in unet.parameters()), 'out std',
          float(out.std()))
  (HERE / 'VERSIONS.json').write_text(json.dumps(
      {'diffusers': diffusers.__version__, 'torch': torch.__version__}, indent=2))


if __name__ == '__main__':
  main()
