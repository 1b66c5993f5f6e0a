"""The evaluator and the dequantisation bounds (vdiff/evaluate.py, vdiff/likelihood.py, vdiff/ode.py).

References: the exact discrete log-probability of a quantised Gaussian is a product over dimensions of
Phi differences (`data.gaussian_mixture_log_prob`, float64); the exact denoiser and the exact CDM logits
of the quantised data come from its forward marginals, per dimension a mixture over the K bin centres
(docs/math.md sec. 7, the Gaussian-mixture line, with one zero-width component per level).
"""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import base
from vdiff import data as data_lib
from vdiff import evaluate as evaluate_lib
from vdiff import likelihood
from vdiff import models
from vdiff import ode
from vdiff import parallel
from vdiff import schedules
from vdiff import train

# gamma_max = 16: alpha_1 = 3.4e-4, so the prior N(0, I) at t = 1 is the true marginal to ~1e-7 nats/dim
# and the ODE density is the exact marginal at t0 up to the solver's tolerance.
WIDE = schedules.linear(gamma_min=-13.3, gamma_max=16.0)
K, MU, S = 16, np.array([0.1, -0.2]), 0.3


def _level_log_probs(mu, s, num_levels):
  """log P_d(k) [K, D]: per-dimension probabilities of the quantised N(mu_d, s^2) (Phi differences)."""
  levels = np.arange(num_levels)[:, None]
  return np.stack([data_lib.gaussian_mixture_log_prob(levels, means=[[m]], stds=[[s]],
                                                      num_levels=num_levels) for m in mu], -1)


def _quantised_gaussian(n, seed, mu=MU, s=S, num_levels=K):
  """n draws of the quantised N(mu, s^2 I) and their exact log P(k) (float64)."""
  x = mu + s * np.random.default_rng(seed).normal(size=(n, len(mu)))
  k = np.asarray(likelihood.decode(jnp.asarray(x, jnp.float32), num_levels))
  exact = data_lib.gaussian_mixture_log_prob(k, means=[mu], stds=[np.full(len(mu), s)],
                                             num_levels=num_levels)
  return k, exact


def _mixture_log_marginal(z, log_pk, alpha, var, num_levels):
  """log sum_k P_d(k) N(z_d; alpha x_k, var) summed over d: the forward marginal of the quantised data.

  z [B, D]; log_pk [K, D]; alpha, var scalars or [B, 1].
  """
  c = likelihood.bin_centres(num_levels)
  lp = jnp.asarray(log_pk.T, jnp.float32)  # [D, K]
  comp = lp[None] - 0.5 * jnp.square(z[..., None] - alpha[..., None] * c) / var[..., None]
  return jnp.sum(jax.nn.logsumexp(comp, -1) - 0.5 * jnp.log(2 * math.pi * var), -1)


def discrete_data_denoiser(schedule, log_pk, num_levels):
  """E[eps | z_t] for the quantised data: (z - alpha E[x | z]) / sigma, with E[x | z] the posterior mean
  over the K bin centres, per dimension (the data's dimensions are independent)."""
  c = likelihood.bin_centres(num_levels)
  lp = jnp.asarray(log_pk.T, jnp.float32)

  def eps_fn(z, t):
    g = schedule.gamma(jnp.broadcast_to(t, z.shape[:1]))[:, None]
    a, sig = schedules.alpha_from_gamma(g), schedules.sigma_from_gamma(g)
    # Responsibilities through a log-softmax: the logits reach ~1e6 at sigma^2 = 1.7e-6.
    logits = lp[None] - 0.5 * jnp.square(z[..., None] - a[..., None] * c) / jnp.square(sig)[..., None]
    x_hat = jnp.sum(jax.nn.softmax(logits, -1) * c, -1)
    return (z - a * x_hat) / sig

  return eps_fn


# --------------------------------------------------------------------------------------------------
# The forward-process bound.
# --------------------------------------------------------------------------------------------------
def test_ode_forward_bound_is_the_exact_discrete_log_probability_with_the_exact_denoiser():
  """Quantised N(mu, s^2) data, K = 16, the ODE with its exact denoiser: the forward-dequantised bound
  at t0 = 0 is <= the exact log P(k) and within solver tolerance of it (the model's posterior over z_0
  is the forward marginal, so the bound's gap KL(q || p(z | k)) vanishes); uniform dequantisation of the
  same model is hundreds of nats below (the model has no mass between the bin centres)."""
  n = 24
  k, exact = _quantised_gaussian(n, seed=0)
  eps_fn = discrete_data_denoiser(WIDE, _level_log_probs(MU, S, K), K)

  @jax.jit
  def run(k):
    fwd, extras = ode.ode_nll(jax.random.PRNGKey(0), eps_fn, WIDE, k, num_levels=K,
                              dequantization="forward")
    uni, _ = ode.ode_nll(jax.random.PRNGKey(0), eps_fn, WIDE, k, num_levels=K, dequantization="uniform")
    return fwd, extras["nfe"], uni

  # ode_nll returns upper bounds on -log P(k): minus them are the lower bounds on log P(k).
  fwd, nfe, uni = map(np.asarray, run(jnp.asarray(k)))
  fwd, uni = -fwd.astype(np.float64), -uni.astype(np.float64)
  gap = fwd - exact
  # Measured: mean gap 1.4e-4 nats (max |gap| 2e-3) per 2-D example at rtol = atol = 1e-5; the bound
  # may exceed log P(k) only by the solver's error.
  assert gap.mean() <= 1e-3, gap
  assert np.all(gap <= 5e-3), gap
  assert np.all(gap >= -5e-3), gap
  assert np.all(nfe > 6)
  uniform_gap = uni - exact  # the uniform nats include the D log(K / 2) of the dequantisation bound
  assert uniform_gap.mean() < -50.0, uniform_gap.mean()


def test_importance_weighted_bound_increases_with_m():
  """L_1 <= L_4 <= L_16 <= L_64 <= log P(k) (Burda et al. 2016), checked with paired differences over
  2000 quantised-Gaussian examples and fixed keys. The density is the exact marginal of the continuous
  N(mu, s^2) at gamma_min (the closed-form ODE density of Gaussian data), a model whose posterior over
  z_0 is wide where q is narrow, so the bound has a gap (~3 nats/dim) for the weights to close.
  Measured z-scores of the paired increases: 12.2, 12.2, 9.8."""
  n, gamma = 2000, jnp.float32(-13.3)
  k, exact = _quantised_gaussian(n, seed=1)
  a2 = 1.0 / (1.0 + math.exp(-13.3))  # alpha^2 = sigmoid(-gamma)
  a, v = math.sqrt(a2), a2 * S**2 + (1.0 - a2)

  def log_density_fn(r, z):  # log N(z; alpha mu, (alpha^2 s^2 + sigma^2) I)
    return (jnp.sum(-0.5 * jnp.square(z - a * MU) / v - 0.5 * math.log(2 * math.pi * v), -1),
            jnp.ones(z.shape[:1], jnp.int32))

  bounds = {}
  for m in (1, 4, 16, 64):
    b, nfe = jax.jit(lambda k, m=m: likelihood.forward_dequantization_bound(
        jax.random.PRNGKey(m), log_density_fn, k, num_levels=K, gamma=gamma, num_samples=m))(
            jnp.asarray(k))
    assert np.all(np.asarray(nfe) == m)
    bounds[m] = np.asarray(b, np.float64)
  for m1, m2 in ((1, 4), (4, 16), (16, 64)):
    d = bounds[m2] - bounds[m1]
    assert d.mean() > 5 * d.std(ddof=1) / math.sqrt(n), (m1, m2, d.mean(), d.std())
  # Gibbs + Jensen: the mean bound is below the mean exact log-probability, by a wide margin here.
  assert (bounds[64] - exact).mean() < -1.0
  # And log-mean-exp of 2m draws is at least the mean of the two halves' log-mean-exps (concavity).
  lw = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5)) * 3)
  assert np.all(np.asarray(likelihood.log_mean_exp(lw)) >=
                0.5 * np.asarray(likelihood.log_mean_exp(lw[:4]) + likelihood.log_mean_exp(lw[4:])) - 1e-6)


class _Logits(nn.Module):
  """A stand-in classifier (its parameters are not used: the tests replace logits_fn by exact logits)."""
  num_classes_out: int
  num_labels: int = 0

  @nn.compact
  def __call__(self, x, label=None, train=False):
    h = x.reshape(x.shape[0], -1)
    if self.num_labels:
      h = jnp.concatenate([h, nn.Embed(self.num_labels + 1, 4)(label)], -1)
    return nn.Dense(self.num_classes_out)(h)


def _cdm_family(num_steps=10, num_labels=0, shape=(2, 1, 1), num_levels=K):
  # DDPM's linear betas with T = num_steps betas: abar_1 = 1 - beta_1 = 1 - 1e-4 (sigma_1 = 0.01).
  m = models.CDMFamily(data_shape=shape, num_levels=num_levels, num_labels=num_labels,
                       num_steps=num_steps, beta_steps=num_steps)
  m.net = _Logits(num_classes_out=num_steps + 2, num_labels=num_labels)
  return m


def _eval_cfg(**kw):
  cfg = base.get_base_config().eval
  cfg.update(**kw)
  return cfg


def test_cdm_forward_bound_at_class_one_with_exact_logits():
  """The CDM one-step density at class 1 (Thm 3.2 at t = 1) with the K-level decoder at abar_1 and the
  forward dequantisation: with the exact logits of the quantised Gaussian (classes 1..T+1: its forward
  marginals; class 0: the continuous N(mu, s^2) density) it equals the exact log P(k) up to float32;
  uniform dequantisation at class 0 (a smooth density) is below it on average, by about
  Delta^2 / (24 s^2) = 0.007 nats/dim."""
  n, d = 2048, 2
  model = _cdm_family()
  abar = np.asarray(model.abar, np.float64)
  log_pk = _level_log_probs(MU, S, K)
  k, exact = _quantised_gaussian(n, seed=2)

  def exact_logits(z):
    z = z.reshape(z.shape[0], -1)
    cols = [jnp.sum(-0.5 * jnp.square(z - MU) / S**2 - 0.5 * math.log(2 * math.pi * S**2), -1)]
    for t in range(1, len(abar) - 1):
      cols.append(_mixture_log_marginal(z, log_pk, jnp.float32(math.sqrt(abar[t])),
                                        jnp.float32(1.0 - abar[t]), K))
    cols.append(jnp.sum(-0.5 * jnp.square(z) - 0.5 * math.log(2 * math.pi), -1))
    return jnp.stack(cols, -1)  # + log p_t(t), a constant for the uniform class prior

  model.logits_fn = lambda params, label=None, **kw: exact_logits
  # These logits are the bin-centre forward marginals (not a classifier trained on dequantised data, for
  # which cdm.forward_class picks a noisier class): for them class 1 is tight, so the bound is taken there.
  model.forward_class = 1
  batch = {"image": jnp.asarray(k.reshape(n, d, 1, 1)), "label": jnp.zeros((n,), jnp.int32)}
  out = {}
  for deq in ("forward", "uniform"):
    fn, dequantized = evaluate_lib.make_nll_fn(model, "cdm", _eval_cfg(dequantization=deq))
    nats, nfe = jax.jit(fn)({}, jax.random.PRNGKey(3), batch)
    # Either way the nats bound -log P(k): the uniform ones include D log(K / 2) (vdiff.likelihood).
    bound = -np.asarray(nats, np.float64)
    out[deq] = bound - exact
    assert dequantized == (deq == "uniform") and np.all(np.asarray(nfe) == 1)
  # forward: gap = KL(q || p(z | k)) ~ 0 (sigma_1 / alpha_1 = 0.01 << the bin width 0.125); float32
  # round-off of ~1e-5 relative on log-densities of ~+4 nats/dim.
  assert np.all(np.abs(out["forward"]) < 2e-3), np.abs(out["forward"]).max()
  # uniform: E_u log p(y) + log Delta <= log int_bin p <= log P(k) (Jensen; in expectation over u, not
  # per draw), gap ~ Delta^2 / (24 s^2) per dim. Standard error of the mean here ~0.004 nats.
  se = out["uniform"].std(ddof=1) / math.sqrt(n)
  assert out["uniform"].mean() < 0 and out["uniform"].mean() > -0.02 * d, (out["uniform"].mean(), se)


# --------------------------------------------------------------------------------------------------
# The evaluator.
# --------------------------------------------------------------------------------------------------
class _TinyScore(nn.Module):
  """A two-layer MLP score network (the trainer's interface, compiles in seconds)."""
  num_labels: int = 0

  @nn.compact
  def __call__(self, z, g_norm, label=None, *, train=False):
    h = z.reshape(z.shape[0], -1)
    feats = jnp.concatenate([h, jnp.broadcast_to(g_norm, z.shape[:1])[:, None]], -1)
    if self.num_labels:
      feats = jnp.concatenate([feats, nn.Embed(self.num_labels + 1, 8)(label)], -1)
    out = nn.Dense(h.shape[1], kernel_init=nn.initializers.normal(0.3))(jnp.tanh(nn.Dense(16)(feats)))
    return out.reshape(z.shape)


def _tiny_vdm(num_labels=0, shape=(8, 8, 1), num_levels=17):
  m = models.VDMFamily(data_shape=shape, num_levels=num_levels, num_labels=num_labels,
                       schedule=models.ScheduleSpec("linear", -8.0, 5.0), score_kwargs={})
  m.net = _TinyScore(num_labels=num_labels)
  return m


@pytest.fixture(scope="module")
def digits():
  return data_lib.load("digits", split="test", seed=0)


def _subset(ds, n):
  return dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])


def _evaluate_until_killed(work, model, params, ds, *, last_batch: int, **common):
  """Evaluate into the work directory `work` and die (an exception) once batch `last_batch` is recorded,
  as a killed evaluation would; returns `work`."""

  class Killed(Exception):
    pass

  def die(i):
    if i == last_batch:
      raise Killed()

  work.mkdir()
  with pytest.raises(Killed):
    train.evaluate(model, params, ds, workdir=str(work), on_batch=die, **common)
  return work


@pytest.mark.parametrize("estimator,dequantization", [("elbo", "uniform"), ("ode", "forward")])
def test_interrupted_evaluation_resumes_to_the_uninterrupted_figure(tmp_path, digits, estimator,
                                                                   dequantization):
  """Batches 0 and 1 of 3 finish, then the run dies: the rerun reads them back from
  eval_<estimator>_partial.jsonl, evaluates batch 2 only (same draws: fold_in(rng, 2)) and reports
  exactly the uninterrupted run's bits/dim and nfe; the partial file is removed when done."""
  model = _tiny_vdm()
  params = model.init(jax.random.PRNGKey(0))
  cfg = _eval_cfg(batch_size=4, num_examples=10, estimator=estimator, dequantization=dequantization,
                  num_time_samples=2)
  mesh = parallel.make_mesh()
  common = dict(estimator=estimator, eval_cfg=cfg, mesh=mesh, rng=jax.random.PRNGKey(7),
                split="test", step=5, progress=False)
  full = train.evaluate(model, params, digits, workdir=str(tmp_path / "a"), **common)
  work = _evaluate_until_killed(tmp_path / "b", model, params, digits, last_batch=1, **common)
  partial = work / f"eval_{estimator}_partial.jsonl"
  assert [json.loads(l)["batch"] for l in partial.read_text().splitlines()] == [0, 1]
  resumed = train.evaluate(model, params, digits, workdir=str(work), **common)
  assert resumed["resumed_after_batch"] == 2 and full["resumed_after_batch"] == 0
  assert resumed["num_examples"] == full["num_examples"] == 10
  assert resumed["bpd"] == full["bpd"] and resumed["bpd_stderr"] == full["bpd_stderr"]
  assert resumed["nfe"] == full["nfe"]
  assert not partial.exists()
  # A different checkpoint step does not pick up another evaluation's rows.
  assert evaluate_lib._read_partial(str(partial), "0" * 16) == {}  # pylint: disable=protected-access


def _edit_digit(line: str) -> str:
  """The row with one digit of its first nats value changed (as a damaged or hand-edited file)."""
  row = json.loads(line)
  text = json.dumps(row["nats"][0])
  i = next(j for j, c in enumerate(text) if c.isdigit() and c != "0")
  row["nats"][0] = json.loads(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
  return json.dumps(row) + "\n"


@pytest.mark.parametrize("damage", ["digit", "duplicate", "swap", "missing"])
def test_damaged_partial_rows_are_recomputed_never_used(tmp_path, digits, damage, capsys):
  """Item 3 of the second "nothing lost" round: eval_<estimator>_partial.jsonl rows were trusted as
  written: one changed digit moved the final figure (5.098732054 -> 5.099013835), a duplicated batch
  index moved it to 5.187071353, exit 0 both times. Rows now carry a sha256; a damaged, duplicated,
  missing or out-of-order row and everything after it are recomputed, so the figure is the
  uninterrupted run's (the reference), and the rerun says which rows it did not use."""
  model = _tiny_vdm()
  params = model.init(jax.random.PRNGKey(0))
  cfg = _eval_cfg(batch_size=2, num_examples=10, estimator="elbo", num_time_samples=2)
  common = dict(estimator="elbo", eval_cfg=cfg, mesh=parallel.make_mesh(), rng=jax.random.PRNGKey(7),
                split="test", step=5, progress=False)
  full = train.evaluate(model, params, digits, workdir=str(tmp_path / "a"), **common)
  work = _evaluate_until_killed(tmp_path / "b", model, params, digits, last_batch=2, **common)
  partial = work / "eval_elbo_partial.jsonl"
  lines = partial.read_text().splitlines(keepends=True)
  assert [json.loads(l)["batch"] for l in lines] == [0, 1, 2]
  edited = {"digit": [lines[0], _edit_digit(lines[1]), lines[2]],
            "duplicate": [lines[0], lines[1], lines[1], lines[2]],
            "swap": [lines[0], lines[2], lines[1]],
            "missing": [lines[0], lines[2]]}[damage]
  partial.write_text("".join(edited))
  capsys.readouterr()
  resumed = train.evaluate(model, params, digits, workdir=str(work), **common)
  assert resumed["bpd"] == full["bpd"] and resumed["bpd_stderr"] == full["bpd_stderr"]
  assert resumed["resumed_after_batch"] == 1
  assert "not resuming from every row" in capsys.readouterr().out


def test_evaluation_records_its_settings(digits):
  model = _tiny_vdm()
  params = model.init(jax.random.PRNGKey(0))
  cfg = _eval_cfg(batch_size=8, num_examples=8, estimator="ode", dequantization="forward",
                  num_dequantization_samples=2, ode_t0=0.01)
  r = train.evaluate(model, params, digits, estimator="ode", eval_cfg=cfg, mesh=parallel.make_mesh(),
                     rng=jax.random.PRNGKey(0), split="test", step=3, progress=False)
  assert r["dequantization"] == "forward" and r["ode_t0"] == 0.01 and r["discrete_bound"] is True
  assert r["num_dequantization_samples"] == 2 and r["num_probes"] == 2 and r["num_time_samples"] == 0
  assert r["matmul_precision"] == "highest" and r["condition"].startswith("none")
  assert "forward" in r["summary"] and "discrete bound" in r["convention"]
  assert np.isfinite(r["bpd"]) and r["num_examples"] == 8


def test_periodic_evaluations_compile_once(digits):
  """Two evaluations of the same model and settings (as the train loop's periodic evals) trace the
  estimator once: the second reuses the compiled program."""
  model = _tiny_vdm()
  traces = []
  nll = model.nll

  def counting_nll(*args, **kwargs):
    traces.append(1)
    return nll(*args, **kwargs)

  model.nll = counting_nll
  cfg = _eval_cfg(batch_size=4, num_examples=8)
  mesh = parallel.make_mesh()
  for seed in (0, 1):  # new parameters each time, as during training
    params = model.init(jax.random.PRNGKey(seed))
    train.evaluate(model, params, digits, estimator="elbo", eval_cfg=cfg, mesh=mesh,
                   rng=jax.random.PRNGKey(0), split="test", step=seed, progress=False)
  assert len(traces) == 1, len(traces)


def test_ode_results_do_not_depend_on_the_batching(digits):
  """The ODE draws its noise per example and the last batch holds only the remaining examples (no
  padded rows integrated: 3 images with batch 2 are batches of 2 and 1; 8 images with batch 500 are one
  batch of 8): batch size 2 gives the per-image values, hence the bits/dim and nfe, of batch size 1."""
  assert evaluate_lib.batch_plan(8, 500, 1, cut_last=True) == [(0, 8)]
  assert evaluate_lib.batch_plan(3, 2, 1, cut_last=True) == [(0, 2), (2, 1)]
  assert evaluate_lib.batch_plan(3, 2, 1, cut_last=False) == [(0, 2), (2, 2)]
  assert evaluate_lib.batch_plan(10, 8, 4, cut_last=True) == [(0, 8), (8, 4)]
  model = _tiny_vdm()
  params = model.init(jax.random.PRNGKey(0))
  ds = _subset(digits, 3)
  results = [train.evaluate(model, params, ds, estimator="ode",
                            eval_cfg=_eval_cfg(batch_size=b, num_examples=3, estimator="ode"),
                            mesh=parallel.make_mesh(), rng=jax.random.PRNGKey(0), split="test",
                            step=0, progress=False) for b in (1, 2)]
  np.testing.assert_allclose(results[0]["bpd"], results[1]["bpd"], rtol=1e-5)
  assert results[0]["nfe"] == results[1]["nfe"], (results[0]["nfe"], results[1]["nfe"])


@pytest.mark.parametrize("estimator,dequantization", [
    ("elbo", "uniform"), ("cdm", "uniform"), ("cdm", "forward"), ("ode", "uniform")])
def test_condition_is_explicit_and_the_same_for_every_estimator(estimator, dequantization):
  """eval.condition='none' evaluates -log p(x) (the null label), 'label' evaluates -log p(x | c), for
  all three estimators: 'none' equals 'label' on a batch whose labels are the null label, and differs
  from 'label' on the true labels."""
  num_labels = 3
  if estimator == "cdm":
    model = _cdm_family(num_labels=num_labels, shape=(4, 4, 1), num_levels=17)
  else:
    model = _tiny_vdm(num_labels=num_labels, shape=(4, 4, 1))
  params = model.init(jax.random.PRNGKey(0))
  if estimator == "cdm":  # a label embedding that matters
    params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  k = jax.random.randint(jax.random.PRNGKey(2), (2, 4, 4, 1), 0, 17)
  batch = {"image": k, "label": jnp.array([0, 2], jnp.int32)}
  null_batch = dict(batch, label=jnp.full((2,), num_labels, jnp.int32))

  fns = {c: jax.jit(train.make_nll_fn(model, estimator, _eval_cfg(
      condition=c, dequantization=dequantization))[0]) for c in ("none", "label")}

  def nats(condition, b):
    return np.asarray(fns[condition](params, jax.random.PRNGKey(4), b)[0])

  np.testing.assert_allclose(nats("none", batch), nats("label", null_batch), rtol=1e-6)
  assert np.all(np.abs(nats("label", batch) - nats("none", batch)) > 1e-4)


@pytest.mark.parametrize("precision,expected", [("highest", True), ("default", False)])
def test_matmul_precision_reaches_the_compiled_program(digits, precision, expected):
  model = _tiny_vdm()
  params = model.init(jax.random.PRNGKey(0))
  mesh = parallel.make_mesh()
  ev = evaluate_lib.Evaluator(model, estimator="elbo", eval_cfg=_eval_cfg(batch_size=2, precision=precision),
                              mesh=mesh)
  local = evaluate_lib._local_batch(digits, 0, 2, 2)  # pylint: disable=protected-access
  bsh = parallel.batch_sharding(mesh)
  batch = parallel.global_batch({k: local[k] for k in ("image", "label", "index")}, bsh)
  compiled = ev.compiled(params, jax.random.PRNGKey(0), batch, parallel.global_batch(local["mask"], bsh))
  assert ("operand_precision={highest" in compiled.as_text()) == expected


@pytest.mark.parametrize("key,value", [("dequantization", "gaussian"), ("precision", "fp8"),
                                       ("condition", "true"), ("num_dequantization_samples", 0),
                                       ("ode_t0", 1.0)])
def test_bad_eval_settings_are_refused_by_name(key, value):
  config = base.get_base_config()
  config.eval[key] = value
  with pytest.raises(ValueError, match=f"eval.{key}"):
    train.validate_config(config)


def test_old_import_paths_reach_the_ode_module():
  for name in ("ode_log_likelihood", "ode_nll_bpd", "probability_flow", "probability_flow_drift",
               "ODE_SOLVERS", "DIVERGENCES"):
    assert getattr(likelihood, name) is getattr(ode, name)
  assert train.make_nll_fn is evaluate_lib.make_nll_fn and train.ESTIMATORS == evaluate_lib.ESTIMATORS
