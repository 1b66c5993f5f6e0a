"""The DiffEnc encoder network y_phi(x, gamma) (Nielsen et al., ICLR 2024, arXiv:2310.19789, sec. 4).

A small U-Net on the clean data x, conditioned on the normalised gamma
g_norm = (gamma - gamma_min) / (gamma_max - gamma_min) through a sinusoidal embedding of 1000 g_norm
(as the score network), with output

    y = tanh(conv_out(h)),   conv_out zero-initialised,

so y = 0 at initialisation and the trainable encoder x_t = alpha_t^2 x + sigma_t^2 y equals the
non-trainable one, x_t = alpha_t^2 x (see `vdiff.diffenc.trainable_encoder`). The tanh keeps y in
(-1, 1), the range of the data.

Layout: conv_in -> per level (`num_res_blocks` ResNet blocks [+ attention where the spatial size is in
`attn_resolutions`], then a stride-2 downsampling conv except at the last level) -> middle
ResNet-attention-ResNet -> per level in reverse (`num_res_blocks + 1` ResNet blocks on skip
concatenations, then nearest-neighbour upsampling + conv except at the first level) -> GroupNorm ->
SiLU -> zero-initialised conv -> tanh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdiff.nets import layers


class EncoderUNet(nn.Module):
  """y_phi: (x [B, H, W, C], g_norm [B] or scalar) -> y [B, H, W, C] in (-1, 1), y = 0 at init.

  Attributes:
    ch: base channel count (a multiple of `num_groups` keeps every GroupNorm at `num_groups` groups).
    ch_mult: channel multiplier per resolution level; H and W must be divisible by 2^(len(ch_mult) - 1).
    num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
    attn_resolutions: spatial sizes (H) at which a self-attention block follows each ResNet block.
    num_groups: GroupNorm groups (reduced to gcd(num_groups, channels) where needed).
    dropout: dropout rate inside the ResNet blocks (active only with train=True).
  """

  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple[int, ...] = ()
  num_groups: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, g_norm: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"EncoderUNet expects x of shape [B, H, W, C], got {x.shape}.")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"H, W = {x.shape[1:3]} must be divisible by 2^(len(ch_mult) - 1) = {factor}.")
    g_norm = jnp.broadcast_to(jnp.asarray(g_norm, jnp.float32), x.shape[:1])
    temb = layers.timestep_embedding(1000.0 * g_norm, self.ch)
    temb = nn.Dense(4 * self.ch)(temb)
    temb = nn.Dense(4 * self.ch)(nn.silu(temb))

    def res(h, out_ch):
      return layers.ResnetBlock(out_ch, dropout=self.dropout, num_groups=self.num_groups)(
          h, temb, train=train)

    def maybe_attn(h):
      if h.shape[1] in self.attn_resolutions:
        h = layers.AttnBlock(num_groups=self.num_groups)(h)
      return h

    # Down.
    h = nn.Conv(self.ch, (3, 3), name="conv_in")(x)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = maybe_attn(res(h, self.ch * mult))
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), name=f"down_{level}")(h)
        skips.append(h)

    # Middle.
    h = res(h, h.shape[-1])
    h = layers.AttnBlock(num_groups=self.num_groups)(h)
    h = res(h, h.shape[-1])

    # Up.
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = maybe_attn(res(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult))
      if level != 0:
        h = layers.upsample_nearest2x(h)
        h = nn.Conv(h.shape[-1], (3, 3), name=f"up_{level}")(h)
    assert not skips

    h = nn.silu(layers.group_norm(self.num_groups, h.shape[-1])(h))
    # Zero-initialised output conv: y = tanh(0) = 0 exactly at init, so DiffEnc starts from the
    # non-trainable encoder (DiffEnc sec. 4).
    h = nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.zeros, name="conv_out")(h)
    return jnp.tanh(h)
