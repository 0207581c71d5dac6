"""Files a user hands over are untrusted: read them bounded, finite and regular; write nothing
over what is not ours.

The bottom of the I/O layer (numpy and ddpm_jax.errors only). Every check raises an InputError
naming the file, what is wrong and the limit, before the work the file would cost is done:
- ``check_regular_file``: a path that is a file (a FIFO or device would block or never end);
- ``load_array`` / ``load_arrays``: .npy and .npz read only after their headers are checked
  against the bytes really there, no pickled objects, at most ``MAX_ARRAY_BYTES``;
- ``check_finite``: the first NaN or infinity, by index;
- ``check_image_header``: at most ``MAX_IMAGE_PIXELS`` pixels before an image is decoded;
- ``check_new_file`` / ``check_output_folder``: an existing file or a folder of other files is
  replaced only with ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import struct
import zipfile
import zlib

import numpy as np

from ddpm_jax.errors import InputError

# What zipfile raises on a damaged archive or entry (a bad header, an unknown version or
# compression method, a short or corrupt stream, a CRC mismatch).
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError,
              ValueError, struct.error, zlib.error, UnicodeDecodeError, OverflowError)

MAX_ARRAY_BYTES = 8 << 30  # one array of a .npy or .npz
MAX_IMAGE_PIXELS = 1 << 26  # width x height of one image (8192 x 8192)
OUTPUT_MARKER = '.ddpm_jax_outputs'  # in a folder ddpm_jax writes its outputs to


def check_regular_file(path: pathlib.Path, what: str = 'file') -> pathlib.Path:
  """``path`` if it is a regular file (symlinks followed); else one line saying what it is."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise FileNotFoundError(f'{what} {path} does not exist') from None
  if stat.S_ISDIR(mode):
    raise IsADirectoryError(f'{what} {path} is a folder, not a file')
  if not stat.S_ISREG(mode):
    raise InputError(f'{what} {path} is not a regular file (a pipe, socket or device); copy '
                     'the data into a file')
  return path


def sha256_of_file(path: pathlib.Path) -> str:
  """The file's sha256, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for block in iter(lambda: file.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def check_finite(values, what: str) -> None:
  """Refuses NaN and infinity in a float array, naming the first bad entry's index."""
  values = np.asarray(values)
  if not np.issubdtype(values.dtype, np.inexact):
    return
  bad = ~np.isfinite(values)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    shown = index[0] if len(index) == 1 else list(index)
    raise InputError(f'{what} holds {int(bad.sum())} non-finite value(s): entry {shown} is '
                     f'{values[index]}; only finite numbers are accepted')


def _check_header(shape, dtype: np.dtype, available: int, what: str) -> None:
  if dtype.hasobject:
    raise InputError(f'{what} holds Python objects (a pickle), which are never loaded; save '
                     'plain numeric arrays')
  nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if nbytes > MAX_ARRAY_BYTES:
    raise InputError(f'{what} declares {list(shape)} {dtype} ({nbytes >> 20} MiB), more than the '
                     f'{MAX_ARRAY_BYTES >> 30} GiB one array may have')
  if nbytes > available:
    raise InputError(f'{what} declares {list(shape)} {dtype} ({nbytes} bytes) but holds only '
                     f'{available}: the file is truncated or its header is wrong')


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def _read_npy(file, available: int, what: str) -> np.ndarray:
  """One .npy from an open binary file of ``available`` bytes, its header checked first."""
  try:
    version = np.lib.format.read_magic(file)
    if version not in _HEADER_READERS:
      raise ValueError(f'format version {version} is not read')
    shape, fortran, dtype = _HEADER_READERS[version](file)
  except (ValueError, OSError, SyntaxError, TypeError) as error:
    raise InputError(f'{what} is not a valid .npy array ({str(error)[:80]})') from None
  _check_header(shape, dtype, available - file.tell(), what)
  array = np.empty(int(np.prod(shape, dtype=object)), dtype)
  if array.nbytes and file.readinto(memoryview(array).cast('B')) != array.nbytes:
    raise InputError(f'{what} is truncated: fewer bytes than its header declares')
  return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def open_zip(path: pathlib.Path, what: str = 'file') -> zipfile.ZipFile:
  """The zip archive at ``path``, or one line saying it is not a readable one."""
  try:
    return zipfile.ZipFile(path)
  except ZIP_ERRORS as error:
    raise InputError(f'{what} {path} is not a readable zip archive ({str(error)[:80]})') from None


def load_arrays(path: pathlib.Path, what: str = 'file') -> dict[str, np.ndarray]:
  """Every array of an .npz (or the one array of an .npy, under 'arr_0'), each read only after
  its header and declared size are checked."""
  path = check_regular_file(pathlib.Path(path), what)
  size = path.stat().st_size
  if path.suffix == '.npy':
    with open(path, 'rb') as file:
      return {'arr_0': _read_npy(file, size, f'{what} {path}')}
  archive = open_zip(path, what)
  arrays = {}
  with archive:
    for entry in archive.infolist():
      if not entry.filename.endswith('.npy'):
        continue
      name = entry.filename[:-len('.npy')]
      label = f'{what} {path}, array {name!r},'
      try:
        with archive.open(entry) as file:
          # The entry's declared size bounds what zipfile hands out; the CRC is checked at its end.
          arrays[name] = _read_npy(file, entry.file_size, label.rstrip(','))
          file.read(1)  # reaches the entry's end, where zipfile checks its CRC
      except InputError:
        raise
      except ZIP_ERRORS as error:
        raise InputError(f'{label} cannot be read ({str(error)[:80]})') from None
  if not arrays:
    raise InputError(f'{what} {path} holds no arrays')
  return arrays


def load_array(path: pathlib.Path, keys: tuple = (), what: str = 'file') -> np.ndarray:
  """The array of an .npy, or of an .npz the first of ``keys`` it holds (any array if none)."""
  arrays = load_arrays(path, what)
  for key in keys or tuple(arrays):
    if key in arrays:
      return arrays[key]
  raise InputError(f'{what} {path} holds {sorted(arrays)}; put the array under '
                   f'{keys[0]!r}')


def check_image_header(size: tuple, path: pathlib.Path) -> None:
  """Refuses an image whose header declares more than MAX_IMAGE_PIXELS (before decoding)."""
  width, height = size
  if width * height > MAX_IMAGE_PIXELS:
    raise InputError(f'image {path} declares {width}x{height} pixels, more than the '
                     f'{MAX_IMAGE_PIXELS} this reader decodes; resize it')


def check_new_file(path: pathlib.Path, overwrite: bool, flag: str) -> pathlib.Path:
  """``path`` if nothing is there (or ``overwrite``), and its folder can be written to."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise IsADirectoryError(f'{flag} {path} is a folder; give a file name')
  if path.exists() and not overwrite:
    raise FileExistsError(f'{flag} {path} exists; pass --overwrite to replace it, or choose '
                          'another name')
  check_writable_folder(path.parent, flag)
  return path


def check_writable_folder(folder: pathlib.Path, flag: str) -> pathlib.Path:
  """``folder`` if it is (or can be created as) a folder this process may write to."""
  folder = pathlib.Path(folder).expanduser()
  if folder.exists() and not folder.is_dir():
    raise NotADirectoryError(f'{flag} {folder} is a file, not a folder; choose another path')
  existing = folder
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise NotADirectoryError(f'{flag}: {existing} is a file, so {folder} cannot be created')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f'{flag}: cannot write to {existing} (permission denied); choose '
                          'another place')
  return folder


def check_output_folder(folder: pathlib.Path, overwrite: bool, flag: str) -> pathlib.Path:
  """``folder`` if a command may write its outputs there: new, empty, written by ddpm_jax
  before (it holds OUTPUT_MARKER) or ``overwrite``. Creates nothing: bad input found later
  leaves nothing behind."""
  folder = check_writable_folder(folder, flag)
  if folder.is_dir() and not overwrite and not (folder / OUTPUT_MARKER).exists() and \
      any(folder.iterdir()):
    raise FileExistsError(f'{flag} {folder} holds files ddpm_jax did not write; choose a new '
                          'folder, or pass --overwrite to write into it')
  return folder


def create_output_folder(folder: pathlib.Path) -> pathlib.Path:
  """Creates a checked output folder and marks it as ddpm_jax's (see check_output_folder)."""
  folder = pathlib.Path(folder).expanduser()
  folder.mkdir(parents=True, exist_ok=True)
  (folder / OUTPUT_MARKER).touch()
  return folder
