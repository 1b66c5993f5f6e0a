"""Ground-truth measures of sample quality: exact densities where the data's are known, two-sample tests otherwise.

Known density (the Gaussian mixture of `vdiff.data`, whose `Dataset.metadata` holds its means [M, D],
stds [M, D] and weights [M]):

* cross-entropy  CE = -E_q log2 p(x) / D  (bits/dim) of the samples x ~ q under the TRUE density p, beside
  the data's own entropy H = -E_p log2 p(x) / D. CE = H(q) + KL(q || p) (per dim): a sampler whose
  samples are the data's has CE = H; extra noise (an undertrained or too coarse sampler) raises CE; a
  sampler that drops the tails or collapses onto the modes can have CE < H, so CE - H is not a bound
  and is read together with
* the component frequencies: each sample is assigned to the components by the true posterior
  r_m(x) = w_m p_m(x) / p(x) (soft assignment; its mean over samples of p is exactly w_m, which the hard
  argmax is not where components overlap), compared with the weights by the total variation
  1/2 sum_m |f_m - w_m| and the largest z-score |f_m - w_m| / se(f_m).
  Continuous samples use the mixture's density (H is its differential entropy, a Monte-Carlo mean with its
  standard error: a mixture's entropy has no closed form); K-level samples (int levels) use the exact
  quantised, clipped probabilities of `vdiff.data.gaussian_mixture_log_prob` (H is then the discrete
  entropy of `vdiff.data.gaussian_mixture_entropy_bpd`).

Real data: a two-sample statistic between generated and held-out images, on pixels in [-1, 1]: the
squared maximum mean discrepancy with a Gaussian kernel (bandwidth by the median heuristic on the pooled
sample) or the energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (the MMD^2 of the distance kernel),
both as the unbiased U-statistic, with a delete-one-group jackknife standard error. Both are 0 in
expectation exactly when the two distributions agree.

References: Gretton et al. 2012, "A kernel two-sample test", JMLR 13 (MMD^2_u, Lemma 6);
Szekely & Rizzo 2013, "Energy statistics" (energy distance); Theis et al. 2016, "A note on the evaluation
of generative models", arXiv:1511.01844 (why log-likelihoods and sample quality need separate measures).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from vdiff import data as data_lib
from vdiff import likelihood
from vdiff import schedules as schedules_lib
from vdiff.dpm_solver import check_choice

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Known density: the Gaussian mixture.
# ----------------------------------------------------------------------------------------------------
def _mixture(means: Any, stds: Any, weights: Any):
  return data_lib._check_mixture(means, stds, weights)  # pylint: disable=protected-access


def component_log_likelihoods(samples: Any, *, means: Any, stds: Any, num_levels: int | None = None
                              ) -> np.ndarray:
  """log p_m(x) (nats) of every sample under every component, float64 [N, M].

  Continuous samples [N, ...] (float): log N(x; mu_m, diag s_m^2). Levels [N, ...] (int, with num_levels):
  log P_m(k) of the quantised, clipped component (`vdiff.data.gaussian_mixture_log_prob`'s factors).
  """
  means, stds, _ = _mixture(means, stds, None)
  x = np.asarray(samples)
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] != means.shape[1]:
    raise ValueError(f"samples have {x.shape[1]} dimensions per example but the means have {means.shape[1]}.")
  out = np.empty((x.shape[0], means.shape[0]))
  chunk = 4096
  for start in range(0, x.shape[0], chunk):
    xb = x[start:start + chunk]
    if num_levels is None:
      u = (xb[:, None, :].astype(np.float64) - means) / stds
      out[start:start + chunk] = (-0.5 * np.square(u) - np.log(stds) - 0.5 * math.log(2 * math.pi)).sum(-1)
    else:
      lower, upper = data_lib._bin_edges(xb, num_levels)  # pylint: disable=protected-access
      a = (lower[:, None, :] - means) / stds
      b = (upper[:, None, :] - means) / stds
      out[start:start + chunk] = data_lib._log_ndtr_diff(a, b).sum(-1)  # pylint: disable=protected-access
  return out


def mixture_eps_fn(schedule: schedules_lib.Schedule, *, means: Any, stds: Any, weights: Any = None):
  """The exact denoiser E[eps | z_t] of the continuous mixture (docs/math.md sec. 7): (z, t) -> eps.

  z_t = alpha x + sigma eps with x ~ sum_m w_m N(mu_m, diag s_m^2) is a mixture of N(alpha mu_m,
  alpha^2 s_m^2 + sigma^2); with the posterior r_m(z) of the components,

      E[eps | z] = sum_m r_m(z) sigma (z - alpha mu_m) / (alpha^2 s_m^2 + sigma^2) = -sigma grad log p_t(z).

  Computed in float32 (means, stds as [M, D] constants); z of shape [B, ...] with prod(...) = D.
  """
  means, stds, weights = _mixture(means, stds, weights)
  mu = jnp.asarray(means, jnp.float32)
  s2 = jnp.asarray(np.square(stds), jnp.float32)
  log_w = jnp.asarray(np.log(weights), jnp.float32)

  def eps_fn(z, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    g = schedule.gamma(t)[:, None, None]
    a2, sg2 = schedules_lib.alpha2_from_gamma(g), schedules_lib.sigma2_from_gamma(g)
    zf = z.reshape(z.shape[0], 1, -1)                       # [B, 1, D]
    var = a2 * s2 + sg2                                     # [B, M, D]
    dev = zf - jnp.sqrt(a2) * mu
    ll = log_w - 0.5 * jnp.sum(jnp.square(dev) / var + jnp.log(var), axis=-1)   # [B, M]
    r = jax.nn.softmax(ll, axis=-1)[..., None]
    eps = jnp.sqrt(sg2[:, 0]) * jnp.sum(r * dev / var, axis=1)
    return eps.reshape(z.shape)

  return eps_fn


def mixture_log_prob(samples: Any, *, means: Any, stds: Any, weights: Any = None,
                     num_levels: int | None = None) -> np.ndarray:
  """log p(x) (continuous density) or log P(k) (K-level samples, num_levels given), nats, float64 [N]."""
  _, _, weights = _mixture(means, stds, weights)
  ll = component_log_likelihoods(samples, means=means, stds=stds, num_levels=num_levels)
  return special.logsumexp(ll + np.log(weights), axis=-1)


def mixture_entropy_bpd(*, means: Any, stds: Any, weights: Any = None, num_levels: int | None = None,
                        num_samples: int = 100_000, seed: int = 0) -> tuple[float, float]:
  """The mixture's entropy per dim in bits and its Monte-Carlo standard error.

  Continuous (num_levels None): the differential entropy h = -E_p log2 p(x) / D over num_samples draws of
  np.random.RandomState(seed). K levels: `vdiff.data.gaussian_mixture_entropy_bpd` (discrete entropy).
  """
  if num_levels is not None:
    return data_lib.gaussian_mixture_entropy_bpd(means=means, stds=stds, weights=weights,
                                                 num_levels=num_levels, num_samples=num_samples, seed=seed)
  means, stds, weights = _mixture(means, stds, weights)
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2, got {num_samples}.")
  rng = np.random.RandomState(seed)
  x, _ = data_lib._sample_mixture(rng, num_samples, means, stds, weights)  # pylint: disable=protected-access
  bits = -mixture_log_prob(x, means=means, stds=stds, weights=weights) / (means.shape[1] * LOG2)
  return float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(num_samples))


def mixture_quality(samples: Any, *, means: Any, stds: Any, weights: Any = None,
                    num_levels: int | None = None, entropy: tuple[float, float] | None = None,
                    entropy_samples: int = 100_000, seed: int = 0) -> dict:
  """Cross-entropy against the entropy, and component frequencies against the weights (module docstring).

  Args:
    samples: [N, ...] continuous samples (x-space, float) or int levels with num_levels.
    means: the mixture's component means [M, D].
    stds: its component standard deviations (broadcastable to [M, D]).
    weights: its weights [M], or None for equal weights.
    num_levels: K for level samples; None for continuous ones.
    entropy: (H, stderr) if already known (e.g. `Dataset.true_bpd`, `true_bpd_stderr`); else estimated.
    entropy_samples: draws of the Monte-Carlo entropy estimate.
    seed: its np.random.RandomState seed.
  Returns:
    dict with cross_entropy_bpd, cross_entropy_bpd_stderr, entropy_bpd, entropy_bpd_stderr, gap_bpd
    (CE - H), gap_bpd_stderr, num_nonfinite (samples left out: NaN/Inf, or level -1), component_freq [M],
    weights [M], freq_stderr [M], tv (total variation 1/2 sum |f - w|), max_abs_z (the largest
    |f_m - w_m| / freq_stderr_m).
  """
  means_a, stds_a, weights_a = _mixture(means, stds, weights)
  x = np.asarray(samples)
  x = x.reshape(x.shape[0], -1)
  ok = np.all(np.isfinite(x), axis=1) if num_levels is None else np.all((x >= 0) & (x < num_levels), axis=1)
  x = x[ok]
  n, d = x.shape
  if n < 2:
    raise ValueError(f"samples must hold at least 2 valid examples, got {n}.")
  ll = component_log_likelihoods(x, means=means_a, stds=stds_a, num_levels=num_levels) + np.log(weights_a)
  log_p = special.logsumexp(ll, axis=-1)
  bits = -log_p / (d * LOG2)
  ce, ce_se = float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(n))
  if entropy is None:
    entropy = mixture_entropy_bpd(means=means_a, stds=stds_a, weights=weights_a, num_levels=num_levels,
                                  num_samples=entropy_samples, seed=seed)
  h, h_se = float(entropy[0]), float(entropy[1])
  # Soft assignment: E_q[r_m(x)] equals w_m exactly when q = p (E_p[p(m | x)] = p(m)); the hard argmax
  # does not (overlapping components: the argmax frequencies of the data's own samples differ from w).
  r = np.exp(ll - log_p[:, None])
  freq = r.mean(0)
  freq_se = r.std(0, ddof=1) / math.sqrt(n)
  z = (freq - weights_a) / np.maximum(freq_se, 1e-300)
  return dict(
      cross_entropy_bpd=ce, cross_entropy_bpd_stderr=ce_se, entropy_bpd=h, entropy_bpd_stderr=h_se,
      gap_bpd=ce - h, gap_bpd_stderr=math.sqrt(ce_se**2 + h_se**2), num_samples=int(n),
      num_nonfinite=int((~ok).sum()), component_freq=freq.tolist(), weights=weights_a.tolist(),
      freq_stderr=freq_se.tolist(), tv=float(0.5 * np.abs(freq - weights_a).sum()),
      max_abs_z=float(np.max(np.abs(z))))


# ----------------------------------------------------------------------------------------------------
# Real data: unbiased two-sample statistics with a jackknife standard error.
# ----------------------------------------------------------------------------------------------------
TWO_SAMPLE_KERNELS = ("gaussian", "energy")


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d2 = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d2, 0.0)


def median_bandwidth(x: Any, y: Any, *, max_points: int = 1000, seed: int = 0) -> float:
  """The median heuristic: the median pairwise distance of (a subsample of) the pooled points."""
  z = np.concatenate([_flat(x), _flat(y)])
  if z.shape[0] > max_points:
    z = z[np.random.RandomState(seed).choice(z.shape[0], max_points, replace=False)]
  d2 = _pairwise_sq(z, z)
  iu = np.triu_indices(z.shape[0], 1)
  return float(np.sqrt(np.median(d2[iu])))


def _flat(x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def two_sample_statistic(x: Any, y: Any, *, kernel: str = "gaussian", bandwidth: float | None = None,
                         num_groups: int = 20, seed: int = 0) -> dict:
  """Unbiased MMD^2 (Gaussian kernel) or energy distance between samples x [n, ...] and y [m, ...].

      MMD^2_u = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / (n m),

  k(a, b) = exp(-|a - b|^2 / (2 bw^2)) ("gaussian"), or k(a, b) = -|a - b| ("energy": the energy
  distance 2 E|X - Y| - E|X - X'| - E|Y - Y'|). Standard error: the delete-one-group jackknife over
  num_groups random groups of x and of y removed together. Pass pixels in [-1, 1] (e.g.
  `vdiff.likelihood.encode` of levels), flattened per example. Memory is O(n m) in blocks of groups.

  Returns:
    dict(statistic, stderr, kernel, bandwidth (None for energy), n, m).
  Reference: Gretton et al. 2012, JMLR 13, Lemma 6; Szekely & Rizzo 2013.
  """
  kernel = check_choice(kernel, TWO_SAMPLE_KERNELS, "kernel")
  x, y = _flat(x), _flat(y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same dimensions per example, got {x.shape[1]} and {y.shape[1]}.")
  n, m = x.shape[0], y.shape[0]
  if min(n, m) < max(2, num_groups):
    raise ValueError(f"x and y need at least num_groups={num_groups} (and 2) examples each, got {n}, {m}.")
  if kernel == "gaussian":
    bw = median_bandwidth(x, y, seed=seed) if bandwidth is None else float(bandwidth)
    if not bw > 0:
      raise ValueError(f"bandwidth must be > 0, got {bw}.")
    kfn = lambda a, b: np.exp(-_pairwise_sq(a, b) / (2.0 * bw * bw))  # noqa: E731
  else:
    bw = None
    kfn = lambda a, b: -np.sqrt(_pairwise_sq(a, b))  # noqa: E731
  rng = np.random.RandomState(seed)
  gx = rng.permutation(n) % num_groups
  gy = rng.permutation(m) % num_groups
  xs = [x[gx == g] for g in range(num_groups)]
  ys = [y[gy == g] for g in range(num_groups)]
  nx = np.array([len(a) for a in xs], np.float64)
  ny = np.array([len(a) for a in ys], np.float64)
  sxx = np.zeros((num_groups, num_groups))
  syy = np.zeros((num_groups, num_groups))
  sxy = np.zeros((num_groups, num_groups))
  for g in range(num_groups):
    for h in range(num_groups):
      if h >= g:
        kxx, kyy = kfn(xs[g], xs[h]), kfn(ys[g], ys[h])
        if g == h:   # i != j: drop the diagonal
          kxx, kyy = kxx.sum() - np.trace(kxx), kyy.sum() - np.trace(kyy)
        else:
          kxx, kyy = kxx.sum(), kyy.sum()
        sxx[g, h] = sxx[h, g] = kxx
        syy[g, h] = syy[h, g] = kyy
      sxy[g, h] = kfn(xs[g], ys[h]).sum()

  def stat(keep):
    a, b = nx[keep].sum(), ny[keep].sum()
    kk = np.ix_(keep, keep)
    return (sxx[kk].sum() / (a * (a - 1)) + syy[kk].sum() / (b * (b - 1))
            - 2.0 * sxy[kk].sum() / (a * b))

  full = stat(np.ones(num_groups, bool))
  loo = np.array([stat(np.arange(num_groups) != g) for g in range(num_groups)])
  se = math.sqrt((num_groups - 1) / num_groups * np.sum(np.square(loo - loo.mean())))
  return dict(statistic=float(full), stderr=float(se), kernel=kernel, bandwidth=bw, n=int(n), m=int(m))


def levels_to_pixels(levels: Any, num_levels: int) -> np.ndarray:
  """Integer levels -> bin centres in [-1, 1] (`vdiff.likelihood.encode`), float64, for the statistics."""
  return np.asarray(likelihood.encode(np.asarray(levels), num_levels), np.float64)
