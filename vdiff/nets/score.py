"""The VDM score network (Kingma et al. 2021, arXiv:2107.00630, appendix B).

A U-Net without downsampling: input Fourier features of z (optionally damped by the noise level,
`fourier_damping`: see `layers.fourier_features`), `num_blocks` ResNet blocks at full resolution,
a middle ResNet-attention-ResNet block, `num_blocks + 1` ResNet blocks on the way up with skip
concatenations, GroupNorm -> SiLU -> zero-initialised conv, plus a skip of z (skip_z): at initialisation
the network's output is exactly its input z. Read as eps (`vdm.make_eps_fn(..., parameterization="eps")`)
that is eps_hat = z, the optimal denoiser of pure noise; read as v ("v") it is v_hat = z, i.e.
eps_hat = sigma_t z + alpha_t v_hat = (sigma_t + alpha_t) z and x_hat = (alpha_t - sigma_t) z, which is
not eps_hat = z (except where alpha_t = 0). The network is conditioned on the
normalised gamma, g_norm = (gamma_t - gamma_min) / (gamma_max - gamma_min) in [0, 1], through a sinusoidal
embedding of 1000 g_norm, and optionally on a class label (label `num_labels` is the null label of
classifier-free guidance).

Two memory and speed options leave the parameters (float32) and their pytree unchanged:
`dtype=jnp.bfloat16` runs the convolutions, dense layers, attention and activations in bfloat16
(GroupNorm statistics stay float32 inside flax; the time embedding and Fourier features are computed in
float32, and the output is cast back to float32 before the z skip, so eps_hat = z + out keeps z exactly);
`remat=True` rematerialises each ResNet block (`flax.linen.remat`, i.e. `jax.checkpoint`): its
activations are recomputed in the backward pass instead of stored, the same function at the cost of
about one more forward pass.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdiff.nets import layers


class ScoreUNet(nn.Module):
  """eps- or v-prediction network: (z [B, H, W, C], g_norm [B], label [B] | None) -> [B, H, W, C].

  With skip_z (default) the output at initialisation equals z (see the module docstring for what that
  means as eps and as v).
  """

  ch: int = 128
  num_blocks: int = 32
  dropout: float = 0.1
  attention: bool = True
  fourier_min: int = 6
  fourier_max: int = 8
  num_groups: int = 32
  num_labels: int = 0
  skip_z: bool = True
  dtype: Any = None     # computation dtype (None: float32); see the module docstring
  remat: bool = False   # rematerialise the ResNet blocks in the backward pass
  # Damp the Fourier features by the noise level (layers.fourier_features): sigma_t is recovered from
  # g_norm through the normalisation range gamma = gamma_min + g_norm (gamma_max - gamma_min), which must
  # be the range the family normalises with (vdm.make_eps_fn's gamma_min / gamma_max).
  fourier_damping: bool = False
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, z, g_norm, label=None, *, train: bool = False):
    if z.ndim != 4:
      raise ValueError(f"ScoreUNet expects z of shape [B, H, W, C], got {z.shape}.")
    g_norm = jnp.broadcast_to(jnp.asarray(g_norm, jnp.float32), z.shape[:1])
    temb = layers.timestep_embedding(1000.0 * g_norm, self.ch)
    temb = nn.Dense(4 * self.ch)(temb)
    temb = nn.Dense(4 * self.ch)(nn.silu(temb))
    if self.num_labels:
      if label is None:
        label = jnp.full(z.shape[:1], self.num_labels, jnp.int32)  # the null label
      temb = temb + nn.Embed(self.num_labels + 1, 4 * self.ch)(label)

    h = z
    if self.fourier_max > self.fourier_min:
      sigma = None
      if self.fourier_damping:
        gamma = self.gamma_min + g_norm * (self.gamma_max - self.gamma_min)
        sigma = jnp.sqrt(jax.nn.sigmoid(gamma))  # sigma_t^2 = sigmoid(gamma_t)
      h = jnp.concatenate([z, layers.fourier_features(z, n_min=self.fourier_min, n_max=self.fourier_max,
                                                      sigma=sigma)], axis=-1)
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype)(h)
    hs = [h]
    # Explicit names (those flax gives the plain blocks), so that the parameter pytree is the same with
    # or without remat. `train` (argument 3, counting the module) is static: it selects dropout's branch.
    block_cls = nn.remat(layers.ResnetBlock, static_argnums=(3,)) if self.remat else layers.ResnetBlock
    names = iter(range(2 * self.num_blocks + 3))
    block = lambda: block_cls(self.ch, self.dropout, self.num_groups, dtype=self.dtype,
                              name=f"ResnetBlock_{next(names)}")
    for _ in range(self.num_blocks):
      h = block()(h, temb, train)
      hs.append(h)
    h = block()(h, temb, train)
    if self.attention:
      h = layers.AttnBlock(self.num_groups, dtype=self.dtype)(h)
    h = block()(h, temb, train)
    for _ in range(self.num_blocks + 1):
      h = block()(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
    h = nn.silu(layers.group_norm(self.num_groups, self.ch, dtype=self.dtype)(h))
    out = nn.Conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name="conv_out",
                  dtype=self.dtype)(h)
    out = out.astype(jnp.float32)  # the loss and the z skip in float32, whatever the compute dtype
    return out + z if self.skip_z else out
