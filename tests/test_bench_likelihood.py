"""experiments/bench_likelihood.py's bookkeeping: paired gaps between estimators of one run."""

import math

import numpy as np

from experiments import bench_likelihood


def test_paired_gap_to_another_estimator_on_the_same_images():
  # Reference: the paired differences written out by hand. The second estimator ran on the first 3 of
  # the reference's 5 images (a prefix), so only those pair up.
  ref = np.array([2.0, 3.0, 1.0, 9.0, 9.0])
  bpd = np.array([2.5, 3.1, 1.6])
  entry = bench_likelihood.add_paired_gap({}, bpd, ref, "elbo_k100")
  diff = np.array([0.5, 0.1, 0.6])
  assert math.isclose(entry["paired_gap_to_elbo_k100"], 0.4, rel_tol=1e-12)
  se = math.sqrt(((diff - 0.4) ** 2).sum() / 2 / 3)
  assert math.isclose(entry["paired_gap_to_elbo_k100_stderr"], se, rel_tol=1e-12)
  # No reference yet, or fewer reference images than the entry has: nothing is claimed.
  assert bench_likelihood.add_paired_gap({}, bpd, None, "elbo_k100") == {}
  assert bench_likelihood.add_paired_gap({}, bpd, ref[:2], "elbo_k100") == {}
