"""Sample-quality measures against their definitions and against samples of the true distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import data
from vdiff import sample_quality as q
from vdiff import schedules

RNG = np.random.RandomState(0)
MEANS = RNG.uniform(-0.5, 0.5, (4, 3))
STDS = RNG.uniform(0.1, 0.3, (4, 3))
WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])


def _draw(n, seed):
  return data._sample_mixture(np.random.RandomState(seed), n, MEANS, STDS, WEIGHTS)[0]  # pylint: disable=protected-access


def test_true_samples_reach_the_entropy_and_the_weights():
  r = q.mixture_quality(_draw(20000, 1), means=MEANS, stds=STDS, weights=WEIGHTS, entropy_samples=50000)
  assert abs(r["gap_bpd"]) < 4 * r["gap_bpd_stderr"], r
  assert r["max_abs_z"] < 4 and r["tv"] < 0.01, r
  np.testing.assert_allclose(r["weights"], WEIGHTS)


def test_wrong_samples_are_detected():
  x = _draw(20000, 2)
  wide = q.mixture_quality(1.15 * x, means=MEANS, stds=STDS, weights=WEIGHTS, entropy_samples=20000)
  assert wide["gap_bpd"] > 8 * wide["gap_bpd_stderr"], wide
  # Dropping component 3 (weight 0.4): TV 0.4 with hard labels; the soft posterior of overlapping
  # components gives 0.16 (measured), still > 20 standard errors.
  comp = data._sample_mixture(np.random.RandomState(3), 20000, MEANS, STDS, WEIGHTS)[1]  # pylint: disable=protected-access
  x3 = _draw(20000, 3)[comp != 3]
  r = q.mixture_quality(x3, means=MEANS, stds=STDS, weights=WEIGHTS, entropy=(0.0, 0.0))
  assert r["tv"] > 0.1 and r["max_abs_z"] > 20, r
  # A non-finite sample is left out and counted.
  x[0, 0] = np.nan
  assert q.mixture_quality(x, means=MEANS, stds=STDS, weights=WEIGHTS, entropy=(0.0, 0.0))["num_nonfinite"] == 1


def test_levels_use_the_exact_discrete_probabilities():
  ds = data.load("gaussian_mixture", split="test", seed=0, num_levels=64, shape=(2, 2, 1),
                 num_examples=4000, entropy_samples=20000)
  m = ds.metadata
  r = q.mixture_quality(ds.images, means=m["means"], stds=m["stds"], weights=m["weights"], num_levels=64,
                        entropy=(ds.true_bpd, ds.true_bpd_stderr))
  # The data's own samples: cross-entropy = discrete entropy (vdiff.data's Monte-Carlo) within 4 s.e.
  assert abs(r["gap_bpd"]) < 4 * r["gap_bpd_stderr"], r
  ref = -data.gaussian_mixture_log_prob(ds.images, means=m["means"], stds=m["stds"], weights=m["weights"],
                                        num_levels=64) / (4 * np.log(2))
  np.testing.assert_allclose(r["cross_entropy_bpd"], ref.mean(), rtol=1e-12)


def test_continuous_entropy_of_one_gaussian_is_closed_form():
  # One diagonal Gaussian: h = 1/2 log2(2 pi e s^2) per dim, averaged over dims.
  h, se = q.mixture_entropy_bpd(means=MEANS[:1], stds=STDS[:1], num_samples=50000)
  ref = np.mean(0.5 * np.log2(2 * np.pi * np.e * STDS[0] ** 2))
  assert abs(h - ref) < 4 * se + 1e-12 and se < 0.01


def test_mixture_eps_fn_is_minus_sigma_grad_log_density():
  sched = schedules.cosine()
  eps_fn = q.mixture_eps_fn(sched, means=MEANS, stds=STDS, weights=WEIGHTS)
  z = jnp.asarray(np.random.RandomState(4).randn(6, 3), jnp.float32)
  t = jnp.linspace(0.05, 0.95, 6)

  def log_pt(zi, ti):
    g = sched.gamma(ti)
    a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    var = a2 * STDS**2 + s2
    return jax.scipy.special.logsumexp(np.log(WEIGHTS) - 0.5 * jnp.sum(
        (zi - jnp.sqrt(a2) * MEANS) ** 2 / var + jnp.log(var), -1))

  grad = jax.vmap(jax.grad(log_pt))(z, t)
  np.testing.assert_allclose(eps_fn(z, t), -sched.sigma(t)[:, None] * grad, atol=2e-6, rtol=1e-5)


def _brute(x, y, kernel, bw):
  def k(a, b):
    d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    return np.exp(-d**2 / (2 * bw * bw)) if kernel == "gaussian" else -d
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  n, m = len(x), len(y)
  return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2 * kxy.mean())


@pytest.mark.parametrize("kernel", ["gaussian", "energy"])
def test_two_sample_statistic(kernel):
  x, y = _draw(600, 5), _draw(500, 6)
  r = q.two_sample_statistic(x, y, kernel=kernel, bandwidth=0.5 if kernel == "gaussian" else None)
  np.testing.assert_allclose(r["statistic"], _brute(x, y, kernel, 0.5), rtol=1e-9, atol=1e-12)
  assert abs(r["statistic"]) < 4 * r["stderr"], r          # same distribution: unbiased, ~0
  shifted = q.two_sample_statistic(x, y + 0.15, kernel=kernel)
  assert shifted["statistic"] > 4 * shifted["stderr"], shifted
  if kernel == "energy":     # the energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|
    assert r["bandwidth"] is None


def test_two_sample_bad_input():
  with pytest.raises(ValueError, match="kernel must be one of .* Did you mean 'energy'"):
    q.two_sample_statistic(np.zeros((30, 2)), np.zeros((30, 2)), kernel="enery")
  with pytest.raises(ValueError, match="same dimensions"):
    q.two_sample_statistic(np.zeros((30, 2)), np.zeros((30, 3)))


def test_bench_samplers_runs_and_reports_every_sampler(tmp_path):
  from experiments import bench_samplers  # pylint: disable=import-outside-toplevel
  out = tmp_path / "b.json"
  doc = bench_samplers.main(["--nfe", "12", "--num-samples", "256", "--entropy-samples", "2000",
                             "--out", str(out)])
  assert out.exists()
  names = {r["sampler"] for r in doc["rows"]}
  assert names == set(bench_samplers.SAMPLERS)
  for r in doc["rows"]:
    assert r["nfe"] <= 12 and np.isfinite(r["gap_bpd"]) and r["num_nonfinite"] == 0
  with pytest.raises(ValueError, match="Did you mean 'heun'"):
    bench_samplers.main(["--samplers", "heum"])
