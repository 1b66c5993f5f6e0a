"""VDM negative ELBO: closed forms for Gaussian data (docs/math.md section 7) and direct computations."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from vdiff import likelihood
from vdiff import schedules as S
from vdiff import vdm

G0, G1 = -13.3, 5.0


def gaussian_eps_fn(schedule, mu, s):
  """The optimal denoiser of x ~ N(mu, s^2 I): E[eps | z] = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2)."""

  def eps_fn(z, t):
    g = vdm.bcast(schedule.gamma(t), z)
    a, sg = S.alpha_from_gamma(g), S.sigma_from_gamma(g)
    return sg * (z - a * mu) / (a ** 2 * s ** 2 + sg ** 2)

  return eps_fn


def closed_form_ldiff(d, s, g0, g1):
  """docs/math.md sec. 7: E L_diff = D/2 [(g1 - log(s^2 + e^g1)) - (g0 - log(s^2 + e^g0))]."""
  f = lambda g: g - math.log(s ** 2 + math.exp(g))
  return d / 2 * (f(g1) - f(g0))


def _pinned_random_shape():
  module = S.PinnedMonotoneGamma()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros(1))["params"]
  params["shape"]["l2"]["kernel"] = 4.0 * jax.random.normal(jax.random.PRNGKey(3), (1, 1024))
  params["shape"]["l3"]["kernel"] = 500.0 * jnp.abs(jax.random.normal(jax.random.PRNGKey(4), (1024, 1)))
  return S.from_module(module, params)


SAME_ENDPOINTS = {
    "linear": S.linear(gamma_min=G0, gamma_max=G1),
    "cosine": S.cosine(gamma_min=G0, gamma_max=G1),
    "quadratic": S.from_function(lambda t: G0 + (G1 - G0) * t ** 2),
    "pinned_net": _pinned_random_shape(),
}


@pytest.mark.parametrize("name", sorted(SAME_ENDPOINTS))
def test_continuous_diffusion_loss_matches_closed_form(name):
  sched = SAME_ENDPOINTS[name]
  d, mu, s, n = 8, 0.3, 0.5, 40_000
  rng = jax.random.PRNGKey(0)
  kx, kt, ke = jax.random.split(rng, 3)
  x = mu + s * jax.random.normal(kx, (n, d))
  t = vdm.sample_times(kt, n, antithetic=False)
  eps = jax.random.normal(ke, (n, d))
  loss = jax.jit(lambda x, t, e: vdm.diffusion_loss(x, t, e, schedule=sched,
                                                    eps_fn=gaussian_eps_fn(sched, mu, s)))(x, t, eps)
  chex.assert_shape(loss, (n,))
  mean, se = float(jnp.mean(loss)), float(jnp.std(loss) / math.sqrt(n))
  ref = closed_form_ldiff(d, s, G0, G1)
  assert abs(mean - ref) < 3 * se, (name, mean, ref, se)


def _exact_tstep(sched, d, s, T):
  """E over i, eps of the T-step loss with the optimal denoiser: 1/2 sum_i expm1(g_i - g_{i-1}) D s^2/(s^2 + e^g_i)."""
  g = np.asarray(sched.gamma(jnp.arange(T + 1) / T), np.float64)
  return 0.5 * np.sum(np.expm1(g[1:] - g[:-1]) * d * s ** 2 / (s ** 2 + np.exp(g[1:])))


def test_tstep_loss_approaches_continuous():
  # Linear gamma: the per-step excess is expm1(dg) - dg ~ dg^2 / 2 with dg = (g1 - g0) / T, so the
  # relative gap shrinks as 1/T (factor 10 per decade of T). (A cosine schedule converges too, but its
  # steep start, dg ~ 1.5 in the first of 1000 steps, makes the gap 28% at T = 1000.)
  sched, d, s = S.linear(gamma_min=G0, gamma_max=G1), 8, 0.5
  ref = closed_form_ldiff(d, s, G0, G1)
  errs = [abs(_exact_tstep(sched, d, s, T) - ref) for T in (10, 100, 1000)]
  assert errs[0] > errs[1] > errs[2]
  assert 8 < errs[1] / errs[2] < 12
  assert errs[2] / ref < 1e-2
  # The T-step loss exceeds the continuous one (more steps = tighter bound, VDM sec. 3.3).
  assert _exact_tstep(sched, d, s, 10) > ref
  # And the implementation's Monte-Carlo estimate agrees with the exact sum at T = 10.
  n, mu = 40_000, 0.0
  kx, kt, ke = jax.random.split(jax.random.PRNGKey(1), 3)
  x = mu + s * jax.random.normal(kx, (n, d))
  t = vdm.sample_times(kt, n)
  loss = vdm.diffusion_loss(x, t, jax.random.normal(ke, (n, d)), schedule=sched,
                            eps_fn=gaussian_eps_fn(sched, mu, s), num_steps=10)
  mean, se = float(jnp.mean(loss)), float(jnp.std(loss) / math.sqrt(n))
  assert abs(mean - _exact_tstep(sched, d, s, 10)) < 3 * se


def test_prior_kl_matches_direct_computation():
  # KL(N(a x, s^2) || N(0, 1)) = log(1/s) + (s^2 + a^2 x^2)/2 - 1/2 per dimension, in float64.
  x = np.linspace(-1, 1, 24).reshape(2, 3, 4)
  for g1 in (5.0, 0.0, -2.0):
    a2, s2 = 1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))
    ref = np.sum(-0.5 * math.log(s2) + (s2 + a2 * x ** 2) / 2 - 0.5, axis=(1, 2))
    got = vdm.prior_loss(jnp.asarray(x, jnp.float32), g1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_reconstruction_probabilities(num_levels):
  # p(x | z_0) over the K levels sums to 1 for every dimension.
  z = jnp.linspace(-1.2, 1.2, 7)
  for g0 in (-13.3, -5.0, 0.0):
    lp = vdm.decoder_log_probs(z, jnp.float32(g0), num_levels=num_levels)
    np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)).sum(-1), 1.0, atol=1e-5)
  # The loss equals an independent float64 computation with scipy's logsumexp.
  k = jax.random.randint(jax.random.PRNGKey(0), (3, 5), 0, num_levels)
  x = likelihood.encode(k, num_levels)
  eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  g0 = -3.0
  got = vdm.reconstruction_loss(eps, x, g0, num_levels=num_levels)
  xs = np.asarray(x, np.float64)
  zoa = xs + math.exp(g0 / 2) * np.asarray(eps, np.float64)
  centres = 2 * (np.arange(num_levels) + 0.5) / num_levels - 1
  logits = -0.5 * (zoa[..., None] - centres) ** 2 / math.exp(g0)
  lp = logits - logsumexp(logits, axis=-1, keepdims=True)
  ref = -np.take_along_axis(lp, np.asarray(k)[..., None], -1)[..., 0].sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_reconstruction_is_nearly_free_at_low_noise():
  # At gamma_0 = -13.3 the noise std exp(-6.65) ~ 1.3e-3 is tiny against the bin width 2/256:
  # -log p(x|z_0) per dim is below 1e-3 nats.
  k = jnp.arange(256).reshape(1, 256)
  x = likelihood.encode(k, 256)
  eps = jax.random.normal(jax.random.PRNGKey(0), x.shape)
  loss = float(vdm.reconstruction_loss(eps, x, -13.3, num_levels=256)[0]) / 256
  assert 0 <= loss < 1e-3


def test_parameterisations_round_trip():
  kx, ke, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (4, 6))
  eps = jax.random.normal(ke, (4, 6))
  g = vdm.bcast(jax.random.uniform(kg, (4,), minval=-10, maxval=4), x)
  a, s = S.alpha_from_gamma(g), S.sigma_from_gamma(g)
  z = a * x + s * eps
  v = vdm.v_from_x_eps(x, eps, a, s)
  np.testing.assert_allclose(vdm.x_from_eps(z, eps, a, s), x, atol=2e-3)  # 1/alpha amplifies at g = 4
  np.testing.assert_allclose(vdm.eps_from_x(z, x, a, s), eps, atol=2e-3)
  np.testing.assert_allclose(vdm.eps_from_v(z, v, a, s), eps, atol=1e-5)
  np.testing.assert_allclose(vdm.x_from_v(z, v, a, s), x, atol=1e-5)


def test_v_parameterised_eps_fn():
  # A network that outputs the exact v gives back the exact eps through make_eps_fn(..., "v").
  sched = S.linear()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  eps = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  t = jnp.linspace(0.1, 0.9, 5)
  g = vdm.bcast(sched.gamma(t), x)
  a, s = S.alpha_from_gamma(g), S.sigma_from_gamma(g)
  z = a * x + s * eps
  v = vdm.v_from_x_eps(x, eps, a, s)
  eps_fn = vdm.make_eps_fn(lambda z_, gn: v, sched, parameterization="v")
  np.testing.assert_allclose(eps_fn(z, t), eps, atol=1e-5)
  with pytest.raises(ValueError, match="parameterization"):
    vdm.make_eps_fn(lambda z_, gn: v, sched, parameterization="x")


def test_antithetic_times_are_stratified():
  t = np.asarray(vdm.sample_times(jax.random.PRNGKey(0), 64))
  assert t.min() >= 0 and t.max() < 1
  np.testing.assert_allclose(np.sort(np.diff(np.sort(t))), 1 / 64, atol=1e-6)


def test_negative_elbo_terms_and_jit():
  sched = S.linear()
  k = jax.random.randint(jax.random.PRNGKey(0), (6, 4, 4, 1), 0, 17)
  x = likelihood.encode(k, 17)
  eps_fn = lambda z, t: jnp.zeros_like(z)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(rng, x):
    return vdm.negative_elbo(rng, x, schedule=sched, eps_fn=eps_fn, num_levels=17)

  total, terms = f(jax.random.PRNGKey(1), x)
  total2, _ = f(jax.random.PRNGKey(2), x)  # no retrace
  chex.assert_shape([total, terms["prior"], terms["recon"], terms["diff"]], (6,))
  np.testing.assert_allclose(total, terms["prior"] + terms["recon"] + terms["diff"], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(total2)))


@pytest.mark.parametrize("num_steps", [1000, 10_000])
def test_t_step_weight_matches_float64(num_steps):
  # T-step L_diff = T/2 expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 with eps = 1, eps_hat = 0, D = 1:
  # exactly T/2 expm1((g1 - g0) / T) for the linear schedule (reference: float64). One example on every
  # step i = 1..T. Forming t = i/T and s = (i-1)/T in float32 first and subtracting two float32 gammas
  # is off by 3.0e-5 (T = 1000) and 3.0e-4 (T = 10^4) relatively under jit; the (i, T) interface by
  # < 2e-7.
  T = num_steps
  t = (jnp.arange(T, dtype=jnp.float32) + 0.5) / T
  loss = jax.jit(lambda t: vdm.diffusion_loss(jnp.zeros((T, 1)), t, jnp.ones((T, 1)), schedule=S.linear(),
                                              eps_fn=lambda z, t: jnp.zeros_like(z), num_steps=T))(t)
  ref = 0.5 * T * np.expm1((G1 - G0) / T)
  err = np.max(np.abs(np.asarray(loss, np.float64) / ref - 1.0))
  assert err < 1e-6, err


def test_score_unet_at_init_outputs_z_and_what_that_means_per_parameterisation():
  # ScoreUNet's output conv is zero-initialised and z is skipped to the output: at init the network is
  # the identity in z. Through make_eps_fn that is eps_hat = z for "eps" and, since eps_hat = sigma z +
  # alpha v_hat (docs/math.md sec. 0), eps_hat = (sigma + alpha) z for "v", not z.
  from vdiff.nets import score
  net = score.ScoreUNet(ch=8, num_blocks=1, dropout=0.0, attention=False, num_groups=4)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  params = jax.jit(net.init)(jax.random.PRNGKey(1), z, jnp.zeros((3,)))
  sched = S.linear()
  apply_fn = lambda z, g: net.apply(params, z, g)
  t = jnp.array([0.1, 0.5, 0.9])

  @jax.jit
  def run(z, t):
    return (apply_fn(z, jnp.array([0.2, 0.4, 0.6])),
            vdm.make_eps_fn(apply_fn, sched, parameterization="eps")(z, t),
            vdm.make_eps_fn(apply_fn, sched, parameterization="v")(z, t))

  out, eps_eps, got = run(z, t)
  np.testing.assert_array_equal(out, z)
  np.testing.assert_array_equal(eps_eps, z)
  g = vdm.bcast(sched.gamma(t), z)
  want = (S.sigma_from_gamma(g) + S.alpha_from_gamma(g)) * z
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(np.asarray(got - z))) > 0.1


def test_elbo_refuses_bad_times_eagerly_and_propagates_nan_under_jit():
  # t must be floating-point times in [0, 1]: integer, NaN and out-of-range t are refused by name when
  # called eagerly. Under jit the values are not
  # known: a NaN time gives a NaN -ELBO for that example (never a finite, valid-looking value).
  sched = S.linear()
  x = jnp.full((3, 2), 0.25)
  eps_fn = gaussian_eps_fn(sched, 0.0, 0.5)
  rng = jax.random.PRNGKey(0)
  elbo = lambda t, **kw: vdm.negative_elbo(rng, x, schedule=sched, eps_fn=eps_fn, num_levels=16, t=t, **kw)
  with pytest.raises(TypeError, match="t must hold floating-point times"):
    elbo(jnp.array([0, 1, 1]))
  with pytest.raises(ValueError, match="t holds NaN"):
    elbo(jnp.array([0.2, jnp.nan, 0.4]))
  for bad in ([0.2, 1.5, 0.4], [-0.1, 0.5, 0.5]):
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\]"):
      elbo(jnp.array(bad))
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\]"):
      elbo(jnp.array(bad), num_steps=10)
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\]"):
      vdm.diffusion_loss(x, jnp.array(bad), x, schedule=sched, eps_fn=eps_fn)
  with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
    elbo(jnp.array([0.2, 0.3]))
  # The ends are valid (t = 1 is the last step of a T-step loss).
  for num_steps in (None, 10):
    assert np.all(np.isfinite(elbo(jnp.array([0.0, 1.0, 0.5]), num_steps=num_steps)[0]))
  nelbo = jax.jit(lambda t: elbo(t)[0])(jnp.array([0.2, jnp.nan, 0.4]))
  assert np.isnan(nelbo[1]) and np.all(np.isfinite(nelbo[jnp.array([0, 2])]))


def test_fourier_features_damped_by_the_noise_level():
  # Reference: E[sin(w z) | x] = sin(w alpha x) exp(-w^2 sigma^2 / 2) for z ~ N(alpha x, sigma^2), so each
  # feature is scaled by exp(-w^2 sigma^2 / 2), w = 2^n 2 pi; computed here in float64 numpy.
  from vdiff.nets import layers
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1)) * 0.5
  sigma = jnp.array([0.0, 0.002, 0.05])
  got = np.asarray(layers.fourier_features(z, n_min=6, n_max=8, sigma=sigma), np.float64)
  w = 2.0 ** np.arange(6, 8) * 2 * np.pi
  # The angle w z in float32, as the network forms it (|w z| ~ 400: float32 rounds it by ~3e-5 rad).
  zz = (np.asarray(z)[..., 0, None] * w.astype(np.float32)).astype(np.float64)  # [B, H, W, F]
  damp = np.exp(-0.5 * (np.asarray(sigma, np.float64)[:, None, None, None] * w) ** 2)
  want = np.concatenate([np.sin(zz) * damp, np.cos(zz) * damp], axis=-1)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # sigma = 0.002: w sigma = 0.804 and 1.608 -> factors exp(-0.323) = 0.7237 and exp(-1.293) = 0.2743.
  np.testing.assert_allclose(damp[1, 0, 0], [0.7237, 0.2743], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(layers.fourier_features(z, n_min=6, n_max=8)),
                                np.asarray(layers.fourier_features(z, n_min=6, n_max=8, sigma=jnp.zeros(3))))


def test_score_unet_fourier_damping_removes_the_features_at_high_noise():
  # With fourier_damping the network recovers sigma_t from g_norm (gamma = G0 + g_norm (G1 - G0)); at
  # g_norm = 1 (sigma^2 = sigmoid(5), w sigma ~ 400) the Fourier channels are exp(-8e4) = 0, so the first
  # conv's Fourier weights cannot change the output; at g_norm = 0 (sigma = 0.0013) they do.
  from vdiff.nets import score
  net = score.ScoreUNet(ch=8, num_blocks=1, dropout=0.0, attention=False, num_groups=4,
                        fourier_damping=True, gamma_min=G0, gamma_max=G1)
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
  params = net.init(jax.random.PRNGKey(2), z, jnp.zeros(2))["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  kernel = params["Conv_0"]["kernel"]  # [3, 3, 1 + 4, ch]: z, then the 4 Fourier channels
  assert kernel.shape[2] == 5
  moved = jax.tree.map(lambda p: p, params)
  moved["Conv_0"] = dict(params["Conv_0"], kernel=kernel.at[:, :, 1:].add(1.0))
  apply = jax.jit(lambda p, g: net.apply({"params": p}, z, g))  # one compilation for all four calls
  for g_norm, changes in ((1.0, False), (0.0, True)):
    g = jnp.full(2, g_norm)
    diff = float(jnp.max(jnp.abs(apply(params, g) - apply(moved, g))))
    assert (diff > 1e-2) if changes else (diff == 0.0), (g_norm, diff)
  # Undamped (the default), the same weights change the output at g_norm = 1 too.
  plain = net.clone(fourier_damping=False)
  diff = float(jnp.max(jnp.abs(plain.apply({"params": params}, z, jnp.ones(2))
                               - plain.apply({"params": moved}, z, jnp.ones(2)))))
  assert diff > 1e-2, diff
