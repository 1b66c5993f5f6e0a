"""Tests of vdiff.diffenc (DiffEnc, Nielsen et al. ICLR 2024, arXiv:2310.19789) and vdiff.nets.encoder.

References used below:
  * VDM's losses (vdiff.vdm, arXiv:2107.00630): the identity encoder with d_hat = 0 must reproduce them.
  * Exact per-step Gaussian KLs of the DiffEnc reverse process, evaluated independently in float64 numpy
    from the joint-Gaussian posterior (docs/math.md sec. 3): their T-step sum must converge to the library's
    continuous-time loss as T grows.
  * E[x | z] of Gaussian data x ~ N(mu, s^2) (docs/math.md sec. 7) pushed through the non-trainable encoder:
    z = alpha^3 x + sigma eps, so E[eps | z] = sigma (z - alpha^3 mu) / (alpha^6 s^2 + sigma^2).
  * Closed-form encoder derivatives: d(alpha^2 x)/d gamma = -sigma^2 alpha^2 x; central finite differences.
  * The published v-form of the loss (DiffEnc code; docs/math.md sec. 3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import diffenc
from vdiff import schedules
from vdiff import vdm
from vdiff.nets import encoder as encoder_net

MU, S = 0.1, 0.5  # Gaussian data N(MU, S^2) for the analytic denoiser.


def _gaussian_eps_fn(schedule, *, power=3):
  """E[eps | z] for x ~ N(MU, S^2), z = alpha^power x + sigma eps (power 1: VDM; 3: non-trainable enc)."""

  def eps_fn(z, t):
    g = vdm.bcast(schedule.gamma(t), z)
    a, s = schedules.alpha_from_gamma(g), schedules.sigma_from_gamma(g)
    ap = a ** power
    return s * (z - ap * MU) / (ap * ap * S ** 2 + s * s)

  return eps_fn


def _smooth_y_fn(x, gamma):
  """A smooth stand-in for y_phi with a non-trivial gamma dependence."""
  return jnp.tanh(0.7 * x + 0.3 * jnp.sin(0.5 * vdm.bcast(gamma, x)) + 0.1 * x * vdm.bcast(gamma, x))


def _data(batch=4, shape=(3,), seed=0):
  rng = np.random.RandomState(seed)
  x = rng.uniform(-1, 1, (batch,) + shape).astype(np.float32)
  eps = rng.randn(batch, *shape).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(eps)


SCHEDULES = {"linear": schedules.linear(), "cosine": schedules.cosine()}


# ----------------------------------------------------------------------------------------------------
# Identity encoder == VDM.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [None, 10])
def test_identity_encoder_without_shift_is_vdm(schedule_name, num_steps):
  # Reference: vdm.diffusion_loss (docs/math.md sec. 3: SNR ||x - x_hat||^2 = ||eps - eps_hat||^2).
  schedule = SCHEDULES[schedule_name]
  x, eps = _data(batch=6)
  t = jnp.linspace(0.01, 0.99, 6)
  eps_fn = _gaussian_eps_fn(schedule, power=1)
  ours = jax.jit(functools.partial(diffenc.diffusion_loss, schedule=schedule,
                                   encoder=diffenc.identity_encoder(), eps_fn=eps_fn,
                                   num_steps=num_steps, model_shift=False))(x, t, eps)
  ref = vdm.diffusion_loss(x, t, eps, schedule=schedule, eps_fn=eps_fn, num_steps=num_steps)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)  # jit vs eager rounding


def test_identity_encoder_negative_elbo_is_vdm():
  # Reference: vdm.negative_elbo with the same rng (same t, eps, decoder noise).
  schedule = schedules.linear()
  x = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 2, 2, 1)) / 127.5 - 1.0, jnp.float32)
  eps_fn = _gaussian_eps_fn(schedule, power=1)
  rng = jax.random.PRNGKey(3)
  ours, terms = jax.jit(functools.partial(
      diffenc.negative_elbo, schedule=schedule, encoder=diffenc.identity_encoder(), eps_fn=eps_fn,
      num_levels=256, model_shift=False))(rng, x)
  ref, ref_terms = jax.jit(functools.partial(
      vdm.negative_elbo, schedule=schedule, eps_fn=eps_fn, num_levels=256))(rng, x)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  for k in ("prior", "recon", "diff"):
    np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-6)


def test_negative_elbo_uses_encoded_endpoints():
  # Reference: docs/math.md sec. 3 -- prior on x_1 = enc(x, gamma_1), reconstruction on x_0 = enc(x, gamma_0).
  schedule = schedules.linear()
  x, _ = _data(batch=3, shape=(2, 2, 1))
  enc = diffenc.nontrainable_encoder()
  rng = jax.random.PRNGKey(0)
  _, terms = jax.jit(functools.partial(diffenc.negative_elbo, schedule=schedule, encoder=enc,
                                       eps_fn=_gaussian_eps_fn(schedule), num_levels=256))(rng, x)
  g0, g1 = schedule.endpoints()
  # rtol: x - sigma^2 x and alpha^2 x round differently.
  np.testing.assert_allclose(terms["prior"], vdm.prior_loss(schedules.alpha2_from_gamma(g1) * x, g1),
                             rtol=1e-5)
  eps0 = jax.random.normal(jax.random.split(rng, 3)[1], x.shape)
  np.testing.assert_allclose(
      terms["recon"], vdm.reconstruction_loss(eps0, x, g0, num_levels=256,
                                              x_mean=schedules.alpha2_from_gamma(g0) * x),
      rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# T-step loss from exact per-step KLs -> continuous loss.
# ----------------------------------------------------------------------------------------------------
G0, G1 = schedules.GAMMA_MIN, schedules.GAMMA_MAX


def _np_terms(g):
  a2, s2 = 1.0 / (1.0 + np.exp(g)), 1.0 / (1.0 + np.exp(-g))
  return np.sqrt(a2), np.sqrt(s2), a2, s2


def _np_x_hat(z, g):
  """E[x_t | z_t] = alpha^2 E[x | z] for x ~ N(MU, S^2), z = alpha^3 x + sigma eps (float64)."""
  a, _, a2, s2 = _np_terms(g)
  return a2 * (MU + a ** 3 * S ** 2 * (z - a ** 3 * MU) / (a ** 6 * S ** 2 + s2))


def _reference_step_kls(x, eps, num_steps):
  """KL(q(z_s | z_t, x) || p(z_s | z_t)) for every step i = 1..T, [T, B], float64, fixed eps.

  q: the joint Gaussian of z_s ~ N(alpha_s x_s, sigma_s^2), z_t | z_s ~ N(alpha_{t|s} z_s + alpha_t (x_t
  - x_s), sigma_{t|s}^2) gives mu_Q = alpha_s x_s + (alpha_{t|s} sigma_s^2 / sigma_t^2)(z_t - alpha_t x_t),
  var_Q = sigma_{t|s}^2 sigma_s^2 / sigma_t^2. p: the same with x_s, x_t -> x_hat plus the modelled shift
  alpha_s (gamma_s - gamma_t)(-sigma_t^2 x_hat), and var_P = var_Q (docs/math.md sec. 3, w = 1).
  Linear schedule, non-trainable encoder x_t = alpha_t^2 x, Gaussian-optimal x_hat.
  """
  i = np.arange(1, num_steps + 1)[:, None, None]
  gt = G0 + (G1 - G0) * i / num_steps
  gs = G0 + (G1 - G0) * (i - 1) / num_steps
  at, st, at2, st2 = _np_terms(gt)
  as_, _, as2, ss2 = _np_terms(gs)
  xt, xs = at2 * x, as2 * x
  z = at * xt + st * eps
  ats = at / as_
  sts2 = st2 - ats ** 2 * ss2
  k = ats * ss2 / st2
  mu_q = as_ * xs + k * (z - at * xt)
  xh = _np_x_hat(z, gt)
  mu_p = as_ * xh + k * (z - at * xh) + as_ * (gs - gt) * (-st2 * xh)
  var_q = sts2 * ss2 / st2
  return np.sum((mu_q - mu_p) ** 2 / (2 * var_q), axis=-1)


def test_t_step_loss_converges_to_continuous():
  # References: float64 per-step Gaussian KLs (above) and the continuous formula of docs/math.md sec. 3
  # evaluated in float64; the library's float32 losses must match both, and the T-step sum must approach
  # the continuous integral at rate O(1/T).
  schedule = schedules.linear()
  enc = diffenc.nontrainable_encoder()
  eps_fn = _gaussian_eps_fn(schedule)
  rng = np.random.RandomState(0)
  b, d = 4, 3
  x = rng.uniform(-1, 1, (b, d))
  eps = rng.randn(b, d)

  def tile(a, n):
    return jnp.asarray(np.tile(a[None], (n, 1, 1)).reshape(-1, d), jnp.float32)

  loss = jax.jit(lambda x, t, e, num_steps: diffenc.diffusion_loss(
      x, t, e, schedule=schedule, encoder=enc, eps_fn=eps_fn, num_steps=num_steps),
                 static_argnums=3)

  # Continuous loss at N midpoints (midpoint rule for the integral over t).
  n = 4096
  tt = (np.arange(n) + 0.5) / n
  cont = np.asarray(loss(tile(x, n), jnp.asarray(np.repeat(tt, b), jnp.float32), tile(eps, n), None))
  cont = cont.reshape(n, b)
  g = (G0 + (G1 - G0) * tt)[:, None, None]
  a, s, a2, s2 = _np_terms(g)
  xt = a2 * x
  xh = _np_x_hat(a * xt + s * eps, g)
  cont_ref = 0.5 * (G1 - G0) * np.sum(
      np.exp(-g) * ((xt - xh) - (-s2 * a2 * x + s2 * xh)) ** 2, axis=-1)
  # Float32 agreement; the absolute slack covers t ~ 1 where the loss is ~1e-6 nats and eps - eps_hat
  # is a cancellation inside the (float32) model itself.
  np.testing.assert_allclose(cont, cont_ref, rtol=1e-5, atol=1e-4)
  integral = cont.mean(axis=0)

  errors = []
  for num_steps in (10, 100, 1000):
    kl = _reference_step_kls(x, eps, num_steps)  # [T, B]
    tm = (np.arange(1, num_steps + 1) - 0.5) / num_steps
    ours = np.asarray(loss(tile(x, num_steps), jnp.asarray(np.repeat(tm, b), jnp.float32),
                           tile(eps, num_steps), num_steps)).reshape(num_steps, b)
    # T-step loss at step i = T KL_i (float32 vs float64). rtol: at T = 1000, Delta = gamma_t - gamma_s
    # ~ 0.018 is a difference of float32 gammas ~ -13 (rounding ~1e-6), i.e. ~5e-5 relative in
    # expm1(Delta); the atol covers t ~ 1 as above.
    np.testing.assert_allclose(ours, num_steps * kl, rtol=1e-4, atol=1e-4)
    errors.append(np.max(np.abs(kl.sum(0) - integral) / integral))
  # Observed relative errors: ~1.8, ~0.09, ~0.009 (first order in 1/T).
  assert errors[0] > 5 * errors[1] > 25 * errors[2], errors
  assert errors[2] < 0.015, errors


# ----------------------------------------------------------------------------------------------------
# Alternative forms of the same loss.
# ----------------------------------------------------------------------------------------------------
def test_v_form_of_published_code():
  # Reference: DiffEnc's published v-form, 1/2 gamma' alpha^2 ||v - v_hat + sigma (x_hat - x_t + y +
  # dy/dgamma)||^2 with v = alpha eps - sigma x_t, v_hat = alpha eps_hat - sigma x_hat (docs/math.md sec. 3).
  schedule = schedules.cosine()
  enc = diffenc.trainable_encoder(_smooth_y_fn)
  eps_fn = _gaussian_eps_fn(schedule)
  x, eps = _data(batch=5)
  t = jnp.linspace(0.05, 0.95, 5)

  @jax.jit
  def both(x, t, eps):
    ours = diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, eps_fn=eps_fn)
    gamma, dgamma = schedule.gamma_and_dgamma(t)
    g = vdm.bcast(gamma, x)
    a, s = schedules.alpha_from_gamma(g), schedules.sigma_from_gamma(g)
    y, dy = jax.jvp(lambda gg: _smooth_y_fn(x, gg), (gamma,), (jnp.ones_like(gamma),))
    xt = a * a * x + s * s * y
    z = a * xt + s * eps
    eps_hat = eps_fn(z, t)
    x_hat = (z - s * eps_hat) / a
    v, v_hat = a * eps - s * xt, a * eps_hat - s * x_hat
    ref = 0.5 * dgamma * jnp.sum((a * (v - v_hat + s * (x_hat - xt + y + dy))) ** 2, axis=-1)
    return ours, ref

  ours, ref = both(x, t, eps)
  np.testing.assert_allclose(ours, ref, rtol=1e-4)


@pytest.mark.parametrize("num_steps", [None, 50])
def test_x_hat_fn_matches_eps_fn(num_steps):
  # Reference: the same model given as x_hat = (z - sigma eps_hat) / alpha (docs/math.md sec. 0).
  schedule = schedules.linear()
  enc = diffenc.nontrainable_encoder()
  eps_fn = _gaussian_eps_fn(schedule)

  def x_hat_fn(z, t):
    g = vdm.bcast(schedule.gamma(t), z)
    return vdm.x_from_eps(z, eps_fn(z, t), schedules.alpha_from_gamma(g),
                          schedules.sigma_from_gamma(g))

  x, eps = _data(batch=5)
  t = jnp.linspace(0.1, 0.9, 5)
  a = diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, eps_fn=eps_fn,
                             num_steps=num_steps)
  b = diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, x_hat_fn=x_hat_fn,
                             num_steps=num_steps)
  np.testing.assert_allclose(a, b, rtol=1e-4)


def test_nontrainable_shift_is_exact_for_perfect_prediction():
  # Reference: d_hat = -sigma^2 x_hat is the exact derivative of alpha^2 x when x_hat = x_t (docs/math.md
  # sec. 3), so a model that predicts x_t exactly has zero continuous loss; without the shift it does not.
  schedule = schedules.linear()
  enc = diffenc.nontrainable_encoder()
  x, eps = _data(batch=4)
  t = jnp.array([0.02, 0.3, 0.6, 0.95])
  oracle = lambda z, tt: eps  # eps_hat = eps  <=>  x_hat = x_t
  with_shift = diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, eps_fn=oracle)
  without = diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, eps_fn=oracle,
                                   model_shift=False)
  np.testing.assert_allclose(with_shift, 0.0, atol=1e-10)
  assert np.all(without > 0) and np.max(without) > 0.1


# ----------------------------------------------------------------------------------------------------
# Encoder derivatives.
# ----------------------------------------------------------------------------------------------------
ENCODERS = {
    "identity": diffenc.identity_encoder,
    "nontrainable": diffenc.nontrainable_encoder,
    "trainable": lambda: diffenc.trainable_encoder(_smooth_y_fn),
    "function": lambda: lambda x, g: jnp.cos(0.2 * vdm.bcast(g, x)) * x,  # a plain callable
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_jvp_matches_finite_differences(name):
  # Reference: central finite differences in float64, (enc(g + h) - enc(g - h)) / 2h, error O(h^2).
  enc = ENCODERS[name]()
  with jax.enable_x64(True):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 3)), jnp.float64)
    gamma = jnp.asarray([-13.3, -4.0, 0.5, 5.0], jnp.float64)
    xt, dxt = diffenc.encoder_and_derivative(enc, x, gamma)
    h = 1e-5
    fd = (enc(x, gamma + h) - enc(x, gamma - h)) / (2 * h)
    np.testing.assert_allclose(xt, enc(x, gamma), rtol=1e-14)
    np.testing.assert_allclose(dxt, fd, rtol=1e-6, atol=1e-10)
  if name == "nontrainable":  # closed form: d(alpha^2 x)/d gamma = -sigma^2 alpha^2 x
    np.testing.assert_allclose(dxt, -(jax.nn.sigmoid(gamma) * jax.nn.sigmoid(-gamma))[:, None] * x,
                               rtol=1e-10)


def test_nontrainable_derivative_is_accurate_in_float32_at_low_noise():
  # Reference: float64 closed form -sigma^2 alpha^2 x. At gamma = -13.3 a jvp of sigmoid(-gamma) would
  # give alpha^2 (1 - alpha^2) with ~2 correct digits; the encoder is written through sigma^2 instead.
  x = jnp.array([[0.5, -0.9, 0.1]], jnp.float32)
  gamma = jnp.array([-13.3], jnp.float32)
  _, dxt = diffenc.encoder_and_derivative(diffenc.nontrainable_encoder(), x, gamma)
  g = -13.3
  ref = -(1 / (1 + np.exp(-g))) * (1 / (1 + np.exp(g))) * np.asarray(x, np.float64)
  np.testing.assert_allclose(dxt, ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The encoder network and the trainable encoder at initialisation.
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_net():
  # One level (attention inside it) keeps XLA's CPU compile short; multi-level shapes are checked by
  # shape inference in test_encoder_net_shapes_and_zero_init.
  net = encoder_net.EncoderUNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                                num_groups=4)
  x = jnp.zeros((2, 8, 8, 1), jnp.float32)
  # An rbg key: compiling the initialisers with the default threefry key takes ~4x longer on CPU.
  params = jax.jit(net.init)(jax.random.key(0, impl="rbg"), x, jnp.zeros((2,)))["params"]
  return net, params


def test_encoder_net_shapes_and_zero_init(tiny_net):
  # Reference: DiffEnc sec. 4 -- tanh of a zero-initialised output layer, so y = 0 at init.
  net, params = tiny_net
  x, _ = _data(batch=2, shape=(8, 8, 1))
  y = jax.jit(lambda p, x, g: net.apply({"params": p}, x, g))(params, x, jnp.array([0.1, 0.9]))
  assert y.shape == x.shape
  np.testing.assert_array_equal(y, 0.0)
  # Multi-level networks on 8x8x1 and 32x32x3 by shape inference only (no compilation: fast on CPU).
  for shape, ch_mult, attn in (((2, 8, 8, 1), (1, 2), (4,)), ((2, 32, 32, 3), (1, 2, 2), (8,))):
    big = encoder_net.EncoderUNet(ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
                                  num_groups=8)
    xs = jax.ShapeDtypeStruct(shape, jnp.float32)
    gs = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    variables = jax.eval_shape(big.init, jax.random.PRNGKey(0), xs, gs)
    out = jax.eval_shape(lambda v, x, g: big.apply(v, x, g), variables, xs, gs)
    assert out.shape == shape and out.dtype == jnp.float32


def test_trainable_encoder_at_init_equals_nontrainable(tiny_net):
  # Reference: DiffEnc sec. 4 -- at init y = 0, so alpha^2 x + sigma^2 y = alpha^2 x and the losses agree.
  net, params = tiny_net
  schedule = schedules.linear()
  trainable = diffenc.trainable_encoder(diffenc.y_fn_from_module(net, params))
  fixed = diffenc.nontrainable_encoder()
  x, _ = _data(batch=2, shape=(8, 8, 1))
  eps_fn = _gaussian_eps_fn(schedule)

  @jax.jit
  def both(rng):
    out = []
    for enc in (trainable, fixed):
      nelbo, terms = diffenc.negative_elbo(rng, x, schedule=schedule, encoder=enc, eps_fn=eps_fn,
                                           num_levels=256)
      out.append((nelbo, terms["prior"], terms["recon"], terms["diff"]))
    return out

  ours, ref = both(jax.random.PRNGKey(5))
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_trainable_encoder_with_network_jvp_matches_finite_differences(tiny_net):
  # References: central finite differences (float32, h = 1e-2: observed relative error ~1e-5), and the
  # product rule d/dgamma [sigma^2 (y - x)] = sigma^2 alpha^2 (y - x) + sigma^2 dy/dgamma.
  net, params = tiny_net
  # Perturb the zero output layer so that y depends on x and gamma.
  params = dict(params)
  params["conv_out"] = jax.tree_util.tree_map(
      lambda p: 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params["conv_out"])
  y_fn = diffenc.y_fn_from_module(net, params)
  enc = diffenc.trainable_encoder(y_fn)
  x, _ = _data(batch=2, shape=(8, 8, 1))
  gamma = jnp.array([-6.0, 1.0], jnp.float32)
  h = 1e-2

  @jax.jit
  def run(gamma):
    _, d = diffenc.encoder_and_derivative(enc, x, gamma)
    fd = (enc(x, gamma + h) - enc(x, gamma - h)) / (2 * h)
    y, dy = jax.jvp(lambda g: y_fn(x, g), (gamma,), (jnp.ones_like(gamma),))
    s2 = vdm.bcast(jax.nn.sigmoid(gamma), x)
    return d, fd, s2 * (1 - s2) * (y - x) + s2 * dy, y

  d, fd, product_rule, y = run(gamma)
  assert np.max(np.abs(y)) > 1e-2  # y is non-trivial
  scale = np.max(np.abs(d))
  np.testing.assert_allclose(d, fd, rtol=0, atol=1e-3 * scale)
  np.testing.assert_allclose(d, product_rule, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("num_steps", [1000, 10_000])
def test_t_step_weight_matches_float64(num_steps):
  # With x = 0 the non-trainable encoder's offsets vanish; with d_hat = 0 (model_shift=False), eps = 1 and
  # eps_hat = 0 the T-step loss is T/2 expm1(gamma_t - gamma_s) D, exactly T/2 expm1((g1 - g0) / T) for
  # the linear schedule (reference: float64), on every step i = 1..T. A weight from float32 t, s and
  # two float32 gammas is off by 3.0e-5 (T = 1000) and 3.0e-4 (T = 10^4) relatively under jit.
  T = num_steps
  t = (jnp.arange(T, dtype=jnp.float32) + 0.5) / T
  loss = jax.jit(lambda t: diffenc.diffusion_loss(
      jnp.zeros((T, 1)), t, jnp.ones((T, 1)), schedule=schedules.linear(),
      encoder=diffenc.nontrainable_encoder(), eps_fn=lambda z, t: jnp.zeros_like(z), num_steps=T,
      model_shift=False))(t)
  ref = 0.5 * T * np.expm1((schedules.GAMMA_MAX - schedules.GAMMA_MIN) / T)
  err = np.max(np.abs(np.asarray(loss, np.float64) / ref - 1.0))
  assert err < 1e-6, err


def _tiny_family(encoder_kind):
  from vdiff import models
  return models.DiffEncFamily(
      encoder_kind=encoder_kind, encoder_kwargs=dict(ch=4, ch_mult=(1,), num_res_blocks=1,
                                                     attn_resolutions=(), num_groups=2),
      data_shape=(4, 4, 1), num_levels=17, schedule=models.ScheduleSpec("linear"),
      score_kwargs=dict(ch=4, num_blocks=1, dropout=0.0, attention=False, num_groups=2))


@pytest.mark.parametrize("encoder_kind", ["identity", "nontrainable", "trainable"])
def test_family_sample_gives_every_sampler_the_encoder_shift(encoder_kind, monkeypatch):
  # DiffEncFamily.sample must call each sampler with encoder_shift=True (identity encoder: False) and
  # clip_x0 only where given; every sampler is supported, and a sampler the family does not know, or
  # clip_x0 for a sampler that never clips, is refused by name before any sampling work (params=None).
  # The samplers are replaced by recorders (their maths is tested in test_samplers.py).
  from vdiff import config_schema, samplers
  calls = {}
  for fn_name in ("vdm_ancestral", "ddpm", "ddim", "probability_flow_sample"):
    monkeypatch.setattr(samplers, fn_name, lambda *a, _n=fn_name, **kw: calls.setdefault(_n, kw))
  # probability_flow_sample(..., return_nfe=True) returns (samples, nfe per example).
  monkeypatch.setattr(samplers, "probability_flow_sample",
                      lambda *a, **kw: (calls.setdefault("probability_flow_sample", kw), jnp.zeros(3)))
  fam = _tiny_family(encoder_kind)
  fam.schedule = lambda params: schedules.linear()       # params=None: nothing is initialised
  fam.guided_eps_fn = lambda params, label, w: (lambda z, t: z)
  assert fam.supported_samplers == config_schema.SAMPLERS
  rng = jax.random.PRNGKey(1)
  for name in ("vdm_ancestral", "ddpm", "ddim", "ode"):  # (the others: tests/test_cli.py, test_dpm_solver.py)
    fam.sample(None, rng, 3, num_steps=4, sampler=name)
  assert sorted(calls) == ["ddim", "ddpm", "probability_flow_sample", "vdm_ancestral"]
  for kw in calls.values():
    assert kw["encoder_shift"] is (encoder_kind != "identity") and kw["num_levels"] == 17
    assert "clip_x0" not in kw                           # None: the sampler's own default
  calls.clear()
  fam.sample(None, rng, 3, num_steps=4, sampler="ddim", clip_x0=True)
  assert calls["ddim"]["clip_x0"] is True
  with pytest.raises(ValueError, match="sample.sampler='euler' is not supported"):
    fam.sample(None, rng, 3, sampler="euler")
  with pytest.raises(ValueError, match="sample.clip_x0=True applies to the samplers"):
    fam.sample(None, rng, 3, sampler="vdm_ancestral", clip_x0=True)
  with pytest.raises(ValueError, match="sample.clip_x0 must be None"):
    fam.sample(None, rng, 3, sampler="ddpm", clip_x0="yes")


# ----------------------------------------------------------------------------------------------------
# Cost of the trainable-encoder step on small data (experiments/configs/known_density.py: 4x4x1).
# ----------------------------------------------------------------------------------------------------
def _convs_on_small_maps(jaxpr) -> list:
  """Input shapes of every conv_general_dilated (nested jaxprs included) whose (dilated) spatial input is
  smaller than its kernel: the convolutions XLA's CPU backend runs in a slow kernel-input-swapped form."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      dilation = eqn.params["lhs_dilation"]  # a transposed conv's input, dilated: (s - 1) d + 1
      spatial = [(lhs[d] - 1) * r + 1 for d, r in zip(dn.lhs_spec[2:], dilation)]
      window = [rhs[d] for d in dn.rhs_spec[2:]]
      if any(s < k for s, k in zip(spatial, window)):
        found.append(lhs)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _convs_on_small_maps(sub)
  return found


def test_encoder_convolutions_on_maps_smaller_than_the_kernel_are_matmuls(monkeypatch):
  """The encoder U-Net on 4x4 data (ch_mult (1, 2): 2x2 maps under 3x3 kernels), differentiated as in
  training (jvp in gamma, then the gradient in the parameters): no convolution on a map smaller than its
  kernel remains (vdiff.nets.layers.conv_general_dilated makes them matmuls), and the loss and every
  gradient equal those of plain lax convolutions to float32 rounding (the reference: the same network
  with lax.conv_general_dilated patched back in)."""
  net = encoder_net.EncoderUNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 4, 4, 1), minval=-1.0, maxval=1.0)
  params = net.init(jax.random.PRNGKey(1), x, jnp.zeros((1,)))["params"]
  # Perturb the zero-initialised output conv (and everything else) so that y and its derivative are
  # not identically zero.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  gamma = jnp.linspace(-13.3, 5.0, 8)

  def make_value_and_grad():  # a new function each time: jit and make_jaxpr cache by function

    def loss(p):
      enc = diffenc.trainable_encoder(diffenc.y_fn_from_module(net, p))
      offset, doffset = diffenc.encoder_and_derivative(enc.offset, x, gamma)
      return jnp.sum(jnp.square(offset)) + jnp.sum(jnp.square(doffset))

    return jax.value_and_grad(loss)

  small = _convs_on_small_maps(jax.make_jaxpr(make_value_and_grad())(params).jaxpr)
  assert not small, f"{len(small)} convolutions on maps smaller than the kernel, inputs {small[:4]}"
  value, grads = jax.jit(make_value_and_grad())(params)
  monkeypatch.setattr(encoder_net.layers, "conv_general_dilated", jax.lax.conv_general_dilated)
  ref_value, ref_grads = jax.jit(make_value_and_grad())(params)
  assert _convs_on_small_maps(jax.make_jaxpr(make_value_and_grad())(params).jaxpr)  # reference: has them
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  # Rounding of a gradient sum in another order scales with the largest gradients, not with each leaf's
  # own size: some leaves are exactly zero in exact arithmetic (a bias whose shift a GroupNorm removes)
  # and hold only float32 rounding noise (~1e-6 here) in both versions.
  scale = max(float(jnp.abs(r).max()) for r in jax.tree.leaves(ref_grads))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale, err_msg=f"gradient scale {scale}")


def test_known_density_trainable_step_costs_at_most_3x_the_vdm_step():
  """experiments/configs/known_density.py: XLA's FLOP count of the DiffEnc train loss and gradient with
  the trainable encoder stays within 3x that of the VDM loss and gradient on the same 4x4x1 batch of 128
  (the encoder is sized for 4x4 data; the base default encoder made it 26x). Lowered, not compiled:
  cost analysis of the unoptimised program, the same count for both."""
  from experiments.configs import known_density
  from vdiff import models

  def flops(family):
    config = known_density.get_config(family)
    model = models.from_config(config.model, data_shape=(4, 4, 1), num_levels=256, num_labels=10)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    batch = {"image": jax.ShapeDtypeStruct((config.training.batch_size, 4, 4, 1), jnp.int32),
             "label": jax.ShapeDtypeStruct((config.training.batch_size,), jnp.int32)}
    fn = jax.value_and_grad(lambda p, r, b: jnp.mean(model.loss(p, r, b, train=True)[0]))
    cost = jax.jit(fn).lower(params, jax.random.PRNGKey(0), batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  vdm_flops, diffenc_flops = flops("vdm"), flops("diffenc,trainable")
  assert diffenc_flops <= 3.0 * vdm_flops, (diffenc_flops, vdm_flops, diffenc_flops / vdm_flops)
