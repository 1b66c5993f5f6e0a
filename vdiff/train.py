"""Training, evaluation and sampling: `train_and_evaluate(config, workdir)` and its pure, jitted steps.

The work directory receives (its contract, with the lock, the config guard on resume and the verified
checkpoints, is vdiff/workdir.py):
  config.json      the config the run started with (a resume records changes in config_changes.jsonl)
  metrics.jsonl    one JSON object per logged step (step, loss, bpd (ELBO families), the loss terms, lr,
                   throughput, wall_seconds since the run or resume started, time as a unix timestamp)
  checkpoints/     orbax CheckpointManager steps (asynchronous saves, max_to_keep, checksums, resumable)
  eval.json        the last evaluation: step, split, bpd, bpd_stderr, estimator, num_examples, nfe, ...
  eval_history.jsonl   every eval.json / eval_<estimator>.json that a later evaluation replaced
  samples_<step>.png / samples_<step>.npz   sample grids and the integer samples (also in TensorBoard)
  samples_<step>_<sampler>_n<steps>_eta<eta>_w<w>.png / .npz   --mode=sample's, named by its settings
  eval_<estimator>.json   --mode=eval's evaluation with that estimator (eval.json stays training's)

SIGTERM and SIGINT stop the loop with a checkpoint at the step it reached; at most MAX_STEPS_IN_FLIGHT
dispatched steps run ahead of the device, so that happens within a few step times, and the processes of
a multi-process run agree on the signal so that all save the same step.

State is a `TrainState` pytree (flax TrainState + EMA parameters + rng + non-finite bookkeeping). The train
step is pure, jit-compiled once over a Mesh with NamedSharding (parameters replicated, batch split over
devices), donates its input state, folds the step into the rng, and can run several optimisation steps per
dispatch with lax.scan. Data order and randomness are functions of the step, so a killed run that resumes
from its last checkpoint ends in the state of an uninterrupted run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from vdiff import config_schema
from vdiff import data as data_lib
from vdiff import evaluate as evaluate_lib
from vdiff import grid
from vdiff import likelihood
from vdiff import models
from vdiff import parallel
from vdiff import sampling
from vdiff import workdir as workdir_lib

Array = jax.Array
log = logging.getLogger("vdiff")

NAN_POLICIES = config_schema.NAN_POLICIES


class NonFiniteError(RuntimeError):
  """Training met a non-finite loss or gradient under the 'stop' policy."""


class ConfigError(ValueError):
  """A setting refused by validation (of the config, its data or its model) before any step; the message
  names the key. A ValueError, so callers that catch ValueError still catch it."""


def _config_errors(fn):
  """Re-raise the ValueError of a validation or construction step as ConfigError (same message)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from e
  return wrapped


class TrainState(train_state.TrainState):
  """Flax TrainState with EMA parameters, the run's rng and non-finite-step bookkeeping."""

  ema_params: Any = None
  rng: Array = None
  nonfinite_count: Array = None        # int32: steps whose loss or gradient was not finite
  first_nonfinite_step: Array = None   # int32: the first such step, -1 if none
  halted: Array = None                 # bool: the 'stop' policy froze the state


# --------------------------------------------------------------------------------------------------
# Optimiser and state.
# --------------------------------------------------------------------------------------------------
def weight_decay_mask(params) -> Any:
  """Which parameters weight decay reaches: a tree of bools with the structure of `params`.

  The rule: a leaf is decayed iff it is named `kernel`, has rank >= 2, and does not lie under the
  top-level `schedule` key. So the weights of dense, convolution and attention layers (score network,
  DiffEnc encoder, CDM classifier) are decayed, and never
    * biases and normalisation scales (decay would pull offsets and gains, not weights, towards 0);
    * embedding tables (`embedding`: each class's row sees only that class's examples, so decay would
      shrink the rows of rare classes);
    * any schedule parameter (`schedule/...`: gamma_0 / gamma_1, the monotone network, the scalar
      slope and offset; decay towards 0 would move the noise schedule's endpoints without any gradient,
      e.g. gamma_0 from -13.3 to -13.273 in 1,000 steps at weight decay 0.01 and learning rate 2e-4).
  """

  def rule(path, leaf) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return bool(names) and names[0] != "schedule" and names[-1] == "kernel" and jnp.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(rule, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the update to global norm <= max_norm: u <- u min(1, max_norm / ||u||_2).

  optax.clip_by_global_norm's rule (Pascanu et al. 2012, arXiv:1211.5063) and state (EmptyState), with
  the norm taken as one reduction over the concatenated leaves (`_flat_sq_norm`): the same expression as
  the train step's gradient norm, so the compiled step computes it once for the clip, the non-finite
  guard and the `grad_norm` metric, instead of a reduction per leaf for each.
  """

  def update_fn(updates, state, params=None):
    del params
    g_norm = jnp.sqrt(_flat_sq_norm(updates))
    # A non-finite norm gives a non-finite scale, and the guard of make_train_step skips the step.
    scale = jnp.where(g_norm < max_norm, jnp.ones_like(g_norm), max_norm / g_norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_lr_schedule(*, learning_rate: float, warmup_steps: int, lr_schedule: str = "constant",
                     decay_steps: int = 0) -> optax.Schedule:
  """The learning rate as a function of the optimiser's update count (the schedule make_optimizer uses).

  constant: linear warm-up from 0 to learning_rate over warmup_steps updates, then learning_rate.
  cosine: the same warm-up, then cosine decay to 0 at update decay_steps (optax.warmup_cosine_decay_schedule).
  """
  if lr_schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                 optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
  if lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                              max(decay_steps, warmup_steps + 1))
  raise ValueError(f"optim.lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")


def make_optimizer(*, learning_rate: float, warmup_steps: int, b1: float = 0.9, b2: float = 0.99,
                   eps: float = 1e-8, weight_decay: float = 0.01, grad_clip: float = 0.0,
                   lr_schedule: str = "constant", decay_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with linear warm-up as VDM trains it (b2 = 0.99, weight decay 0.01), optional clipping/decay.

  Decoupled weight decay (Loshchilov & Hutter, arXiv:1711.05101) reaches only the parameters chosen by
  `weight_decay_mask`: dense / convolution kernels, never biases, norm scales, embeddings or schedule
  parameters. grad_clip > 0 clips the gradient's global norm first (`clip_by_global_norm`). The learning
  rate follows `make_lr_schedule` with the same arguments.
  """
  lr = make_lr_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps, lr_schedule=lr_schedule,
                        decay_steps=decay_steps)
  tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
  if grad_clip > 0:
    tx = optax.chain(clip_by_global_norm(grad_clip), tx)
  return tx


def lr_schedule_from_config(config) -> optax.Schedule:
  """The learning-rate schedule of `optimizer_from_config(config)` (update count -> learning rate)."""
  o = config.optim
  return make_lr_schedule(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                          lr_schedule=o.lr_schedule, decay_steps=config.training.num_steps)


def optimizer_from_config(config) -> optax.GradientTransformation:
  o = config.optim
  return make_optimizer(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, b1=o.b1, b2=o.b2,
                        eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                        lr_schedule=o.lr_schedule, decay_steps=config.training.num_steps)


def create_train_state(model, tx, rng) -> TrainState:
  r_init, r_state = jax.random.split(rng)
  params = model.init(r_init)
  # step as a strongly typed int32 array: TrainState.create's Python 0 becomes a weakly typed value,
  # which differs from the step's output type and would make the jitted step compile twice.
  state = TrainState.create(apply_fn=None, params=params, tx=tx, ema_params=params, rng=r_state,
                           nonfinite_count=jnp.zeros((), jnp.int32),
                           first_nonfinite_step=jnp.full((), -1, jnp.int32),
                           halted=jnp.zeros((), bool))
  return state.replace(step=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------------
# The train step.
# --------------------------------------------------------------------------------------------------
def _all_finite(tree) -> Array:
  """True iff every element of every leaf is finite: one reduction over the flattened leaves.

  The leaves are concatenated into one vector and reduced once (one kernel whatever the number of
  leaves), instead of one reduction per leaf; the concatenation is a temporary copy of the tree. The
  train step's guard applies it to the new parameters (`make_train_step`).
  """
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(jnp.concatenate([x.astype(jnp.float32) for x in leaves])))


def _flat_sq_norm(tree) -> Array:
  """sum of x^2 over every element of every leaf, as ONE float32 reduction over the concatenated leaves.

  One reduction kernel whatever the number of leaves (a per-leaf reduction adds a kernel per parameter
  leaf to the step); the price is a temporary float32 copy of the tree. Non-finite iff some element is
  non-finite or the sum overflows float32 (some |x| above ~1.8e19, or the sum of squares above ~3.4e38).
  """
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  v = jnp.concatenate(leaves)
  return jnp.sum(v * v)


def ema_decay_at(step, ema_decay: float, *, warmup: bool):
  """The EMA's decay at (0-based) step `step`: ema_decay, or with warmup min(ema_decay, (1 + n) / (10 + n)).

  Without warm-up the EMA starts at the initial parameters and keeps ema_decay^n of them after n
  updates: 20% after 1,600 steps at 0.999, which dominates a short run's EMA (the photos VDM's test
  bits/dim were 6.07 with its EMA against 3.71 with its parameters). The warm-up (the num_updates rule of
  TensorFlow's ExponentialMovingAverage) starts at decay 0.1 and reaches ema_decay after about
  9 / (1 - ema_decay) steps, so early parameters fade out as fast as the run moves on.
  """
  if not warmup:
    return jnp.float32(ema_decay)
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


def make_train_step(model, *, ema_decay: float, nan_policy: str = "skip", inject_nan_at_step: int = -1,
                    ema_warmup: bool = False):
  """One optimisation step (state, batch) -> (state, metrics), pure and jit-able.

  The EMA of the parameters decays by `ema_decay_at(state.step, ema_decay, warmup=ema_warmup)`.

  The step's randomness is fold_in(state.rng, state.step). A non-finite loss, gradient or updated
  parameter never reaches the state: the update is dropped and counted ('skip'), or the state is frozen
  and the host stops at its next synchronisation ('stop'). `inject_nan_at_step` >= 0 replaces that step's
  loss by NaN (a test switch for the policies).

  The guard reads two reductions over the concatenated leaves, not one per parameter leaf: the
  gradient's global norm ||g||_2 (also the logged `grad_norm`), non-finite iff some gradient element is
  non-finite or sum(g^2) overflows float32 (a gradient element above ~1.8e19, or a squared norm above
  ~3.4e38: a step that large is skipped too), and the finiteness of the new parameters params + u, which
  covers a non-finite update (a non-finite learning rate or optimiser state) and a finite update whose
  sum overflows. The parameters are finite from initialisation on, since only finite ones are kept.

  The step's compiled size is that of the bare step (value_and_grad, the optimiser's update, the new
  parameters) plus, per parameter leaf, the conditional's plumbing and the EMA's kernel: the new
  parameters and optimiser state are computed before the conditional, written once and read by both the
  finiteness test and the conditional, and the EMA follows it with a decay chosen by its branch
  (`experiments/bench_overhead.py` measures both steps).
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  num_dims = math.prod(model.data_shape)
  # loss / (D ln 2) is bits/dim only where the training loss is the negative ELBO, a bound on -log P(k)
  # in nats (families whose native estimator is the ELBO). The CDM's loss (w_ce CE + MSE) is not a
  # likelihood: no training "bpd" is logged for it (its bits/dim come from the evaluator). A minimal
  # model without `native_estimator` (only init/loss, as in the tests) is taken for an ELBO family.
  loss_is_nll = getattr(model, "native_estimator", "elbo") == "elbo"

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      per_example, terms = model.loss(params, rng, batch, train=True)
      loss = jnp.mean(per_example)
      if inject_nan_at_step >= 0:
        loss = jnp.where(state.step == inject_nan_at_step, jnp.nan, loss)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = jnp.sqrt(_flat_sq_norm(grads))
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
    ok = finite & ~state.halted

    def choose(params, opt_state, decay):
      # The EMA's decay and weight as float32 constants of each branch: (ema_decay, 1 - ema_decay) as
      # the expression d e + (1 - d) p rounds them, or (1, 0), which leaves the EMA's value unchanged
      # (1 e + 0 p = e for finite p, the parameters kept).
      return params, opt_state, jnp.float32(decay), jnp.float32(1.0 - decay)

    # A conditional, not a per-leaf select on `ok`: `ok` depends on every leaf, and XLA's fusion copies
    # the computation of a select's operands into each leaf's select kernel (O(leaves^2) code with the
    # former per-leaf reductions; at paper size, hundreds of leaves, XLA's CPU compilation of this step
    # took over ten minutes and 20 GB; and with the reductions shared, a copy of the optimiser's update
    # per select still). The conditional is a fusion boundary: the new parameters and optimiser state
    # are written once, before it, and read by the finiteness test and by it, so each leaf's update is
    # computed once. It selects only those two trees; the EMA is one kernel per leaf after it, reading
    # the parameters it chose and the decay of its branch.
    params, opt_state, decay, weight = jax.lax.cond(
        ok, lambda new, old: choose(*new, ema_decay_at(state.step, ema_decay, warmup=ema_warmup)),
        lambda new, old: choose(*old, 1.0),
        (new_params, new_opt_state), (state.params, state.opt_state))
    # The scalars in each leaf's dtype, as the Python floats of d e + (1 - d) p would be.
    ema = jax.tree.map(lambda e, p: decay.astype(e.dtype) * e + weight.astype(e.dtype) * p,
                       state.ema_params, params)
    bad = ~finite
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        nonfinite_count=state.nonfinite_count + bad.astype(jnp.int32),
        first_nonfinite_step=jnp.where(bad & (state.first_nonfinite_step < 0), state.step,
                                       state.first_nonfinite_step),
        halted=state.halted | (bad & (nan_policy == "stop")))
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    metrics["loss"] = loss
    if "bpd" not in metrics and loss_is_nll:
      metrics["bpd"] = loss / (num_dims * math.log(2.0))
    metrics["grad_norm"] = grad_norm
    metrics["finite"] = finite.astype(jnp.float32)
    return new_state, metrics

  return step_fn


def make_multi_step(step_fn):
  """Several optimisation steps per dispatch: batches carry a leading [steps] axis; metrics are averaged."""

  def multi(state, batches):
    state, metrics = jax.lax.scan(step_fn, state, batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return multi


def jit_train_step(step_fn, mesh, *, steps_per_dispatch: int):
  """jit with the state replicated and donated and the batch split over the mesh's data axis."""
  fn = step_fn if steps_per_dispatch == 1 else make_multi_step(step_fn)
  rep = parallel.replicated(mesh)
  bsh = parallel.batch_sharding(mesh, leading_axes=0 if steps_per_dispatch == 1 else 1)
  return jax.jit(fn, in_shardings=(rep, bsh), out_shardings=(rep, rep), donate_argnums=(0,))


# --------------------------------------------------------------------------------------------------
# Evaluation lives in vdiff.evaluate; these names stay importable from here.
# --------------------------------------------------------------------------------------------------
ESTIMATORS = evaluate_lib.ESTIMATORS
make_nll_fn = evaluate_lib.make_nll_fn
evaluate = evaluate_lib.evaluate


# --------------------------------------------------------------------------------------------------
# The work directory (vdiff/workdir.py); these names stay importable from here.
# --------------------------------------------------------------------------------------------------
checkpoint_manager = workdir_lib.checkpoint_manager
restore_latest = workdir_lib.restore_latest
save_checkpoint = workdir_lib.save_checkpoint
write_json = workdir_lib.write_json
append_jsonl = workdir_lib.append_jsonl
_Scalars = workdir_lib.Scalars


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _progress(*, total, desc, enabled=True, initial=0):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
              disable=not enabled or jax.process_index() != 0, leave=True)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[vdiff] {msg}", flush=True)


def _to_python(tree):
  return jax.tree.map(lambda a: float(np.asarray(a)), tree)


@_config_errors
def load_data(config, split: str):
  """The split named by config.data (read once per process: `setup` validates the evaluation split
  and the trainer then evaluates on it, so both get the same loaded arrays)."""
  d = config.data
  # Source options that only some configs define (the photos source's patch geometry).
  extra = tuple((k, d[k]) for k in ("patch_size", "patch_stride") if k in d)
  path = d.path or None
  # A file's modification time is part of the key, so a rewritten .npz is read again.
  stamp = os.stat(path).st_mtime_ns if path and os.path.exists(path) else None
  return _load_data_cached(d.name, split, d.data_dir or None, path, stamp, config.seed, extra)


@functools.lru_cache(maxsize=4)
def _load_data_cached(name, split, data_dir, path, stamp, seed, extra):  # pylint: disable=unused-argument
  return data_lib.load(name, split=split, data_dir=data_dir, path=path, seed=seed, **dict(extra))


@_config_errors
def build_model(config, ds):
  return models.from_config(config.model, data_shape=ds.shape, num_levels=ds.num_levels,
                            num_labels=ds.num_labels,
                            compute_dtype=config.training.get("compute_dtype", "float32"))


def _stack_batches(ds, config, start_step: int, n: int):
  t = config.training
  batches = [data_lib.train_batch(ds, t.batch_size, seed=config.seed, step=start_step + i,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(),
                                  random_flip=config.data.random_flip) for i in range(n)]
  out = {"image": np.stack([b["image"] for b in batches]), "label": np.stack([b["label"] for b in batches])}
  if n == 1:
    out = jax.tree.map(lambda a: a[0], out)
  return out


class _Preemption:
  """Turns SIGTERM (how cluster and TPU preemption arrives) and SIGINT (Ctrl-C) into a flag the train
  loop checks: it saves a checkpoint at the step it is at and stops. A second SIGINT raises
  KeyboardInterrupt at once (the checkpoint being written, if any, is left as orbax's temporary
  directory, which the next run moves aside)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._old = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str | None:
    return None if self.signum is None else signal.Signals(self.signum).name

  def __enter__(self):
    for s in self.SIGNALS:
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      self.signum = signum
      # os.write, not print: a handler that prints while the main thread prints raises RuntimeError.
      os.write(2, (f"\n[vdiff] {signal.Signals(signum).name}: saving a checkpoint at the current step "
                   "and stopping" + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT
                                     else "") + "\n").encode())

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}


def _crossed(prev: int, new: int, every: int) -> bool:
  return every > 0 and new // every > prev // every


# Dispatched train steps the host may run ahead of the device. jax dispatches asynchronously, so without
# a bound the loop queues dozens of steps; a preemption signal (and the checkpoint after it) would wait
# for all of them. With at most this many in flight it is acted on within a few step times, and the
# progress bar counts finished steps.
MAX_STEPS_IN_FLIGHT = 2
# In a multi-process run the processes agree on a preemption signal (which reaches them at different
# moments) every this many steps, at the same steps on every process, so that all save the same step.
# Each agreement is an all-gather and a host synchronisation; a one-process run checks every dispatch.
PREEMPTION_CHECK_STEPS = 4
# Sampling keys: fold_in(fold_in(PRNGKey(seed), _SAMPLE_STREAM), step). PRNGKey(seed) itself is split for
# the initialisation, so the samples draw from a stream of their own.
_SAMPLE_STREAM = 0x53414D50


def sample_key(seed: int, step: int) -> Array:
  """The key the samples of `step` are drawn with (training's periodic and final samples, --mode=sample)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLE_STREAM), step)


def make_sample_fn(model, sample_cfg):
  """(params, rng, label) -> (integer samples, NFE per sample), jitted once for the config's sampler
  settings. A family of `vdiff.models` gets the sampler-specific options (`vdiff.sampling`) and reports
  its NFE; another family's own `sample` is called with the common settings and its NFE is None."""
  s = sample_cfg
  common = dict(num=s.num_samples, num_steps=s.num_steps, sampler=s.sampler, eta=s.eta,
                guidance_weight=s.guidance_weight, clip_x0=s.get("clip_x0"))
  if isinstance(model, models.Family):
    return jax.jit(functools.partial(model.sample, **common, options=sampling.options_from_config(s),
                                     return_nfe=True))
  fn = jax.jit(functools.partial(model.sample, **common))
  return lambda params, rng, label=None: (fn(params, rng, label=label), None)


def sample_file_base(workdir: str, step: int, sample_cfg, *, describe: bool = False) -> str:
  """The path, without .png / .npz, of the samples of `step`.

  Training's periodic and final samples are samples_<step>; --mode=sample (describe=True) names the
  sampler settings too: `samples_<step>_<settings>` with `<settings>` from `sampling.settings_name`, then
  `_label<label>` for a class and `_raw` for the raw parameters (e.g. `samples_00002000_ddim_n50_eta0_w0`,
  `samples_00002000_dpm_solver++_n20_o2_multistep_logSNR_w0`), so that drawing with other settings does
  not overwrite earlier files.
  """
  name = f"samples_{step:08d}"
  if describe:
    s = sample_cfg
    name += "_" + sampling.settings_name(s.sampler, num_steps=s.num_steps, eta=s.eta,
                                         guidance_weight=s.guidance_weight,
                                         options=sampling.options_from_config(s))
    if s.label >= 0:
      name += f"_label{int(s.label)}"
    if s.get("params", "ema") == "raw":
      name += "_raw"
  return os.path.join(workdir, name)


def _keep_other_samples(base: str, samples: np.ndarray) -> None:
  """Before base.png / base.npz are written: where base.npz holds other samples (settings the file
  name does not record, such as sample.num_samples or sample.clip_x0), move the pair to
  base_replaced_<n> (the first n free) rather than overwrite it. The same samples again (a rerun with
  the same settings and key) are simply written anew."""
  if not os.path.exists(base + ".npz"):
    return
  with np.load(base + ".npz") as old:
    if "samples" in old.files and np.array_equal(old["samples"], samples):
      return
  n = 1
  while os.path.exists(f"{base}_replaced_{n}.npz") or os.path.exists(f"{base}_replaced_{n}.png"):
    n += 1
  for ext in (".npz", ".png"):
    if os.path.exists(base + ext):
      os.replace(base + ext, f"{base}_replaced_{n}{ext}")
  _say(f"{base}.npz held other samples: moved to {base}_replaced_{n}.npz / .png")


def _sample_and_save(model, params, config, workdir, step, rng, *, sample_fn=None, describe=False,
                     scalars=None):
  """Draw config.sample.num_samples samples and write them as `sample_file_base(...)` .png/.npz;
  `sample_fn` (from make_sample_fn) is reused across calls so that periodic sampling compiles once, and
  `scalars` (a vdiff.workdir.Scalars) also receives the grid as a TensorBoard image. The .npz and
  samples.json record the sampler, its settings and the NFE per sample. Returns (samples, nfe)."""
  s = config.sample
  label = None
  if model.num_labels and s.label >= 0:
    label = jnp.full((s.num_samples,), s.label, jnp.int32)
  fn = sample_fn if sample_fn is not None else make_sample_fn(model, s)
  samples, nfe = fn(params, rng, label=label)
  samples = np.asarray(jax.device_get(samples))
  nfe = None if nfe is None else float(jax.device_get(nfe))
  if jax.process_index() == 0:
    base = sample_file_base(workdir, step, s, describe=describe)
    _keep_other_samples(base, samples)
    grid.save_grid(base + ".png", samples, model.num_levels)
    options = sampling.options_from_config(s)
    settings = {"sampler": s.sampler, "num_steps": int(s.num_steps), "eta": float(s.eta),
                "guidance_weight": float(s.guidance_weight), "nfe": nfe,
                "options": dict(options)}
    np.savez_compressed(base + ".npz", samples=samples, step=step, settings=json.dumps(settings),
                        **{k: v for k, v in settings.items() if k != "options" and v is not None})
    write_json(os.path.join(workdir, "samples.json"),
               {"step": int(step), "png": base + ".png", "npz": base + ".npz", **settings})
    if scalars is not None:
      scalars.image("samples", grid.make_grid(samples, model.num_levels), step)
  return samples, nfe


# --------------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------------
SAMPLERS = config_schema.SAMPLERS  # the names models.Family.sample accepts


@_config_errors
def validate_config(config) -> None:
  """Refuse impossible settings before any compute, naming the key.

  First every key against its declared type and range (`vdiff.config_schema.SCHEMA`, one table: finite
  floats, bounds, names of choices); then the checks that relate keys to each other or to the machine
  (num_steps a multiple of steps_per_dispatch, gamma_min < gamma_max, an importable family, the batch
  sizes against the device count). Settings checked against the data and the model (batch sizes
  against the number of examples, the estimator and sampler against the family) are refused in
  `setup`, still before step 0.
  """
  errors = config_schema.errors(config)
  if errors:
    raise ValueError("invalid config: " + "; ".join(errors) + ".")
  t, m = config.training, config.model
  if t.num_steps % t.steps_per_dispatch:
    errors.append(f"training.num_steps ({t.num_steps}) must be a multiple of "
                  f"training.steps_per_dispatch ({t.steps_per_dispatch})")
  if "schedule" in m and not m.schedule.gamma_min < m.schedule.gamma_max:
    errors.append(f"model.schedule.gamma_min ({m.schedule.gamma_min}) must be < "
                  f"model.schedule.gamma_max ({m.schedule.gamma_max})")
  if "score" in m and m.score.fourier_min > m.score.fourier_max:
    errors.append(f"model.score.fourier_min ({m.score.fourier_min}) must be <= "
                  f"model.score.fourier_max ({m.score.fourier_max})")
  if "cdm" in m and m.cdm.beta_start > m.cdm.beta_end:
    errors.append(f"model.cdm.beta_start ({m.cdm.beta_start}) must be <= model.cdm.beta_end "
                  f"({m.cdm.beta_end})")
  try:
    models.resolve_family(m.family)  # a registered name or an importable "package.module:ClassName"
  except ValueError as e:
    errors.append(str(e).rstrip("."))
  errors.extend(evaluate_lib.config_errors(config.eval))  # the estimator's own settings
  if errors:
    raise ValueError("invalid config: " + "; ".join(errors) + ".")
  n = jax.device_count()
  if t.batch_size % n:
    raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of "
                     f"devices ({n}).")
  if config.eval.batch_size % n:
    raise ValueError(f"eval.batch_size ({config.eval.batch_size}) must be divisible by the number "
                     f"of devices ({n}).")


@_config_errors
def validate_data(config, train_ds, eval_ds) -> None:
  """Refuse a data set the run cannot use, naming the key: a training batch larger than the data, and an
  evaluation split whose examples differ from the training split's (its bits/dim would be computed with
  the training split's D = H W C and K)."""
  d, t, e = config.data, config.training, config.eval
  if t.batch_size > len(train_ds):
    raise ValueError(f"training.batch_size ({t.batch_size}) must be <= the number of training examples "
                     f"({len(train_ds)} in data.name={d.name!r}, split 'train').")
  for what, a, b in (("example shape [H, W, C]", train_ds.shape, eval_ds.shape),
                     ("number of levels K", train_ds.num_levels, eval_ds.num_levels),
                     ("number of classes", train_ds.num_labels, eval_ds.num_labels)):
    if a != b:
      raise ValueError(f"the evaluation split (eval.split={e.split!r}) of data.name={d.name!r} has "
                       f"{what} {b}, the training split {a}: every split must agree.")
  # eval.batch_size above the number of evaluated examples is not an error: the evaluator caps the batch
  # at that number rounded up to the device count (`vdiff.evaluate.batch_plan`), so
  # `--config.eval.num_examples=32` works with any config's eval.batch_size.


@_config_errors
def validate_model(config, model) -> None:
  """Refuse settings the built model cannot run (before step 0, not after the whole training run): the
  evaluation estimator and the sampler for this family, and the sample label of a conditional model."""
  make_nll_fn(model, config.eval.estimator, config.eval)  # raises naming eval.estimator and the family
  s = config.sample
  if isinstance(model, models.Family):  # the sampler, sample.clip_x0 and the sampler's options
    model.check_sample_args(s.sampler, s.get("clip_x0"), num_steps=s.num_steps,
                            options=sampling.options_from_config(s))
  else:
    supported = tuple(getattr(model, "supported_samplers", SAMPLERS))
    if s.sampler not in supported:
      raise ValueError(f"sample.sampler={s.sampler!r} does not apply to model family "
                       f"{model.family_name!r}; use one of {supported}.")
  if model.num_labels and not -1 <= s.label < model.num_labels:
    raise ValueError(f"sample.label must be -1 (unconditional) or a class in [0, {model.num_labels}), "
                     f"got {s.label}.")


def init_state(model, tx, rng, mesh) -> TrainState:
  """A new TrainState, created by a jitted init directly replicated over the mesh (the sharding the
  train step returns, so the step compiles once)."""
  init = jax.jit(functools.partial(create_train_state, model, tx),
                 out_shardings=parallel.replicated(mesh))
  return init(rng)


def setup(config, workdir):
  validate_config(config)
  mesh = parallel.make_mesh()
  train_ds = load_data(config, "train")
  validate_data(config, train_ds, load_data(config, config.eval.split))
  model = build_model(config, train_ds)
  validate_model(config, model)
  tx = optimizer_from_config(config)
  rng = jax.random.PRNGKey(config.seed)
  init = functools.partial(init_state, model, tx, mesh=mesh)
  abstract = jax.eval_shape(functools.partial(create_train_state, model, tx), rng)
  return mesh, train_ds, model, init, abstract, rng


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from the newest good checkpoint), evaluate and sample; returns the last eval.

  The work directory's contract (vdiff/workdir.py) comes first: the run takes the directory's lock, and a
  resume whose config changes a guarded key is refused before anything is written. A run stopped by
  SIGTERM or SIGINT saves a checkpoint and returns {"step", "preempted": True, "signal"}.
  """
  validate_config(config)
  with workdir_lib.lock(workdir):
    changes = workdir_lib.check_config(workdir, config)
    # A multi-process run whose peer dies stops within VDIFF_PEER_TIMEOUT s with one line and exit
    # status 76 (parallel.start_peer_watchdog), instead of hanging in a collective.
    watchdog = parallel.start_peer_watchdog(newest_checkpoint=lambda: workdir_lib.latest_step(workdir))
    try:
      return _train_and_evaluate(config, workdir, changes)
    finally:
      if watchdog is not None:
        watchdog.set()


def _abstract_replicated(abstract, mesh):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)


def _train_and_evaluate(config, workdir, changes) -> dict:
  t_run = time.time()  # metrics.jsonl's wall_seconds count from here (the start of this run or resume)
  mesh, train_ds, model, init, abstract, rng = setup(config, workdir)
  t = config.training
  test_ds = load_data(config, config.eval.split)
  workdir_lib.move_aside_temporary(workdir)
  mngr = checkpoint_manager(workdir, max_to_keep=t.max_checkpoints_to_keep,
                            async_save=t.async_checkpointing)
  state, start = restore_latest(mngr, _abstract_replicated(abstract, mesh))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if state is None:
    state, start = init(rng), 0
    _say(f"new run in {workdir} on {jax.device_count()} device(s), {jax.process_count()} process(es)")
  else:
    start = int(start)
    _say(f"resumed from the checkpoint at step {start} in {workdir}")
    # Rows logged after this checkpoint by the run that stopped are superseded from here on
    # (workdir.read_metrics drops them).
    append_jsonl(metrics_path, {"step": start, "event": "resumed", "from_step": start})
    workdir_lib.prune(mngr, t.max_checkpoints_to_keep)
  workdir_lib.record_config(workdir, config, step=start, changes=changes)

  step_fn = make_train_step(model, ema_decay=t.ema_decay, ema_warmup=bool(t.get("ema_warmup", False)),
                            nan_policy=t.nan_policy,
                            inject_nan_at_step=t.inject_nan_at_step)
  n = t.steps_per_dispatch
  train_step = jit_train_step(step_fn, mesh, steps_per_dispatch=n)
  bsh = parallel.batch_sharding(mesh, leading_axes=0 if n == 1 else 1)
  scalars = _Scalars(workdir)
  eval_rng = jax.random.PRNGKey(config.seed + 1)
  sample_fn = None
  last_eval = None
  step = start
  lr_fn = lr_schedule_from_config(config)
  # (A train step without .lower, e.g. jit_train_step wrapped by an instrumented caller, compiles at its
  # first call instead.)
  # Signals are caught from here on: one that arrives while the step compiles stops the run after its
  # first step, with a checkpoint, like one that arrives later.
  preemption = contextlib.ExitStack()
  preempt = preemption.enter_context(_Preemption())
  try:
    if step < t.num_steps and hasattr(train_step, "lower"):
      # Compile ahead of time, before the progress bar exists, so that its rate and ETA measure training
      # only. Every process compiles first, then all start the first step together: its all-reduce waits
      # only 30 s for the other processes, and one may compile more slowly (parallel.barrier).
      _say("compiling the train step...")
      tc = time.time()
      batch = parallel.global_batch(_stack_batches(train_ds, config, step, n), bsh,
                                    batch_axis=0 if n == 1 else 1)
      train_step = train_step.lower(state, batch).compile()
      _say(f"compiled in {time.time() - tc:.1f} s")
      if jax.process_count() > 1:
        parallel.barrier("first_train_step")
  except BaseException:
    preemption.close()
    raise
  bar = _progress(total=t.num_steps, desc="train", initial=start)
  t_last, step_last = time.time(), step
  in_flight = collections.deque()  # (step reached, an output of that dispatch) not yet known finished
  finished = start

  def wait_for(until: int) -> None:
    nonlocal finished
    while in_flight and (in_flight[0][0] <= until or len(in_flight) > MAX_STEPS_IN_FLIGHT):
      s, token = in_flight.popleft()
      jax.block_until_ready(token)
      bar.update(s - finished)
      finished = s

  with preemption:
    while step < t.num_steps:
      local = _stack_batches(train_ds, config, step, n)
      batch = parallel.global_batch(local, bsh, batch_axis=0 if n == 1 else 1)
      state, metrics = train_step(state, batch)
      prev, step = step, step + n
      in_flight.append((step, metrics["loss"]))  # metrics are not donated: safe to wait on later
      wait_for(-1)  # keep at most MAX_STEPS_IN_FLIGHT dispatches queued
      is_last = step >= t.num_steps
      if _crossed(prev, step, t.log_every) or is_last:
        wait_for(step)
        m = _to_python(metrics)
        nonfinite = int(state.nonfinite_count)
        now = time.time()
        dt = now - t_last
        # lr: the rate of this row's last update, lr_fn(step - 1) (the schedule counts updates from 0;
        # a skipped non-finite step does not advance the optimiser's count, so after one the optimiser
        # lags this figure by the number skipped).
        m.update(step=step, nonfinite_count=nonfinite, lr=float(lr_fn(step - 1)),
                 wall_seconds=now - t_run, time=now,
                 steps_per_sec=(step - step_last) / max(dt, 1e-9),
                 examples_per_sec=(step - step_last) * t.batch_size / max(dt, 1e-9))
        t_last, step_last = now, step
        append_jsonl(metrics_path, m)
        scalars.write(m)
        bar.set_postfix(loss=f"{m['loss']:.4g}", **({"bpd": f"{m['bpd']:.4g}"} if "bpd" in m else {}))
        if nonfinite:
          first = int(state.first_nonfinite_step)
          if t.nan_policy == "stop":
            bar.close()
            mngr.wait_until_finished()
            append_jsonl(metrics_path, {"step": step, "event": "stopped_nonfinite",
                                        "first_nonfinite_step": first})
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first} (nan_policy='stop'); the state was "
                f"frozen there and the last checkpoint ({mngr.latest_step()}) is finite.")
          log.warning("%d non-finite step(s) skipped so far (first at step %d)", nonfinite, first)
      # Every process must stop at the same step (the save is a collective): one process agrees with
      # itself at every dispatch; several agree every PREEMPTION_CHECK_STEPS steps and at the end.
      if jax.process_count() == 1:
        stop = preempt.requested
      elif _crossed(prev, step, PREEMPTION_CHECK_STEPS) or is_last:
        stop = parallel.any_process(preempt.requested)
      else:
        stop = False
      if _crossed(prev, step, t.checkpoint_every) or is_last or stop:
        save_checkpoint(mngr, state, step)
      if stop:
        wait_for(step)
        mngr.wait_until_finished()
        name = preempt.name or "a signal to another process"
        append_jsonl(metrics_path, {"step": step, "event": "preempted", "signal": name})
        log.warning("%s: saved a checkpoint at step %d and stopped.", name, step)
        bar.close()
        scalars.close()
        mngr.close()
        return {"step": step, "preempted": True, "signal": name}
      if _crossed(prev, step, t.eval_every) and not is_last:
        last_eval = evaluate(model, eval_params(state, config), test_ds, estimator=config.eval.estimator,
                             eval_cfg=config.eval, mesh=mesh, rng=eval_rng, split=config.eval.split,
                             step=step, progress=False, workdir=workdir)
        row = {"step": step, "eval_bpd": last_eval["bpd"], "eval_bpd_stderr": last_eval["bpd_stderr"]}
        append_jsonl(metrics_path, row)
        scalars.write(row)
      if _crossed(prev, step, t.sample_every) and not is_last:
        sample_fn = sample_fn or make_sample_fn(model, config.sample)
        _sample_and_save(model, state.ema_params, config, workdir, step,
                         sample_key(config.seed, step), sample_fn=sample_fn, scalars=scalars)
    wait_for(step)
  bar.close()
  mngr.wait_until_finished()
  last_eval = evaluate(model, eval_params(state, config), test_ds, estimator=config.eval.estimator,
                       eval_cfg=config.eval, mesh=mesh, rng=eval_rng, split=config.eval.split,
                       step=step, workdir=workdir)
  last_eval["params"] = config.eval.get("params", "ema")
  workdir_lib.replace_json(os.path.join(workdir, "eval.json"), last_eval)
  row = {"step": step, "eval_bpd": last_eval["bpd"], "eval_bpd_stderr": last_eval["bpd_stderr"]}
  append_jsonl(metrics_path, row)
  scalars.write(row)
  if config.sample.num_samples > 0:
    sample_fn = sample_fn or make_sample_fn(model, config.sample)
    _sample_and_save(model, state.ema_params, config, workdir, step, sample_key(config.seed, step),
                     sample_fn=sample_fn, scalars=scalars)
  scalars.close()
  mngr.close()
  return last_eval


def _restore_for_inference(config, workdir):
  """The newest good checkpoint for --mode=eval/sample. Read-only: a training run may hold the work
  directory, so a bad checkpoint is reported and skipped, not moved, and the lock is not taken."""
  validate_config(config)
  workdir_lib.check_config(workdir, config)
  mesh, train_ds, model, _, abstract, _ = setup(config, workdir)
  mngr = checkpoint_manager(workdir, max_to_keep=config.training.max_checkpoints_to_keep,
                            async_save=False)
  state, step = restore_latest(mngr, _abstract_replicated(abstract, mesh), move_aside=False)
  mngr.close()
  if state is None:
    raise workdir_lib.NoCheckpointError(f"no restorable checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                            "train first (--mode=train).")
  return mesh, model, state, int(step)


EVAL_PARAMS = config_schema.PARAMS


def eval_params(state, config, section: str = "eval"):
  """The parameters evaluations use: the EMA (eval.params='ema', the default) or the raw parameters
  ('raw'; e.g. for a run too short for its EMA decay, see `ema_decay_at`). --mode=sample reads
  sample.params likewise; training's periodic samples use the EMA."""
  which = config[section].get("params", "ema")
  return state.params if which == "raw" else state.ema_params


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=eval: evaluate the newest checkpoint's parameters (eval.params: the EMA by default) with
  config.eval.estimator; the result goes to eval_<estimator>.json (eval_<estimator>_raw.json for the raw
  parameters, so that neither overwrites the other; an earlier result in that file moves to
  eval_history.jsonl)."""
  mesh, model, state, step = _restore_for_inference(config, workdir)
  ds = load_data(config, config.eval.split)
  which = config.eval.get("params", "ema")
  result = evaluate(model, eval_params(state, config), ds, estimator=config.eval.estimator,
                    eval_cfg=config.eval, mesh=mesh, rng=jax.random.PRNGKey(config.seed + 1),
                    split=config.eval.split, step=step, workdir=workdir)
  result["params"] = which
  # eval.json stays the training run's own evaluation; each estimator's --mode=eval result has its file.
  suffix = "_raw" if which == "raw" else ""
  workdir_lib.replace_json(os.path.join(workdir, f"eval_{config.eval.estimator}{suffix}.json"), result)
  return result


def sample_checkpoint(config, workdir: str) -> np.ndarray:
  """--mode=sample: draw config.sample.num_samples samples from the newest checkpoint and write them as
  sample_file_base(workdir, step, config.sample, describe=True) + .png / .npz (the path is printed)."""
  _, model, state, step = _restore_for_inference(config, workdir)
  # sample.params: the EMA parameters (the default) or the raw ones (file name ending in _raw).
  samples, nfe = _sample_and_save(model, eval_params(state, config, "sample"), config, workdir, step,
                                  sample_key(config.seed, step), describe=True)
  base = sample_file_base(workdir, step, config.sample, describe=True)
  nfe_text = "" if nfe is None else f", {nfe:g} network evaluations (NFE) per sample"
  _say(f"wrote {samples.shape[0]} samples (step {step}, sampler {config.sample.sampler}{nfe_text}) to "
       f"{base}.png and {base}.npz")
  return samples
