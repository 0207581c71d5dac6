"""Read the tensors of a PyTorch file (.pth / .pt, or a TorchScript archive) without torch.

Both are zip files whose ``data.pkl`` is a pickle and whose ``data/<key>`` entries are raw
storages. Unpickling runs whatever callables the pickle names, so a file a user downloaded is
read with an Unpickler that resolves only the handful of names a tensor archive needs and
refuses every other one: nothing from the file is ever executed.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import zipfile

import numpy as np

from ddpm_jax import file_checks
from ddpm_jax.errors import InputError

# Limits of this reader (the FID network's archive: 376 tensors, 87 MiB, depth 4).
MAX_TENSOR_BYTES = 2 << 30  # storages read, and tensors built from them, each in all
MAX_PICKLE_BYTES = 64 << 20
MAX_TENSORS = 100_000
MAX_DEPTH = 64
MAX_DIMS = 32

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class UnsafeArchive(InputError):
  """The pickle names something other than tensors, containers and module records."""


class ScriptObject:
  """A TorchScript module record: its attributes, without any of its code."""

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


def _ints(value, what: str, low: int) -> tuple:
  """A tuple of Python ints >= low, or UnsafeArchive."""
  items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(items) > MAX_DIMS or not all(isinstance(v, int) and v >= low for v in items):
    raise UnsafeArchive(f'a tensor\'s {what} {str(value)[:60]} is not a list of at most '
                        f'{MAX_DIMS} integers >= {low}')
  return items


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2, as a numpy copy of the strided view.

  The view is checked as PyTorch's weights_only loader would: non-negative offset and sizes,
  strides >= 1 on every axis longer than 1, no two elements on one storage slot (so a tensor
  never holds more elements than its storage), and no element past the storage's end.
  """
  del unused  # requires_grad, hooks, metadata
  if not isinstance(storage, _Storage):
    raise UnsafeArchive(f'a tensor is rebuilt from {type(storage).__name__}, not a storage')
  (offset,) = _ints(offset, 'offset', 0)
  size, stride = _ints(size, 'size', 0), _ints(stride, 'stride', 0)
  if len(size) != len(stride):
    raise UnsafeArchive(f'a tensor has {len(size)} sizes but {len(stride)} strides')
  data = storage.array
  if 0 in size:
    return np.zeros(size, data.dtype)
  reach = 0  # the furthest element, from the view's first one, of the axes checked so far
  for step, length in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if step <= reach:
      raise UnsafeArchive(f'a tensor of size {list(size)} with strides {list(stride)} reads '
                          'storage elements more than once')
    reach += (length - 1) * step
  if offset + reach >= len(data):
    raise UnsafeArchive(f'a tensor of size {list(size)}, strides {list(stride)} at offset '
                        f'{offset} reads past the end of its storage of {len(data)} elements')
  storage.reader.count_tensor(int(np.prod(size)) * data.itemsize)
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  if not isinstance(data, np.ndarray):
    raise UnsafeArchive(f'a parameter wraps {type(data).__name__}, not a tensor')
  return data


def _list(items):
  return list(items)


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): _list,
    ('torch.jit._pickle', 'build_doublelist'): _list,
    ('torch.jit._pickle', 'build_boollist'): _list,
}


class _Storage:
  """One storage of the archive: its elements, read once, and the reader that budgets them."""

  def __init__(self, array: np.ndarray, reader: '_TensorUnpickler'):
    self.array, self.reader = array, reader


class _TensorUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._source = source
    self._storages: dict[str, _Storage] = {}
    self._storage_bytes = 0
    self._tensor_bytes = 0

  def count_tensor(self, nbytes: int) -> None:
    self._tensor_bytes += nbytes
    if self._tensor_bytes > MAX_TENSOR_BYTES:
      raise UnsafeArchive(f'its tensors add up to more than {MAX_TENSOR_BYTES >> 20} MiB, the '
                          'limit of this reader')

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if module.startswith('__torch__.'):  # a TorchScript module's record; its code is not read
      return type(name, (ScriptObject,), {})
    raise UnsafeArchive(f'refuses to load {module}.{name}: not part of a tensor archive')

  def persistent_load(self, pid):
    """('storage', type, key, location, numel): the storage's bytes, read once per key and only
    after the zip entry's declared size matches numel elements of that type."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafeArchive(f'unexpected persistent id {str(pid)[:60]}')
    _, dtype, key, _, numel = pid
    if not isinstance(dtype, np.dtype):
      raise UnsafeArchive(f'storage of unsupported type {str(dtype)[:60]}')
    if not (isinstance(key, str) and key.isalnum() and len(key) <= 32):
      raise UnsafeArchive(f'storage key {str(key)[:40]!r} is not a short alphanumeric name')
    (numel,) = _ints(numel, 'storage size', 0)
    if key in self._storages:
      known = self._storages[key].array
      if known.dtype != dtype or len(known) != numel:
        raise UnsafeArchive(f'storage {key} is declared twice with different types or sizes')
      return self._storages[key]
    name = f'{self._prefix}data/{key}'
    try:
      entry = self._archive.getinfo(name)
    except KeyError:
      raise UnsafeArchive(f'storage {key} is named but the archive has no {name}') from None
    expected = numel * dtype.itemsize
    if entry.file_size != expected:
      raise UnsafeArchive(f'storage {key} declares {numel} {dtype} elements ({expected} bytes) '
                          f'but its zip entry holds {entry.file_size} bytes')
    self._storage_bytes += expected
    if self._storage_bytes > MAX_TENSOR_BYTES:
      raise UnsafeArchive(f'its storages add up to more than {MAX_TENSOR_BYTES >> 20} MiB, the '
                          'limit of this reader')
    raw = _read_entry(self._archive, entry, self._source)
    storage = _Storage(np.frombuffer(raw, dtype=dtype), self)
    self._storages[key] = storage
    return storage


def _read_entry(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, source: str) -> bytes:
  """An entry's bytes, at most its declared size (zipfile stops there and checks the CRC)."""
  try:
    raw = archive.read(entry)
  except file_checks.ZIP_ERRORS as error:
    raise UnsafeArchive(f'{entry.filename} in {source} cannot be read ({error})') from None
  if len(raw) != entry.file_size:
    raise UnsafeArchive(f'{entry.filename} in {source} is shorter than its declared '
                        f'{entry.file_size} bytes')
  return raw


def _flatten(obj, prefix: str, out: dict, depth: int = 0) -> None:
  """Tensors by dotted path; nesting and count are bounded (a pickle can share or nest one
  container in itself, which would otherwise recurse forever or exponentially)."""
  if isinstance(obj, np.ndarray):
    if len(out) >= MAX_TENSORS:
      raise UnsafeArchive(f'it holds more than {MAX_TENSORS} tensors, the limit of this reader')
    out[prefix.rstrip('.')] = obj
    return
  if isinstance(obj, ScriptObject):
    obj = vars(obj)
  if not isinstance(obj, dict):
    return
  if depth >= MAX_DEPTH:
    raise UnsafeArchive(f'its containers nest deeper than {MAX_DEPTH} levels')
  for key, value in obj.items():
    _flatten(value, f'{prefix}{key}.', out, depth + 1)


def load_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor in a PyTorch file, by its dotted name -> numpy array.

  A state dict ({'conv.weight': ...}, possibly under a 'state_dict' key) gives its own keys; a
  TorchScript module gives its attribute paths ('net.layers.conv.weight'). A file that is not
  such an archive, names anything but tensors and containers, or declares sizes, offsets or
  strides its storages do not hold raises UnsafeArchive (an InputError) in one line.
  """
  path = file_checks.check_regular_file(pathlib.Path(path), 'weights file')
  if not zipfile.is_zipfile(path):
    raise InputError(f'{path} is not a PyTorch zip archive (legacy pre-1.6 .pth files and '
                     'other formats are not read); re-save it with torch.save in a recent torch')
  with file_checks.open_zip(path, 'weights file') as archive:
    pickles = [info for info in archive.infolist() if info.filename.endswith('/data.pkl')
               or info.filename == 'data.pkl']
    if not pickles:
      raise InputError(f'{path} has no data.pkl: not a PyTorch archive')
    entry = pickles[0]
    if entry.file_size > MAX_PICKLE_BYTES:
      raise UnsafeArchive(f'{path}: {entry.filename} declares {entry.file_size} bytes, more '
                          f'than the {MAX_PICKLE_BYTES >> 20} MiB a tensor index needs')
    prefix = entry.filename[:-len('data.pkl')]
    pickled = io.BytesIO(_read_entry(archive, entry, str(path)))
    try:
      root = _TensorUnpickler(pickled, archive, prefix, str(path)).load()
    except UnsafeArchive as error:
      raise UnsafeArchive(f'{path}: {error}') from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError) as error:
      # A malformed pickle fails inside the unpickler in many ways; none of them ran code.
      raise UnsafeArchive(f'{path}: {entry.filename} is not a valid tensor index '
                          f'({type(error).__name__}: {str(error)[:80]})') from None
  if isinstance(root, dict) and isinstance(root.get('state_dict'), dict):
    root = root['state_dict']
  tensors: dict[str, np.ndarray] = {}
  try:
    _flatten(root, '', tensors)
  except UnsafeArchive as error:
    raise UnsafeArchive(f'{path}: {error}') from None
  if not tensors:
    raise InputError(f'{path} holds no tensors')
  return tensors
