"""Random-access data sources and the grain pipeline that shuffles and batches them.

Every source has ``len`` and ``get_batch(indices) -> {'x': float32 [n, ...] in model space,
'label': int32 [n] (when it has labels)}``. Images are scaled from uint8 to [-1, 1]; series
windows arrive normalised. One grain pipeline serves them all: a new permutation each epoch
from the seed, global batches of indices, each process loading only its own rows, and an
iterator state that is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

import grain
import numpy as np
from PIL import Image

from ddpm_jax import file_checks, series_data, sharding
from ddpm_jax.errors import InputError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
IMAGE_KEYS = ('images', 'image', 'x', 'arr_0')  # where an .npz holds its images
BUILTIN = ('digits', 'synthetic', 'images', 'series')
MAX_CLASSES = 100_000


@dataclasses.dataclass
class DataInfo:
  """What the model and the sampler need to know about a dataset."""
  shape: tuple  # one example: (H, W, C) or (window, C)
  num_examples: int
  num_classes: int = 0  # 0 when the data has no labels
  stats: Optional[dict] = None  # series: per-channel normalisation, saved with checkpoints


def images_to_model(images: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def model_to_uint8(x) -> np.ndarray:
  """float in [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class ArraySource:
  """uint8 images [N, H, W, C] held in memory, with optional int labels [N]."""

  def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None, name: str = 'array'):
    images = np.asarray(images)
    if images.ndim == 3:  # [N, H, W]: one channel
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise InputError(f'{name}: images must be uint8 [N, H, W, C], got {images.dtype} '
                       f'{list(images.shape)}')
    if images.shape[0] == 0:
      raise InputError(f'{name}: no images')
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f'{name}: labels must be integers [{len(images)}], one per image; got '
                         f'{labels.dtype} {list(labels.shape)}')
      if len(labels) and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise InputError(f'{name}: labels must lie in [0, {MAX_CLASSES}); got '
                         f'{labels.min()}..{labels.max()}')
    self.images = images
    self.labels = None if labels is None else np.asarray(labels).astype(np.int32)

  def __len__(self):
    return len(self.images)

  def get_batch(self, indices) -> dict:
    batch = {'x': images_to_model(self.images[indices])}
    if self.labels is not None:
      batch['label'] = self.labels[indices]
    return batch

  def info(self) -> DataInfo:
    num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
    return DataInfo(tuple(self.images.shape[1:]), len(self), num_classes)


def open_image(path: pathlib.Path):
  """A PIL image of a regular file whose header is readable and within MAX_IMAGE_PIXELS."""
  file_checks.check_regular_file(path, 'image')
  try:
    image = Image.open(path)
  except Image.DecompressionBombError:  # PIL's own limit, twice MAX_IMAGE_PIXELS
    raise InputError(f'image {path} declares {file_checks.MAX_IMAGE_PIXELS * 2}+ pixels, more '
                     f'than the {file_checks.MAX_IMAGE_PIXELS} this reader decodes; '
                     'resize it') from None
  except (OSError, ValueError, SyntaxError) as error:
    raise InputError(f'image {path} cannot be read ({str(error)[:80]}); remove or re-save '
                     'it') from None
  try:
    file_checks.check_image_header(image.size, path)
  except InputError:
    image.close()
    raise
  return image


# Channels a folder's images get when data.channels is 0, from the first image's PIL mode.
_GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')


class FolderSource:
  """A folder (searched recursively) of PNG/JPEG images of one size, decoded on access;
  ``channels`` 0 takes 1 (grayscale), 4 (RGBA) or 3 from the first image."""

  def __init__(self, folder: pathlib.Path, channels: int):
    self.files = sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not self.files:
      raise InputError(f'no PNG or JPEG images in {folder}')
    if channels == 0:
      with open_image(self.files[0]) as image:
        channels = 1 if image.mode in _GRAY_MODES else 4 if image.mode == 'RGBA' else 3
    self.mode = {1: 'L', 3: 'RGB', 4: 'RGBA'}.get(channels)
    if self.mode is None:
      raise InputError(f'data.channels={channels}: image folders take 1, 3 or 4 channels')
    sizes = {}
    for path in self.files:  # reads headers only
      with open_image(path) as image:
        sizes.setdefault(image.size, path)
      if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise InputError(f'images in {folder} differ in size: {pa.name} is {a[0]}x{a[1]}, '
                         f'{pb.name} is {b[0]}x{b[1]}; resize them to one size')
    self.width, self.height = next(iter(sizes))
    self.channels = channels

  def __len__(self):
    return len(self.files)

  def _load(self, path) -> np.ndarray:
    with open_image(path) as image:
      if image.size != (self.width, self.height):
        raise InputError(f'image {path} is now {image.size[0]}x{image.size[1]}, not '
                         f'{self.width}x{self.height} as when the folder was read')
      try:
        array = np.asarray(image.convert(self.mode), np.uint8)
      except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt pixel data
        raise InputError(f'image {path} cannot be decoded ({str(error)[:80]}); remove or '
                         're-save it') from None
    return array.reshape(self.height, self.width, self.channels)

  def get_batch(self, indices) -> dict:
    return {'x': images_to_model(np.stack([self._load(self.files[i]) for i in indices]))}

  def info(self) -> DataInfo:
    return DataInfo((self.height, self.width, self.channels), len(self))


class TfdsSource:
  """A prepared tensorflow-datasets image set read through ``tfds.data_source`` (no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str = '', try_gcs: bool = False):
    import tensorflow_datasets as tfds
    data_dir = data_dir or None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
      raise InputError(f'unknown dataset {name!r}: neither one of {", ".join(BUILTIN)} nor a '
                       f'tensorflow-datasets name (see tfds.list_builders())') from None
    try:
      # download=False: offline, tfds's own download retries DNS for minutes before failing.
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                     try_gcs=try_gcs)
    except Exception as error:  # tfds raises several types here, some misleading
      if builder.is_prepared():
        raise InputError(f'tfds dataset {name!r} in {builder.data_dir} cannot be read through '
                         f'tfds.data_source ({type(error).__name__}: {error}); prepare it with '
                         f'file_format="array_record"') from None
      raise InputError(
          f'tfds dataset {name!r} is not prepared in {builder.data_dir}; prepare it once where '
          f'there is network: python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}'"
          f"{'' if data_dir is None else f', data_dir={data_dir!r}'})"
          f'.download_and_prepare(file_format=\'array_record\')"') from None
    self.name = name
    features = builder.info.features
    self.num_classes = getattr(features['label'], 'num_classes', 0) if 'label' in features else 0
    first = self.source[0]
    if 'image' not in first:
      raise InputError(f'tfds dataset {name!r} has no "image" feature (has {sorted(first)})')
    self.shape = tuple(np.asarray(first['image']).shape)

  def __len__(self):
    return len(self.source)

  def get_batch(self, indices) -> dict:
    records = [self.source[int(i)] for i in indices]
    batch = {'x': images_to_model(np.stack([np.asarray(r['image'], np.uint8) for r in records]))}
    if self.num_classes:
      batch['label'] = np.asarray([r['label'] for r in records], np.int32)
    return batch

  def info(self) -> DataInfo:
    return DataInfo(self.shape, len(self), self.num_classes)


class SeriesSource:
  """Training windows of a normalised series; the validation and test windows that follow them.

  The rows are split in time order, train | validation | test (``series_data.split_rows``),
  and the normalisation statistics come from the training rows only. ``row_ranges`` gives each
  part's own rows of the original series, ``window_rows`` the rows its windows are cut from:
  the same, except that under the 'ett' protocol a validation or test window may take its
  lookback (``window - horizon`` steps) from the rows before its part, and those windows step
  by 1 (the benchmark scores every one). No window's horizon leaves its part. With a
  ``horizon``, ``stats['linear_map']`` and ``stats['nlinear_map']`` hold the least-squares maps
  from the lookback to the horizon on the normalised training rows ([C, lookback + 1, horizon];
  series_data.LINEAR_MAPS).
  """

  def __init__(self, series: np.ndarray, names: Sequence[str], window: int, stride: int,
               val_fraction: float, normalization: str, copy: bool = True,
               test_fraction: float = 0.0, protocol: str = 'fractions', horizon: int = 0):
    """``copy=False`` hands the series over: a float32 one is normalised in place."""
    rows = series.shape[0]
    self.row_ranges = series_data.split_rows(protocol, rows, val_fraction=val_fraction,
                                             test_fraction=test_fraction)
    split = self.row_ranges['train'][1]
    if window > split:
      raise InputError(f'window {window} is longer than the training part of the series '
                       f'({split} of {rows} rows); use a window of at most {split}')
    lookback, held_out_stride = 0, stride
    if protocol == 'ett':
      if normalization != 'zscore':
        raise InputError("data.protocol=ett z-scores with the training rows' statistics; set "
                         "--config.data.normalization=zscore")
      if not 0 < horizon < window:
        raise InputError(f'data.protocol=ett needs data.horizon in 1..{window - 1} (the window '
                         f'is lookback + horizon = {window} steps), got {horizon}')
      lookback, held_out_stride = window - horizon, 1
    self.stats = series_data.fit_normalization(series[:split], normalization, names)
    normalized = series_data.normalize(series, self.stats, copy=copy)
    if horizon:  # a run made for one horizon: the linear maps model.forecast_base can take
      for name, relative in series_data.LINEAR_MAPS.items():
        self.stats[name] = series_data.fit_linear_map(
            normalized[:split], window - horizon, horizon, relative).astype(np.float32).tolist()
    self.names = list(names)
    self.window_rows = {part: (first - (lookback if part != 'train' else 0), end)
                        for part, (first, end) in self.row_ranges.items()}
    self.train = series_data.LazyWindows(normalized[:split], window, stride)
    self.validation, self.test = (
        self._part(normalized, self.window_rows[part], window, held_out_stride)
        for part in ('validation', 'test'))

  @staticmethod
  def _part(normalized, rows, window, stride):
    """The windows of rows (first, end), or None when they hold less than one window."""
    first, end = rows
    return series_data.LazyWindows(normalized[first:end], window, stride) \
        if end - first >= window else None

  def __len__(self):
    return len(self.train)

  def get_batch(self, indices) -> dict:
    return self.train.get_batch(indices)

  def info(self) -> DataInfo:
    return DataInfo((self.train.window, self.train.series.shape[1]), len(self), 0, self.stats)


def source_from_config(series: np.ndarray, names: Sequence[str], data_config,
                       copy: bool = True) -> SeriesSource:
  """The SeriesSource of a series [N, C] (original units) split as ``config.data`` says."""
  return SeriesSource(series, names, data_config.window, data_config.stride,
                      data_config.val_fraction, data_config.normalization, copy=copy,
                      test_fraction=data_config.get('test_fraction', 0.0),
                      protocol=data_config.get('protocol', 'fractions'),
                      horizon=data_config.get('horizon', 0))


def series_source(path: pathlib.Path, data_config) -> SeriesSource:
  """Reads, checks and splits the series that ``config.data`` names. Its statistics (saved with
  the checkpoints) also record the file, ``{'source': {'path', 'sha256'}}``, so that a run can
  say which file it expects when the data moved or changed."""
  series, names = series_data.read_series(path, data_config.columns, data_config.time_column)
  series = series_data.check_or_fill_nans(series, names, data_config.fill_nan, str(path))
  source = source_from_config(series.astype(np.float32), names, data_config, copy=False)
  source.stats['source'] = {'path': str(pathlib.Path(path).resolve()),
                            'sha256': file_checks.sha256_of_file(path)}
  return source


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 handwritten digits (values 0..16, no download) as uint8
  images [1797, 8, 8, 1] (0..255) and their labels [1797]."""
  from sklearn.datasets import load_digits  # scikit-learn loads only when digits are used
  digits = load_digits()
  return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], digits.target


def digits_source() -> ArraySource:
  """The digits of ``digits_arrays`` as a data source."""
  return ArraySource(*digits_arrays(), name='digits')


def synthetic_source(num_examples: int, image_size: int, channels: int, seed: int = 0):
  """Random uint8 images of the configured shape, for benchmarks and tests."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, image_size, image_size, channels), dtype=np.uint8)
  return ArraySource(images, rng.integers(0, 10, num_examples), name='synthetic')


def array_file_source(path: pathlib.Path) -> ArraySource:
  """A .npy array of uint8 images, or a .npz with images under 'images' / 'x' / 'arr_0' and
  optional 'labels' / 'y'."""
  return arrays_source(file_checks.load_arrays(path, 'images file'), path)


def arrays_source(arrays: dict, path: pathlib.Path) -> ArraySource:
  """The images (and labels) of an array file's arrays, read by ``file_checks.load_arrays``."""
  image_key = next((k for k in IMAGE_KEYS if k in arrays), None)
  if image_key is None:
    raise InputError(f'{path} holds {sorted(arrays)}; put the images under "images"')
  label_key = next((k for k in ('labels', 'label', 'y') if k in arrays), None)
  return ArraySource(arrays[image_key], None if label_key is None else arrays[label_key],
                     name=str(path))


def create_source(data_config, seed: int = 0):
  """The source ``config.data`` names. Bad names or paths raise a one-line ValueError or
  FileNotFoundError before anything is compiled."""
  name = data_config.name
  if name == 'digits':
    return digits_source()
  if name == 'synthetic':
    return synthetic_source(data_config.num_examples, data_config.image_size,
                            data_config.channels, seed)
  if name in ('images', 'series'):
    if not data_config.path:
      raise InputError(f'data.name={name!r} needs --config.data.path=...')
    path = pathlib.Path(data_config.path).expanduser()
    if not path.exists():
      raise FileNotFoundError(f'data.path {path} does not exist')
    if name == 'series':
      return series_source(path, data_config)
    if path.is_dir():
      return FolderSource(path, data_config.channels)
    if path.suffix in ('.npy', '.npz'):
      return array_file_source(path)
    raise InputError(f'data.path {path} is neither a folder of images nor a .npy/.npz array')
  return TfdsSource(name, data_config.split, data_config.data_dir, data_config.try_gcs)


class _LoadRows:
  """Maps a global batch of indices to this process's rows, loaded."""

  def __init__(self, source, rows: slice):
    self.source, self.rows = source, rows

  def __call__(self, indices):
    return self.source.get_batch(np.asarray(indices)[self.rows])


def make_iterator(source, global_batch_size: int, seed: int) -> grain.DatasetIterator:
  """An endless iterator of this process's share of each global batch (a dict of numpy arrays).

  Shuffled by grain with a new permutation each epoch; ``get_state()`` / ``set_state()`` resume
  it exactly. Every process draws the same global batch of indices and loads only its rows, so
  the batches do not depend on how many processes share them.
  """
  if len(source) < global_batch_size:
    raise InputError(f'the dataset has {len(source)} examples, fewer than one batch of '
                     f'{global_batch_size}; lower training.batch_size')
  dataset = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
             .batch(global_batch_size, drop_remainder=True)
             .map(_LoadRows(source, sharding.process_rows(global_batch_size))))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
