"""Training, evaluation and sampling: `train_and_evaluate(config, workdir)` and its pure, jitted steps.

The work directory (docs/design.md) receives:
  config.json      the resolved config
  metrics.jsonl    one JSON object per logged step (step, loss, bpd, the loss terms, lr, throughput)
  checkpoints/     orbax CheckpointManager steps (asynchronous saves, max_to_keep, resumable)
  eval.json        the last evaluation: step, split, bpd, bpd_stderr, estimator, num_examples, nfe, ...
  samples_<step>.png / samples_<step>.npz   sample grids and the integer samples

State is a `TrainState` pytree (flax TrainState + EMA parameters + rng + non-finite bookkeeping). The train
step is pure, jit-compiled once over a Mesh with NamedSharding (parameters replicated, batch split over
devices), donates its input state, folds the step into the rng, and can run several optimisation steps per
dispatch with lax.scan. Data order and randomness are functions of the step, so a killed run that resumes
from its last checkpoint ends in the state of an uninterrupted run.
"""

from __future__ import annotations

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
import orbax.checkpoint as ocp
from flax import struct
from flax.training import train_state

from vdiff import data as data_lib
from vdiff import grid
from vdiff import likelihood
from vdiff import models
from vdiff import parallel

Array = jax.Array
log = logging.getLogger("vdiff")

NAN_POLICIES = ("skip", "stop")


class NonFiniteError(RuntimeError):
  """Training met a non-finite loss or gradient under the 'stop' policy."""


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
def make_optimizer(*, learning_rate: float, warmup_steps: int, b1: float = 0.9, b2: float = 0.99,
                   eps: float = 1e-8, weight_decay: float = 0.01, grad_clip: float = 0.0,
                   lr_schedule: str = "constant", decay_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with linear warm-up as VDM trains it (b2 = 0.99, weight decay 0.01), optional clipping/decay."""
  if lr_schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                               optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
  elif lr_schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                            max(decay_steps, warmup_steps + 1))
  else:
    raise ValueError(f"optim.lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
  tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


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
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def make_train_step(model, *, ema_decay: float, nan_policy: str = "skip", inject_nan_at_step: int = -1):
  """One optimisation step (state, batch) -> (state, metrics), pure and jit-able.

  The step's randomness is fold_in(state.rng, state.step). A non-finite loss or gradient never reaches
  the parameters: the update is dropped and counted ('skip'), or the state is frozen and the host stops
  at its next synchronisation ('stop'). `inject_nan_at_step` >= 0 replaces that step's loss by NaN (a
  test switch for the policies).
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  num_dims = math.prod(model.data_shape)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      per_example, terms = model.loss(params, rng, batch, train=True)
      loss = jnp.mean(per_example)
      if inject_nan_at_step >= 0:
        loss = jnp.where(state.step == inject_nan_at_step, jnp.nan, loss)
      return loss, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    ok = finite & ~state.halted

    def update(operand):
      st, g = operand
      updated = st.apply_gradients(grads=g)
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, st.ema_params,
                         updated.params)
      return updated.params, updated.opt_state, ema

    def keep(operand):
      st, _ = operand
      return st.params, st.opt_state, st.ema_params

    # A conditional, not a per-leaf select on `ok`: `ok` reduces over every gradient leaf, and XLA's
    # fusion would copy that reduction into each leaf's select kernel (O(leaves^2) code; at paper size,
    # hundreds of leaves, XLA's CPU compilation of this step took over ten minutes and 20 GB). A
    # skipped step also skips the optimiser's arithmetic.
    params, opt_state, ema = jax.lax.cond(ok, update, keep, (state, grads))
    bad = ~finite
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
        nonfinite_count=state.nonfinite_count + bad.astype(jnp.int32),
        first_nonfinite_step=jnp.where(bad & (state.first_nonfinite_step < 0), state.step,
                                       state.first_nonfinite_step),
        halted=state.halted | (bad & (nan_policy == "stop")))
    metrics = {k: jnp.mean(v) for k, v in terms.items()}
    metrics["loss"] = loss
    if "bpd" not in metrics:
      metrics["bpd"] = loss / (num_dims * math.log(2.0))
    metrics["grad_norm"] = optax.tree.norm(grads)
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
# Evaluation.
# --------------------------------------------------------------------------------------------------
ESTIMATORS = ("elbo", "cdm", "ode")


def make_nll_fn(model, estimator: str, eval_cfg):
  """(params, rng, batch) -> (per-example NLL in nats [B], nfe per example) for the chosen estimator."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"eval.estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  if estimator == "ode":
    if not model.supports_ode:
      raise ValueError(f"eval.estimator='ode' does not apply to this {model.family_name!r} model (a "
                       "DiffEnc encoder changes the probability flow); use 'elbo'.")

    def ode_fn(params, rng, batch):
      r_deq, r_probe = jax.random.split(rng)
      y = likelihood.dequantize(r_deq, batch["image"], model.num_levels)
      logp, nfe = likelihood.ode_log_likelihood(
          r_probe, model.eps_fn(params), model.schedule(params), y, rtol=eval_cfg.ode_rtol,
          atol=eval_cfg.ode_atol, divergence=eval_cfg.ode_divergence)
      return -logp, nfe

    return ode_fn, True
  if estimator != model.native_estimator:
    raise ValueError(f"eval.estimator={estimator!r} does not apply to model family "
                     f"{model.family_name!r}; use {model.native_estimator!r} or 'ode'.")
  k = max(int(eval_cfg.num_time_samples), 1)

  def native(params, rng, batch):
    # k Monte-Carlo samples (time and noise for the ELBO, dequantisation for CDM) in a fori_loop, so
    # the program (and its compile time) does not grow with k.
    def body(i, acc):
      return acc + model.nll(params, jax.random.fold_in(rng, i), batch)[0]

    total = jax.lax.fori_loop(0, k, body, jnp.zeros(batch["image"].shape[:1], jnp.float32))
    return total / k, jnp.asarray(float(model.nfe_per_sample * k))

  return native, model.dequantized


def evaluate(model, params, ds, *, estimator: str, eval_cfg, mesh, rng, split: str, step: int,
             progress: bool = True) -> dict:
  """NLL of a whole split (each example exactly once; the padded last batch is masked) in bits/dim."""
  nll_fn, dequantized = make_nll_fn(model, estimator, eval_cfg)
  rep = parallel.replicated(mesh)
  bsh = parallel.batch_sharding(mesh)
  def nll_and_mask(params, rng, batch, mask):
    nats, nfe = nll_fn(params, rng, batch)
    return nats, nfe, mask  # the mask comes back replicated: every process sees the global mask

  jitted = jax.jit(nll_and_mask, in_shardings=(rep, rep, bsh, bsh), out_shardings=(rep, rep, rep))
  batch_size = eval_cfg.batch_size
  parallel.check_batch_size(batch_size, mesh)
  num = len(ds) if not eval_cfg.num_examples else min(len(ds), eval_cfg.num_examples)
  sub = ds if num == len(ds) else dataclasses.replace(ds, images=ds.images[:num], labels=ds.labels[:num])
  values, masks, nfes = [], [], []
  compile_s = 0.0
  t0 = time.time()
  # eval_batches takes the GLOBAL batch size and hands this process its slice of each global batch, so
  # batch i holds the same examples (and draws the same noise) on any number of processes.
  it = data_lib.eval_batches(sub, batch_size, process_index=jax.process_index(),
                             process_count=jax.process_count())
  num_batches = math.ceil(num / batch_size)
  bar = _progress(total=num_batches, desc=f"eval {estimator}", enabled=progress)
  for i, local in enumerate(it):
    batch = parallel.global_batch({"image": local["image"], "label": local["label"]}, bsh)
    mask = parallel.global_batch(local["mask"], bsh)
    args = (params, jax.random.fold_in(rng, i), batch, mask)
    if i == 0:  # compile ahead of time so that seconds_per_image measures evaluation only
      tc = time.time()
      jitted = jitted.lower(*args).compile()
      compile_s = time.time() - tc
      t0 += compile_s
    nats, nfe, mask = jitted(*args)
    values.append(np.asarray(nats))
    masks.append(np.asarray(mask))
    nfes.append(float(np.mean(np.asarray(nfe))))
    bar.update(1)
  bar.close()
  seconds = time.time() - t0
  nats = np.concatenate(values)
  mask = np.concatenate(masks).astype(bool)
  bpd = np.asarray(likelihood.nats_to_bpd(nats[mask], model.num_dims,
                                          num_levels=model.num_levels if dequantized else None))
  n = int(mask.sum())
  result = {
      "step": int(step), "split": split, "estimator": estimator,
      "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
      "num_examples": n, "nfe": float(np.mean(nfes)),
      "seconds": seconds, "seconds_per_image": seconds / max(n, 1), "compile_seconds": compile_s,
      "convention": ("continuous density on uniformly dequantised data, + log2(K/2) bits/dim"
                     if dequantized else "discrete bound on -log P(k) (no dequantisation offset)"),
      "num_levels": model.num_levels, "num_dims": model.num_dims,
  }
  if estimator == "elbo":
    result["num_time_samples"] = int(eval_cfg.num_time_samples)
  return result


# --------------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, *, max_to_keep: int, async_save: bool = True):
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def restore_latest(mngr, abstract_state) -> tuple[Any, int | None]:
  """Restore the newest checkpoint that reads back whole and finite; fall back to older ones.

  A checkpoint cut short by a crash (or corrupted on disk) raises on restore; it is reported and the
  previous step is tried, so one bad save never loses the run.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      log.warning("checkpoint at step %d cannot be restored (%s: %s); trying an older one.",
                  step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      continue
    if not bool(_all_finite(state.params)):
      log.warning("checkpoint at step %d holds non-finite parameters; trying an older one.", step)
      continue
    return state, step
  return None, None


def save_checkpoint(mngr, state, step: int) -> bool:
  """Save unless the state holds a non-finite value or was frozen by nan_policy='stop' (a bad state
  never replaces a good one, and a frozen one is not saved under a later step's name)."""
  if not bool(jax.device_get(_all_finite((state.params, state.ema_params)))):
    log.error("not saving step %d: the state holds non-finite values.", step)
    return False
  if bool(jax.device_get(state.halted)):
    log.error("not saving step %d: training stopped at a non-finite step (nan_policy='stop').", step)
    return False
  mngr.save(step, args=ocp.args.StandardSave(state))
  return True


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


def write_json(path: str, obj) -> None:
  """Write JSON atomically (temporary file + rename): readers never see half a file."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def append_jsonl(path: str, obj) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "a") as f:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


class _Scalars:
  """metrics.jsonl rows mirrored as TensorBoard scalars (workdir/tensorboard; tensorboardX writes the
  event files without TensorFlow). Process 0 only."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict) -> None:
    if self._writer is None:
      return
    step = int(row["step"])
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._writer.add_scalar(k, float(v), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _to_python(tree):
  return jax.tree.map(lambda a: float(np.asarray(a)), tree)


def load_data(config, split: str):
  d = config.data
  return data_lib.load(d.name, split=split, data_dir=d.data_dir or None, path=d.path or None,
                       seed=config.seed)


def build_model(config, ds):
  return models.from_config(config.model, data_shape=ds.shape, num_levels=ds.num_levels,
                            num_labels=ds.num_labels)


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
  """Turns SIGTERM (how cluster and TPU preemption arrives) into a flag the train loop checks."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _crossed(prev: int, new: int, every: int) -> bool:
  return every > 0 and new // every > prev // every


def _sample_and_save(model, params, config, workdir, step, rng):
  s = config.sample
  label = None
  if model.num_labels and s.label >= 0:
    label = jnp.full((s.num_samples,), s.label, jnp.int32)
  fn = jax.jit(functools.partial(model.sample, num=s.num_samples, num_steps=s.num_steps,
                                 sampler=s.sampler, eta=s.eta, guidance_weight=s.guidance_weight))
  samples = np.asarray(jax.device_get(fn(params, rng, label=label)))
  if jax.process_index() == 0:
    base = os.path.join(workdir, f"samples_{step:08d}")
    grid.save_grid(base + ".png", samples, model.num_levels)
    np.savez_compressed(base + ".npz", samples=samples, step=step, sampler=s.sampler,
                        num_steps=s.num_steps)
    write_json(os.path.join(workdir, "samples.json"),
               {"step": int(step), "png": base + ".png", "npz": base + ".npz", "sampler": s.sampler,
                "num_steps": int(s.num_steps), "guidance_weight": float(s.guidance_weight)})
  return samples


# --------------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------------
def validate_config(config) -> None:
  """Refuse impossible settings before any compute, naming the key."""
  t, m = config.training, config.model
  errors = []
  if t.batch_size < 1:
    errors.append(f"training.batch_size must be >= 1, got {t.batch_size}")
  if t.num_steps < 0:
    errors.append(f"training.num_steps must be >= 0, got {t.num_steps}")
  if t.steps_per_dispatch < 1:
    errors.append(f"training.steps_per_dispatch must be >= 1, got {t.steps_per_dispatch}")
  elif t.num_steps % t.steps_per_dispatch:
    errors.append(f"training.num_steps ({t.num_steps}) must be a multiple of "
                  f"training.steps_per_dispatch ({t.steps_per_dispatch})")
  if not 0.0 <= t.ema_decay < 1.0:
    errors.append(f"training.ema_decay must be in [0, 1), got {t.ema_decay}")
  if t.nan_policy not in NAN_POLICIES:
    errors.append(f"training.nan_policy must be one of {NAN_POLICIES}, got {t.nan_policy!r}")
  if config.optim.learning_rate <= 0:
    errors.append(f"optim.learning_rate must be > 0, got {config.optim.learning_rate}")
  if "schedule" in m and not m.schedule.gamma_min < m.schedule.gamma_max:
    errors.append(f"model.schedule.gamma_min ({m.schedule.gamma_min}) must be < "
                  f"model.schedule.gamma_max ({m.schedule.gamma_max})")
  if m.family not in models.FAMILIES:
    errors.append(f"model.family must be one of {sorted(models.FAMILIES)}, got {m.family!r}")
  if config.eval.estimator not in ESTIMATORS:
    errors.append(f"eval.estimator must be one of {ESTIMATORS}, got {config.eval.estimator!r}")
  if errors:
    raise ValueError("invalid config: " + "; ".join(errors) + ".")
  n = jax.device_count()
  if t.batch_size % n:
    raise ValueError(f"training.batch_size ({t.batch_size}) must be divisible by the number of "
                     f"devices ({n}).")
  if config.eval.batch_size % n:
    raise ValueError(f"eval.batch_size ({config.eval.batch_size}) must be divisible by the number "
                     f"of devices ({n}).")


def init_state(model, tx, rng, mesh) -> TrainState:
  """A new TrainState, created by a jitted init directly replicated over the mesh (the sharding the
  train step returns, so the step compiles once)."""
  init = jax.jit(functools.partial(create_train_state, model, tx),
                 out_shardings=parallel.replicated(mesh))
  return init(rng)


def setup(config, workdir):
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  train_ds = load_data(config, "train")
  model = build_model(config, train_ds)
  tx = optimizer_from_config(config)
  rng = jax.random.PRNGKey(config.seed)
  init = functools.partial(init_state, model, tx, mesh=mesh)
  abstract = jax.eval_shape(functools.partial(create_train_state, model, tx), rng)
  return mesh, train_ds, model, init, abstract, rng


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from the newest good checkpoint), evaluate and sample; returns the last eval."""
  mesh, train_ds, model, init, abstract, rng = setup(config, workdir)
  t = config.training
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  test_ds = load_data(config, config.eval.split)
  mngr = checkpoint_manager(workdir, max_to_keep=t.max_checkpoints_to_keep,
                            async_save=t.async_checkpointing)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)
  state, start = restore_latest(mngr, abstract)
  if state is None:
    state, start = init(rng), 0
    _say(f"new run in {workdir} on {jax.device_count()} device(s), {jax.process_count()} process(es)")
  else:
    _say(f"resumed from the checkpoint at step {start} in {workdir}")
  start = int(start)

  step_fn = make_train_step(model, ema_decay=t.ema_decay, nan_policy=t.nan_policy,
                            inject_nan_at_step=t.inject_nan_at_step)
  n = t.steps_per_dispatch
  train_step = jit_train_step(step_fn, mesh, steps_per_dispatch=n)
  bsh = parallel.batch_sharding(mesh, leading_axes=0 if n == 1 else 1)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  scalars = _Scalars(workdir)
  eval_rng = jax.random.PRNGKey(config.seed + 1)
  last_eval = None
  step = start
  bar = _progress(total=t.num_steps, desc="train", initial=start)
  t_last, step_last = time.time(), step
  with _Preemption() as preempt:
    while step < t.num_steps:
      local = _stack_batches(train_ds, config, step, n)
      batch = parallel.global_batch(local, bsh, batch_axis=0 if n == 1 else 1)
      state, metrics = train_step(state, batch)
      prev, step = step, step + n
      bar.update(n)
      is_last = step >= t.num_steps
      if _crossed(prev, step, t.log_every) or is_last:
        m = _to_python(metrics)
        nonfinite = int(state.nonfinite_count)
        dt = time.time() - t_last
        m.update(step=step, nonfinite_count=nonfinite,
                 steps_per_sec=(step - step_last) / max(dt, 1e-9),
                 examples_per_sec=(step - step_last) * t.batch_size / max(dt, 1e-9))
        t_last, step_last = time.time(), step
        append_jsonl(metrics_path, m)
        scalars.write(m)
        bar.set_postfix(loss=f"{m['loss']:.4g}", bpd=f"{m['bpd']:.4g}")
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
      if _crossed(prev, step, t.checkpoint_every) or is_last or preempt.requested:
        save_checkpoint(mngr, state, step)
      if preempt.requested:
        mngr.wait_until_finished()
        append_jsonl(metrics_path, {"step": step, "event": "preempted"})
        log.warning("SIGTERM: saved a checkpoint at step %d and stopped.", step)
        bar.close()
        mngr.close()
        return {"step": step, "preempted": True}
      if _crossed(prev, step, t.eval_every) and not is_last:
        last_eval = evaluate(model, state.ema_params, test_ds, estimator=config.eval.estimator,
                             eval_cfg=config.eval, mesh=mesh, rng=eval_rng, split=config.eval.split,
                             step=step, progress=False)
        row = {"step": step, "eval_bpd": last_eval["bpd"], "eval_bpd_stderr": last_eval["bpd_stderr"]}
        append_jsonl(metrics_path, row)
        scalars.write(row)
      if _crossed(prev, step, t.sample_every) and not is_last:
        _sample_and_save(model, state.ema_params, config, workdir, step, jax.random.PRNGKey(step))
  bar.close()
  mngr.wait_until_finished()
  last_eval = evaluate(model, state.ema_params, test_ds, estimator=config.eval.estimator,
                       eval_cfg=config.eval, mesh=mesh, rng=eval_rng, split=config.eval.split,
                       step=step)
  last_eval["params"] = "ema"
  write_json(os.path.join(workdir, "eval.json"), last_eval)
  row = {"step": step, "eval_bpd": last_eval["bpd"], "eval_bpd_stderr": last_eval["bpd_stderr"]}
  append_jsonl(metrics_path, row)
  scalars.write(row)
  scalars.close()
  if config.sample.num_samples > 0:
    _sample_and_save(model, state.ema_params, config, workdir, step, jax.random.PRNGKey(config.seed))
  mngr.close()
  return last_eval


def _restore_for_inference(config, workdir):
  mesh, train_ds, model, _, abstract, _ = setup(config, workdir)
  mngr = checkpoint_manager(workdir, max_to_keep=config.training.max_checkpoints_to_keep,
                            async_save=False)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)
  state, step = restore_latest(mngr, abstract)
  mngr.close()
  if state is None:
    raise FileNotFoundError(f"no restorable checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                            "train first (--mode=train).")
  return mesh, model, state, int(step)


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=eval: evaluate the newest checkpoint's EMA parameters with config.eval.estimator."""
  mesh, model, state, step = _restore_for_inference(config, workdir)
  ds = load_data(config, config.eval.split)
  result = evaluate(model, state.ema_params, ds, estimator=config.eval.estimator,
                    eval_cfg=config.eval, mesh=mesh, rng=jax.random.PRNGKey(config.seed + 1),
                    split=config.eval.split, step=step)
  result["params"] = "ema"
  write_json(os.path.join(workdir, "eval.json"), result)
  write_json(os.path.join(workdir, f"eval_{config.eval.estimator}.json"), result)
  return result


def sample_checkpoint(config, workdir: str) -> np.ndarray:
  """--mode=sample: draw config.sample.num_samples samples from the newest checkpoint; PNG + npz."""
  _, model, state, step = _restore_for_inference(config, workdir)
  return _sample_and_save(model, state.ema_params, config, workdir, step,
                          jax.random.PRNGKey(config.seed))
