"""Bring your own network: a user's denoiser trained by vdiff's trainer and command line.

  python -m experiments.main --config=examples/own_network_config.py --workdir=/tmp/own_network \
      --config.model.family=examples.own_network:OwnNetworkVDM

`OwnNetworkVDM` subclasses `vdiff.models.DenoiserFamily` and writes only a Flax module, `init`, `eps_fn`
and `loss`; the trainer supplies the rest of `vdiff.models.FamilyProtocol` (data parallelism, EMA,
checkpoints and resumption, evaluation with the ELBO and the probability-flow ODE, every sampler and
classifier-free guidance). Its hyperparameters arrive from `model.options` in the config.

The settings that make a small denoiser work on K-level data (docs/math.md sec. 2; VDM, Kingma et al.,
arXiv:2107.00630, appendix B):
  * the output skip eps_hat = z + net(z, .): with a zero-initialised last layer the network starts as
    eps_hat = z, the optimal denoiser of pure noise, and learns only a correction;
  * Fourier features sin / cos(2^n pi z) of the input, with 2^n pi near the inverse bin width (K = 17:
    n = 2..4), so the network resolves the fine structure of z at low noise;
  * gamma_min near -8 for K = 17 (set in the config): the bin half-width 1/K is reached at gamma ~ -5.7,
    so a lower gamma_min only adds noise levels where reconstruction is already free.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdiff import likelihood
from vdiff import models
from vdiff import vdm


class Denoiser(nn.Module):
  """A small convolutional ResNet: (z [B, H, W, C], g_norm [B], label [B] | None) -> eps_hat [B, H, W, C]."""

  ch: int = 32
  num_blocks: int = 2
  fourier_min: int = 2
  fourier_max: int = 5
  num_labels: int = 0

  @nn.compact
  def __call__(self, z, g_norm, label=None):
    # Noise level: a sinusoidal embedding of 1000 g_norm (g_norm in [0, 1], see vdm.make_eps_fn).
    half = self.ch // 2
    freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half) / (half - 1))
    emb = 1000.0 * g_norm[:, None] * freqs
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    emb = nn.Dense(self.ch)(nn.silu(nn.Dense(self.ch)(emb)))
    if self.num_labels:
      if label is None:  # unconditional: the null label of classifier-free guidance
        label = jnp.full(z.shape[:1], self.num_labels, jnp.int32)
      emb = emb + nn.Embed(self.num_labels + 1, self.ch)(label)

    # Input Fourier features sin / cos(2^n pi z), n in [fourier_min, fourier_max), per channel.
    f = z[..., None] * (jnp.pi * 2.0 ** jnp.arange(self.fourier_min, self.fourier_max))
    f = f.reshape(z.shape[:-1] + (-1,))
    h = nn.Conv(self.ch, (3, 3))(jnp.concatenate([z, jnp.sin(f), jnp.cos(f)], axis=-1))
    for _ in range(self.num_blocks):
      r = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(h)))
      r = r + nn.Dense(self.ch)(emb)[:, None, None, :]
      r = nn.Conv(self.ch, (3, 3))(nn.silu(nn.GroupNorm(num_groups=8)(r)))
      h = h + r
    out = nn.Conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(h))
    return z + out  # the output skip: eps_hat = z at initialisation


class OwnNetworkVDM(models.DenoiserFamily):
  """A VDM family around `Denoiser`, trained on the negative ELBO; a learned or fixed schedule from
  model.schedule, the network's width and depth from model.options."""

  def __init__(self, *, ch: int = 32, num_blocks: int = 2, fourier_min: int = 2, fourier_max: int = 5,
               **kw):
    super().__init__(**kw)  # data_shape, num_levels, num_labels, schedule, num_steps, antithetic, ...
    self.net = Denoiser(ch=ch, num_blocks=num_blocks, fourier_min=fourier_min,
                        fourier_max=fourier_max, num_labels=self.num_labels)

  def init(self, rng):
    r_net, r_schedule = jax.random.split(rng)
    z = jnp.zeros((1,) + self.data_shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if self.num_labels else None
    return {"net": self.net.init(r_net, z, jnp.zeros((1,)), label)["params"],
            "schedule": self.schedule_spec.init(r_schedule)}  # {} for a fixed schedule

  def eps_fn(self, params, label=None, *, train=False, rng=None):
    del train, rng  # no dropout in this network
    apply = lambda z, g_norm: self.net.apply({"params": params["net"]}, z, g_norm, label)
    # g_norm is gamma normalised by the schedule's own (initial) endpoints.
    return vdm.make_eps_fn(apply, self.schedule(params))

  def loss(self, params, rng, batch, *, train=True):
    r_label, r_elbo = jax.random.split(rng)
    labels = batch["label"] if self.num_labels else None
    if labels is not None and train:  # label dropout trains the unconditional model for guidance
      labels = models.drop_labels(r_label, labels, p_uncond=self.p_uncond, null_label=self.num_labels)
    x = likelihood.encode(batch["image"], self.num_levels)  # K levels -> bin centres in [-1, 1]
    return vdm.negative_elbo(r_elbo, x, schedule=self.schedule(params),
                             eps_fn=self.eps_fn(params, labels), num_levels=self.num_levels,
                             num_steps=self.num_steps, antithetic=self.antithetic)
