"""Building blocks of the DDPM UNet, for 2-D ([B, H, W, C]) and 1-D ([B, L, C]) inputs."""

from __future__ import annotations

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def group_norm(num_groups: int, dtype: Dtype, name=None, epsilon: float = 1e-6):
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> conv, + Dense(time embedding) per channel, GroupNorm -> SiLU -> dropout
  -> conv, with a 1x1 shortcut when the channel count changes."""
  out_ch: int
  spatial_dims: int = 2
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = nn.silu(group_norm(self.num_groups, self.dtype, 'norm1', self.norm_eps)(x))
    h = conv(self.out_ch, self.spatial_dims, self.dtype, name='conv1')(h)
    t_proj = nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                      name='temb_proj')(nn.silu(temb))
    h = h + t_proj.reshape(t_proj.shape[:1] + (1,) * self.spatial_dims + t_proj.shape[1:])
    h = nn.silu(group_norm(self.num_groups, self.dtype, 'norm2', self.norm_eps)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
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

  @nn.compact
  def __call__(self, x):
    batch, channels = x.shape[0], x.shape[-1]
    num_heads = channels // self.head_dim if self.head_dim else self.num_heads
    if channels % num_heads or (self.head_dim and channels % self.head_dim):
      raise ValueError(f'attention with {channels} channels cannot be split into heads of '
                       f'{self.head_dim or "?"} channels ({self.num_heads} heads); choose a '
                       f'head count or width dividing {channels}')
    head_dim = channels // num_heads
    h = group_norm(self.num_groups, self.dtype, 'norm', self.norm_eps)(x)
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
