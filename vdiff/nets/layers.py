"""Building blocks shared by the vdiff networks: time embeddings, ResNet blocks, self-attention."""

from __future__ import annotations

import math

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def timestep_embedding(t, dim: int, *, max_period: float = 10000.0):
  """Sinusoidal embedding of scalar times t [B] -> [B, dim] (Vaswani et al. / DDPM)."""
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(z, *, n_min: int, n_max: int):
  """VDM's input Fourier features: sin and cos of 2^n pi z for n in [n_min, n_max), per channel.

  They let the network resolve the fine structure of z at low noise levels (VDM appendix B).
  Args: z [B, H, W, C]. Returns [B, H, W, 2 C (n_max - n_min)].
  """
  freqs = 2.0 ** jnp.arange(n_min, n_max, dtype=jnp.float32) * 2.0 * jnp.pi
  h = z[..., None] * freqs  # [B, H, W, C, F]
  h = h.reshape(z.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def upsample_nearest2x(h):
  """Nearest-neighbour 2x upsampling of [B, H, W, C] to [B, 2H, 2W, C] by broadcast + reshape.

  Equals jax.image.resize(h, (B, 2H, 2W, C), "nearest"), whose implementation is a gather with a
  scatter-add as its transpose. The U-Nets here are differentiated twice (DiffEnc's jvp through the
  encoder, CDM's input-gradient denoiser); broadcast and reshape keep gathers and scatters out of those
  graphs, and transpose to a plain sum over each 2x2 block.
  """
  b, hh, ww, c = h.shape
  h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, 2, ww, 2, c))
  return h.reshape(b, 2 * hh, 2 * ww, c)


def group_norm(num_groups: int, channels: int, name: str | None = None, dtype: Any = None) -> nn.GroupNorm:
  """GroupNorm whose group count divides the channel count (tiny test networks have few channels).

  dtype: the output dtype (None: that of the input); flax computes the mean and variance in float32
  whatever it is, so a bfloat16 network keeps float32 normalisation statistics.
  """
  g = math.gcd(num_groups, channels)
  return nn.GroupNorm(num_groups=g, name=name, dtype=dtype)


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv -> + Dense(cond) -> GroupNorm -> SiLU -> dropout -> zero-init conv, + skip.

  dtype: the computation dtype of the convolutions, dense layers and activations (None: float32 by
  promotion of the float32 parameters); the parameters are float32 whatever it is.
  """

  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Any = None

  @nn.compact
  def __call__(self, x, cond, train: bool = False):
    in_ch = x.shape[-1]
    h = nn.silu(group_norm(self.num_groups, in_ch, dtype=self.dtype)(x))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(h)
    if cond is not None:
      h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.silu(cond))[:, None, None, :]
    h = nn.silu(group_norm(self.num_groups, self.out_ch, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    if in_ch != self.out_ch:
      x = nn.Dense(self.out_ch, name="skip", dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over spatial positions with a zero-initialised output projection."""

  num_groups: int = 32
  dtype: Any = None  # computation dtype, as in ResnetBlock

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(self.num_groups, c, dtype=self.dtype)(x).reshape(b, h * w, c)
    y = nn.SelfAttention(num_heads=1, qkv_features=c, out_kernel_init=nn.initializers.zeros,
                         dtype=self.dtype)(y)
    return x + y.reshape(b, h, w, c)
