"""DiffEnc: diffusion on a learned, time-dependent encoding of the data, per example, in nats.

Nielsen, Christensen, Dittadi, Winther, "DiffEnc: Variational Diffusion with a Learned Encoder",
ICLR 2024, arXiv:2310.19789. Builds on VDM (Kingma et al., arXiv:2107.00630).

The diffusion runs on x_t = enc(x, gamma_t) instead of x:

    q(z_t | x) = N(alpha_t x_t, sigma_t^2 I),
    identity:        x_t = x                                   (VDM)
    non-trainable:   x_t = alpha_t^2 x
    trainable:       x_t = alpha_t^2 x + sigma_t^2 y_phi(x, gamma_t)

An encoder is ONE interface: a callable enc(x [B, ...], gamma [B]) -> x_t [B, ...]. The factories below
return `Encoder` objects (callables that also keep the offset x_t - x, see the numerics note); any plain
callable is accepted too and wrapped by `as_encoder`.

The reverse posterior gains a mean shift (docs/math.md sec. 3; DiffEnc eq. 7): for s < t,

    mu_Q = alpha_s x_t + (alpha_{t|s} sigma_s^2 / sigma_t^2)(z_t - alpha_t x_t) + alpha_s (x_s - x_t),
    sigma_Q^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2,

and the generative model predicts x_hat(z_t, t) of x_t and the shift with the encoder-derivative estimate
d_hat = -sigma_t^2 x_hat (exact for the non-trainable encoder):

    mu_P = alpha_s x_hat + (alpha_{t|s} sigma_s^2 / sigma_t^2)(z_t - alpha_t x_hat)
           + alpha_s (gamma_s - gamma_t) d_hat,                sigma_P^2 = sigma_Q^2  (w = 1).

Per-step KL (derivation; c = -expm1(gamma_s - gamma_t) = sigma_{t|s}^2 / sigma_t^2, Delta = gamma_t -
gamma_s):

    KL_i = |mu_Q - mu_P|^2 / (2 sigma_Q^2)
         = 1/2 (SNR_s / c) || c (x_t - x_hat) + (x_s - x_t) - (gamma_s - gamma_t) d_hat ||^2
         = 1/2 expm1(Delta) || (eps - eps_hat) - u / c ||^2,
    u    = SNR_t^(1/2) [(x_s - x_t) - (gamma_s - gamma_t) d_hat],

using SNR_t^(1/2) (x_t - x_hat) = eps_hat - eps (z_t = alpha_t x_t + sigma_t eps) and
(SNR_s / SNR_t) c = e^Delta (1 - e^-Delta) = expm1(Delta). The T-step loss is T E_i KL_i, and as
T -> infinity (c ~ Delta, x_s - x_t ~ -Delta dx_t/dgamma) it becomes docs/math.md's continuous loss

    L_diff = 1/2 E_{t,eps} [ gamma'(t) SNR_t || (x_t - x_hat) - (dx_t/dgamma - d_hat) ||^2 ]
           = 1/2 E_{t,eps} [ gamma'(t) || (eps - eps_hat) + SNR_t^(1/2) (dx_t/dgamma - d_hat) ||^2 ].

With the identity encoder and d_hat = 0 both reduce to VDM's losses exactly.

Numerics (float32). We evaluate the eps-form (last line), not SNR ||x_t - x_hat||^2: at gamma = -13.3,
SNR = 6e5 multiplies a difference x_t - x_hat of two O(1) numbers that agree to ~1e-3, so float32
rounding of x_t and x_hat (6e-8) would put ~5e-5 of noise on each component of eps - eps_hat; the
eps-form takes eps - eps_hat directly. The shift term SNR^(1/2) d_hat = -alpha sigma x_hat is formed as
-sigma (z - sigma eps_hat) with no division. The published code's v-form,
1/2 gamma' alpha^2 || v - v_hat + sigma (x_hat - x_t + y + dy/dgamma) ||^2, is the same expression:
alpha (v - v_hat) = eps - eps_hat for v = alpha eps - sigma x_t, and for the trainable encoder
dx_t/dgamma + sigma^2 x_hat = sigma^2 (x_hat - x_t + y + dy/dgamma), so
SNR^(1/2) (dx_t/dgamma - d_hat) = alpha sigma (x_hat - x_t + y + dy/dgamma).
Encoders are written through sigma^2 = sigmoid(gamma) only (alpha^2 x = x - sigma^2 x): the jvp of
sigmoid is s (1 - s), accurate for small s = sigma^2, whereas d alpha^2 / d gamma computed as
a (1 - a) with a = alpha^2 ~ 1 - 1.7e-6 keeps only ~2 significant digits at gamma = -13.3. For the
same reason the T-step loss forms x_s - x_t from the offsets x_t - x (-sigma^2 x for the non-trainable
encoder, accurate to relative 1e-7) rather than from x_t and x_s, which agree to ~1e-8 when T = 1000.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from vdiff import checks
from vdiff import schedules as schedules_lib
from vdiff import vdm

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]
YFn = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------------------------------
# Encoders.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Encoder:
  """A DiffEnc encoder x_t = enc(x, gamma) = x + offset(x, gamma).

  Keeping the offset x_t - x (rather than x_t) lets `difference` form x_s - x_t without cancelling two
  nearly equal O(1) numbers (see the module docstring).

  Attributes:
    offset_fn: (x [B, ...], gamma [B]) -> x_t - x [B, ...], differentiable in gamma (and parameters).
    name: a label for logs.
  """

  offset_fn: Callable[[Array, Array], Array]
  name: str = "custom"

  def __call__(self, x: Array, gamma: Array) -> Array:
    """x_t = enc(x, gamma_t), [B, ...]."""
    return x + self.offset(x, gamma)

  def offset(self, x: Array, gamma: Array) -> Array:
    """x_t - x, [B, ...]."""
    gamma = jnp.broadcast_to(jnp.asarray(gamma, x.dtype), x.shape[:1])
    return self.offset_fn(x, gamma)

  def difference(self, x: Array, gamma_s: Array, gamma_t: Array) -> Array:
    """x_s - x_t = offset(x, gamma_s) - offset(x, gamma_t), [B, ...]."""
    return self.offset(x, gamma_s) - self.offset(x, gamma_t)


def identity_encoder() -> Encoder:
  """x_t = x: plain VDM."""
  return Encoder(lambda x, gamma: jnp.zeros_like(x), name="identity")


def nontrainable_encoder() -> Encoder:
  """x_t = alpha_t^2 x, written as x - sigma_t^2 x (DiffEnc sec. 3; dx_t/dgamma = -sigma^2 alpha^2 x)."""

  def offset_fn(x, gamma):
    return -vdm.bcast(schedules_lib.sigma2_from_gamma(gamma), x) * x

  return Encoder(offset_fn, name="nontrainable")


def trainable_encoder(y_fn: YFn) -> Encoder:
  """x_t = alpha_t^2 x + sigma_t^2 y(x, gamma_t) = x + sigma_t^2 (y - x)  (DiffEnc sec. 3, eq. 4).

  Args:
    y_fn: (x [B, ...], gamma [B]) -> y [B, ...], e.g. `y_fn_from_module(EncoderUNet(...), params)`.
      With y = 0 (the zero-initialised network) this is exactly `nontrainable_encoder()`.
  """

  def offset_fn(x, gamma):
    return vdm.bcast(schedules_lib.sigma2_from_gamma(gamma), x) * (y_fn(x, gamma) - x)

  return Encoder(offset_fn, name="trainable")


def from_function(enc_fn: Callable[[Array, Array], Array], name: str = "custom") -> Encoder:
  """Wrap any callable enc_fn(x, gamma) -> x_t (its offset is formed as enc_fn(x, gamma) - x)."""
  return Encoder(lambda x, gamma: enc_fn(x, gamma) - x, name=name)


def as_encoder(enc: Callable[[Array, Array], Array]) -> Encoder:
  """An `Encoder` as is; any other callable enc(x, gamma) -> x_t through `from_function`."""
  return enc if isinstance(enc, Encoder) else from_function(enc)


def y_fn_from_module(module, params, *, gamma_min: float = schedules_lib.GAMMA_MIN,
                     gamma_max: float = schedules_lib.GAMMA_MAX) -> YFn:
  """Bind an encoder network (e.g. `vdiff.nets.encoder.EncoderUNet`) to y_fn(x, gamma).

  The network sees g_norm = (gamma - gamma_min) / (gamma_max - gamma_min) with FIXED constants (as
  `vdm.make_eps_fn`), so learning the schedule's endpoints does not move the network's input scale.
  """

  def y_fn(x, gamma):
    return module.apply({"params": params}, x, (gamma - gamma_min) / (gamma_max - gamma_min))

  return y_fn


def encoder_and_derivative(enc: Callable[[Array, Array], Array], x: Array,
                           gamma: Array) -> tuple[Array, Array]:
  """(x_t, dx_t/dgamma) by one forward-mode jvp in gamma (differentiable in the encoder's parameters).

  The encoder acts per example, so the jvp with a tangent of ones in gamma [B] gives every example's
  derivative d x_t / d gamma_t at once.

  Args:
    enc: encoder callable. x: [B, ...] data. gamma: [B] (or scalar, broadcast).
  Returns:
    (x_t [B, ...], dx_t/dgamma [B, ...]).
  """
  gamma = jnp.broadcast_to(jnp.asarray(gamma, x.dtype), x.shape[:1])
  return jax.jvp(lambda g: enc(x, g), (gamma,), (jnp.ones_like(gamma),))


# ----------------------------------------------------------------------------------------------------
# The DiffEnc diffusion loss.
# ----------------------------------------------------------------------------------------------------
def _predict(z, t, alpha, sigma, eps_fn, x_hat_fn):
  """(eps_hat, alpha x_hat) from an eps- or an x_t-prediction model."""
  if (eps_fn is None) == (x_hat_fn is None):
    raise ValueError("pass exactly one of eps_fn and x_hat_fn.")
  if eps_fn is not None:
    eps_hat = eps_fn(z, t)
    return eps_hat, z - sigma * eps_hat  # alpha x_hat = z - sigma eps_hat: no division by alpha.
  x_hat = x_hat_fn(z, t)
  # Dividing by sigma is inherent to x-prediction (absolute error ~ 6e-8 / sigma in eps_hat).
  return (z - alpha * x_hat) / sigma, alpha * x_hat


def diffusion_loss(x: Array, t: Array, eps: Array, *, schedule: schedules_lib.Schedule,
                   encoder: Callable[[Array, Array], Array], eps_fn: EpsFn | None = None,
                   x_hat_fn: EpsFn | None = None, num_steps: int | None = None,
                   model_shift: bool = True) -> Array:
  """The DiffEnc diffusion term for one (t, eps) per example, in nats, [B].

  Continuous time (num_steps None; docs/math.md sec. 3, DiffEnc eq. 12):
    1/2 gamma'(t) || (eps - eps_hat) + SNR_t^(1/2) (dx_t/dgamma - d_hat) ||^2
    (= 1/2 gamma' SNR || (x_t - x_hat) - (dx_t/dgamma - d_hat) ||^2),   d_hat = -sigma_t^2 x_hat.
  T steps (t = i/T, s = (i-1)/T, i = floor(t T) + 1; T times the i-th per-step KL, see module doc):
    T/2 expm1(gamma_t - gamma_s) || (eps - eps_hat) - u / c ||^2,   c = -expm1(gamma_s - gamma_t),
    u = SNR_t^(1/2) [(x_s - x_t) - (gamma_s - gamma_t) d_hat].
  Here z_t = alpha_t x_t + sigma_t eps with x_t = encoder(x, gamma_t), and x_hat predicts x_t.

  Args:
    x: [B, ...] data. t: [B] floating-point times in [0, 1] (eagerly checked; see `vdm.diffusion_loss`).
    eps: [B, ...] noise. schedule: the noise schedule. encoder: enc(x, gamma) -> x_t.
    eps_fn: denoiser eps_fn(z, t) -> eps_hat (eps- or v-network through `vdm.make_eps_fn`), or
    x_hat_fn: x_hat_fn(z, t) -> x_hat, a direct prediction of x_t (pass exactly one).
    num_steps: T, or None for T = infinity.
    model_shift: use d_hat = -sigma_t^2 x_hat (True, DiffEnc) or d_hat = 0 (False).
  Returns:
    [B] loss in nats.
  """
  chex.assert_equal_shape([x, eps])
  checks.times(t, "t", batch_size=x.shape[0])
  enc = as_encoder(encoder)
  shift = 1.0 if model_shift else 0.0
  if num_steps is None:
    gamma_t, dgamma = schedule.gamma_and_dgamma(t)
    offset, doffset = encoder_and_derivative(enc.offset, x, gamma_t)  # d x_t/dgamma = d offset/dgamma
  else:
    i = vdm.step_indices(t, num_steps)
    t, s = i / num_steps, (i - 1.0) / num_steps
    gamma_t, gamma_s = schedule.gamma(t), schedule.gamma(s)
    offset = enc.offset(x, gamma_t)
  g = vdm.bcast(gamma_t, x)
  alpha, sigma = schedules_lib.alpha_from_gamma(g), schedules_lib.sigma_from_gamma(g)
  z = alpha * (x + offset) + sigma * eps
  eps_hat, alpha_x_hat = _predict(z, t, alpha, sigma, eps_fn, x_hat_fn)
  chex.assert_equal_shape([eps_hat, x])
  sqrt_snr = jnp.exp(-0.5 * g)
  if num_steps is None:
    # SNR^(1/2) (dx_t/dgamma - d_hat) = SNR^(1/2) dx_t/dgamma + alpha sigma x_hat.
    resid = (eps - eps_hat) + sqrt_snr * doffset + shift * sigma * alpha_x_hat
    weight = 0.5 * dgamma
  else:
    delta = schedule.gamma_difference(i, num_steps)  # from (i, T): exact for the linear schedule
    db = vdm.bcast(delta, x)
    x_diff = enc.offset(x, gamma_s) - offset  # x_s - x_t, from offsets (see module numerics note)
    # u = SNR_t^(1/2)(x_s - x_t) + Delta SNR_t^(1/2) d_hat,  SNR^(1/2) d_hat = -sigma alpha x_hat.
    u = sqrt_snr * x_diff - shift * db * sigma * alpha_x_hat
    resid = (eps - eps_hat) - u / (-jnp.expm1(-db))
    weight = 0.5 * num_steps * jnp.expm1(delta)
  return weight * jnp.sum(jnp.square(resid).reshape(x.shape[0], -1), axis=-1)


def endpoint_losses(rng: Array, x: Array, *, schedule: schedules_lib.Schedule,
                    encoder: Callable[[Array, Array], Array], num_levels: int) -> tuple[Array, Array]:
  """(L_prior [B], L_recon [B]) of the encoded process; they depend on the schedule only via gamma(0), gamma(1).

  L_prior = KL(N(alpha_1 x_1, sigma_1^2 I) || N(0, I)) with x_1 = enc(x, gamma_1);
  L_recon = -log p(x | z_0) with z_0 = alpha_0 x_0 + sigma_0 eps (eps drawn from rng), x_0 = enc(x, gamma_0).
  """
  enc = as_encoder(encoder)
  gamma_0, gamma_1 = schedule.endpoints()
  ones = jnp.ones(x.shape[:1], x.dtype)
  prior = vdm.prior_loss(enc(x, gamma_1 * ones), gamma_1)
  recon = vdm.reconstruction_loss(jax.random.normal(rng, x.shape), x, gamma_0,
                                  num_levels=num_levels, x_mean=enc(x, gamma_0 * ones))
  return prior, recon


def negative_elbo(rng: Array, x: Array, *, schedule: schedules_lib.Schedule,
                  encoder: Callable[[Array, Array], Array], eps_fn: EpsFn, num_levels: int,
                  num_steps: int | None = None, antithetic: bool = True, t: Array | None = None,
                  model_shift: bool = True) -> tuple[Array, dict[str, Array]]:
  """DiffEnc -ELBO(x) = L_prior + L_recon + L_diff per example in nats, one sample of (t, eps).

  L_prior = KL(N(alpha_1 x_1, sigma_1^2 I) || N(0, I)) with x_1 = enc(x, gamma_1);
  L_recon = -log p(x | z_0) with z_0 = alpha_0 x_0 + sigma_0 eps, x_0 = enc(x, gamma_0);
  L_diff as in `diffusion_loss`. Mirrors `vdm.negative_elbo` (same rng splitting).

  Args:
    rng: PRNG key. x: [B, ...] encoded K-level data. schedule, encoder, eps_fn: the model.
    num_levels: K. num_steps: T (None = continuous time). antithetic: stratified t over the batch.
    t: optional [B] times (overrides sampling). model_shift: d_hat = -sigma^2 x_hat (True) or 0.
  Returns:
    (nelbo [B], {"prior": [B], "recon": [B], "diff": [B]}).
  """
  enc = as_encoder(encoder)
  rng_t, rng_0, rng_e = jax.random.split(rng, 3)
  if t is None:
    t = vdm.sample_times(rng_t, x.shape[0], antithetic=antithetic)
  prior, recon = endpoint_losses(rng_0, x, schedule=schedule, encoder=enc, num_levels=num_levels)
  diff = diffusion_loss(x, t, jax.random.normal(rng_e, x.shape), schedule=schedule, encoder=enc,
                        eps_fn=eps_fn, num_steps=num_steps, model_shift=model_shift)
  return prior + recon + diff, {"prior": prior, "recon": recon, "diff": diff}
