"""Trainer: compile once, the work-directory contract, clear errors for bad configs and data."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import quickstart
from _overrides import set_keys
from vdiff import data as data_lib
from vdiff import parallel
from vdiff import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = quickstart.get_config("tiny")
  return set_keys(c, overrides)


@pytest.mark.parametrize("steps_per_dispatch", [1, 2])
def test_train_step_traces_once(steps_per_dispatch):
  config = tiny_config(**{"training.steps_per_dispatch": steps_per_dispatch})
  ds = train.load_data(config, "train")
  model = train.build_model(config, ds)
  tx = train.optimizer_from_config(config)
  mesh = parallel.make_mesh()
  state = train.init_state(model, tx, jax.random.PRNGKey(0), mesh)
  traces = []
  step_fn = train.make_train_step(model, ema_decay=0.9)

  def counted(state, batch):
    traces.append(1)  # Python side effect: runs only while tracing
    return step_fn(state, batch)

  jitted = train.jit_train_step(counted, mesh, steps_per_dispatch=steps_per_dispatch)
  losses = []
  for i in range(4):
    local = train._stack_batches(ds, config, i * steps_per_dispatch, steps_per_dispatch)  # pylint: disable=protected-access
    batch = parallel.global_batch(local, parallel.batch_sharding(
        mesh, leading_axes=0 if steps_per_dispatch == 1 else 1),
        batch_axis=0 if steps_per_dispatch == 1 else 1)
    state, metrics = jitted(state, batch)
    losses.append(float(metrics["loss"]))
  assert len(traces) == 1, f"the train step was traced {len(traces)} times"
  assert int(state.step) == 4 * steps_per_dispatch
  assert all(np.isfinite(losses))


class _ManyLeaves:
  """A model with `num_leaves` independent 8x16 weight matrices: loss = sum_i ||tanh(x W_i)||^2."""

  data_shape = (8,)

  def __init__(self, num_leaves):
    self.num_leaves = num_leaves

  def init(self, rng):
    del rng
    return {f"w{i:03d}": jnp.full((8, 16), 0.01 * i) for i in range(self.num_leaves)}

  def loss(self, params, rng, batch, train=True):
    del rng, train
    per = sum(jnp.sum(jnp.tanh(batch["image"] @ w) ** 2, axis=-1) for w in params.values())
    return per, {"sum_sq": per}


@functools.lru_cache(maxsize=None)
def _many_leaves_step(grad_clip, num_leaves=100):
  """The jitted train step of `_ManyLeaves(num_leaves)`, its initial state, a batch and its optimised HLO
  (compiled once, shared by the tests below)."""
  model = _ManyLeaves(num_leaves)
  tx = train.make_optimizer(learning_rate=1e-3, warmup_steps=1, grad_clip=grad_clip)
  mesh = parallel.make_mesh()
  state = train.init_state(model, tx, jax.random.PRNGKey(0), mesh)
  jitted = train.jit_train_step(train.make_train_step(model, ema_decay=0.9), mesh, steps_per_dispatch=1)
  batch = {"image": jnp.ones((4, 8), jnp.float32)}
  compiled = jitted.lower(state, batch).compile()
  return model, compiled, state, batch, compiled.as_text()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_update_kernels_do_not_each_reduce_over_every_leaf(grad_clip):
  # The skip-if-non-finite decision reduces over every gradient leaf. Written as a per-leaf select on
  # that flag, XLA fused the whole reduction into each leaf's update kernels: O(leaves^2) code, which
  # at paper size took XLA's CPU backend over ten minutes and 20 GB to compile (DiffEnc; 243 s -> 30 s
  # for a 2-block score network once the step used lax.cond). Reference: with 100 leaves the select
  # version compiles to 407 kernels with over 50 operands each; the step must have a handful (the
  # loss's own sum, the gradient norm, the finiteness flag), whatever the number of leaves.
  model, jitted, state, batch, hlo = _many_leaves_step(grad_clip)
  widths = [len(re.findall(r"%[\w.\-]+", line.split(" fusion(", 1)[1].split("), kind=")[0]))
            for line in hlo.splitlines() if " fusion(" in line]
  wide = sum(w > model.num_leaves // 2 for w in widths)
  assert wide <= 10, (wide, len(widths))
  new_state, metrics = jitted(jax.tree.map(jnp.copy, state), batch)  # the step donates its state
  assert bool(metrics["finite"]) and int(new_state.step) == 1


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_guard_and_grad_norm_add_no_reduction_per_leaf(grad_clip):
  # The non-finite guard, the `grad_norm` metric and gradient clipping each read a global norm; the
  # step computes each norm as one reduction over the concatenated leaves, shared by all three. The
  # model's own loss has one reduction per leaf (sum over each tanh(x W_i)^2), so the optimised HLO of
  # the 100-leaf step holds about 100 reductions. Measured on the XLA CPU backend: 103 (grad_clip=0)
  # and 103 (grad_clip=1) now; 301 and 401 with a finiteness reduction per gradient leaf, a per-leaf
  # grad_norm and optax's per-leaf clipping norm (one, two and three more reductions per leaf).
  model, _, _, _, hlo = _many_leaves_step(grad_clip)
  reductions = len(re.findall(r"\breduce\(", hlo))
  assert reductions <= model.num_leaves + 50, reductions


def test_guard_skips_an_update_that_is_not_finite():
  # A NaN learning rate (refused by validate_config, here forced past it) makes every update NaN while
  # the loss and the gradients stay finite. The guard checks the update too: the step is counted as
  # non-finite and the parameters, the EMA and the optimiser state stay as they were.
  model = _ManyLeaves(3)
  tx = train.make_optimizer(learning_rate=float("nan"), warmup_steps=1)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  before = jax.tree.map(np.asarray, (state.params, state.ema_params, state.opt_state))
  step = jax.jit(train.make_train_step(model, ema_decay=0.9))
  batch = {"image": jnp.ones((4, 8), jnp.float32)}
  for i in range(3):  # step 0 has learning rate 0 * NaN = NaN too (linear warm-up from 0)
    state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"]))
  assert int(state.nonfinite_count) == 3 and int(state.first_nonfinite_step) == 0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.ema_params,
                                                             state.opt_state))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_weight_decay_reaches_kernels_only():
  # With zero gradients Adam's moments stay 0, so AdamW's update is -lr_t * wd * p for a decayed
  # parameter and exactly 0 for any other. Over 100 steps (lr_0 = 0 at the first step of the linear
  # warm-up, lr afterwards) a decayed kernel becomes p * (1 - lr wd)^99 (closed form), while biases,
  # norm scales, the class embedding and every schedule parameter (the pinned endpoints gamma_0 /
  # gamma_1 included) do not move at all.
  from vdiff import models  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"model.schedule.kind": "learned_pinned", "model.conditional": True})
  model = models.from_config(config.model, data_shape=(8, 8, 1), num_levels=17, num_labels=10)
  params = model.init(jax.random.PRNGKey(0))
  lr, wd = 1e-2, 0.1
  tx = train.make_optimizer(learning_rate=lr, warmup_steps=1, weight_decay=wd)
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def run(params):
    def body(_, carry):
      p, opt = carry
      u, opt = tx.update(zeros, opt, p)
      return optax.apply_updates(p, u), opt
    return jax.lax.fori_loop(0, 100, body, (params, tx.init(params)))[0]

  final = run(params)
  flat0 = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  flat1 = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(final)}
  kinds = {"kernel": 0, "schedule": 0, "bias": 0, "scale": 0, "embedding": 0}
  for key, p0 in flat0.items():
    if key.startswith("['schedule']"):
      kinds["schedule"] += 1
      np.testing.assert_array_equal(flat1[key], p0, err_msg=key)
    elif key.endswith("['kernel']") and p0.ndim >= 2:
      kinds["kernel"] += 1
      np.testing.assert_allclose(flat1[key], p0 * (1.0 - lr * wd) ** 99, rtol=2e-5, err_msg=key)
    else:
      kinds[key.rsplit("'", 2)[-2]] += 1
      np.testing.assert_array_equal(flat1[key], p0, err_msg=key)
  assert all(kinds.values()), kinds  # every kind of parameter was present and checked
  assert float(final["schedule"]["gamma_0"]) == float(params["schedule"]["gamma_0"])


def test_scan_equals_single_steps():
  """Two steps in one lax.scan dispatch give the parameters of two single-step dispatches."""
  config = tiny_config()
  ds = train.load_data(config, "train")
  model = train.build_model(config, ds)
  tx = train.optimizer_from_config(config)
  mesh = parallel.make_mesh()
  init = lambda: jax.jit(lambda r: train.create_train_state(model, tx, r))(jax.random.PRNGKey(0))
  step_fn = train.make_train_step(model, ema_decay=0.9)
  one = train.jit_train_step(step_fn, mesh, steps_per_dispatch=1)
  two = train.jit_train_step(step_fn, mesh, steps_per_dispatch=2)
  s1 = init()
  for i in range(2):
    s1, _ = one(s1, jax.tree.map(jnp.asarray, train._stack_batches(ds, config, i, 1)))  # pylint: disable=protected-access
  s2, _ = two(init(), jax.tree.map(jnp.asarray, train._stack_batches(ds, config, 0, 2)))  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_nonfinite_update_is_skipped_and_counted():
  config = tiny_config()
  ds = train.load_data(config, "train")
  model = train.build_model(config, ds)
  tx = train.optimizer_from_config(config)
  state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(train.make_train_step(model, ema_decay=0.9, nan_policy="skip", inject_nan_at_step=0))
  state, metrics = step(state, jax.tree.map(jnp.asarray, train._stack_batches(ds, config, 0, 1)))  # pylint: disable=protected-access
  assert float(metrics["finite"]) == 0.0
  assert int(state.nonfinite_count) == 1 and int(state.first_nonfinite_step) == 0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, metrics = step(state, jax.tree.map(jnp.asarray, train._stack_batches(ds, config, 1, 1)))  # pylint: disable=protected-access
  assert float(metrics["finite"]) == 1.0 and int(state.nonfinite_count) == 1


def _run_cli(workdir, *extra, env=None):
  cmd = [sys.executable, "-m", "experiments.main",
         "--config=experiments/configs/quickstart.py:tiny", f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, **(env or {})))


def test_cli_tiny_writes_the_workdir_contract(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run_cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "test bits/dim" in proc.stdout
  files = set(os.listdir(workdir))
  assert {"config.json", "metrics.jsonl", "eval.json", "checkpoints"} <= files
  assert any(f.endswith(".png") for f in files) and any(f.endswith(".npz") for f in files)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "loss" in r]
  assert train_rows and all({"step", "loss", "bpd"} <= set(r) for r in train_rows)
  ev = json.load(open(os.path.join(workdir, "eval.json")))
  assert {"step", "split", "bpd", "bpd_stderr", "estimator", "num_examples"} <= set(ev)
  assert ev["step"] == 20 and ev["split"] == "test" and ev["estimator"] == "elbo"
  assert ev["num_examples"] == 128 and np.isfinite(ev["bpd"])
  # The printed figure is the one in eval.json.
  assert f"{ev['bpd']:.4f}" in proc.stdout
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["training"]["num_steps"] == 20
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "20"
  # TensorBoard event files beside metrics.jsonl, holding the same rows.
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(f.startswith("events.out.tfevents") for f in events)


def test_cli_refuses_unknown_config_key(tmp_path):
  # One line naming the key and the nearest known key (not a 51-line traceback from inside the flag
  # parser), exit status 2 (a usage error), nothing written.
  proc = _run_cli(str(tmp_path / "x"), "--config.training.not_a_key=3")
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "not_a_key" in proc.stderr
  assert not os.path.exists(tmp_path / "x" / "checkpoints")
  proc = _run_cli(str(tmp_path / "x"), "--config.training.batch_sise=3")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) <= 3, (proc.returncode, lines[:5], len(lines))
  assert "unknown config key 'training.batch_sise'" in lines[0]
  assert "nearest known key is 'training.batch_size'" in lines[0]
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("key,value,message", [
    ("training.batch_size", 0, "training.batch_size must be >= 1"),
    ("model.schedule.gamma_min", 6.0, "gamma_min"),
    ("training.nan_policy", "ignore", "training.nan_policy"),
    ("training.ema_decay", 1.5, "training.ema_decay"),
    ("eval.params", "last", r"eval.params must be one of \('ema', 'raw'\)"),
    ("sample.params", "best", r"sample.params must be one of \('ema', 'raw'\)"),
    ("model.family", "gan", "model.family"),
    ("eval.estimator", "bogus", "eval.estimator"),
    # Settings that used to fail only after the whole training run, or deep inside it without the key:
    ("eval.batch_size", 0, "eval.batch_size must be >= 1"),
    ("sample.sampler", "vdm_ancestal", r"sample.sampler must be one of .* got 'vdm_ancestal' \(did you mean "
                                         r"'vdm_ancestral'\?\)"),
    ("eval.estimator", "cdm", "eval.estimator='cdm' does not apply to model family 'vdm'"),
    ("training.batch_size", 10**8, r"training.batch_size \(100000000\) must be <= the number of "
                                   r"training examples \(1497"),
])
def test_bad_config_values_are_refused(tmp_path, key, value, message):
  config = tiny_config(**{key: value})
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_an_eval_batch_larger_than_the_evaluated_examples_is_capped_not_refused():
  """Old code refused it (`eval.batch_size (100) must be <= the number of evaluated examples (64 ...)`),
  so the README's `--config.eval.num_examples=32` failed with the quickstart's eval.batch_size = 100.
  The evaluator makes one batch of the examples instead (reference: `evaluate.batch_plan`'s contract)."""
  from vdiff import evaluate  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"eval.batch_size": 100, "eval.num_examples": 64})
  ds = train.load_data(config, "train")
  train.validate_data(config, ds, train.load_data(config, "test"))
  assert evaluate.batch_plan(64, 100, 1, cut_last=False) == [(0, 64)]
  assert evaluate.batch_plan(64, 100, 1, cut_last=True) == [(0, 64)]


@pytest.mark.parametrize("key,value", [
    ("optim.learning_rate", float("nan")), ("optim.weight_decay", float("inf")),
    ("optim.b2", float("nan")), ("model.p_uncond", float("-inf")), ("eval.ode_rtol", float("nan")),
])
def test_nonfinite_config_floats_are_refused(key, value):
  # Every float of the config is checked (a walk over the ConfigDict), so a NaN reaches no step.
  with pytest.raises(ValueError, match=rf"{re.escape(key)} must be finite, got {value}"):
    train.validate_config(tiny_config(**{key: value}))


def _npz_config(path, **overrides):
  return tiny_config(**{"data.name": "npz", "data.path": path, "training.num_steps": 2,
                        "training.checkpoint_every": 1, "eval.batch_size": 8, "eval.num_examples": 0,
                        "sample.num_samples": 0, **overrides})


@pytest.mark.parametrize("case", ["test_split_6x6", "labels_out_of_range"])
def test_unusable_data_is_refused_before_step_0(tmp_path, case):
  # An 8x8 training split with a 6x6 test split was evaluated with D = 64; labels past num_labels made
  # every step of a conditional run a skipped NaN step and still printed a bits/dim. Both are refused
  # when the data are loaded, before any step (no checkpoint is written).
  rng = np.random.RandomState(0)
  path = str(tmp_path / "data.npz")
  train_images = rng.randint(0, 17, (32, 8, 8, 1)).astype(np.uint8)
  if case == "test_split_6x6":
    np.savez(path, train=train_images, test=rng.randint(0, 17, (8, 6, 6, 1)).astype(np.uint8),
             num_levels=np.int64(17))
    config, message = _npz_config(path), r"\(8, 8, 1\).*\(6, 6, 1\)"
  else:
    np.savez(path, train=train_images, test=rng.randint(0, 17, (8, 8, 8, 1)).astype(np.uint8),
             train_labels=rng.randint(0, 4, 32), test_labels=rng.randint(0, 3, 8),
             num_levels=np.int64(17), num_labels=np.int64(3))
    config, message = _npz_config(path, **{"model.conditional": True}), r"key 'train_labels'.*\[0, 3\]"
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.parametrize("images,message", [
    (np.zeros((4, 8, 8), np.int32), "rank"),
    (np.full((4, 8, 8, 1), 17, np.int32), "num_levels|range|< 17|>= 17"),
    (np.full((4, 8, 8, 1), -1, np.int32), "negative|range|>= 0|< 0"),
    (np.full((4, 8, 8, 1), 0.5, np.float32), "integer"),
])
def test_bad_data_is_refused(images, message):
  with pytest.raises(ValueError, match=message):
    data_lib.validate_images(images, 17)


def test_ode_estimator_refused_for_an_encoder():
  """The probability-flow ODE of a plain diffusion does not describe a DiffEnc model (its encoder adds a
  drift), so eval.estimator='ode' is refused there instead of returning a wrong number."""
  from experiments.configs import diffenc_cifar10  # pylint: disable=g-import-not-at-top
  from vdiff import models  # pylint: disable=g-import-not-at-top
  c = diffenc_cifar10.get_config("tiny,trainable")
  m = models.from_config(c.model, data_shape=(8, 8, 1), num_levels=17, num_labels=0)
  with pytest.raises(ValueError, match="does not apply"):
    train.make_nll_fn(m, "ode", c.eval)
  c.model.encoder.kind = "identity"
  m = models.from_config(c.model, data_shape=(8, 8, 1), num_levels=17, num_labels=0)
  assert train.make_nll_fn(m, "ode", c.eval)[1] is True  # dequantised convention
  with pytest.raises(ValueError, match="does not apply to model family"):
    train.make_nll_fn(m, "cdm", c.eval)


@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_bench_train_builds_each_family_with_its_own_networks(size):
  # experiments/bench_train.py must time the network each family trains: DiffEnc with its trainable
  # encoder (the non-trainable variant is the VDM score network alone, already the `vdm` row), CDM with
  # its classifier. Parameter trees are built abstractly (jax.eval_shape), so the paper size costs nothing.
  from experiments import bench_train
  from vdiff import models
  shape, levels = bench_train.SIZES[size]
  trees = {}
  for family in bench_train.FAMILY_CONFIGS:
    config = bench_train.get_config(family, size)
    assert config.model.family == family
    model = models.from_config(config.model, data_shape=shape, num_levels=levels, num_labels=10)
    trees[family] = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  assert "encoder" in trees["diffenc"] and "encoder" not in trees["vdm"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(trees["diffenc"]["score"]) == count(trees["vdm"]["score"])
  assert count(trees["diffenc"]) > count(trees["vdm"])
  if size == "paper":
    # The counts bench_train recorded from the initialised states (docs/results/bench_train_paper.json):
    # VDM CIFAR-10 (32 ResNet blocks x 128 channels), DiffEnc (the same + its encoder U-Net), CDM.
    assert count(trees["vdm"]) == 30_586_245
    assert count(trees["diffenc"]) == 56_424_838
    assert count(trees["cdm"]) == 33_130_090


@pytest.mark.parametrize("family,logs_bpd", [("vdm", True), ("cdm", False)])
def test_training_bpd_is_logged_only_for_a_likelihood_loss(family, logs_bpd):
  """Old code: the CDM's loss (w_ce CE + MSE, not a likelihood) was logged as bpd = loss / (D ln 2)
  (e.g. 0.086 "bits/dim" on 4x4 data of true entropy 6.75)."""
  config = tiny_config(**{"model.family": family})
  ds = train.load_data(config, "train")
  model = train.build_model(config, ds)
  state = train.init_state(model, train.optimizer_from_config(config), jax.random.PRNGKey(0),
                           parallel.make_mesh())
  batch = train._stack_batches(ds, config, 0, 1)  # pylint: disable=protected-access
  # Tracing is enough to see which metrics the step returns.
  _, metrics = jax.eval_shape(train.make_train_step(model, ema_decay=0.9), state, batch)
  assert ("bpd" in metrics) == logs_bpd, sorted(metrics)
  assert {"loss", "grad_norm", "finite"} <= set(metrics)


def test_ema_warmup_decay_and_the_ema_after_one_step():
  """With training.ema_warmup the decay at step n is min(d, (1 + n) / (10 + n)) (TensorFlow's
  ExponentialMovingAverage with num_updates): 0.1 at n = 0, so after one step the EMA is 0.1 p_0 + 0.9 p_1,
  against d p_0 + (1 - d) p_1 without. Without warm-up a short run's EMA keeps d^n of the initial
  parameters (0.999^1600 = 0.20: the photos VDM's test bits/dim were 6.07 with its EMA, 3.71 without)."""
  np.testing.assert_allclose([float(train.ema_decay_at(n, 0.999, warmup=True)) for n in (0, 90, 10**5)],
                             [0.1, 0.91, 0.999], rtol=1e-6)
  assert float(train.ema_decay_at(0, 0.999, warmup=False)) == np.float32(0.999)
  config = tiny_config()
  ds = train.load_data(config, "train")
  model = train.build_model(config, ds)
  tx = train.optimizer_from_config(config)
  mesh = parallel.make_mesh()
  batch = train._stack_batches(ds, config, 0, 1)  # pylint: disable=protected-access
  for warmup, d in ((True, 0.1), (False, 0.999)):
    state = train.init_state(model, tx, jax.random.PRNGKey(0), mesh)
    p0 = jax.tree.map(np.asarray, state.params)
    state, _ = jax.jit(train.make_train_step(model, ema_decay=0.999, ema_warmup=warmup))(state, batch)
    want = jax.tree.map(lambda a, b: d * a + (1 - d) * b, p0, jax.tree.map(np.asarray, state.params))
    for got, ref in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_eval_params_raw_evaluates_the_raw_parameters_into_its_own_file(tmp_path):
  """--mode=eval with eval.params='raw' evaluates state.params (not the EMA) and writes
  eval_elbo_raw.json beside eval_elbo.json; neither overwrites the other. Reference: the same
  evaluator called directly on each parameter set."""
  wd = str(tmp_path / "w")
  config = tiny_config(**{"training.num_steps": 3, "training.ema_decay": 0.99, "eval.num_examples": 32})
  train.train_and_evaluate(config, wd)
  results = {}
  for which in ("ema", "raw"):
    results[which] = train.evaluate_checkpoint(tiny_config(**{
        "training.num_steps": 3, "training.ema_decay": 0.99, "eval.num_examples": 32,
        "eval.params": which}), wd)
  ema = json.load(open(os.path.join(wd, "eval_elbo.json")))
  raw = json.load(open(os.path.join(wd, "eval_elbo_raw.json")))
  assert (ema["params"], raw["params"]) == ("ema", "raw")
  assert ema["bpd"] == results["ema"]["bpd"] and raw["bpd"] == results["raw"]["bpd"]
  assert abs(ema["bpd"] - raw["bpd"]) > 1e-3, (ema["bpd"], raw["bpd"])  # after 3 steps at 0.99: far apart
  mesh, model, state, step = train._restore_for_inference(config, wd)  # pylint: disable=protected-access
  ds = train.load_data(config, "test")
  direct = train.evaluate(model, state.params, ds, estimator="elbo", eval_cfg=config.eval, mesh=mesh,
                          rng=jax.random.PRNGKey(config.seed + 1), split="test", step=step)
  assert abs(direct["bpd"] - raw["bpd"]) < 1e-6, (direct["bpd"], raw["bpd"])
  # --mode=sample with sample.params='raw': samples of state.params, in a file of their own.
  cfg = tiny_config(**{"training.num_steps": 3, "training.ema_decay": 0.99, "sample.params": "raw"})
  got = train.sample_checkpoint(cfg, wd)
  base = train.sample_file_base(wd, step, cfg.sample, describe=True)
  assert base.endswith("_raw") and os.path.exists(base + ".png")
  want = model.sample(state.params, train.sample_key(cfg.seed, step), cfg.sample.num_samples,
                      num_steps=cfg.sample.num_steps, sampler=cfg.sample.sampler)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
