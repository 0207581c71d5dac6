"""Read the tensors of a PyTorch file (.pth / .pt, or a TorchScript archive) without torch.

Both are zip files whose ``data.pkl`` is a pickle and whose ``data/<key>`` entries are raw
storages. Unpickling runs whatever callables the pickle names, so a file a user downloaded is
read with an Unpickler that resolves only the handful of names a tensor archive needs and
refuses every other one: nothing from the file is ever executed.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class UnsafeArchive(ValueError):
  """The pickle names something other than tensors, containers and module records."""


class ScriptObject:
  """A TorchScript module record: its attributes, without any of its code."""

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2, as a numpy copy of the strided view."""
  del unused  # requires_grad, hooks, metadata
  itemsize = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
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


class _TensorUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if module.startswith('__torch__.'):  # a TorchScript module's record; its code is not read
      return type(name, (ScriptObject,), {})
    raise UnsafeArchive(f'refuses to load {module}.{name}: not part of a tensor archive')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'):
      raise UnsafeArchive(f'unexpected persistent id {pid!r:.60}')
    dtype, key = pid[1], pid[2]
    if not isinstance(dtype, np.dtype):
      raise UnsafeArchive(f'storage of unsupported type {dtype!r:.60}')
    raw = self._archive.read(f'{self._prefix}data/{key}')
    return np.frombuffer(raw, dtype=dtype)


def _flatten(obj, prefix: str, out: dict) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip('.')] = obj
  elif isinstance(obj, dict):
    for key, value in obj.items():
      _flatten(value, f'{prefix}{key}.', out)
  elif isinstance(obj, ScriptObject):
    for key, value in vars(obj).items():
      _flatten(value, f'{prefix}{key}.', out)


def load_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor in a PyTorch file, by its dotted name -> numpy array.

  A state dict ({'conv.weight': ...}, possibly under a 'state_dict' key) gives its own keys; a
  TorchScript module gives its attribute paths ('net.layers.conv.weight').
  """
  path = pathlib.Path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a PyTorch zip archive (legacy pre-1.6 .pth files and '
                     'other formats are not read); re-save it with torch.save in a recent torch')
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl')
               or name == 'data.pkl']
    if not pickles:
      raise ValueError(f'{path} has no data.pkl: not a PyTorch archive')
    prefix = pickles[0][:-len('data.pkl')]
    with archive.open(pickles[0]) as file:
      root = _TensorUnpickler(file, archive, prefix).load()
  if isinstance(root, dict) and isinstance(root.get('state_dict'), dict):
    root = root['state_dict']
  tensors: dict[str, np.ndarray] = {}
  _flatten(root, '', tensors)
  if not tensors:
    raise ValueError(f'{path} holds no tensors')
  return tensors
