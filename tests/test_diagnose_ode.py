"""experiments/diagnose_ode.py: the quantised mixture's exact denoiser, checked two independent ways."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import data
from vdiff import likelihood
from vdiff import ode
from vdiff import schedules
from experiments import diagnose_ode


def _mixture(num_levels=32, n=6):
  return data.load("gaussian_mixture", split="test", shape=(2, 1, 1), num_levels=num_levels,
                   num_examples=n, entropy_samples=2000)


def test_exact_denoiser_is_tweedie_of_the_exact_marginal():
  # Reference: E[eps | z] = -sigma d/dz log q_t(z) (Tweedie), with q_t(z) = sum_m w_m prod_i sum_k
  # P_mi(k) N(z_i; alpha x^(k), sigma^2) summed in float64 numpy and differentiated by central differences.
  ds = _mixture()
  sched = schedules.linear(gamma_min=-6.0, gamma_max=4.0)
  eps_fn = diagnose_ode.exact_eps_fn(ds, sched)
  means, stds, w = (np.asarray(ds.metadata[k]) for k in ("means", "stds", "weights"))
  k = np.arange(ds.num_levels)
  lo, hi = data._bin_edges(k, ds.num_levels)  # pylint: disable=protected-access
  from scipy.stats import norm
  p = norm.cdf((hi - means[..., None]) / stds[..., None]) - norm.cdf((lo - means[..., None]) / stds[..., None])
  centres = -1.0 + (2.0 * k + 1.0) / ds.num_levels
  for t in (0.3, 0.6):
    g = float(sched.gamma(jnp.float32(t)))
    alpha, sigma = math.sqrt(1 / (1 + math.exp(g))), math.sqrt(1 / (1 + math.exp(-g)))

    def log_q(z):  # z [D]
      dens = (p * np.exp(-0.5 * (z[None, :, None] - alpha * centres) ** 2 / sigma ** 2)).sum(-1)
      return math.log(float((w * np.prod(dens / (sigma * math.sqrt(2 * math.pi)), axis=-1)).sum()))

    z = np.array([0.3, -0.2]) * alpha + 0.1
    h = 1e-5
    grad = np.array([(log_q(z + h * e) - log_q(z - h * e)) / (2 * h) for e in np.eye(2)])
    got = np.asarray(eps_fn(jnp.asarray(z, jnp.float32).reshape(1, 2, 1, 1), jnp.float32(t))).ravel()
    np.testing.assert_allclose(got, -sigma * grad, rtol=2e-3, atol=2e-4)


def test_ode_bound_with_the_exact_denoiser_matches_the_exact_probabilities():
  # Reference: the exact -log2 P(k) / D of data.gaussian_mixture_log_prob. With the exact denoiser, the
  # forward-dequantisation ODE bound at t0 = 0 (sigma_0 = 0.0013 against bins 1/16 wide) is tight: its
  # expected gap is the KL between the forward marginal and the model's posterior of z_0 given k, ~0 here.
  # Each image's value is one draw of z (m = 1), so single images scatter by ~0.01 bits/dim at D = 2;
  # the mean over 24 images is within 0.005 (measured -0.0002 +- 0.0016 on the 4x4 mixture, README).
  ds = _mixture(n=24)
  sched = schedules.linear()
  k = jnp.asarray(ds.images)
  nats, _ = jax.jit(lambda r, kk: ode.ode_nll(r, diagnose_ode.exact_eps_fn(ds, sched), sched, kk,
                                              num_levels=ds.num_levels, dequantization="forward",
                                              divergence="exact"))(jax.random.PRNGKey(0), k)
  bpd = np.asarray(likelihood.nats_to_bpd(nats, 2))
  truth = -data.gaussian_mixture_log_prob(np.asarray(k), means=ds.metadata["means"], stds=ds.metadata["stds"],
                                          weights=ds.metadata["weights"], num_levels=ds.num_levels) / (2 * math.log(2))
  gap = bpd - truth
  assert abs(gap.mean()) < 0.005 and np.max(np.abs(gap)) < 0.03, gap
