"""Building blocks shared by the vdiff networks: time embeddings, ResNet blocks, self-attention."""

from __future__ import annotations

import math

from typing import Any

import flax.linen as nn
from jax import lax
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


def fourier_features(z, *, n_min: int, n_max: int, sigma=None):
  """VDM's input Fourier features: sin and cos of 2^n 2 pi z for n in [n_min, n_max), per channel.

  They let the network resolve the fine structure of z at low noise levels (VDM appendix B; the
  frequencies are those of the official code, 2^n * 2 pi).

  With `sigma` (the noise level sigma_t of z, [B]) each feature of angular frequency w is damped by
  exp(-w^2 sigma^2 / 2), its expected value's factor under the noise: for z = alpha x + sigma eps,
  E[sin(w z) | x] = sin(w alpha x) exp(-w^2 sigma^2 / 2). Where w sigma >> 1 a feature is noise that
  carries nothing about x, yet its derivative w cos(w z) is large (w = 2^7 2 pi ~ 804 at n = 7): a
  network that does not cancel it exactly has an input Jacobian that oscillates with z. The ELBO only
  sees eps_hat's values, but the probability-flow ODE integrates its divergence, tr(d eps_hat / dz),
  and such oscillations made the ODE likelihood of a VDM on 256-level data 0.5 to 0.8 bits/dim worse
  than its ELBO (README, "Known-density benchmark"). Damped, the features fade out as sigma grows
  (by sigma = 4 / w they are below exp(-8)), and the network sees them only where they are signal.
  Args: z [B, H, W, C]; sigma None or [B]. Returns [B, H, W, 2 C (n_max - n_min)].
  """
  freqs = 2.0 ** jnp.arange(n_min, n_max, dtype=jnp.float32) * 2.0 * jnp.pi
  h = z[..., None] * freqs  # [B, H, W, C, F]
  feats = [jnp.sin(h), jnp.cos(h)]
  if sigma is not None:
    damp = jnp.exp(-0.5 * jnp.square(jnp.reshape(sigma, (-1, 1, 1, 1, 1)) * freqs))
    feats = [f * damp for f in feats]
  feats = [f.reshape(z.shape[:-1] + (-1,)) for f in feats]
  return jnp.concatenate(feats, axis=-1)


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


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with convolutions on maps smaller than the kernel done as one matmul.

  For a stride-1, undilated, ungrouped NHWC/HWIO convolution whose input is smaller than its kernel
  (a 3x3 conv on a 2x2 or 1x1 map, as at the bottom of a U-Net on 4x4 data), the padded input is cut
  into its kh x kw shifted windows, concatenated along channels ([B, Ho, Wo, kh kw C]) and multiplied by
  the kernel reshaped to [kh kw C, O]: the same sum of products, in another order (float32 rounding).
  Taps whose window lies entirely in the zero padding are left out (their products are exact zeros).
  Why: XLA's CPU backend rewrites such a convolution with the roles of input and kernel swapped, and
  that form runs 10-25x slower than the matmul (a 3x3, 128-channel conv at 2x2, batch 128: 26-43 ms
  against 1.8 ms), which dominated DiffEnc's step on 4x4 data, where the encoder's jvp and its
  gradient multiply the count of such convolutions. Every other convolution goes to XLA unchanged.
  """
  n = lhs.ndim - 2
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  kernel = rhs.shape[:-2] if dn == nhwc else None
  plain = (dn == nhwc and n == 2 and all(s == 1 for s in window_strides)
           and all(d == 1 for d in (lhs_dilation or (1,) * n))
           and all(d == 1 for d in (rhs_dilation or (1,) * n))
           and feature_group_count == 1 and batch_group_count == 1)
  if plain and any(x < k for x, k in zip(lhs.shape[1:3], kernel)):
    pads = (lax.padtype_to_pads(lhs.shape[1:3], kernel, (1, 1), padding)
            if isinstance(padding, str) else padding)
    (pt, pb), (pl, pr) = pads
    (h, w), (kh, kw) = lhs.shape[1:3], kernel
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    plain = ho > 0 and wo > 0  # an empty output stays with XLA
  else:
    plain = False
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  xp = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  taps = [(i, j) for i in range(kh) for j in range(kw)
          if i + ho > pt and i < pt + h and j + wo > pl and j < pl + w]  # windows touching the input
  cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i, j in taps], axis=-1)
  mat = jnp.concatenate([rhs[i, j] for i, j in taps], axis=0)  # [len(taps) C, O], in the same order
  return lax.dot_general(cols, mat, (((3,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


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
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype,
                conv_general_dilated=conv_general_dilated)(h)
    if cond is not None:
      h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.silu(cond))[:, None, None, :]
    h = nn.silu(group_norm(self.num_groups, self.out_ch, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                conv_general_dilated=conv_general_dilated)(h)
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
