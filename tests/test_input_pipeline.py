import numpy as np
import pytest
from PIL import Image

from ddpm_jax.configs import default
from ddpm_jax import input_pipeline


def _epochs(iterator, batches):
  return np.concatenate([next(iterator)['label'] for _ in range(batches)])


def test_each_epoch_is_a_new_permutation_and_state_resumes():
  labels = np.arange(12)
  source = input_pipeline.ArraySource(np.zeros((12, 2, 2, 1), np.uint8), labels)
  iterator = input_pipeline.make_iterator(source, 4, seed=7)
  seen = _epochs(iterator, 6)  # two epochs
  first, second = seen[:12], seen[12:]
  assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, np.arange(12))
  # A fresh iterator set to a saved state continues exactly where the first one would.
  again = input_pipeline.make_iterator(source, 4, seed=7)
  _epochs(again, 2)
  state = again.get_state()
  later = _epochs(again, 3)
  resumed = input_pipeline.make_iterator(source, 4, seed=7)
  resumed.set_state(state)
  np.testing.assert_array_equal(_epochs(resumed, 3), later)
  np.testing.assert_array_equal(later, seen[8:20])


def test_batches_are_scaled_to_model_space():
  images = np.array([0, 255, 128], np.uint8).reshape(3, 1, 1, 1)
  batch = input_pipeline.ArraySource(images).get_batch(np.array([0, 1, 2]))
  np.testing.assert_allclose(batch['x'].ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
  np.testing.assert_array_equal(input_pipeline.model_to_uint8(batch['x']), images)


def test_digits_source_is_offline_and_complete():
  source = input_pipeline.digits_source()
  info = source.info()
  assert info.shape == (8, 8, 1) and info.num_examples == 1797 and info.num_classes == 10
  batch = source.get_batch(np.arange(5))
  assert batch['x'].min() >= -1 and batch['x'].max() <= 1 and batch['x'].max() > 0.9


def test_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  source = input_pipeline.FolderSource(tmp_path, channels=3)
  assert len(source) == 3 and source.info().shape == (16, 16, 3)
  assert input_pipeline.FolderSource(tmp_path, channels=0).info().shape == (16, 16, 3)
  gray = tmp_path / 'gray'
  gray.mkdir()
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(gray / 'a.png')
  assert input_pipeline.FolderSource(gray, channels=0).info().shape == (16, 16, 1)
  expected = np.asarray(Image.open(tmp_path / '1.png'))
  np.testing.assert_array_equal(input_pipeline.model_to_uint8(source.get_batch([1])['x'][0]),
                                expected)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'small.png')
  with pytest.raises(ValueError, match='differ in size.*16x16.*8x8'):
    input_pipeline.FolderSource(tmp_path, channels=3)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='no PNG or JPEG images'):
    input_pipeline.FolderSource(empty, channels=3)


def test_npz_source_with_labels(tmp_path):
  path = tmp_path / 'data.npz'
  np.savez(path, images=np.ones((5, 4, 4, 3), np.uint8), labels=np.arange(5))
  config = default.get_config().data
  config.name, config.path = 'images', str(path)
  source = input_pipeline.create_source(config)
  assert source.info() == input_pipeline.DataInfo((4, 4, 3), 5, 5)
  np.testing.assert_array_equal(source.get_batch([4, 2])['label'], [4, 2])
  np.save(tmp_path / 'bad.npy', np.ones((5, 4, 4, 3), np.float32))
  config.path = str(tmp_path / 'bad.npy')
  with pytest.raises(ValueError, match='uint8'):
    input_pipeline.create_source(config)


def test_tfds_source_under_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    source = input_pipeline.TfdsSource('mnist', 'train')
    info = source.info()
    assert info.shape == (28, 28, 1) and info.num_examples == 6 and info.num_classes == 10
    batch = source.get_batch([0, 5])
    assert batch['x'].shape == (2, 28, 28, 1) and batch['label'].dtype == np.int32


def test_tfds_errors_are_immediate_and_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
    input_pipeline.TfdsSource('no_such_set', 'train')
  # Offline and not prepared: fails at once, naming data_dir and the command that prepares it.
  with pytest.raises(ValueError, match=rf"'cifar10' is not prepared in {tmp_path}.*"
                                       r"download_and_prepare"):
    input_pipeline.TfdsSource('cifar10', 'train', data_dir=str(tmp_path))


def test_bad_paths():
  config = default.get_config().data
  config.name = 'images'
  with pytest.raises(ValueError, match='needs --config.data.path'):
    input_pipeline.create_source(config)
  config.path = '/no/such/folder'
  with pytest.raises(FileNotFoundError, match='/no/such/folder does not exist'):
    input_pipeline.create_source(config)
  source = input_pipeline.ArraySource(np.zeros((3, 2, 2, 1), np.uint8))
  with pytest.raises(ValueError, match='fewer than one batch'):
    input_pipeline.make_iterator(source, 4, 0)
