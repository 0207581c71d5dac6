"""How long evaluation takes on this machine: FID features and the bits/dim bound.

  python benchmarks/eval_speed.py --ckpt=runs/digits

FID: Inception-v3 pool features of 500 images (CIFAR-sized 32x32, upsampled to 299) in batches
of 50, after one warm-up batch: images/s. Bits/dim: the bound of 100 digits images under the
run's T-step schedule (T network calls per image), for each reverse variance: seconds per 100
images, compilation included (it is paid once per command). Prints a table and writes it to
benchmarks/results/eval_speed.md. Needs the FID weights (see the README's Evaluation section).
"""

import pathlib
import platform
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ddpm_jax import evaluation, inception  # noqa: E402

flags.DEFINE_string('ckpt', '', 'A digits run for the bits/dim row (skipped when empty).')
flags.DEFINE_integer('num_images', 500, 'Images for the FID row.')
RESULTS = pathlib.Path(__file__).resolve().parent / 'results' / 'eval_speed.md'


def main(argv):
  del argv
  f = flags.FLAGS
  import jax
  machine = (f'{platform.processor() or platform.machine()}, {jax.device_count()} '
             f'{jax.devices()[0].platform} device(s), {jax.devices()[0].device_kind}')
  rows = []
  extract = inception.feature_extractor(inception.load_params(), batch_size=50)
  images = np.random.default_rng(0).integers(0, 256, (f.num_images, 32, 32, 3), dtype=np.uint8)
  extract(images[:50])  # compile
  start = time.time()
  extract(images)
  elapsed = time.time() - start
  rows.append(('FID features (Inception-v3, 299x299, batch 50)',
               f'{f.num_images / elapsed:.1f} images/s'))
  if f.ckpt:
    result = evaluation.bits_per_dim(f.ckpt, num_images=100, batch_size=100)
    for variance in ('small', 'large'):
      rows.append((f'bits/dim bound, T = {result["num_timesteps"]}, {variance} variance, '
                   '100 digits', f'{result[variance]["seconds"]:.1f} s per 100 images '
                   f'({result[variance]["bpd"]:.3f} bits/dim)'))
  table = [f'Measured on {machine}.', '', '| what | speed |', '|---|---|']
  table += [f'| {name} | {value} |' for name, value in rows]
  text = '\n'.join(table) + '\n'
  print(text)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(text)


if __name__ == '__main__':
  app.run(main)
