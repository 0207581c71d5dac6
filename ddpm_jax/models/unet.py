"""The DDPM noise-prediction UNet (Ho et al. 2020), for images and for 1-D windows."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.diffusion import concrete_or_none
from ddpm_jax.models.layers import (AttnBlock, Downsample, ResBlock, Upsample, conv, group_norm,
                                    timestep_embedding, zeros_init)
from ddpm_jax.errors import InputError


def check_label_range(labels, num_classes: int, allow_null: bool) -> None:
  """Labels known at trace time lie in [0, num_classes - 1]; the network itself also takes
  ``num_classes``, the null label of classifier-free guidance (``allow_null``)."""
  values = concrete_or_none(labels)
  if values is None or not values.size:
    return
  high = num_classes if allow_null else num_classes - 1
  if values.min() < 0 or values.max() > high:
    null = f' (or {num_classes} for the null label)' if allow_null else ''
    raise InputError(f'labels must lie in [0, {num_classes - 1}]{null}; got range '
                     f'[{values.min()}, {values.max()}]')


class UNet(nn.Module):
  """eps_theta(x_t, t): x [B, H, W, C] (spatial_dims=2) or [B, L, C] (spatial_dims=1) -> same shape.

  ``time_scale`` multiplies t before the sinusoidal embedding: 1 for integer timesteps, e.g.
  1000 for continuous t in [0, 1]. ``num_classes`` > 0 makes the model class-conditional with an
  extra null label (index ``num_classes``) for classifier-free guidance.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_heads: int = 1
  num_groups: int = 32
  out_channels: Optional[int] = None
  num_classes: int = 0
  spatial_dims: int = 2
  time_scale: float = 1.0
  dtype: Any = jnp.float32
  # Options of other released networks (diffusers' names); the defaults are the DDPM paper's.
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  norm_eps: float = 1e-6
  attention_head_dim: int = 0  # > 0: heads of this width instead of num_heads heads
  downsample_padding: int = 0
  # How the up path's doubling + 3x3 convolution is computed (layers.Upsample); not a
  # network option: the parameters and outputs are the same either way.
  subpixel_upsample: bool = True
  # GroupNorm's backward pass by hand (layers.fused_group_norm) or by autodiff; the same
  # parameters either way, and outputs that agree to float rounding.
  fused_group_norm: bool = True
  # Dropout masks from 16-bit draws (layers.dropout_16bit) or flax's nn.Dropout: the same law
  # (to 1 / 2**16), other random draws; no parameters either way.
  fast_dropout: bool = True

  def check_input(self, x_shape, labels=None) -> None:
    """Raises ValueError when an input of x_shape [B, *spatial, C] (or labels) cannot be taken."""
    if len(x_shape) != self.spatial_dims + 2:
      layout = '[B, H, W, C]' if self.spatial_dims == 2 else '[B, L, C]'
      raise InputError(f'the UNet with spatial_dims={self.spatial_dims} takes {layout} inputs, '
                       f'got shape {tuple(x_shape)}')
    factor = 2 ** (len(self.ch_mult) - 1)
    spatial = tuple(x_shape[1:-1])
    if any(size % factor for size in spatial):
      fits = ', '.join(str(factor * max(1, round(s / factor))) for s in spatial)
      raise InputError(f'input spatial size {spatial} is not divisible by {factor} (2 ** '
                       f'(len(ch_mult) - 1) with ch_mult={tuple(self.ch_mult)}); resize to a '
                       f'multiple of {factor} (e.g. {fits}) or use fewer levels')
    for mult in self.ch_mult:
      if (self.ch * mult) % self.num_groups:
        raise InputError(f'GroupNorm({self.num_groups}) cannot split {self.ch * mult} channels '
                         f'(ch={self.ch} x {mult}); make ch * ch_mult divisible by num_groups')
    if labels is not None and self.num_classes <= 0:
      raise InputError('labels were given to an unconditional model (model.num_classes = 0); '
                       'drop the labels or train with model.num_classes set')
    if labels is not None:
      check_label_range(labels, self.num_classes, allow_null=True)

  @nn.compact
  def __call__(self, x, t, labels=None, train: bool = False):
    self.check_input(x.shape, labels)
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    block = lambda out_ch: ResBlock(out_ch, self.spatial_dims, self.dropout, self.num_groups,
                                    self.dtype, self.norm_eps, self.fused_group_norm,
                                    self.fast_dropout)
    attn = lambda: AttnBlock(self.num_heads, self.num_groups, self.dtype, self.norm_eps,
                             self.attention_head_dim, self.fused_group_norm)

    temb = timestep_embedding(t * self.time_scale, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype, param_dtype=jnp.float32, name='temb_dense0')(temb)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype, param_dtype=jnp.float32,
                    name='temb_dense1')(nn.silu(temb))
    if self.num_classes > 0:
      if labels is None:  # no labels: the unconditional (null-label) model
        labels = jnp.full((batch,), self.num_classes, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                             param_dtype=jnp.float32, name='label_emb')(labels)

    h = conv(self.ch, self.spatial_dims, self.dtype, name='conv_in')(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.ch * mult)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.spatial_dims, self.dtype, self.downsample_padding)(h)
        skips.append(h)

    h = block(h.shape[-1])(h, temb, train)
    h = attn()(h)
    h = block(h.shape[-1])(h, temb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(self.ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
      if level != 0:
        h = Upsample(self.spatial_dims, self.dtype, self.subpixel_upsample)(h)

    h = group_norm(self.num_groups, self.dtype, self.norm_eps, silu=True,
                   fused=self.fused_group_norm, name='norm_out')(h)
    out_channels = self.out_channels or x.shape[-1]
    h = conv(out_channels, self.spatial_dims, self.dtype, kernel_init=zeros_init, name='conv_out')(h)
    return h.astype(jnp.float32)
