"""experiments/bench_likelihood.py's bookkeeping: paired gaps between estimators of one run."""

import math

import numpy as np
import pytest

from experiments import bench_likelihood


def test_paired_gap_to_another_estimator_on_the_same_images():
  # Reference: the paired differences written out by hand.
  ref = np.array([2.0, 3.0, 1.0])
  bpd = np.array([2.5, 3.1, 1.6])
  entry = bench_likelihood.add_paired_gap({}, bpd, ref, "elbo_k100")
  diff = np.array([0.5, 0.1, 0.6])
  assert math.isclose(entry["paired_gap_to_elbo_k100"], 0.4, rel_tol=1e-12)
  se = math.sqrt(((diff - 0.4) ** 2).sum() / 2 / 3)
  assert math.isclose(entry["paired_gap_to_elbo_k100_stderr"], se, rel_tol=1e-12)
  # No reference yet, or a reference on other images (a longer prefix: other batches, correlated draws):
  # nothing is claimed.
  assert bench_likelihood.add_paired_gap({}, bpd, None, "elbo_k100") == {}
  assert bench_likelihood.add_paired_gap({}, bpd, np.append(ref, 9.0), "elbo_k100") == {}
  assert bench_likelihood.add_paired_gap({}, bpd, ref[:2], "elbo_k100") == {}


def test_paired_gap_to_each_per_image_code():
  # Reference: the per-image differences written out by hand. The codes hold one more image than the
  # estimator ran on (the ODE's prefix): the gap is over the estimator's images; whole-array codes
  # (no per-image figure) and codes on fewer images are left out.
  codes = {"png": {"bpd": 4.0, "bpd_per_image": [4.0, 5.0, 3.0, 9.0]},
           "webp": {"bpd": 3.0, "bpd_per_image": [3.0, 3.5, 2.0, 8.0]},
           "lzma": {"bpd": 4.2}, "short": {"bpd": 1.0, "bpd_per_image": [1.0, 1.0]}, "num_images": 4}
  entry = bench_likelihood.add_codec_gaps({"per_image_bpd": [3.5, 3.1, 2.6]}, codes)
  gaps = entry["paired_gap_to_codec"]
  assert set(gaps) == {"png", "webp"}
  for name, diff in (("png", [-0.5, -1.9, -0.4]), ("webp", [0.5, -0.4, 0.6])):
    mean = sum(diff) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in diff) / 2 / 3)
    assert math.isclose(gaps[name]["gap"], mean, rel_tol=1e-12), name
    assert math.isclose(gaps[name]["stderr"], se, rel_tol=1e-12), name
  assert "paired_gap_to_codec" not in bench_likelihood.add_codec_gaps({"per_image_bpd": [1.0]}, {"lzma": {}})


def test_report_merges_bench_files_of_the_same_images_and_refuses_others():
  from experiments import report  # pylint: disable=g-import-not-at-top
  data = {"name": "gaussian_mixture", "split": "test", "num_examples": 500, "shape": [4, 4, 1],
          "num_levels": 256}
  a = {"data": data, "results": [{"label": "vdm/elbo_k1"}], "command": "A", "wall_seconds": 10.0,
       "baselines": None, "hardware": {}}
  b = {"data": dict(data), "results": [{"label": "cdm/cdm_uniform"}, {"label": "cdm/cdm_forward"}],
       "command": "B", "wall_seconds": 2.5, "baselines": {"gzip": {"bpd": 7.6}}, "hardware": {}}
  m = report.merge_bench([a, b])
  assert [r["label"] for r in m["results"]] == ["vdm/elbo_k1", "cdm/cdm_uniform", "cdm/cdm_forward"]
  assert m["command"] == "A; B" and m["wall_seconds"] == 12.5 and m["baselines"] == {"gzip": {"bpd": 7.6}}
  with pytest.raises(SystemExit, match="num_examples"):
    report.merge_bench([a, dict(b, data=dict(data, num_examples=16))])


def test_ode_draws_do_not_depend_on_the_batch_size():
  """The ODE estimator folds each image's index into the key (vdiff.evaluate); the bench used to fold
  the batch index in as well, so the same images got other draws at another batch size (9.15 / 8.75
  bits/dim at batch 2 against 8.64 / 8.32 at batch 4 on a photos model). Now every image's bits/dim is
  the same at batch 1, 2 and 4 (reference: the estimator run image by image, batch 1)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  from vdiff import models  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, z, g_norm, label=None, *, train=False):
      h = z.reshape(z.shape[0], -1)
      feats = jnp.concatenate([h, jnp.broadcast_to(g_norm, z.shape[:1])[:, None]], -1)
      return nn.Dense(h.shape[1], kernel_init=nn.initializers.normal(0.3))(
          jnp.tanh(nn.Dense(16)(feats))).reshape(z.shape)

  model = models.VDMFamily(data_shape=(8, 8, 1), num_levels=17, num_labels=0,
                           schedule=models.ScheduleSpec("linear", -8.0, 5.0), score_kwargs={})
  model.net = Tiny()
  params = model.init(jax.random.PRNGKey(0))
  ds = data_lib.load("digits", split="test", seed=0)
  ds = dataclasses.replace(ds, images=ds.images[:4], labels=ds.labels[:4])
  fn = bench_likelihood.ode_fn(model, tol=1e-3, divergence="hutchinson")
  per_image = {}
  for b in (1, 2, 4):
    entry = bench_likelihood.run_estimator(fn[0], params, ds, batch_size=b, seed=3, dequantized=True,
                                           warmup=False, per_example=True)
    per_image[b] = np.asarray(entry["per_image_bpd"])
  np.testing.assert_allclose(per_image[2], per_image[1], rtol=1e-4)
  np.testing.assert_allclose(per_image[4], per_image[1], rtol=1e-4)
  # The draws matter (so the test can fail): batch-indexed keys give other figures.
  folded = bench_likelihood.run_estimator(fn[0], params, ds, batch_size=2, seed=3, dequantized=True,
                                          warmup=False, per_example=False)
  assert np.max(np.abs(np.asarray(folded["per_image_bpd"]) - per_image[1])) > 1e-3
