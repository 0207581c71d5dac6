"""FID and KID between image sets, and the image sets and statistics files they are read from.

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to two sets of
Inception pool features; KID (Binkowski et al., 2018) the unbiased MMD^2 with the cubic
polynomial kernel, averaged over random subsets. Statistics files are pytorch-fid's: an .npz
with ``mu`` [2048] and ``sigma`` [2048, 2048], so published reference statistics work.
"""

from __future__ import annotations

import pathlib
from typing import Callable, NamedTuple, Optional

import numpy as np

from ddpm_jax import file_checks, inception, input_pipeline, progress
from ddpm_jax.errors import InputError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class FeatureSet(NamedTuple):
  """One side of a comparison: its Gaussian statistics and, for images, the features."""
  name: str
  mu: np.ndarray  # [D]
  sigma: np.ndarray  # [D, D]
  features: Optional[np.ndarray] = None  # [N, D]; None for a statistics file


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from rounding -> 0)."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).

  Through symmetric eigendecompositions, so singular covariances (fewer images than
  dimensions) need no regularising offset, unlike a general ``sqrtm(S1 @ S2)``.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  values = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(np.clip(values, 0, None)).sum()
  diff = mu1 - mu2
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
  return float(max(distance, 0.0))  # >= 0 exactly; rounding can leave -1e-4 for equal sets


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of x [m, D] and y [n, D] under k(a, b) = (a.b / D + 1)^3."""
  m, n = len(x), len(y)
  kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE,
                              seed: int = 0) -> tuple[float, float]:
  """KID: mean and standard deviation of mmd2_unbiased over random subsets (without
  replacement) of min(subset_size, len(x), len(y)) features from each side."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  size = min(subset_size, len(x), len(y))
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                          y[rng.choice(len(y), size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def compare(a: FeatureSet, b: FeatureSet) -> dict:
  """{'fid', and when both sides have features: 'kid', 'kid_std'}; every value finite."""
  if a.mu.shape != b.mu.shape:
    raise InputError(f'{a.name} has {len(a.mu)}-d statistics and {b.name} {len(b.mu)}-d; '
                     'compare statistics of the same network layer')
  with np.errstate(over='ignore', invalid='ignore'):  # a non-finite result is refused below
    result = {'fid': frechet_distance(a.mu, a.sigma, b.mu, b.sigma)}
    if a.features is not None and b.features is not None:
      result['kid'], result['kid_std'] = kernel_inception_distance(a.features, b.features)
  for name, value in result.items():
    if not np.isfinite(value):
      raise InputError(f'{name.upper()} of {a.name} and {b.name} is {value}: the features or '
                       'statistics are not finite')
  return result


def save_statistics(path, features_or_set) -> pathlib.Path:
  """Writes pytorch-fid's statistics format: an .npz with mu and sigma."""
  path = pathlib.Path(path).expanduser()
  if path.suffix != '.npz':
    raise InputError(f'statistics are written as .npz; got {path}')
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, mu=features_or_set.mu, sigma=features_or_set.sigma)
  return path


def _load_statistics(path: pathlib.Path, arrays: dict) -> FeatureSet:
  mu, sigma = arrays['mu'], arrays['sigma']
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise InputError(f'{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not a '
                     'mean [D] and covariance [D, D]')
  if len(mu) > inception.FEATURE_DIM or not np.issubdtype(mu.dtype, np.number) or \
      not np.issubdtype(sigma.dtype, np.number):
    raise InputError(f'{path}: statistics must be numbers of at most {inception.FEATURE_DIM} '
                     f'dimensions (Inception pool3); got {mu.dtype} mu of {len(mu)}')
  file_checks.check_finite(mu, f'{path}: mu')
  file_checks.check_finite(sigma, f'{path}: sigma')
  return FeatureSet(str(path), mu.astype(np.float64), sigma.astype(np.float64))


def read_images(spec: str, data_dir: str = '', split: str = 'train',
                max_images: int = 0) -> tuple[np.ndarray, Optional[str]]:
  """uint8 [N, H, W, 3] from a samples .npz / .npy, a folder of PNG/JPEG, 'digits' or a tfds
  name (its ``split``); plus a note when grayscale images were replicated to 3 channels."""
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    source = input_pipeline.FolderSource(path, _folder_channels(path))
  elif path.suffix in ('.npz', '.npy'):
    if not path.is_file():
      raise FileNotFoundError(f'{path} does not exist')
    source = input_pipeline.array_file_source(path)
  elif '/' in spec or path.suffix:
    raise FileNotFoundError(f'{spec} is neither a folder, an .npz/.npy file nor a dataset name')
  elif spec == 'digits':
    source = input_pipeline.digits_source()
  else:
    source = input_pipeline.TfdsSource(spec, split, data_dir)
  return inception.check_images(source_images(source, max_images), spec)


def source_images(source, max_images: int = 0) -> np.ndarray:
  """The images of an input_pipeline source back as uint8 [N, H, W, C] (exact: the source
  scaled them from uint8)."""
  count = len(source) if not max_images else min(max_images, len(source))
  return np.concatenate([
      input_pipeline.model_to_uint8(source.get_batch(np.arange(i, min(i + 1000, count)))['x'])
      for i in range(0, count, 1000)])


def _folder_channels(folder: pathlib.Path) -> int:
  """1 for a folder of grayscale images (replicated later, with a note), else 3."""
  first = next((p for p in sorted(folder.rglob('*'))
                if p.suffix.lower() in input_pipeline.IMAGE_SUFFIXES), None)
  if first is None:
    raise InputError(f'no PNG or JPEG images in {folder}')
  with input_pipeline.open_image(first) as image:
    return 1 if image.mode in ('1', 'L', 'LA', 'I', 'I;16') else 3


def feature_set(spec: str, features_fn: Optional[Callable], data_dir: str = '',
                split: str = 'train', max_images: int = 0, note: Callable = print) -> FeatureSet:
  """A statistics .npz as it is; any image set through ``features_fn`` (lazily created)."""
  path = pathlib.Path(spec).expanduser()
  if path.suffix == '.npz' and path.exists():
    arrays = file_checks.load_arrays(path, 'statistics or images file')
    if 'mu' in arrays or 'sigma' in arrays:
      if not ('mu' in arrays and 'sigma' in arrays):
        raise InputError(f'{path} has {sorted(arrays)}: a statistics file needs both mu '
                         'and sigma')
      return _load_statistics(path, arrays)
    if not any(k in arrays for k in input_pipeline.IMAGE_KEYS):
      raise InputError(f'{path} holds {sorted(arrays)}: neither images (arr_0) nor '
                       'statistics (mu and sigma)')
    source = input_pipeline.arrays_source(arrays, path)
    images, replicated = inception.check_images(source_images(source, max_images), spec)
  else:
    images, replicated = read_images(spec, data_dir, split, max_images)
  if replicated:
    note(replicated)
  return images_feature_set(spec, images, features_fn())


def images_feature_set(name: str, images: np.ndarray, features_fn: Callable) -> FeatureSet:
  """Inception features of uint8 images [N, H, W, 3] with a progress bar, and their statistics."""
  bar = progress.Progress(len(images), f'features of {name}', 'image')
  try:
    features = features_fn(images, progress=bar.advance)
  finally:
    bar.close()
  mu, sigma = statistics(features)
  return FeatureSet(name, mu, sigma, features)
