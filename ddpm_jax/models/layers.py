"""Building blocks of the DDPM UNet, for 2-D ([B, H, W, C]) and 1-D ([B, L, C]) inputs."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# DDPM initialises the last layer of each residual branch (and of the network) at zero, so every
# block starts as the identity.
zeros_init = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Transformer sinusoidal embedding of t [B] (integer or float) -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def conv(features: int, spatial_dims: int, dtype: Dtype, kernel: int = 3, stride: int = 1,
         kernel_init=nn.initializers.lecun_normal(), name=None):
  """A 'SAME' convolution over ``spatial_dims`` axes with float32 parameters."""
  return nn.Conv(features, (kernel,) * spatial_dims, strides=(stride,) * spatial_dims,
                 padding='SAME', dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                 name=name)


def group_norm(num_groups: int, dtype: Dtype, name=None):
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> conv, + Dense(time embedding) per channel, GroupNorm -> SiLU -> dropout
  -> conv, with a 1x1 shortcut when the channel count changes."""
  out_ch: int
  spatial_dims: int = 2
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = nn.silu(group_norm(self.num_groups, self.dtype, 'norm1')(x))
    h = conv(self.out_ch, self.spatial_dims, self.dtype, name='conv1')(h)
    t_proj = nn.Dense(self.out_ch, dtype=self.dtype, param_dtype=jnp.float32,
                      name='temb_proj')(nn.silu(temb))
    h = h + t_proj.reshape(t_proj.shape[:1] + (1,) * self.spatial_dims + t_proj.shape[1:])
    h = nn.silu(group_norm(self.num_groups, self.dtype, 'norm2')(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(self.out_ch, self.spatial_dims, self.dtype, kernel_init=zeros_init, name='conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, self.spatial_dims, self.dtype, kernel=1, name='shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over all positions, with a residual connection."""
  num_heads: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, channels = x.shape[0], x.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f'attention with {channels} channels cannot be split into '
                       f'{self.num_heads} heads; choose num_heads dividing {channels}')
    head_dim = channels // self.num_heads
    h = group_norm(self.num_groups, self.dtype, 'norm')(x).reshape(batch, -1, channels)  # [B, N, C]
    dense = lambda name, init=nn.initializers.lecun_normal(): nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init,
        name=name)
    q, k, v = dense('q')(h), dense('k')(h), dense('v')(h)  # [B, N, heads, head_dim]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=zeros_init, name='proj_out')(out)
    return x + out.reshape(x.shape)


class Downsample(nn.Module):
  """Halves every spatial axis with a strided 3x3 convolution."""
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(x.shape[-1], self.spatial_dims, self.dtype, stride=2, name='conv')(x)


class Upsample(nn.Module):
  """Doubles every spatial axis (nearest neighbour), then a 3x3 convolution."""
  spatial_dims: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for axis in range(1, 1 + self.spatial_dims):
      x = jnp.repeat(x, 2, axis=axis)
    return conv(x.shape[-1], self.spatial_dims, self.dtype, name='conv')(x)
