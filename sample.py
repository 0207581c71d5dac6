"""Draws samples from a training run.

  python sample.py --ckpt=runs/digits --num_samples=64 --method=ddim --num_steps=50 --out=out/

Writes grid.png and samples.npz (uint8 [N, H, W, C] under arr_0) for images; samples.npy,
samples.csv and windows.png for time series.
"""

from ddpm_jax.commands import sample

if __name__ == '__main__':
  sample.run()
