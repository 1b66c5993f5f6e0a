"""Noise schedules: float32 precision at the endpoints, gamma' by jvp, the DDPM grid, monotonicity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import schedules as S


def _learned(kind):
  module = S.LEARNED[kind]()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))["params"]
  # Move the shape away from the (almost linear) initialisation so derivatives are not trivial.
  params = jax.tree.map(lambda p: p * 1.0, params)
  if kind != "learned_scalar":
    net = params["shape"] if kind == "learned_pinned" else params
    net["l2"]["kernel"] = 3.0 * jax.random.normal(jax.random.PRNGKey(1), net["l2"]["kernel"].shape)
    net["l3"]["kernel"] = 20.0 * jnp.abs(jax.random.normal(jax.random.PRNGKey(2),
                                                              net["l3"]["kernel"].shape))
  return S.from_module(module, params)


ALL = {
    "linear": S.linear(),
    "cosine": S.cosine(),
    "ddpm": S.ddpm_linear_beta(),
    "learned_scalar": _learned("learned_scalar"),
    "learned_net": _learned("learned_net"),
    "learned_pinned": _learned("learned_pinned"),
    "custom": S.from_function(lambda t: -10.0 + 15.0 * t ** 2 + t),
    # The schedule through a discrete grid (here the CDM paper's uniform grid, T = 1000).
    "grid": S.from_alpha2_grid(S.uniform_sigma_alpha2(1000)[1:-1]),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_dgamma_matches_finite_differences(name):
  sched = ALL[name]
  t = jnp.linspace(0.05, 0.95, 13)
  h = 1e-3
  fd = (np.asarray(sched.gamma(t + h), np.float64) - np.asarray(sched.gamma(t - h), np.float64)) / (2 * h)
  # Central differences in float32: error ~ eps * |gamma| / h ~ 1e-3 absolute; ddpm is piecewise linear
  # on a 1/1000 grid, so compare away from knots with the same tolerance.
  np.testing.assert_allclose(np.asarray(sched.dgamma(t)), fd, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("name", sorted(ALL))
def test_increasing_and_consistent(name):
  sched = ALL[name]
  t = jnp.linspace(0.0, 1.0, 501)
  g = np.asarray(sched.gamma(t))
  assert np.all(np.diff(g) > 0), "gamma must be strictly increasing"
  a2, s2 = np.asarray(sched.alpha2(t), np.float64), np.asarray(sched.sigma2(t), np.float64)
  np.testing.assert_allclose(a2 + s2, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sched.snr(t)), a2 / s2, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, a2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sched.sigma(t)) ** 2, s2, rtol=1e-5)


def test_float32_precision_at_vdm_endpoints():
  # Reference: float64 logistic function. sigma^2 at gamma = -13.3 is 1.67e-6; 1 - sigmoid(13.3) in
  # float32 would keep only ~1 significant digit (float32 spacing near 1 is 6e-8).
  for g in (-13.3, 5.0):
    ref_s2 = 1.0 / (1.0 + math.exp(-g))
    ref_a2 = 1.0 / (1.0 + math.exp(g))
    assert abs(float(S.sigma2_from_gamma(jnp.float32(g))) / ref_s2 - 1) < 1e-6
    assert abs(float(S.alpha2_from_gamma(jnp.float32(g))) / ref_a2 - 1) < 1e-6
    assert abs(float(S.sigma_from_gamma(jnp.float32(g))) / math.sqrt(ref_s2) - 1) < 1e-6
  naive = 1.0 - float(jax.nn.sigmoid(jnp.float32(13.3)))
  assert abs(naive / (1.0 / (1.0 + math.exp(13.3))) - 1) > 1e-3  # why the formulas avoid 1 - sigmoid


def test_ddpm_grid_is_ddpm():
  # Reference: Ho et al. 2020, abar_t = prod_{s<=t} (1 - beta_s), betas linear in [1e-4, 0.02].
  sched = S.ddpm_linear_beta()
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1.0 - betas)
  got = np.asarray(sched.discrete_alpha2(1000), np.float64)
  assert got[0] == 1.0
  np.testing.assert_allclose(got[1:], abar, rtol=2e-6, atol=1e-7)
  # 1 - abar_1 = beta_1 = 1e-4 through sigma^2 = sigmoid(gamma): precise to float32.
  np.testing.assert_allclose(float(sched.sigma2(1e-3)), 1e-4, rtol=1e-4)


def test_linear_and_cosine_endpoints():
  for sched in (S.linear(), S.cosine(), S.linear(gamma_min=-5.0, gamma_max=3.0)):
    g0, g1 = sched.endpoints()
    assert abs(float(g0) - sched.gamma(0.0)) < 1e-6
  g0, g1 = S.cosine().endpoints()
  np.testing.assert_allclose([float(g0), float(g1)], [-13.3, 5.0], atol=1e-4)
  # cosine: alpha^2 ∝ cos^2 (Nichol & Dhariwal with s = 0) -> gamma = 2 log tan(pi u / 2).
  u = 0.5
  assert abs(2 * math.log(math.tan(math.pi * u / 2))) < 1e-12  # gamma = 0 at u = 1/2


def test_learned_schedule_init_equals_linear():
  t = jnp.linspace(0, 1, 11)
  for kind in ("learned_scalar", "learned_pinned"):
    module = S.LEARNED[kind]()
    params = module.init(jax.random.PRNGKey(0), t)["params"]
    got = S.from_module(module, params).gamma(t)
    if kind == "learned_scalar":
      np.testing.assert_allclose(got, S.linear().gamma(t), atol=1e-5)
    else:
      np.testing.assert_allclose(got[jnp.array([0, -1])], [-13.3, 5.0], atol=1e-5)


def test_dgamma_is_differentiable_in_parameters():
  # d/dw of gamma'(t) for gamma = b + |w| t is sign(w): checks the jvp stays differentiable.
  module = S.LearnedScalarGamma()
  params = module.init(jax.random.PRNGKey(0), jnp.zeros(1))["params"]
  f = lambda p: jnp.sum(S.from_module(module, p).dgamma(jnp.array([0.3, 0.6])))
  g = jax.grad(f)(params)
  assert float(g["w"]) == pytest.approx(2.0)
  assert float(g["b"]) == pytest.approx(0.0)


def test_bad_endpoints_are_refused():
  with pytest.raises(ValueError, match="gamma_min must be smaller"):
    S.linear(gamma_min=5.0, gamma_max=-13.3)
  with pytest.raises(ValueError, match="num_steps"):
    S.ddpm_linear_beta(num_steps=1)


@pytest.mark.parametrize("name", sorted(ALL))
def test_gamma_difference_equals_subtraction(name):
  # Every schedule: gamma_difference(i, T) is gamma(i / T) - gamma((i - 1) / T) (to float32 rounding of
  # the gammas), for integer and float32 step indices alike.
  sched = ALL[name]
  T = 20
  i = np.arange(1, T + 1)
  ref = sched.gamma(i / T) - sched.gamma((i - 1) / T)
  np.testing.assert_allclose(sched.gamma_difference(i, T), ref, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(sched.gamma_difference(jnp.asarray(i, jnp.float32), T), ref, rtol=1e-4,
                             atol=2e-5)


def _cosine_gamma64(t, gamma_min=-13.3, gamma_max=5.0):
  """The cosine schedule in float64 (reference for its closed-form increments)."""
  u0 = 2.0 / math.pi * math.atan(math.exp(gamma_min / 2))
  u1 = 2.0 / math.pi * math.atan(math.exp(gamma_max / 2))
  return 2.0 * np.log(np.tan(0.5 * math.pi * (u0 + (u1 - u0) * np.asarray(t, np.float64))))


@pytest.mark.parametrize("num_steps", [1000, 10_000])
@pytest.mark.parametrize("name", ["linear", "learned_scalar", "cosine"])
def test_gamma_difference_is_exact_on_the_t_step_grid(name, num_steps):
  # The T-step weight expm1(gamma_t - gamma_s), t = i / T, s = (i - 1) / T, against float64: linear and
  # learned_scalar (g1 - g0) / T exactly; cosine its float64 gamma differenced. The plain float32 route
  # (t and s rounded to float32, two gammas near -13.3 subtracted) is off by ~6e-8 T relatively
  # (asserted below, so the test shows what the integer interface buys); gamma_difference must be
  # within 1e-6 (measured 3e-8 linear, 2.4e-7 cosine).
  sched = ALL[name]
  T = num_steps
  i = np.arange(1, T + 1)
  if name == "cosine":
    ref = _cosine_gamma64(i / T) - _cosine_gamma64((i - 1) / T)
  else:
    g0, g1 = (float(v) for v in sched.endpoints())
    ref = np.full(T, (g1 - g0) / T)
  got = np.asarray(jnp.expm1(sched.gamma_difference(i, T)), np.float64)
  t32 = jnp.arange(1, T + 1, dtype=jnp.float32) / T
  naive = np.asarray(jnp.expm1(sched.gamma(t32) - sched.gamma(t32 - 1.0 / T)), np.float64)
  err = np.max(np.abs(got / np.expm1(ref) - 1.0))
  naive_err = np.max(np.abs(naive / np.expm1(ref) - 1.0))
  assert err < 1e-6, err
  assert naive_err > 1e-5, naive_err


def _ddpm_gamma64(num_steps, beta_start=1e-4, beta_end=0.02):
  """gamma_i = log((1 - abar_i) / abar_i), i = 1..T, of DDPM's linear betas over T steps, in float64."""
  log_abar = np.cumsum(np.log1p(-np.linspace(beta_start, beta_end, num_steps)))
  return np.log(-np.expm1(log_abar)) - log_abar


@pytest.mark.parametrize("num_steps", [10, 1000, 10_000])
@pytest.mark.parametrize("name", ["linear", "cosine", "ddpm"])
def test_closed_form_increments_at_the_first_and_last_steps(name, num_steps):
  """Every closed-form gamma_difference at its first two and last two steps, T = 10, 1000, 10^4, against
  float64 (the schedules' own formulas differenced in float64: relative error <= 1e-16 |gamma| / Delta,
  about 1e-12 here). Within 3e-7 (a few float32 ulps), and the T-step weight expm1(Delta) within 1e-6.
  The cosine's old closed form 4 atanh(sin(a - b) / sin(a + b)) took 1 - ratio from the rounded ratio
  at the first step, where the ratio is near 1: 1.35e-6 at T = 10 (1.3e-5 in the T = 10 loss)."""
  T = num_steps
  if name == "ddpm":
    sched = S.ddpm_linear_beta(num_steps=T)
    g = _ddpm_gamma64(T)
    ref = np.diff(np.concatenate([[2 * g[0] - g[1]], g]))  # i = 1 against the extrapolated gamma(0)
  elif name == "cosine":
    sched = S.cosine()
    i = np.arange(1, T + 1)
    ref = _cosine_gamma64(i / T) - _cosine_gamma64((i - 1) / T)
  else:
    sched = S.linear()
    ref = np.full(T, (5.0 - -13.3) / T)
  idx = np.array([1, 2, T - 1, T])
  got = np.asarray(sched.gamma_difference(idx, T), np.float64)
  err = np.abs(got / ref[idx - 1] - 1.0)
  assert np.all(err < 3e-7), (idx, err)
  weight_err = np.abs(np.expm1(got) / np.expm1(ref[idx - 1]) - 1.0)
  assert np.all(weight_err < 1e-6), (idx, weight_err)


def test_pinned_schedule_stays_increasing_after_a_step_against_its_gap():
  # One large gradient step that shrinks gamma(1) - gamma(0), whatever the parameterisation of the
  # endpoints: with free endpoints (gamma_0, gamma_1) it swaps them (gamma_0 = 6.7 > gamma_1 = -15) and
  # the schedule decreases; pinned by construction (gamma_1 = gamma_0 + softplus(gap)) it stays
  # increasing. Reference: the definition of a schedule (gamma strictly increasing, docs/math.md sec. 0).
  module = S.PinnedMonotoneGamma(n_features=16)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))["params"]
  gap_fn = lambda p: jnp.diff(module.apply({"params": p}, jnp.array([0.0, 1.0])))[0]
  grad = jax.grad(gap_fn)(params)
  stepped = jax.tree.map(lambda p, g: p - 20.0 * g, params, grad)
  gamma = np.asarray(S.from_module(module, stepped).gamma(jnp.linspace(0.0, 1.0, 11)))
  assert np.all(np.diff(gamma) > 0), gamma


def test_pinned_schedule_is_increasing_for_any_parameters():
  # gamma_0 anywhere, gap down to -5 (softplus(-5) = 6.7e-3, increments ~7e-4 over 11 points, far above
  # float32 resolution at |gamma| <= 30), and a random shape.
  module = S.PinnedMonotoneGamma(n_features=16)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,)))["params"]
  rng = np.random.RandomState(0)
  t = jnp.linspace(0.0, 1.0, 11)
  for _ in range(20):
    p = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=np.shape(a)) * 5.0, jnp.float32), params)
    p = dict(p, gamma_0=jnp.float32(rng.uniform(-25, 25)), gap=jnp.float32(rng.uniform(-5, 25)))
    gamma = np.asarray(S.from_module(module, p).gamma(t))
    assert np.all(np.diff(gamma) > 0), (p["gamma_0"], p["gap"], gamma)


def test_grid_schedule_hits_its_knots_however_t_is_formed():
  # Reference: the grid itself (float64, rounded once). t = i / T formed as float32(i) / T, as
  # float32(i) * (1 / T) (what XLA makes of a division by a constant) and from float64 all land on
  # gamma_i to float32 round-off of gamma, although they differ by an ulp where the grid is steep.
  T = 1000
  abar = S.uniform_sigma_alpha2(T)[1:-1]
  sched = S.from_alpha2_grid(abar)
  gamma = np.log1p(-abar) - np.log(abar)
  i = np.arange(1, T + 1)
  for t in (jnp.arange(1, T + 1, dtype=jnp.float32) / T,
            jnp.arange(1, T + 1, dtype=jnp.float32) * jnp.float32(1.0 / T),
            jnp.asarray(i / T, jnp.float32)):
    np.testing.assert_allclose(np.asarray(sched.gamma(t), np.float64), gamma, rtol=3e-7, atol=3e-7)
  with pytest.raises(ValueError, match="strictly decreasing"):
    S.from_alpha2_grid(abar[::-1])
  with pytest.raises(ValueError, match="shape"):
    S.from_alpha2_grid(abar[:1])


def _grid64(gamma):
  """float64 DDPM grid from gamma_1..T: (log abar, 1 - abar, beta) with beta_1 = 1 - abar_1."""
  log_abar = -np.logaddexp(0.0, gamma)                 # log sigmoid(-gamma)
  om = -np.expm1(log_abar)
  beta = -np.expm1(np.diff(np.concatenate([[0.0], log_abar])))
  return log_abar, om, beta


@pytest.mark.parametrize("name", ["ddpm", "linear", "cosine"])
def test_discrete_grid_matches_float64(name):
  # DDPM (Ho et al. 2020): betas linspace(1e-4, 0.02, 1000) in float64, abar = cumprod(1 - beta). The
  # float32 knots route (beta from two float32 log abar near -10) is off by 1.2e-4 relatively; the grid
  # is built from the betas in float64 and rounded once (measured 6e-8). linear / cosine: the float64
  # gamma on t = i / T through the same formulas (measured 1.1e-6 / 6e-7: float32 rounding of gamma_i).
  T = 1000
  i = np.arange(1, T + 1)
  if name == "ddpm":
    beta = np.linspace(1e-4, 0.02, T)
    log_abar = np.cumsum(np.log1p(-beta))
    om = -np.expm1(log_abar)
    tol = 2e-7
  else:
    g = -13.3 + 18.3 * i / T if name == "linear" else _cosine_gamma64(i / T)
    log_abar, om, beta = _grid64(g)
    tol = 3e-6
  grid = ALL[name].discrete_grid(T)
  for field in grid:
    assert field.shape == (T + 1,) and field.dtype == jnp.float32
  assert float(grid.log_abar[0]) == 0.0 and float(grid.one_minus_abar[0]) == 0.0
  assert float(grid.gamma[0]) == -np.inf
  rel = lambda a, b: np.max(np.abs(np.asarray(a, np.float64) / b - 1.0))
  assert rel(grid.beta[1:], beta) < tol
  assert rel(grid.one_minus_abar[1:], om) < tol
  assert rel(grid.log_one_minus_beta[1:], np.log1p(-beta)) < tol
  assert np.max(np.abs(np.asarray(grid.log_abar[1:], np.float64) - log_abar) / (1.0 + np.abs(log_abar))) < tol
  np.testing.assert_allclose(np.exp(np.asarray(grid.log_abar, np.float64)), ALL[name].discrete_alpha2(T),
                             rtol=2e-6)
