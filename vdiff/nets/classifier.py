"""Noise-level classifiers for Classification Diffusion Models (CDM, Yadin et al., arXiv:2402.10095).

A CDM network f(x) -> T + 2 logits takes NO time input: it classifies how much noise x carries, among the
classes t in {0 (clean data), 1..T, T + 1 (pure N(0, I))}. Its last layer is a cumulative sum,

    logit[t] = sum_{j <= t} r_j(x),

so the raw output r_t(x) models log p(t | x) - log p(t - 1 | x), the log density ratio of two neighbouring
noise levels (CDM sec. 4); adjacent classes differ little, and each r_t only has to learn a small
correction. The quantities used downstream, F(x, t) = logit[T + 1] - logit[t] (denoiser) and
logit[0] - logit[T + 1] (one-step likelihood), are then partial sums of the r_j.

Two trunks share the head and the call signature `__call__(x, label=None, *, train=False) -> [B, T + 2]`:
  * `NoiseLevelClassifier`: the DDPM U-Net (ResNet blocks, self-attention, down/up-sampling with skips)
    without a time embedding, for images [B, H, W, C];
  * `MLPClassifier`: a SiLU multilayer perceptron for flat vectors [B, D] (low-dimensional test data).
Both may be conditioned on a class label (num_labels > 0): the label is embedded (num_labels + 1 rows; the
last row is the null label of classifier-free guidance, used when `label` is None) and enters every block
the way a time embedding would. Activations are smooth (SiLU): the denoiser is the input gradient of the
logits and training differentiates it again (second-order AD), so ReLU's piecewise-constant gradient
would give a piecewise-constant denoiser.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdiff.nets import layers


def _label_embedding(label, batch: int, num_labels: int, dim: int):
  """Embed class labels [B] (None -> the null label `num_labels`) into [B, dim]; None if unconditional."""
  if not num_labels:
    if label is not None:
      raise ValueError("label was given but num_labels = 0 (an unconditional classifier).")
    return None
  if label is None:
    label = jnp.full((batch,), num_labels, jnp.int32)  # the null label of classifier-free guidance
  label = jnp.asarray(label, jnp.int32)
  if label.shape != (batch,):
    raise ValueError(f"label must have shape [B] = ({batch},), got {label.shape}.")
  emb = nn.Embed(num_labels + 1, dim, name="label_embed")(label)
  emb = nn.Dense(dim, name="label_dense_0")(emb)
  return nn.Dense(dim, name="label_dense_1")(nn.silu(emb))


def _cumsum_head(h, num_classes_out: int):
  """Dense(num_classes_out) -> cumulative sum over classes.

  The Dense layer is zero-initialised: at initialisation every logit is 0, i.e. the uniform posterior,
  F(x, t) = 0 and the gradient denoiser is eps_hat = sqrt(1 - abar_t) x_t, the optimal denoiser of data
  that is itself N(0, I).
  """
  r = nn.Dense(num_classes_out, kernel_init=nn.initializers.zeros, name="head_out")(h)
  return jnp.cumsum(r, axis=-1)


class NoiseLevelClassifier(nn.Module):
  """DDPM-style U-Net noise-level classifier: x [B, H, W, C] (label [B]) -> logits [B, num_classes_out].

  conv in -> per level: `num_res_blocks` ResNet blocks (self-attention at `attn_resolutions`),
  downsample (stride-2 conv) except at the last level -> middle ResNet-attention-ResNet -> per level in
  reverse: `num_res_blocks + 1` ResNet blocks on skip concatenations, upsample (nearest + conv) except at
  the first level -> GroupNorm -> SiLU -> conv -> global average pool -> Dense -> cumulative sum.

  Attributes:
    ch: base channel count. ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResNet blocks per level on the way down. attn_resolutions: spatial sizes (H) at which
      self-attention follows each ResNet block. dropout: dropout rate inside ResNet blocks (train only).
    num_classes_out: T + 2. num_labels: label classes for conditioning (0 = unconditional).
    num_groups: GroupNorm groups (reduced to gcd with the channel count for tiny networks).
  Reference: CDM (arXiv:2402.10095) sec. 4 and appendix; DDPM U-Net (Ho et al., arXiv:2006.11239).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_classes_out: int = 1002
  num_labels: int = 0
  num_groups: int = 32

  @nn.compact
  def __call__(self, x, label=None, *, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"NoiseLevelClassifier expects x of shape [B, H, W, C], got {x.shape}.")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"x spatial shape {x.shape[1:3]} must be divisible by 2^(len(ch_mult) - 1) ="
                       f" {factor} (ch_mult={tuple(self.ch_mult)}).")
    emb = _label_embedding(label, x.shape[0], self.num_labels, 4 * self.ch)
    block = lambda c: layers.ResnetBlock(c, self.dropout, self.num_groups)
    attn = lambda: layers.AttnBlock(self.num_groups)

    # Downsampling path.
    h = nn.Conv(self.ch, (3, 3), name="conv_in")(x)
    hs = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.ch * mult)(h, emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
        hs.append(h)

    # Middle.
    h = block(h.shape[-1])(h, emb, train=train)
    h = attn()(h)
    h = block(h.shape[-1])(h, emb, train=train)

    # Upsampling path with skip concatenations.
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(self.ch * mult)(jnp.concatenate([h, hs.pop()], axis=-1), emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = attn()(h)
      if level != 0:
        h = layers.upsample_nearest2x(h)
        h = nn.Conv(h.shape[-1], (3, 3))(h)
    assert not hs, "every skip connection must be consumed"

    # Classification head: no time input anywhere, so everything the logits know comes from x.
    h = nn.silu(layers.group_norm(self.num_groups, h.shape[-1], name="head_norm")(h))
    h = nn.Conv(self.ch, (3, 3), name="head_conv")(h)
    h = jnp.mean(h, axis=(1, 2))  # global average pool -> [B, ch]
    return _cumsum_head(h, self.num_classes_out)


class MLPClassifier(nn.Module):
  """SiLU MLP noise-level classifier for flat vectors: x [B, D] (label [B]) -> logits [B, num_classes_out].

  Each hidden layer is h <- SiLU(Dense(h) + Dense(label embedding)); the head is the cumulative sum.

  Attributes:
    features: hidden widths. dropout: dropout rate after each hidden layer (train only).
    num_classes_out: T + 2. num_labels: label classes for conditioning (0 = unconditional).
  """

  features: Sequence[int] = (256, 256, 256)
  dropout: float = 0.0
  num_classes_out: int = 52
  num_labels: int = 0

  @nn.compact
  def __call__(self, x, label=None, *, train: bool = False):
    if x.ndim != 2:
      raise ValueError(f"MLPClassifier expects x of shape [B, D], got {x.shape}.")
    emb = _label_embedding(label, x.shape[0], self.num_labels, self.features[0])
    h = x
    for width in self.features:
      h = nn.Dense(width)(h)
      if emb is not None:
        h = h + nn.Dense(width, use_bias=False)(emb)
      h = nn.silu(h)
      if self.dropout:
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return _cumsum_head(h, self.num_classes_out)
