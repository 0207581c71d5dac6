import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.configs import cifar10, default
from ddpm_jax import cpu_backend
from ddpm_jax.models import UNet, compute_dtype, create_model
from ddpm_jax.models.layers import Dropout16, dropout_16bit, fused_group_norm, subpixel_upsample_conv
from tests.helpers import error_lines, run_script


def tiny(**overrides):
  kwargs = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                num_heads=2, num_groups=8)
  kwargs.update(overrides)
  return UNet(**kwargs)


def randomized(params, key):
  """DDPM zero-initialises the last conv of each branch; random values make every path count."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def init(model, x, labels=None):
  t = jnp.zeros((x.shape[0],), jnp.int32)
  params = model.init(jax.random.key(0), x, t, labels)['params']
  return randomized(params, jax.random.key(1))


def test_cifar10_preset_parameter_count():
  config = default.get_config()
  config.model = default.model_cifar10()
  config.data.channels = 3
  model = create_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             jnp.zeros((1,), jnp.int32)))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  # The diffusers port of the DDPM CIFAR-10 network counts 35,746,307 parameters, exactly (a
  # UNet without its GroupNorm scales and biases would have 28,416 fewer).
  assert count == 35_746_307, count


@pytest.mark.parametrize('spatial_dims,shape', [(2, (3, 8, 8, 3)), (1, (3, 16, 2))])
@pytest.mark.parametrize('num_classes', [0, 10])
def test_output_shape_and_time_dependence(spatial_dims, shape, num_classes):
  model = tiny(spatial_dims=spatial_dims, num_classes=num_classes)
  x = jax.random.normal(jax.random.key(2), shape)
  labels = jnp.array([0, 3, 10]) if num_classes else None
  params = init(model, x, labels)
  apply = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y))
  out = apply(params, x, jnp.array([1, 2, 3]), labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  out2 = apply(params, x, jnp.array([500, 2, 3]), labels)
  assert not np.allclose(out[0], out2[0], atol=1e-4)  # t changes the output...
  np.testing.assert_allclose(out[1:], out2[1:], rtol=1e-5, atol=1e-5)  # ...of that example only
  if num_classes:
    out3 = apply(params, x, jnp.array([1, 2, 3]), jnp.array([5, 3, 10]))
    assert not np.allclose(out[0], out3[0], atol=1e-4)


def test_continuous_time_embedding():
  model = tiny(time_scale=1000.0)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  params = init(model, x)
  a = model.apply({'params': params}, x, jnp.array([0.1, 0.1]))
  b = model.apply({'params': params}, x, jnp.array([0.1, 0.9]))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[1], b[1], atol=1e-4)


def test_dropout_only_in_training():
  model = tiny(dropout=0.5)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  params = init(model, x)
  t = jnp.array([5, 6])
  run = lambda train, seed: model.apply({'params': params}, x, t, train=train,
                                        rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1), atol=1e-4)
  np.testing.assert_array_equal(run(True, 0), run(True, 0))


def test_batch_items_never_interact():
  model = tiny()
  x = jax.random.normal(jax.random.key(3), (5, 8, 8, 1))
  t = jnp.array([1, 50, 100, 500, 999])
  params = init(model, x)
  perm = jnp.array([3, 0, 4, 1, 2])
  out = model.apply({'params': params}, x, t)
  out_perm = model.apply({'params': params}, x[perm], t[perm])
  np.testing.assert_allclose(out_perm, out[perm], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
  t = jnp.array([10, 700])
  params = init(tiny(), x)
  out32 = tiny().apply({'params': params}, x, t)
  out16 = tiny(dtype=jnp.bfloat16).apply({'params': params}, x, t)
  assert out16.dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel


@pytest.mark.parametrize('shape', [(2, 5, 6, 3), (2, 7, 3)])
def test_subpixel_upsample_is_doubling_then_conv(shape):
  """The up path's shortcut against its definition: nearest doubling, then a 'SAME' 3x3 conv;
  values and both gradients."""
  spatial_dims = len(shape) - 2
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3,) * spatial_dims + (shape[-1], 4))
  letters = 'HW'[:spatial_dims]

  def definition(x, kernel):
    for axis in range(1, 1 + spatial_dims):
      x = jnp.repeat(x, 2, axis=axis)
    return jax.lax.conv_general_dilated(x, kernel, (1,) * spatial_dims, 'SAME',
                                        dimension_numbers=(f'N{letters}C', f'{letters}IO',
                                                           f'N{letters}C'))

  expected, expected_vjp = jax.vjp(definition, x, kernel)
  got, got_vjp = jax.vjp(subpixel_upsample_conv, x, kernel)
  assert got.shape == expected.shape == (shape[0],) + tuple(2 * s for s in shape[1:-1]) + (4,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(2), expected.shape)
  for g, e in zip(got_vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('silu', [True, False])
@pytest.mark.parametrize('shape', [(2, 5, 6, 64), (3, 10, 32)])
def test_fused_group_norm_is_flax_group_norm(shape, silu):
  """Values and all three gradients against flax's nn.GroupNorm (and nn.silu) by autodiff, on
  inputs with a mean far from 0 (where E[x^2] - E[x]^2 loses digits)."""
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
  scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), shape[-1:])
  bias = 0.3 * jax.random.normal(jax.random.key(2), shape[-1:])
  flax_norm = nn.GroupNorm(num_groups=8, epsilon=1e-6)

  def expected_fn(x, scale, bias):
    y = flax_norm.apply({'params': {'scale': scale, 'bias': bias}}, x)
    return nn.silu(y) if silu else y

  got, got_vjp = jax.vjp(lambda *a: fused_group_norm(*a, 8, 1e-6, silu), x, scale, bias)
  expected, expected_vjp = jax.vjp(expected_fn, x, scale, bias)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(3), shape)
  for g, e in zip(got_vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))


@pytest.mark.parametrize('rate', [0.1, 0.3])
def test_dropout_16bit_law(rate):
  """Drop frequency, kept values (E[output] = x) and independence of the draws (two come from
  one 32-bit word, half the entries apart), against the Bernoulli law, to 5 standard errors."""
  x = jnp.ones((64, 32, 32, 16))  # 2**20 entries
  y = np.asarray(dropout_16bit(x, rate, jax.random.key(0))).reshape(-1)
  dropped = y == 0
  drop_probability = 1 - round((1 - rate) * 2 ** 16) / 2 ** 16
  assert abs(drop_probability - rate) < 2 ** -16
  standard_error = np.sqrt(rate * (1 - rate) / y.size)
  assert abs(dropped.mean() - drop_probability) < 5 * standard_error
  np.testing.assert_allclose(y[~dropped], 1 / (1 - drop_probability), rtol=1e-6)
  assert abs(y.mean() - 1) < 5 * standard_error / (1 - rate)
  for lag in (1, 16, y.size // 2):  # neighbouring words, a channel row, the halves of a word
    correlation = np.corrcoef(dropped[:-lag], dropped[lag:])[0, 1]
    assert abs(correlation) < 5 / np.sqrt(y.size), lag
  other_key = np.asarray(dropout_16bit(x, rate, jax.random.key(1))).reshape(-1) == 0
  agreement = (dropped == other_key).mean()  # independent masks agree with p^2 + (1-p)^2
  assert abs(agreement - (rate ** 2 + (1 - rate) ** 2)) < 5 * np.sqrt(0.25 / y.size)


def test_dropout_16bit_edges():
  x = jax.random.normal(jax.random.key(0), (3, 5, 7))  # an odd number of entries
  y = dropout_16bit(x, 0.5, jax.random.key(1))
  assert y.shape == x.shape and y.dtype == x.dtype
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 2 * np.asarray(x)[kept], rtol=1e-6)
  assert 0 < kept.sum() < x.size
  np.testing.assert_array_equal(dropout_16bit(x, 1.0, jax.random.key(1)), jnp.zeros_like(x))
  module = Dropout16(0.5)
  np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout16(0.0).apply({}, x, deterministic=False), x)
  np.testing.assert_array_equal(module.apply({}, x, deterministic=False,
                                             rngs={'dropout': jax.random.key(2)}),
                                module.apply({}, x, deterministic=False,
                                             rngs={'dropout': jax.random.key(2)}))
  bf16 = dropout_16bit(x.astype(jnp.bfloat16), 0.5, jax.random.key(1))
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(bf16) != 0, kept)


def test_fast_dropout_network_has_flax_dropout_law():
  """The network in training mode, averaged over 256 dropout keys, with 16-bit dropout and with
  flax's nn.Dropout: the same expectation, to 5 Monte-Carlo standard errors."""
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
  t = jnp.array([3, 800])
  params = randomized(tiny(dropout=0.3).init(jax.random.key(0), x, t)['params'], jax.random.key(1))
  keys = jax.random.split(jax.random.key(2), 256)

  def outputs(fast):
    model = tiny(dropout=0.3, fast_dropout=fast)
    apply = lambda key: model.apply({'params': params}, x, t, train=True, rngs={'dropout': key})
    return jax.vmap(apply)(keys)  # [keys, B, H, W, C]

  fast, flax_dropout = outputs(True), outputs(False)
  eval_output = tiny(dropout=0.3).apply({'params': params}, x, t)
  assert float(jnp.abs(fast[0] - eval_output).max()) > 1e-2  # dropout is on
  standard_error = jnp.sqrt((fast.var(0) + flax_dropout.var(0)) / len(keys))
  assert float(jnp.max(jnp.abs(fast.mean(0) - flax_dropout.mean(0)) / standard_error)) < 5


@pytest.mark.parametrize('field', ['subpixel_upsample', 'fused_group_norm', 'fast_dropout'])
@pytest.mark.parametrize('spatial_dims,shape', [(2, (2, 8, 8, 3)), (1, (2, 16, 2))])
def test_compute_switch_keeps_parameters_outputs_and_gradients(spatial_dims, shape, field):
  on = tiny(spatial_dims=spatial_dims)
  off = tiny(spatial_dims=spatial_dims, **{field: False})
  x = jax.random.normal(jax.random.key(5), shape)
  t = jnp.array([3, 800])
  init_on = on.init(jax.random.key(0), x, t)['params']
  init_off = off.init(jax.random.key(0), x, t)['params']
  assert jax.tree.structure(init_on) == jax.tree.structure(init_off)  # checkpoints fit both
  for a, b in zip(jax.tree.leaves(init_on), jax.tree.leaves(init_off)):
    np.testing.assert_array_equal(a, b)
  params = randomized(init_on, jax.random.key(1))
  np.testing.assert_allclose(on.apply({'params': params}, x, t),
                             off.apply({'params': params}, x, t), rtol=1e-5, atol=1e-5)
  grad = lambda model: jax.grad(
      lambda p: jnp.sum(model.apply({'params': p}, x, t) ** 2))(params)
  grad_on, grad_off = grad(on), grad(off)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_off))
  for a, b in zip(jax.tree.leaves(grad_on), jax.tree.leaves(grad_off)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_bad_input():
  model = tiny(ch_mult=(1, 2, 2))
  t = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match=r'\(10, 10\) is not divisible by 4.*e\.g\. 8, 8'):
    model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 1)), t)
  with pytest.raises(ValueError, match=r'GroupNorm\(32\) cannot split 16 channels'):
    tiny(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t)
  with pytest.raises(ValueError, match='unconditional model'):
    tiny().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t, jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 9\].*\[0, 11\]'):
    tiny(num_classes=10).init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32),
                              jnp.array([0, 11]))
  with pytest.raises(ValueError, match=r'\[B, L, C\] inputs, got shape \(1, 8, 8, 1\)'):
    tiny(spatial_dims=1).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert compute_dtype('auto', 'gpu') == compute_dtype('auto', 'tpu') == jnp.bfloat16
  assert compute_dtype('auto', 'cpu') == jnp.float32
  assert compute_dtype('bfloat16', 'cpu') == jnp.bfloat16  # an explicit choice is kept
  assert cifar10.get_config().model.dtype == 'auto'
  assert create_model(cifar10.get_config()).dtype == compute_dtype('auto', jax.default_backend())
  with pytest.raises(ValueError, match="unknown model.dtype 'fp8'; choose auto or one of"):
    compute_dtype('fp8')


def test_cpu_convolution_setting_keeps_the_users_and_has_an_off_switch():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  cpu_backend.configure(environ)
  assert environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=1 '
                                  '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution')
  cpu_backend.configure(environ)  # once only
  assert environ['XLA_FLAGS'].count('ynn_fusion_type') == 1
  launch = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234', 'JAX_NUM_PROCESSES': '2',
            'JAX_PROCESS_ID': '1'}
  for several in ({'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}, launch,
                  {'DDPM_JAX_DISTRIBUTED': '1'}):  # where YNNPACK's convolutions were faster
    cpu_backend.configure(several)
    assert 'ynn_fusion_type' not in several.get('XLA_FLAGS', '')
  own = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_dot'}
  cpu_backend.configure(own)
  assert own['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
  off = {'DDPM_JAX_CPU_CONVOLUTIONS': 'ynnpack'}
  cpu_backend.configure(off)
  assert 'XLA_FLAGS' not in off
  with pytest.raises(ValueError, match="DDPM_JAX_CPU_CONVOLUTIONS='mkl': choose one of eigen"):
    cpu_backend.configure({'DDPM_JAX_CPU_CONVOLUTIONS': 'mkl'})


CONVOLUTION_PROGRAM = '''
import json, jax, jax.numpy as jnp, numpy as np
from ddpm_jax import cpu_backend
cpu_backend.configure()
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
               dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) / 24
print(json.dumps({'ynnpack': '__ynn_fusion' in conv.lower(x, w).compile().as_text(),
                  'y': np.asarray(conv(x, w)).ravel()[:64].tolist()}))
'''


def test_cpu_convolution_setting_reaches_the_backend():
  """What configure() sets before the backend starts decides who runs a convolution; both
  compute the same values."""
  if jax.default_backend() != 'cpu':
    pytest.skip('an XLA:CPU setting')
  results = {}
  for choice in cpu_backend.CHOICES:
    result = run_script('-c', CONVOLUTION_PROGRAM,
                        env={'DDPM_JAX_CPU_CONVOLUTIONS': choice, 'XLA_FLAGS': ''})
    assert result.returncode == 0, result.stderr[-3000:]
    results[choice] = json.loads(result.stdout.strip().splitlines()[-1])
  assert not results['eigen']['ynnpack'] and results['ynnpack']['ynnpack']
  np.testing.assert_allclose(results['eigen']['y'], results['ynnpack']['y'], rtol=1e-4, atol=1e-4)
  bad = run_script('sample.py', '--ckpt=/nonexistent', env={'DDPM_JAX_CPU_CONVOLUTIONS': 'mkl'})
  assert bad.returncode == 1 and error_lines(bad) == [
      "sample.py: error: DDPM_JAX_CPU_CONVOLUTIONS='mkl': choose one of eigen, ynnpack"]
