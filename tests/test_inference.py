import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import generate, inference, trainer
from ddpm_jax.models import create_model
from tests.helpers import error_lines, run_script, tiny_config
from tests.test_models import randomized


def _conditional_setup():
  config = tiny_config()
  config.data.image_size, config.data.channels = 8, 1
  config.model.num_classes = 3
  model = create_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                      jnp.zeros((1,), jnp.int32))['params']
  return config, model, randomized(params, jax.random.key(1))


@pytest.mark.slow  # 50 s on the 2-core CI machine: in the slow pass
def test_sample_fn_composes_with_jit_and_vmap():
  config, model, params = _conditional_setup()
  sample_fn = inference.make_sample_fn(model, config)
  keys = jax.random.split(jax.random.key(3), 3)
  direct = [sample_fn(params, k, 2, num_steps=4) for k in keys]
  in_jit = jax.jit(lambda p, k: sample_fn(p, k, 2, num_steps=4))(params, keys[0])
  np.testing.assert_allclose(in_jit, direct[0], rtol=1e-5, atol=1e-5)
  in_vmap = jax.vmap(lambda k: sample_fn(params, k, 2, num_steps=4))(keys)
  assert in_vmap.shape == (3, 2, 8, 8, 1)
  for i in range(3):
    np.testing.assert_allclose(in_vmap[i], direct[i], rtol=1e-4, atol=1e-4)
  assert float(in_vmap.min()) >= 0 and float(in_vmap.max()) <= 1  # data space


def test_classifier_free_guidance():
  config, model, params = _conditional_setup()
  labels = jnp.array([0, 2, 1])
  null = jnp.full((3,), 3)
  x = jax.random.normal(jax.random.key(4), (3, 8, 8, 1))
  t = jnp.array([5, 50, 90])
  apply = lambda y: model.apply({'params': params}, x, t, y)
  cond, uncond = apply(labels), apply(null)
  guided = lambda w: inference.guided_model_fn(model, params, labels, w)(x, t)
  np.testing.assert_array_equal(guided(1.0), cond)
  np.testing.assert_array_equal(guided(0.0), uncond)
  np.testing.assert_allclose(guided(3.0), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
  # Through the whole sampler: w = 0 is the null-label (unconditional) model.
  sample_fn = inference.make_sample_fn(model, config)
  key = jax.random.key(5)
  w0 = sample_fn(params, key, 3, labels=labels, guidance_scale=0.0)
  np.testing.assert_array_equal(w0, sample_fn(params, key, 3))
  assert not np.allclose(sample_fn(params, key, 3, labels=labels, guidance_scale=1.0), w0)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\]'):
    sample_fn(params, key, 3, labels=jnp.array([0, 1, 3]))


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('digits_run')
  config = tiny_config(name='digits')
  trainer.train(config, workdir)
  return workdir


def test_sample_script_writes_grid_and_npz(digits_run, tmp_path):
  out = tmp_path / 'out'
  result = run_script('sample.py', f'--ckpt={digits_run}', '--num_samples=5', '--method=ddim',
                      '--num_steps=4', '--batch_size=3', f'--out={out}', f'--png_dir={tmp_path / "png"}',
                      '--trajectory')
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out / 'samples.npz') as f:
    samples = f['arr_0']
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.uint8
  assert Image.open(out / 'grid.png').size[0] > 8
  assert len(list((tmp_path / 'png').glob('*.png'))) == 5
  assert Image.open(out / 'trajectory.png').size[1] > Image.open(out / 'trajectory.png').size[0] / 2
  # The same seed (and batch size) reproduces the same file, in-process this time.
  again = generate.generate(generate.SampleRequest(
      str(digits_run), str(tmp_path / 'again'), num_samples=5, method='ddim', num_steps=4,
      batch_size=3))
  with np.load(again / 'samples.npz') as f:
    np.testing.assert_array_equal(f['arr_0'], samples)
  other = generate.generate(generate.SampleRequest(
      str(digits_run), str(tmp_path / 'other'), num_samples=5, method='ddim', num_steps=4,
      batch_size=3, seed=1))
  with np.load(other / 'samples.npz') as f:
    assert not np.array_equal(f['arr_0'], samples)


def test_sample_script_bad_input(digits_run, tmp_path):
  cases = [
      ([f'--ckpt={tmp_path / "missing"}'], 'does not exist'),
      ([f'--ckpt={digits_run}', '--method=plms'], "unknown sampling method 'plms'"),
      ([f'--ckpt={digits_run}', '--method=ddim', '--num_steps=500'], 'num_steps=500 is larger'),
      ([f'--ckpt={digits_run}', '--labels=1'], 'labels were given but the model is unconditional'),
      ([f'--ckpt={digits_run}', '--method=dpm_solver++', '--spacing=quadratic'],
       "dpm_solver++ does not take spacing='quadratic'; it takes logsnr, karras"),
  ]
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text((digits_run / 'config.json').read_text())
  cases.append(([f'--ckpt={tmp_path / "empty"}'], 'holds no complete checkpoint'))
  for args, message in cases:
    result = run_script('sample.py', *args, f'--out={tmp_path / "o"}')
    lines = error_lines(result)
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], \
        (args, result.stderr[-2000:])


@pytest.mark.parametrize('method, steps', [('ddim', 4), ('dpm_solver++', 4)])
def test_antithetic_samples_come_from_mirrored_noise(method, steps):
  """With the network at its initialisation (its last conv is zero: it predicts eps = 0) a
  deterministic sampler is an odd map of x_T, clipping included, so in image space [0, 1] the
  two samples of each antithetic pair sum to 1 exactly; independent noise does not."""
  config = tiny_config()
  config.data.image_size, config.data.channels = 8, 1
  model = create_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  sample_fn = inference.make_sample_fn(model, config)
  draw = lambda antithetic: np.asarray(sample_fn(params['params'], jax.random.key(5), 6,
                                                 method=method, num_steps=steps,
                                                 antithetic=antithetic), np.float64)
  paired, independent = draw(True), draw(False)
  np.testing.assert_allclose(paired[0::2] + paired[1::2], 1.0, atol=1e-6)
  assert np.abs(independent[0::2] + independent[1::2] - 1.0).max() > 0.1
  assert np.abs(paired[0::2] - paired[1::2]).max() > 0.1  # the pairs are not one sample twice
  assert np.abs(paired[0::2] - paired[2::2][:1]).max() > 0.1  # nor the pairs one pair
  # An odd batch pairs all but its last draw, which is a draw of its own.
  odd = np.asarray(sample_fn(params['params'], jax.random.key(5), 5, method=method,
                             num_steps=steps, antithetic=True), np.float64)
  assert odd.shape == (5, 8, 8, 1)
  np.testing.assert_allclose(odd[0:4:2] + odd[1:4:2], 1.0, atol=1e-6)
  assert min(np.abs(odd[4] - odd[i]).max() for i in range(4)) > 0.1


@pytest.mark.slow  # 30 s on the 2-core CI machine: in the slow pass
def test_progress_pieces_give_the_same_samples_as_one_scan(digits_run):
  assert [inference.progress_chunk(n) for n in (1000, 50, 20, 7, 1)] == [100, 5, 2, 1, 1]
  sample_fn, params = inference.load_sampler(digits_run)
  for method, steps in (('ddim', 7), ('dpm_solver++', 10), ('ddpm', None)):
    key = jax.random.key(11)
    one_scan = sample_fn(params, key, 3, method=method, num_steps=steps)
    done = []
    pieces = sample_fn(params, key, 3, method=method, num_steps=steps, progress=done.append)
    np.testing.assert_array_equal(np.asarray(pieces), np.asarray(one_scan))
    total = steps or 100  # tiny_config: T = 100
    length = inference.progress_chunk(total)
    assert done == list(range(length, total + 1, length)), (method, done)


@pytest.mark.slow  # 40 s on the 2-core CI machine: in the slow pass
def test_compilation_cache_keeps_the_sampler_and_has_an_off_switch(digits_run, tmp_path):
  cache = tmp_path / 'cache'
  args = [f'--ckpt={digits_run}', '--num_samples=4', '--method=ddim', '--num_steps=10']
  outputs = []
  for run in ('first', 'second'):
    result = run_script('sample.py', *args, f'--out={tmp_path / run}',
                        env={'DDPM_JAX_COMPILATION_CACHE': str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / run / 'samples.npz') as f:
      outputs.append(f['arr_0'])
    if run == 'first':  # the sampler's pieces hold no host callback, so they are kept
      names = {p.name.split('-')[0] for p in cache.iterdir()}
      assert {'jit_start_piece', 'jit_steps_piece'} <= names, names
  np.testing.assert_array_equal(outputs[0], outputs[1])
  jax_folder = tmp_path / 'jax_own'
  result = run_script('sample.py', *args, f'--out={tmp_path / "off"}',
                      env={'DDPM_JAX_COMPILATION_CACHE': 'off',
                           'JAX_COMPILATION_CACHE_DIR': str(jax_folder)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert not jax_folder.exists() or not any(jax_folder.iterdir())


def test_sample_script_heun_on_karras_spacing(digits_run, tmp_path):
  out = tmp_path / 'heun'
  result = run_script('sample.py', f'--ckpt={digits_run}', '--num_samples=3', '--method=heun',
                      '--num_steps=3', '--spacing=karras', '--rho=5', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / 'timing.txt').read_text().startswith('heun (3 steps, karras spacing) 3 samples')
  with np.load(out / 'samples.npz') as f:
    assert f['arr_0'].shape == (3, 8, 8, 1)


def test_sampling_progress_counts_samples_over_batches(capsys):
  """1,000 samples in batches of 256 at 20 steps, reported in pieces of 2 steps: the count is
  in samples and ends at 1,000 (it once read '80/80 steps')."""
  progress = generate.SampleProgress(1000, 256, 20)
  for _ in range(4):
    for steps_done in range(2, 21, 2):
      progress(steps_done)
  assert progress.done == pytest.approx(1000)
  progress.close()
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 10 and lines[-1].startswith('sampling: sample 1000/1000')
  assert 'samples/s' in lines[-1]


def test_lines_written_during_a_bar_go_above_it(capsys, monkeypatch):
  """On a terminal a line printed while a bar is drawn goes through tqdm.write, whole."""
  from ddpm_jax import progress
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True)
  bar = progress.Progress(10, 'train', 'step')
  bar.update(3, {'loss': '0.5'})
  progress.write('step 3: fd 1.2')
  bar.close()
  progress.write('after')
  out, err = capsys.readouterr()
  assert out == 'step 3: fd 1.2\nafter\n'
  assert 'loss=0.5' in err and '3/10' in err


def test_a_class_conditional_grid_has_one_row_per_class(monkeypatch, tmp_path):
  """--labels=2,0,1 cycles the labels over the samples; the grid puts each class on its own
  row, in the order given, and names it."""
  labels = generate.parse_labels('2,0,1', 10)
  images = np.broadcast_to(labels[:, None, None, None].astype(np.uint8), (10, 8, 8, 1))
  drawn = {}
  monkeypatch.setattr(generate.plots, 'image_rows',
                      lambda rows, path, **kw: drawn.update(rows=rows))
  generate.save_class_grid(images, labels, tmp_path / 'grid.png')
  assert [name for name, _ in drawn['rows']] == ['class 2', 'class 0', 'class 1']
  for (name, row), label in zip(drawn['rows'], (2, 0, 1)):
    assert (row == label).all() and len(row) == (labels == label).sum()


def test_sample_flags_become_one_request_whose_unset_values_are_none():
  """sample.py's 'unset' flag values ('' / 0 / -1) are the run's own settings: None, once."""
  defaults = dict(ckpt='runs/x', out='', num_samples=64, method='', num_steps=0, spacing='',
                  rho=0.0, rtol=None, atol=None, solver='', antithetic=None, eta=-1.0, guidance_scale=-1.0, seed=0,
                  batch_size=0, png_dir='',
                  trajectory=False, labels='', eval=False, fid_stats='', inception_weights='',
                  allow_unknown_weights=False, task='generate', horizon=0, series='',
                  num_windows=100, eval_part='test', missing=0.3, block=0, season=24,
                  overwrite=False)
  request = generate.SampleRequest.from_flags(types.SimpleNamespace(**defaults))
  assert (request.method, request.num_steps, request.spacing, request.rho, request.eta,
          request.guidance_scale, request.batch_size, request.horizon, request.rtol,
          request.atol, request.solver, request.antithetic) == (None,) * 12
  given = generate.SampleRequest.from_flags(types.SimpleNamespace(**{
      **defaults, 'method': 'ddim', 'num_steps': 8, 'eta': 0.0, 'guidance_scale': 0.0}))
  assert (given.method, given.num_steps, given.eta, given.guidance_scale) == ('ddim', 8, 0.0, 0.0)
