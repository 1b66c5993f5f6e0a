"""DPM-Solver, DPM-Solver++ and Heun against a float64 transcription of the reference code and the exact
Gaussian probability flow (docs/math.md sec. 7).

Reference: LuChengTHU/dpm-solver, dpm_solver_pytorch.py at commit 52bc3fbcd5de56d60917b826b15d2b69460fc2fa
(NoiseScheduleVP('linear'), DPM_Solver.dpm_solver_first_update, singlestep_dpm_solver_second_update,
singlestep_dpm_solver_third_update, multistep_dpm_solver_second_update, multistep_dpm_solver_third_update,
dynamic_thresholding_fn, get_time_steps, get_orders_and_timesteps_for_singlestep_solver, sample), transcribed
below to numpy float64 with solver_type='dpmsolver' (torch is not needed).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import dpm_solver as dp
from vdiff import samplers
from vdiff import schedules

from _gaussian import MU, S, gaussian_eps_fn  # pylint: disable=g-bad-import-order
B0, B1 = 0.1, 20.0     # score SDE's VP beta_min, beta_max (the reference's 'linear' NoiseScheduleVP)
LINEAR = schedules.linear()
COSINE = schedules.cosine()


def vp_linear_schedule():
  """vdiff's schedule of the VP SDE: log alpha^2 = -(t^2 (b1 - b0) / 2 + t b0), gamma = log expm1(-log alpha^2)."""
  return schedules.from_function(lambda t: jnp.log(jnp.expm1(0.5 * t * t * (B1 - B0) + t * B0)), "vp_linear")


VP = vp_linear_schedule()




# ----------------------------------------------------------------------------------------------------
# The reference, transcribed (float64).
# ----------------------------------------------------------------------------------------------------
class RefVP:
  """NoiseScheduleVP(schedule='linear', continuous_beta_0=0.1, continuous_beta_1=20.)."""

  def lmc(self, t):
    return -0.25 * t**2 * (B1 - B0) - 0.5 * t * B0

  def alpha(self, t):
    return np.exp(self.lmc(t))

  def std(self, t):
    return np.sqrt(1.0 - np.exp(2.0 * self.lmc(t)))

  def lam(self, t):
    m = self.lmc(t)
    return m - 0.5 * np.log(1.0 - np.exp(2.0 * m))

  def inverse_lambda(self, lamb):
    tmp = 2.0 * (B1 - B0) * np.logaddexp(-2.0 * lamb, 0.0)
    delta = B0**2 + tmp
    return tmp / (np.sqrt(delta) + B0) / (B1 - B0)


class RefSolver:
  """DPM_Solver with algorithm_type in {'dpmsolver', 'dpmsolver++'}, solver_type='dpmsolver'."""

  def __init__(self, eps, algorithm, thresholding=False, ratio=0.995, max_val=1.0):
    self.eps, self.ns, self.plus = eps, RefVP(), algorithm == "dpmsolver++"
    self.thresholding, self.ratio, self.max_val = thresholding, ratio, max_val

  def data_pred(self, x, t):
    ns = self.ns
    x0 = (x - ns.std(t) * self.eps(x, t)) / ns.alpha(t)
    if self.thresholding:
      s = np.quantile(np.abs(x0).reshape(x0.shape[0], -1), self.ratio, axis=1)
      s = np.maximum(s, self.max_val)[:, None]
      x0 = np.clip(x0, -s, s) / s
    return x0

  def model(self, x, t):
    return self.data_pred(x, t) if self.plus else self.eps(x, t)

  def first(self, x, s, t, model_s=None):
    ns = self.ns
    h = ns.lam(t) - ns.lam(s)
    model_s = self.model(x, s) if model_s is None else model_s
    if self.plus:
      return ns.std(t) / ns.std(s) * x - ns.alpha(t) * np.expm1(-h) * model_s
    return np.exp(ns.lmc(t) - ns.lmc(s)) * x - ns.std(t) * np.expm1(h) * model_s

  def single2(self, x, s, t, r1):
    ns = self.ns
    h = ns.lam(t) - ns.lam(s)
    s1 = ns.inverse_lambda(ns.lam(s) + r1 * h)
    m_s = self.model(x, s)
    if self.plus:
      phi_11, phi_1 = np.expm1(-r1 * h), np.expm1(-h)
      x_s1 = ns.std(s1) / ns.std(s) * x - ns.alpha(s1) * phi_11 * m_s
      m_s1 = self.model(x_s1, s1)
      return (ns.std(t) / ns.std(s) * x - ns.alpha(t) * phi_1 * m_s
              - 0.5 / r1 * ns.alpha(t) * phi_1 * (m_s1 - m_s))
    phi_11, phi_1 = np.expm1(r1 * h), np.expm1(h)
    x_s1 = np.exp(ns.lmc(s1) - ns.lmc(s)) * x - ns.std(s1) * phi_11 * m_s
    m_s1 = self.model(x_s1, s1)
    return (np.exp(ns.lmc(t) - ns.lmc(s)) * x - ns.std(t) * phi_1 * m_s
            - 0.5 / r1 * ns.std(t) * phi_1 * (m_s1 - m_s))

  def single3(self, x, s, t, r1, r2):
    ns = self.ns
    h = ns.lam(t) - ns.lam(s)
    s1 = ns.inverse_lambda(ns.lam(s) + r1 * h)
    s2 = ns.inverse_lambda(ns.lam(s) + r2 * h)
    m_s = self.model(x, s)
    if self.plus:
      phi_11, phi_12, phi_1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
      phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
      phi_2 = phi_1 / h + 1.0
      x_s1 = ns.std(s1) / ns.std(s) * x - ns.alpha(s1) * phi_11 * m_s
      m_s1 = self.model(x_s1, s1)
      x_s2 = (ns.std(s2) / ns.std(s) * x - ns.alpha(s2) * phi_12 * m_s
              + r2 / r1 * ns.alpha(s2) * phi_22 * (m_s1 - m_s))
      m_s2 = self.model(x_s2, s2)
      return (ns.std(t) / ns.std(s) * x - ns.alpha(t) * phi_1 * m_s
              + 1.0 / r2 * ns.alpha(t) * phi_2 * (m_s2 - m_s))
    phi_11, phi_12, phi_1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
    phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = phi_1 / h - 1.0
    e = lambda a, b: np.exp(ns.lmc(a) - ns.lmc(b))  # noqa: E731
    x_s1 = e(s1, s) * x - ns.std(s1) * phi_11 * m_s
    m_s1 = self.model(x_s1, s1)
    x_s2 = e(s2, s) * x - ns.std(s2) * phi_12 * m_s - r2 / r1 * ns.std(s2) * phi_22 * (m_s1 - m_s)
    m_s2 = self.model(x_s2, s2)
    return e(t, s) * x - ns.std(t) * phi_1 * m_s - 1.0 / r2 * ns.std(t) * phi_2 * (m_s2 - m_s)

  def multi2(self, x, ms, ts, t):
    ns = self.ns
    h0 = ns.lam(ts[-1]) - ns.lam(ts[-2])
    h = ns.lam(t) - ns.lam(ts[-1])
    d1_0 = (ms[-1] - ms[-2]) / (h0 / h)
    if self.plus:
      phi_1 = np.expm1(-h)
      return (ns.std(t) / ns.std(ts[-1]) * x - ns.alpha(t) * phi_1 * ms[-1]
              - 0.5 * ns.alpha(t) * phi_1 * d1_0)
    phi_1 = np.expm1(h)
    return (np.exp(ns.lmc(t) - ns.lmc(ts[-1])) * x - ns.std(t) * phi_1 * ms[-1]
            - 0.5 * ns.std(t) * phi_1 * d1_0)

  def multi3(self, x, ms, ts, t):
    ns = self.ns
    l2, l1, l0, lt = ns.lam(ts[0]), ns.lam(ts[1]), ns.lam(ts[2]), ns.lam(t)
    h1, h0, h = l1 - l2, l0 - l1, lt - l0
    r0, r1 = h0 / h, h1 / h
    d1_0 = (ms[2] - ms[1]) / r0
    d1_1 = (ms[1] - ms[0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    if self.plus:
      phi_1 = np.expm1(-h)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      return (ns.std(t) / ns.std(ts[2]) * x - ns.alpha(t) * phi_1 * ms[2] + ns.alpha(t) * phi_2 * d1
              - ns.alpha(t) * phi_3 * d2)
    phi_1 = np.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return (np.exp(ns.lmc(t) - ns.lmc(ts[2])) * x - ns.std(t) * phi_1 * ms[2] - ns.std(t) * phi_2 * d1
            - ns.std(t) * phi_3 * d2)

  def time_steps(self, skip, t_T, t_0, n):
    if skip == "logSNR":
      return self.ns.inverse_lambda(np.linspace(self.ns.lam(t_T), self.ns.lam(t_0), n + 1))
    return np.linspace(t_T, t_0, n + 1)

  def sample(self, x, steps, t_start, t_end, order, skip, method, lower_order_final=True,
             denoise_to_zero=False):
    if method == "multistep":
      ts = self.time_steps(skip, t_start, t_end, steps)
      t_prev, m_prev = [ts[0]], [self.model(x, ts[0])]
      for step in range(1, order):
        x = self.update_multi(x, m_prev, t_prev, ts[step], step)
        t_prev.append(ts[step])
        m_prev.append(self.model(x, ts[step]))
      for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if (lower_order_final and steps < 10) else order
        x = self.update_multi(x, m_prev, t_prev, ts[step], step_order)
        t_prev, m_prev = t_prev[1:] + [ts[step]], m_prev[1:] + [None]
        if step < steps:
          m_prev[-1] = self.model(x, ts[step])
    else:
      if method == "singlestep":
        if order == 3:
          k = steps // 3 + 1
          orders = {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]
        elif order == 2:
          orders = [2] * (steps // 2) if steps % 2 == 0 else [2] * (steps // 2) + [1]
        else:
          orders = [1] * steps
        if skip == "logSNR":
          outer = self.time_steps(skip, t_start, t_end, len(orders))
        else:
          outer = self.time_steps(skip, t_start, t_end, steps)[np.cumsum([0] + orders)]
      else:
        orders = [order] * (steps // order)
        outer = self.time_steps(skip, t_start, t_end, len(orders))
      for j, o in enumerate(orders):
        s, t = outer[j], outer[j + 1]
        inner = self.time_steps(skip, s, t, o)
        lam_in = self.ns.lam(inner)
        h = lam_in[-1] - lam_in[0]
        if o == 1:
          x = self.first(x, s, t)
        elif o == 2:
          x = self.single2(x, s, t, (lam_in[1] - lam_in[0]) / h)
        else:
          x = self.single3(x, s, t, (lam_in[1] - lam_in[0]) / h, (lam_in[2] - lam_in[0]) / h)
    if denoise_to_zero:
      x = self.data_pred(x, t_end)
    return x

  def update_multi(self, x, ms, ts, t, order):
    if order == 1:
      return self.first(x, ts[-1], t, model_s=ms[-1])
    if order == 2:
      return self.multi2(x, ms, ts, t)
    return self.multi3(x, ms, ts, t)


def ref_gaussian_eps(x, t):
  ns = RefVP()
  a, sg = ns.alpha(t), ns.std(t)
  return sg * (x - a * MU) / (a**2 * S**2 + sg**2)


# ----------------------------------------------------------------------------------------------------
# Whole chains against the reference (identical z_1, same schedule, float32 vs float64).
# ----------------------------------------------------------------------------------------------------
REF_CASES = [
    # (algorithm, method, order, skip_type, steps)
    ("dpm_solver", "multistep", 1, "time_uniform", 1),      # one DPM-Solver-1 step
    ("dpm_solver", "multistep", 2, "logSNR", 7),
    ("dpm_solver", "multistep", 3, "time_uniform", 12),
    ("dpm_solver", "multistep", 3, "logSNR", 3),            # one step of each order
    ("dpm_solver", "singlestep", 2, "logSNR", 7),
    ("dpm_solver", "singlestep", 3, "time_uniform", 8),
    ("dpm_solver", "singlestep", 3, "logSNR", 10),
    ("dpm_solver", "singlestep_fixed", 3, "logSNR", 9),
    ("dpm_solver++", "multistep", 2, "time_uniform", 15),   # DPM-Solver++(2M), no lower_order_final
    ("dpm_solver++", "multistep", 3, "logSNR", 6),
    ("dpm_solver++", "singlestep", 3, "logSNR", 11),
    ("dpm_solver++", "singlestep", 2, "time_uniform", 3),   # one single-step of order 2, then order 1
    ("dpm_solver++", "singlestep_fixed", 2, "time_uniform", 8),
]


@pytest.mark.parametrize("algorithm,method,order,skip,steps", REF_CASES)
def test_chain_matches_reference(algorithm, method, order, skip, steps):
  shape = (64, 3)
  z1 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape), np.float64)
  t_end = 1e-3     # the reference's default end for continuous-time models (its gamma(0) is -inf)
  out = jax.jit(lambda z: dp.dpm_solver(None, gaussian_eps_fn(VP), VP, shape, num_steps=steps, order=order,
                                        algorithm=algorithm, method=method, skip_type=skip, t_end=t_end,
                                        z_init=z))(jnp.asarray(z1, jnp.float32))
  ref = RefSolver(ref_gaussian_eps, algorithm.replace("_", "")).sample(
      z1, steps, 1.0, t_end, order, skip, method)
  ref_x = ref / RefVP().alpha(t_end)
  assert out.nfe == dp.nfe(num_steps=steps, order=order, method=method)
  # vdiff (float32) agrees with the reference (float64) far below the reference's own discretisation error
  # against the exact flow (measured: differences 4e-7 .. 1.8e-4, the largest for the single step from
  # t = 1 to 1e-3 whose two terms of size 150 cancel to 0.5; discretisation errors 2.6e-4 .. 1.9), so a
  # wrong coefficient, order or grid is caught while the exact answer would not pass either.
  diff = float(np.max(np.abs(np.asarray(out.samples, np.float64) - ref_x)))
  err_ref = float(np.max(np.abs(ref_x - exact_flow(z1, VP, t_end))))
  assert diff < min(3e-4, 1e-2 * err_ref), (diff, err_ref)


def test_thresholding_and_denoise_to_zero_match_reference():
  # Data N(0.5, 0.6^2) leaves [-1, 1] often: the 0.9-quantile threshold clips about one in ten values.
  shape = (32, 16)
  z1 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), shape), np.float64)
  out = jax.jit(lambda z: dp.dpm_solver(None, gaussian_eps_fn(VP), VP, shape, num_steps=10, t_end=1e-3,
                                        thresholding=True, thresholding_ratio=0.9, denoise_to_zero=True,
                                        z_init=z))(jnp.asarray(z1, jnp.float32))
  ref = RefSolver(ref_gaussian_eps, "dpmsolver++", thresholding=True, ratio=0.9).sample(
      z1, 10, 1.0, 1e-3, 2, "time_uniform", "multistep", denoise_to_zero=True)
  assert out.nfe == 11
  np.testing.assert_allclose(out.samples, ref, atol=1e-4, rtol=1e-4)
  plain = dp.dpm_solver(None, gaussian_eps_fn(VP), VP, shape, num_steps=10, t_end=1e-3, denoise_to_zero=True,
                        z_init=jnp.asarray(z1, jnp.float32)).samples
  assert np.max(np.abs(np.asarray(plain))) > 1.2 and np.max(np.abs(np.asarray(out.samples))) <= 1.0


def test_phi_series_matches_float64():
  h = np.array([-3.0, -0.6, -0.49, -0.05, -1e-3, 1e-4, 1e-3, 0.05, 0.49, 0.6, 3.0])
  f2 = (np.expm1(h) - h) / h
  f3 = (np.expm1(h) - h - h * h / 2) / (h * h)
  np.testing.assert_allclose(dp.phi2(h), f2, rtol=2e-6)
  np.testing.assert_allclose(dp.phi3(h), f3, rtol=2e-6)


def test_time_from_gamma_inverts_the_schedule():
  t = jnp.linspace(0.0, 1.0, 101)
  for sched in (LINEAR, COSINE, schedules.ddpm_linear_beta()):
    np.testing.assert_allclose(dp.time_from_gamma(sched, sched.gamma(t)), t, atol=3e-6)


# ----------------------------------------------------------------------------------------------------
# Against the exact Gaussian flow: the convergence order, the limit moments.
# ----------------------------------------------------------------------------------------------------
def exact_flow(z1, schedule, t_end=0.0):
  """x = z_e / alpha_e, z_e = alpha_e mu + sqrt(v_e / v_1) (z_1 - alpha_1 mu), v_t = alpha_t^2 s^2 + sigma_t^2:
  the probability-flow map of N(mu, s^2) (linear, so the flow of the affine marginal family)."""
  def av(t):
    g = float(schedule.gamma(t))
    a = float(schedules.alpha_from_gamma(g))
    return a, a * a * S * S + float(schedules.sigma2_from_gamma(g))
  a1, v1 = av(1.0)
  ae, ve = av(t_end)
  return (ae * MU + np.sqrt(ve / v1) * (np.asarray(z1, np.float64) - a1 * MU)) / ae


@functools.lru_cache(maxsize=None)
def _errors(name, steps):
  shape = (256, 2)
  z1 = jax.random.normal(jax.random.PRNGKey(5), shape)
  fns = {
      "dpm1": functools.partial(dp.dpm_solver, order=1, algorithm="dpm_solver", method="singlestep"),
      "dpm2s": functools.partial(dp.dpm_solver, order=2, algorithm="dpm_solver", method="singlestep_fixed"),
      "dpm3s": functools.partial(dp.dpm_solver, order=3, algorithm="dpm_solver", method="singlestep_fixed"),
      "pp2m": functools.partial(dp.dpm_solver, order=2, algorithm="dpm_solver++", method="multistep"),
      "pp3s": functools.partial(dp.dpm_solver, order=3, algorithm="dpm_solver++", method="singlestep_fixed"),
      "heun": dp.heun,
  }
  # Uniform steps in lambda (the time-uniform grid of the cosine schedule has its largest h at the ends,
  # far from the asymptotic range at these step counts); Heun has Karras's grid.
  kw = dict(return_trajectory=True) if name == "heun" else dict(skip_type="logSNR")
  out = jax.jit(lambda z: fns[name](None, gaussian_eps_fn(COSINE), COSINE, shape, num_steps=steps,
                                    z_init=z, **kw))(z1)
  if name == "heun":
    # Compare at sigma_min = 0.002 (before Karras's final Euler step to sigma = 0), where the VE state
    # x = z / alpha is the exact flow's z_t / alpha_t.
    t_min = float(dp.time_from_gamma(COSINE, 2 * np.log(0.002)))
    x = np.asarray(out.trajectory[-2])
    ref = exact_flow(z1, COSINE, t_min)
    return float(np.sqrt(np.mean(np.square(x - ref))))
  return float(np.sqrt(np.mean(np.square(np.asarray(out.samples) - exact_flow(z1, COSINE)))))


# Steps per method chosen in the asymptotic range, above float32 round-off (measured RMS errors in comments).
ORDER_CASES = [
    ("dpm1", 1, (24, 48, 96)),       # RMS errors 5.7e-2, 2.9e-2, 1.5e-2
    ("dpm2s", 2, (24, 48, 96)),      # 2.6e-2, 6.1e-3, 1.5e-3
    ("dpm3s", 3, (48, 96, 192)),     # 2.1e-4, 2.2e-5, 2.5e-6
    ("pp2m", 2, (24, 48, 96)),       # 5.4e-3, 1.4e-3, 3.5e-4
    ("pp3s", 3, (48, 96, 192)),      # 7.0e-5, 1.3e-5, 1.4e-6
    ("heun", 2, (12, 24, 48)),       # 3.9e-2, 8.2e-3, 1.9e-3
]


@pytest.mark.parametrize("name,order,steps", ORDER_CASES)
def test_error_has_the_slope_of_the_order(name, order, steps):
  errs = [_errors(name, n) for n in steps]
  slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
  assert abs(slope - order) < 0.35, (name, errs, slope)


def test_multistep_three_is_limited_by_its_warm_up():
  # Multistep order 3 starts with one order-1 and one order-2 step (the reference's warm-up), whose local
  # errors O(h^2) and O(h^3) keep the global error at O(h^2): measured slope 2.2 here (RMS 2.4e-3,
  # 5.0e-4, 1.2e-4 at 24, 48, 96 steps), not 3. Its error
  shape = (256, 2)
  z1 = jax.random.normal(jax.random.PRNGKey(5), shape)
  errs = []
  for n in (24, 48, 96):
    x = jax.jit(lambda z: dp.dpm_solver(None, gaussian_eps_fn(COSINE), COSINE, shape, num_steps=n, order=3,
                                        skip_type="logSNR", z_init=z))(z1).samples
    errs.append(float(np.sqrt(np.mean(np.square(np.asarray(x) - exact_flow(z1, COSINE))))))
  slope = -np.polyfit(np.log([24, 48, 96]), np.log(errs), 1)[0]
  assert 1.7 < slope < 2.6, (errs, slope)


@pytest.mark.parametrize("name", ["pp2m", "dpm3s", "heun"])
def test_sample_moments_approach_the_flow_limit(name):
  # Started from N(0, I) at t = 1 the flow's image has mean mu (1 - s alpha_1 / sqrt(v_1)) and variance
  # s^2 / v_1 (test_samplers.limit_moments); the exact map is applied to the same z_1 for the comparison.
  shape = (8192, 2)
  z1 = jax.random.normal(jax.random.PRNGKey(6), shape)
  fn = {"pp2m": dp.dpm_solver, "dpm3s": functools.partial(dp.dpm_solver, order=3, method="singlestep",
                                                           algorithm="dpm_solver"), "heun": dp.heun}[name]
  ref = exact_flow(z1, LINEAR)
  gaps = []
  for steps in (8, 64):
    x = np.asarray(jax.jit(lambda z: fn(None, gaussian_eps_fn(LINEAR), LINEAR, shape, num_steps=steps,
                                        z_init=z))(z1).samples)
    gaps.append(abs(x.mean() - ref.mean()) + abs(x.var() - ref.var()))
  g1 = float(LINEAR.gamma(1.0))
  a1 = float(schedules.alpha_from_gamma(g1))
  v1 = a1**2 * S**2 + float(schedules.sigma2_from_gamma(g1))
  assert abs(ref.mean() - MU * (1 - S * a1 / np.sqrt(v1))) < 4 * S / np.sqrt(ref.size)
  # Measured (mean + variance errors): 8 steps 0.03-0.13, 64 steps 1e-4-1.2e-3.
  assert gaps[1] < gaps[0] / 4 and gaps[1] < 0.003, gaps


def test_encoder_shift_solves_the_encoded_flow():
  # Exact denoiser of DiffEnc's non-trainable encoder (z_t = alpha_t^3 x + sigma_t eps): with the shift
  # every flow solver returns ~ x_0 = alpha_0^2 x ~ N(mu, s^2); without it the mean misses the encoder drift.
  shape = (4096, 2)
  eps_fn = gaussian_eps_fn(LINEAR, power=3)

  @jax.jit
  def run(rng):
    return [f(rng, eps_fn, LINEAR, shape, encoder_shift=sh).samples.mean()
            for f in (functools.partial(dp.dpm_solver, num_steps=50), functools.partial(dp.heun, num_steps=25))
            for sh in (True, False)]

  m_pp, m_pp_plain, m_heun, m_heun_plain = (float(v) for v in run(jax.random.PRNGKey(0)))
  # Flow limit from N(0, 1) is within 0.005 of mu here; the plain solvers miss by > 0.1.
  assert abs(m_pp - MU) < 0.02 and abs(m_heun - MU) < 0.02, (m_pp, m_heun)
  assert abs(m_pp_plain - MU) > 0.1 and abs(m_heun_plain - MU) > 0.1


def test_same_key_same_start_as_ddim():
  # Noise layout: z_1 from split(rng)[0], as vdiff.samplers; DPM-Solver-1 on the time-uniform grid from t = 1
  # to 0 with DDIM's t = i / N times is DDIM eta = 0 (Lu et al. 2022, Proposition 4.1 / sec. 4.1).
  shape = (64, 2)
  eps_fn = gaussian_eps_fn(LINEAR)
  a = dp.dpm_solver(jax.random.PRNGKey(9), eps_fn, LINEAR, shape, num_steps=20, order=1,
                    algorithm="dpm_solver").samples
  b = samplers.ddim(jax.random.PRNGKey(9), eps_fn, LINEAR, shape, num_steps=20, grid_steps=20)
  # DDIM's last step goes to abar_0 = 1, DPM-Solver's to t = 0 (sigma_0 = 0.0013): same first 19 steps.
  np.testing.assert_allclose(a, b, atol=3e-3)


@pytest.mark.parametrize("method", ["multistep", "singlestep", "heun"])
def test_compiles_once_and_traces_denoiser_once(method):
  traces = []

  def eps_fn(z, t):
    traces.append(1)
    return gaussian_eps_fn(LINEAR)(z, t)

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(rng):
    if method == "heun":
      return dp.heun(rng, eps_fn, LINEAR, (4, 2), num_steps=10)
    return dp.dpm_solver(rng, eps_fn, LINEAR, (4, 2), num_steps=12, order=3, method=method,
                         skip_type="logSNR")

  for seed in range(3):
    out = run(jax.random.PRNGKey(seed))
  assert len(traces) == 1
  assert int(out.nfe) == (19 if method == "heun" else 12)


def test_guidance_and_levels():
  def eps_cond_fn(z, t, labels):
    return gaussian_eps_fn(LINEAR, mu=0.3 * labels[:, None].astype(jnp.float32))(z, t)

  labels = jnp.arange(8) % 2
  guided = samplers.classifier_free_guidance(eps_cond_fn, labels, guidance_weight=0, null_label=2)
  a = dp.dpm_solver(jax.random.PRNGKey(0), guided, LINEAR, (8, 3), num_steps=10)
  b = dp.dpm_solver(jax.random.PRNGKey(0), lambda z, t: eps_cond_fn(z, t, labels), LINEAR, (8, 3), num_steps=10)
  np.testing.assert_array_equal(a.samples, b.samples)
  lv = dp.heun(jax.random.PRNGKey(0), guided, LINEAR, (8, 3), num_steps=6, num_levels=16).samples
  assert lv.dtype == jnp.int32 and int(lv.min()) >= 0 and int(lv.max()) <= 15


@pytest.mark.parametrize("kwargs,match", [
    (dict(order=3, num_steps=2), "num_steps must be >= order"),
    (dict(order=4), "order must be 1, 2 or 3"),
    (dict(algorithm="dpmsolver++"), "algorithm must be one of .* Did you mean 'dpm_solver\\+\\+'"),
    (dict(method="multi_step"), "method must be one of .* Did you mean 'multistep'"),
    (dict(skip_type="logsnr"), "skip_type must be one of .* Did you mean 'logSNR'"),
    (dict(algorithm="dpm_solver", thresholding=True), "thresholding needs algorithm='dpm_solver\\+\\+'"),
    (dict(t_start=0.5, t_end=0.7), "t_start and t_end"),
])
def test_bad_input_is_refused_before_compute(kwargs, match):
  calls = []

  def eps_fn(z, t):
    calls.append(1)
    return z

  with pytest.raises(ValueError, match=match):
    dp.dpm_solver(jax.random.PRNGKey(0), eps_fn, LINEAR, (2, 2), **kwargs)
  assert not calls


def test_heun_bad_input():
  with pytest.raises(ValueError, match="num_steps must be >= 2"):
    dp.heun(jax.random.PRNGKey(0), gaussian_eps_fn(LINEAR), LINEAR, (2, 2), num_steps=1)
  with pytest.raises(ValueError, match="sigma_max must lie in the schedule's range"):
    dp.heun(jax.random.PRNGKey(0), gaussian_eps_fn(LINEAR), LINEAR, (2, 2), sigma_max=80.0)
