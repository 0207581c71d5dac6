"""Building blocks of the DDPM UNet, for 2-D ([B, H, W, C]) and 1-D ([B, L, C]) inputs."""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.errors import InputError

Dtype = Any

# DDPM initialises the last layer of each residual branch (and of the network) at zero, so every
# block starts as the identity.
zeros_init = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0):
  """Transformer sinusoidal embedding of t [B] (integer or float) -> [B, dim] float32.

  Frequencies max_period ** (-i / (dim / 2 - freq_shift)); [sin, cos] ([cos, sin] when
  ``flip_sin_to_cos``). The DDPM paper's network: freq_shift 1, no flip (diffusers' names).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) /
                  (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def conv(features: int, spatial_dims: int, dtype: Dtype, kernel: int = 3, stride: int = 1,
         kernel_init=nn.initializers.lecun_normal(), name=None):
  """A 'SAME' convolution over ``spatial_dims`` axes with float32 parameters."""
  return nn.Conv(features, (kernel,) * spatial_dims, strides=(stride,) * spatial_dims,
                 padding='SAME', dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                 name=name)


def _group_statistics(x32, num_groups: int, epsilon: float):
  """Mean and 1 / sqrt(variance + epsilon) of each group of channels of x32 [B, *S, C] (float32)
  -> ([B, G], [B, G]); the variance as E[x^2] - E[x]^2 clipped at 0, as flax's GroupNorm does.

  Sums over space per channel first, then over each group's channels: flax's statistics to float
  rounding, and XLA:CPU reduces [B, S, C] over S 4-10x faster than over S and C / G at once.
  """
  batch, channels = x32.shape[0], x32.shape[-1]
  flat = x32.reshape(batch, -1, channels)  # [B, S, C]
  count = flat.shape[1] * (channels // num_groups)
  group_sum = lambda per_channel: per_channel.reshape(batch, num_groups, -1).sum(-1)  # -> [B, G]
  mean = group_sum(flat.sum(1)) / count
  variance = jnp.maximum(0.0, group_sum((flat * flat).sum(1)) / count - mean * mean)
  return mean, jax.lax.rsqrt(variance + epsilon)


def _per_channel(group_values, like):
  """[B, G] -> [B, 1, ..., 1, C], broadcastable against ``like`` [B, *S, C]."""
  channels = jnp.repeat(group_values, like.shape[-1] // group_values.shape[1], axis=1)
  return channels.reshape((like.shape[0],) + (1,) * (like.ndim - 2) + (like.shape[-1],))


def _group_norm_forward(x, scale, bias, num_groups, epsilon, silu):
  """GroupNorm of x [B, *S, C] with per-channel scale and bias [C] (float32), then SiLU when
  ``silu`` -> (same shape, in x's dtype; the residuals the hand-written backward pass needs)."""
  x32 = x.astype(jnp.float32)
  mean, inv_std = _group_statistics(x32, num_groups, epsilon)
  z = (x32 - _per_channel(mean, x)) * (_per_channel(inv_std, x) * scale) + bias
  y = z * jax.nn.sigmoid(z) if silu else z
  return y.astype(x.dtype), (x, scale, bias, mean, inv_std)


def _group_norm_backward(num_groups, epsilon, silu, residuals, dy):
  """Gradients of ``_group_norm_forward`` for x, scale and bias, from x and the [B, G] group
  statistics alone."""
  del epsilon
  x, scale, bias, mean, inv_std = residuals
  spatial_axes = tuple(range(1, x.ndim - 1))
  inv_std_c = _per_channel(inv_std, x)
  x_hat = (x.astype(jnp.float32) - _per_channel(mean, x)) * inv_std_c
  dz = dy.astype(jnp.float32)
  if silu:
    z = x_hat * scale + bias
    sigmoid = jax.nn.sigmoid(z)
    dz = dz * (sigmoid * (1 + z * (1 - sigmoid)))
  dz_sum = dz.sum(spatial_axes)  # [B, C]
  dz_x_hat_sum = (dz * x_hat).sum(spatial_axes)  # [B, C]
  group_size = x.size // (x.shape[0] * num_groups)
  group_mean = lambda per_channel: _per_channel(  # [B, C] -> [B, 1, ..., C]
      (per_channel * scale).reshape(x.shape[0], num_groups, -1).sum(-1) / group_size, x)
  # d x_hat / d x projects out the group's mean and its x_hat direction.
  dx = inv_std_c * (dz * scale - group_mean(dz_sum) - x_hat * group_mean(dz_x_hat_sum))
  return dx.astype(x.dtype), dz_x_hat_sum.sum(0), dz_sum.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fused_group_norm(x, scale, bias, num_groups: int, epsilon: float, silu: bool):
  """``_group_norm_forward``'s output with a hand-written backward pass.

  Autodiff keeps x - mean (another map the size of x) for the backward pass and reads and
  writes maps of that size several times more; this recomputes what it needs from x and the
  [B, G] statistics.
  """
  return _group_norm_forward(x, scale, bias, num_groups, epsilon, silu)[0]


fused_group_norm.defvjp(_group_norm_forward, _group_norm_backward)


class FusedGroupNorm(nn.Module):
  """nn.GroupNorm (the same parameters, scale and bias [C], and values to float rounding), then
  SiLU when ``silu``, differentiated by ``fused_group_norm``'s backward pass."""
  num_groups: int
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6
  silu: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return fused_group_norm(x, scale, bias, self.num_groups, self.epsilon,
                            self.silu).astype(self.dtype)


def group_norm(num_groups: int, dtype: Dtype, epsilon: float, silu: bool, fused: bool, name: str):
  """x [B, *S, C] -> GroupNorm(x), then SiLU when ``silu``; parameters name/scale, name/bias.

  ``fused``: FusedGroupNorm; otherwise flax's nn.GroupNorm (and nn.silu), differentiated by
  autodiff. The values agree to float rounding.
  """
  if fused:
    return FusedGroupNorm(num_groups, dtype, epsilon, silu, name=name)
  norm = nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      param_dtype=jnp.float32, name=name)
  return (lambda x: nn.silu(norm(x))) if silu else norm


# Dropout from 16-bit draws: a keep probability in steps of 1 / 2**16 (0.9 -> 58982 / 65536,
# 6e-6 below), two draws per 32-bit random word. flax's nn.Dropout draws a float32 uniform per
# entry; in the CIFAR-10 network's CPU train step its dropout took 91 ms, this one 34 ms
# (profiler, README Speed).
DRAW_LEVELS = 2 ** 16


def dropout_16bit(x, rate: float, key):
  """x [B, *S, C] with each entry zeroed with probability ``rate`` (rounded to a multiple of
  1 / 2**16) and the others divided by the keep probability, so that E[output] = x."""
  keep_levels = round((1.0 - rate) * DRAW_LEVELS)
  if keep_levels <= 0:
    return jnp.zeros_like(x)
  words = jax.random.bits(key, ((x.size + 1) // 2,), jnp.uint32)
  # Low halves decide the first half of the entries, high halves the rest.
  keep = jnp.concatenate([(words & 0xFFFF) < keep_levels, (words >> 16) < keep_levels])
  keep = keep[:x.size].reshape(x.shape)
  return jnp.where(keep, x * jnp.asarray(DRAW_LEVELS / keep_levels, x.dtype), jnp.zeros_like(x))


class Dropout16(nn.Module):
  """Dropout (``dropout_16bit``) with the 'dropout' random stream, as nn.Dropout takes it."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout_16bit(x, self.rate, self.make_rng('dropout'))


def dropout(rate: float, fast: bool):
  """Dropout16 when ``fast``, else flax's nn.Dropout: the same law, other random draws."""
  return Dropout16(rate) if fast else nn.Dropout(rate)


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> conv, + Dense(time embedding) per channel, GroupNorm -> SiLU -> dropout
  -> conv, with a 1x1 shortcut when the channel count changes."""
  out_ch: int
  spatial_dims: int = 2
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  fused_norm: bool = True
  fast_dropout: bool = True

  @nn.compact
  def __call__(self, x, temb, train: bool):
    norm_silu = lambda name: group_norm(self.num_groups, self.dtype, self.norm_eps, silu=True,
                                        fused=self.fused_norm, name=name)
    h = norm_silu('norm1')(x)
    h = conv(self.out_ch, self.spatial_dims, self.dtype, name='conv1')(h)
    t_proj = nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                      name='temb_proj')(nn.silu(temb))
    h = h + t_proj.reshape(t_proj.shape[:1] + (1,) * self.spatial_dims + t_proj.shape[1:])
    h = norm_silu('norm2')(h)
    h = dropout(self.dropout, self.fast_dropout)(h, deterministic=not train)
    h = conv(self.out_ch, self.spatial_dims, self.dtype, kernel_init=zeros_init, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, self.spatial_dims, self.dtype, kernel=1, name='shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over all positions, with a residual connection.

  ``head_dim`` > 0 fixes the width of a head (heads = channels / head_dim, diffusers'
  attention_head_dim); otherwise ``num_heads`` heads share the channels.
  """
  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  head_dim: int = 0
  fused_norm: bool = True

  @nn.compact
  def __call__(self, x):
    batch, channels = x.shape[0], x.shape[-1]
    num_heads = channels // self.head_dim if self.head_dim else self.num_heads
    if channels % num_heads or (self.head_dim and channels % self.head_dim):
      raise InputError(f'attention with {channels} channels cannot be split into heads of '
                       f'{self.head_dim or "?"} channels ({self.num_heads} heads); choose a '
                       f'head count or width dividing {channels}')
    head_dim = channels // num_heads
    h = group_norm(self.num_groups, self.dtype, self.norm_eps, silu=False, fused=self.fused_norm,
                   name='norm')(x)
    h = h.reshape(batch, -1, channels)  # [B, N, C]
    dense = lambda name, init=nn.initializers.lecun_normal(): nn.DenseGeneral(
        (num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init,
        name=name)
    q, k, v = dense('q')(h), dense('k')(h), dense('v')(h)  # [B, N, heads, head_dim]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=zeros_init, name='proj_out')(out)
    return x + out.reshape(x.shape)


class Downsample(nn.Module):
  """Halves every (even) spatial axis with a strided 3x3 convolution.

  ``padding`` before each axis (after: 1): 0 is the DDPM paper's (and 'SAME' for even sizes),
  1 is diffusers' later default (``downsample_padding``).
  """
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3,) * self.spatial_dims, strides=(2,) * self.spatial_dims,
                   padding=((self.padding, 1),) * self.spatial_dims, dtype=self.dtype,
                   param_dtype=jnp.float32, name='conv')(x)


# Nearest-neighbour doubling then a 3x3 convolution, per axis: the output at 2i takes
# x[i-1] k0 + x[i] (k1 + k2) and the one at 2i+1 takes x[i] (k0 + k1) + x[i+1] k2. Rows of
# SUBPIXEL_TAPS[phase] sum the kernel's 3 taps into those 2.
SUBPIXEL_TAPS = (((1, 0, 0), (0, 1, 1)),
                 ((1, 1, 0), (0, 0, 1)))


def subpixel_upsample_conv(x, kernel):
  """conv_3x3(nearest_upsample_2x(x)) without the upsampled map: x [B, *S, C], kernel
  [3, ..., 3, C, O] -> [B, *2S, O] in x's dtype, no bias (taps are summed in the kernel's dtype).

  Each of the 2 ** D output phases is a 2x2 convolution of x with summed taps: 4 ** D / 9 ** D
  of the products per output (0.44 in 2-D), the same sums up to rounding.
  """
  spatial_dims = x.ndim - 2
  taps = jnp.asarray(SUBPIXEL_TAPS, kernel.dtype)  # [phase, tap, k]
  letters = 'HWD'[:spatial_dims]
  dimension_numbers = (f'N{letters}C', f'{letters}IO', f'N{letters}C')
  outputs = []
  for phase in itertools.product((0, 1), repeat=spatial_dims):
    phase_kernel = kernel
    for axis, p in enumerate(phase):  # [3, ...] -> [2, ...] along axis
      phase_kernel = jnp.moveaxis(jnp.tensordot(taps[p], phase_kernel, axes=([1], [axis])), 0,
                                  axis)
    outputs.append(jax.lax.conv_general_dilated(
        x, phase_kernel.astype(x.dtype), (1,) * spatial_dims, [(1 - p, p) for p in phase],
        dimension_numbers=dimension_numbers))  # [B, *S, O]
  # [2, ..., 2, B, *S, O] -> [B, S1, 2, S2, 2, ..., O] -> [B, *2S, O]
  y = jnp.stack(outputs).reshape((2,) * spatial_dims + outputs[0].shape)
  order = [spatial_dims]
  for axis in range(spatial_dims):
    order += [spatial_dims + 1 + axis, axis]
  y = jnp.transpose(y, order + [y.ndim - 1])
  return y.reshape((x.shape[0],) + tuple(2 * s for s in x.shape[1:-1]) + (kernel.shape[-1],))


class SubpixelUpsampleConv(nn.Module):
  """Doubling + 3x3 'SAME' convolution with nn.Conv's parameters (kernel [3, ..., 3, C, O], bias
  [O]), computed by ``subpixel_upsample_conv``."""
  features: int
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3,) * self.spatial_dims + (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = subpixel_upsample_conv(x.astype(self.dtype), kernel)
    return y + bias.astype(self.dtype)


class Upsample(nn.Module):
  """Doubles every spatial axis (nearest neighbour), then a 3x3 convolution.

  ``subpixel`` computes the pair without the doubled map (``subpixel_upsample_conv``); the
  parameters, and the outputs up to rounding, are the same either way.
  """
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32
  subpixel: bool = True

  @nn.compact
  def __call__(self, x):
    if self.subpixel:
      return SubpixelUpsampleConv(x.shape[-1], self.spatial_dims, self.dtype, name='conv')(x)
    for axis in range(1, 1 + self.spatial_dims):
      x = jnp.repeat(x, 2, axis=axis)
    return conv(x.shape[-1], self.spatial_dims, self.dtype, name='conv')(x)
