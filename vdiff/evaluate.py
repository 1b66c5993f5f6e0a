"""Evaluation: the three NLL estimators, compiled once, masked, resumable and at full float32 precision.

Estimators (`ESTIMATORS`), each (params, rng, batch) -> (per-example nats [B], nfe [B]), the nats an
upper bound on the discrete -log P(k) (the return convention of `vdiff.likelihood`), so that bits/dim
are `likelihood.nats_to_bpd(nats, D)` for all three:

  elbo  VDM / DiffEnc negative ELBO, `eval.num_time_samples` Monte-Carlo time draws averaged per image:
        a discrete bound on -log P(k) (docs/math.md sec. 2).
  cdm   CDM one-step density (Thm 3.2), `eval.num_dequantization_samples` draws per image, with
        `eval.dequantization` = uniform (class 0, a density on uniformly dequantised data, its
        D log(K/2) folded into the nats: + log2(K/2) bits/dim) or forward (class 1 with the K-level
        decoder at abar_1: a discrete bound, no offset).
  ode   probability-flow ODE (docs/math.md sec. 6), any family whose flow is the plain diffusion, with
        the same two dequantisations (forward: the ODE from `eval.ode_t0` to 1 and the decoder at t0).

With m > 1 dequantisation draws the bound is importance-weighted (log-mean-exp; tighter as m grows,
`vdiff.likelihood.forward_dequantization_bound`). `eval.condition` = label | none conditions a
conditional model on the true label or on the null label, the same for all three estimators.

`Evaluator` compiles its estimator once per batch shape and is reused for every later evaluation;
`evaluate` keeps one Evaluator per model and settings. Every example is evaluated exactly once across
processes and devices; the batch is capped at the number of examples rounded up to the device count,
and for the ODE the last batch is cut to the remaining examples (`batch_plan`); padded rows are masked
out of every mean, including nfe. Per-batch results are appended to `<workdir>/eval_<estimator>_partial.jsonl` under a
hash of the settings, the checkpoint step and the parameters, so a killed evaluation rerun with the
same settings continues after its last finished batch with the same random draws (batch i uses
fold_in(rng, i); the ODE draws per example, fold_in(rng, example index)) and ends with the figure of an
uninterrupted run. Programs are compiled under `jax.default_matmul_precision(eval.precision)`
("highest" by default: TPUs and GPUs otherwise multiply float32 matrices at lower precision).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import cdm as cdm_lib
from vdiff import config_schema
from vdiff import data as data_lib
from vdiff import likelihood
from vdiff import ode
from vdiff import parallel

Array = jax.Array

# The names config.eval accepts: declared once, in the config's table (vdiff.config_schema).
ESTIMATORS = config_schema.ESTIMATORS
DEQUANTIZATIONS = config_schema.DEQUANTIZATIONS
PRECISIONS = config_schema.PRECISIONS
CONDITIONS = config_schema.CONDITIONS


# --------------------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
  """The evaluation settings read from `config.eval` (defaults for keys an older config lacks)."""

  estimator: str = "elbo"
  num_time_samples: int = 1
  dequantization: str = "uniform"
  num_dequantization_samples: int = 1
  ode_t0: float = 0.0
  ode_rtol: float = 1e-5
  ode_atol: float = 1e-5
  ode_divergence: str = "hutchinson"
  precision: str = "highest"
  condition: str = "label"

  @classmethod
  def from_config(cls, eval_cfg, estimator: str | None = None) -> "Settings":
    get = eval_cfg.get if hasattr(eval_cfg, "get") else (lambda k, d: getattr(eval_cfg, k, d))
    values = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
    if estimator is not None:
      values["estimator"] = estimator
    return cls(**values)

  def errors(self) -> list[str]:
    out = []
    if self.estimator not in ESTIMATORS:
      out.append(f"eval.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
    if self.dequantization not in DEQUANTIZATIONS:
      out.append(f"eval.dequantization must be one of {DEQUANTIZATIONS}, got {self.dequantization!r}")
    if self.precision not in PRECISIONS:
      out.append(f"eval.precision must be one of {PRECISIONS}, got {self.precision!r}")
    if self.condition not in CONDITIONS:
      out.append(f"eval.condition must be one of {CONDITIONS}, got {self.condition!r}")
    for name in ("num_time_samples", "num_dequantization_samples"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        out.append(f"eval.{name} must be an int >= 1, got {v!r}")
    if not 0.0 <= float(self.ode_t0) < 1.0:
      out.append(f"eval.ode_t0 must be in [0, 1), got {self.ode_t0}")
    if self.ode_divergence not in ode.DIVERGENCES:
      out.append(f"eval.ode_divergence must be one of {ode.DIVERGENCES}, got {self.ode_divergence!r}")
    if not (self.ode_rtol > 0 and self.ode_atol > 0):
      out.append(f"eval.ode_rtol and eval.ode_atol must be > 0, got {self.ode_rtol}, {self.ode_atol}")
    return out

  def check(self) -> "Settings":
    errors = self.errors()
    if errors:
      raise ValueError("invalid eval config: " + "; ".join(errors) + ".")
    return self

  def record(self, model) -> dict:
    """What eval.json states about how the number was computed."""
    e = self.estimator
    dequantized = e != "elbo"
    out = {
        "num_time_samples": int(self.num_time_samples) if e == "elbo" else 0,
        "dequantization": self.dequantization if dequantized else "none",
        "num_dequantization_samples": int(self.num_dequantization_samples) if dequantized else 0,
        "num_probes": 0, "ode_t0": None, "cdm_class": None,
        "matmul_precision": self.precision,
        "condition": self.condition if model.num_labels else "none (unconditional model)",
    }
    if e == "ode":
      out.update(ode_rtol=float(self.ode_rtol), ode_atol=float(self.ode_atol),
                 ode_divergence=self.ode_divergence,
                 ode_t0=float(self.ode_t0) if self.dequantization == "forward" else 0.0)
      if self.ode_divergence == "hutchinson":  # one Rademacher probe per dequantisation draw
        out["num_probes"] = int(self.num_dequantization_samples)
    if e == "cdm":
      out["cdm_class"] = _cdm_forward_class(model) if self.dequantization == "forward" else 0
    return out


def _cdm_forward_class(model) -> int:
  """The class a forward-dequantised CDM bound is evaluated at (`cdm.forward_class`; 1 for a model
  without a class grid)."""
  if getattr(model, "forward_class", None) is not None:
    return int(model.forward_class)
  abar = getattr(model, "abar", None)
  return 1 if abar is None else cdm_lib.forward_class(abar, model.num_levels)


def config_errors(eval_cfg) -> list[str]:
  """Problems with config.eval, each naming its key (for the trainer's config validation)."""
  try:
    return Settings.from_config(eval_cfg).errors()
  except TypeError as e:
    return [f"eval: {e}"]


def convention(settings: Settings, num_levels: int, cdm_class: int = 1) -> str:
  """One sentence saying what kind of number the estimator's bits/dim are."""
  e, m = settings.estimator, settings.num_dequantization_samples
  if e == "elbo":
    return (f"discrete bound on -log P(k): VDM negative ELBO, {settings.num_time_samples} time "
            "draw(s) per image (no dequantisation offset)")
  where = ("CDM one-step density" if e == "cdm" else "probability-flow ODE density")
  if settings.dequantization == "forward":
    at = f"class {cdm_class}" if e == "cdm" else f"t0 = {float(settings.ode_t0):g}"
    return (f"discrete bound on -log P(k): {where} at {at}, forward-process dequantisation with the "
            f"K-level decoder, {m} importance sample(s) (no dequantisation offset)")
  return (f"continuous density on uniformly dequantised data, {where}, {m} importance sample(s), "
          f"+ log2(K/2) = {likelihood.dequantization_offset_bpd(num_levels):g} bits/dim")


# --------------------------------------------------------------------------------------------------
# Estimators.
# --------------------------------------------------------------------------------------------------
def _condition(model, batch, condition: str):
  """The batch with its labels replaced by the null label when condition='none'."""
  if not model.num_labels or condition == "label":
    return batch
  return dict(batch, label=jnp.full(batch["label"].shape, model.num_labels, jnp.int32))


def make_nll_fn(model, estimator: str, eval_cfg):
  """(params, rng, batch) -> (per-example NLL in nats [B], nfe per example [B]) for the chosen estimator,
  and whether it bounds -log P(k) through a density on uniformly dequantised data (True) or directly
  (False: the ELBO, or forward dequantisation).

  The nats are always an upper bound on the discrete -log P(k) (the return convention of
  `vdiff.likelihood`: a uniformly dequantised density's nats include D log(K / 2)), so bits/dim are
  `likelihood.nats_to_bpd(nats, D)` either way; the flag only labels the convention (eval.json's
  "discrete_bound", the convention sentence and the printed summary).

  batch = {"image": int [B, ...], "label": int [B], optionally "index": int [B]} (the examples' indices
  in the split; the ODE draws its noise per example from fold_in(rng, index), so its results do not
  depend on the batching).
  """
  s = Settings.from_config(eval_cfg, estimator).check()
  cond = s.condition
  if estimator == "ode":
    if not model.supports_ode:
      raise ValueError(f"eval.estimator='ode' does not apply to this {model.family_name!r} model (a "
                       "DiffEnc encoder changes the probability flow); use 'elbo'.")
    ode_kw = dict(rtol=float(s.ode_rtol), atol=float(s.ode_atol), divergence=s.ode_divergence)
    m = int(s.num_dequantization_samples)

    def ode_fn(params, rng, batch):
      batch = _condition(model, batch, cond)
      schedule = model.schedule(params)
      k = batch["image"]
      index = batch.get("index", jnp.arange(k.shape[0], dtype=jnp.int32))
      labels = batch["label"] if model.num_labels else jnp.zeros(k.shape[:1], jnp.int32)

      def one(idx, k_i, label_i):
        # One example at a time (vmapped): the denoiser sees its own label, and the draws depend on the
        # example's index only.
        eps_fn = model.eps_fn(params, label_i[None] if model.num_labels else None)
        r = jax.random.fold_in(rng, idx)
        t0 = float(s.ode_t0) if s.dequantization == "forward" else 0.0
        nats, extras = ode.ode_nll(r, eps_fn, schedule, k_i[None], num_levels=model.num_levels,
                                   dequantization=s.dequantization, t0=t0, num_samples=m, **ode_kw)
        return nats[0], extras["nfe"][0]

      return jax.vmap(one)(index, k, labels)

    return ode_fn, s.dequantization == "uniform"
  if estimator != model.native_estimator:
    raise ValueError(f"eval.estimator={estimator!r} does not apply to model family "
                     f"{model.family_name!r}; use {model.native_estimator!r} or 'ode'.")
  if estimator == "cdm":
    m = int(s.num_dequantization_samples)

    def cdm_fn(params, rng, batch):
      batch = _condition(model, batch, cond)
      nats, _ = model.nll(params, rng, batch, dequantization=s.dequantization, num_samples=m)
      return nats, jnp.full(nats.shape, model.nfe_per_sample * m, jnp.float32)

    return cdm_fn, s.dequantization == "uniform"
  k = int(s.num_time_samples)

  def native(params, rng, batch):
    batch = _condition(model, batch, cond)

    # k Monte-Carlo samples of time and noise in a fori_loop, so the program (and its compile time)
    # does not grow with k.
    def body(i, acc):
      return acc + model.nll(params, jax.random.fold_in(rng, i), batch)[0]

    total = jax.lax.fori_loop(0, k, body, jnp.zeros(batch["image"].shape[:1], jnp.float32))
    return total / k, jnp.full(total.shape, float(model.nfe_per_sample * k), jnp.float32)

  return native, model.dequantized


# --------------------------------------------------------------------------------------------------
# Batching, resumption.
# --------------------------------------------------------------------------------------------------
def batch_plan(num_examples: int, batch_size: int, unit: int, *,
               cut_last: bool) -> list[tuple[int, int]]:
  """(start, global size) of every batch.

  The batch size is capped at num_examples rounded up to a multiple of `unit` (the device count): 8
  examples with eval.batch_size = 500 make one batch of 8, not of 500. With cut_last (the ODE, whose
  padded rows would each cost a whole adaptive solve) the last batch is also cut to the remaining
  examples rounded up to `unit`, a second program shape; otherwise it is padded to the full size (one
  compiled program). Padded rows are masked out of every mean.
  """
  if batch_size < 1 or batch_size % unit:
    raise ValueError(f"eval.batch_size ({batch_size}) must be a positive multiple of the number of "
                     f"devices and processes ({unit}).")
  roundup = lambda n: -(-n // unit) * unit
  batch_size = min(batch_size, roundup(max(num_examples, 1)))
  full, rest = divmod(num_examples, batch_size)
  plan = [(i * batch_size, batch_size) for i in range(full)]
  if rest:
    plan.append((full * batch_size, roundup(rest) if cut_last else batch_size))
  return plan


def _local_batch(ds, start: int, size: int, num_examples: int) -> dict:
  """This process's slice of the global batch [start, start + size); rows past the end repeat the
  batch's first example (masked out) so that they cost an ordinary example's work."""
  sl = data_lib.process_slice(size, jax.process_index(), jax.process_count())
  idx = np.arange(start, start + size)[sl]
  valid = idx < num_examples
  safe = np.where(valid, idx, start)
  return {"image": ds.images[safe], "label": np.asarray(ds.labels[safe], np.int32),
          "index": idx.astype(np.int32), "mask": valid.astype(np.float32)}


def _fingerprint(params) -> list[float]:
  """Two float64 sums over every parameter: enough to tell two parameter sets apart."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(parallel.fetch(params))]
  return [float(sum(x.sum() for x in leaves)), float(sum(np.abs(x).sum() for x in leaves))]


def _row_digest(row: dict) -> str:
  """sha256 of a partial row's content (every field but the digest itself, canonical JSON)."""
  body = {k: v for k, v in row.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _partial_row(key: str, batch: int, step: int, nats: np.ndarray, nfe: np.ndarray) -> str:
  row = {"key": key, "batch": int(batch), "step": int(step), "nats": nats.tolist(), "nfe": nfe.tolist()}
  return json.dumps({**row, "sha256": _row_digest(row)}) + "\n"


def _read_partial(path: str, key: str, sizes: list[int] | None = None,
                  problems: list[str] | None = None) -> dict[int, dict]:
  """The rows of this evaluation (`key`) that can be trusted; why any others were not goes to `problems`.

  Rows are appended in batch order 0, 1, 2, ...; a killed evaluation leaves a prefix of them (and maybe
  half a line). Trusted: the longest run of rows, in file order, that are batches 0, 1, ..., r - 1, each
  with a matching sha256, `sizes[i]` (when given) finite nats and nfe, and whose batch index no other row of this key
  repeats. Everything after the first damaged, duplicated, missing or out-of-order row is recomputed
  (a resume cache is never worth a wrong figure). Rows without a digest (an older vdiff) are not used.
  """
  problems = [] if problems is None else problems
  if not os.path.exists(path):
    return {}
  mine = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        if f'"key": "{key}"' in line:
          problems.append(f"line {n} is not JSON")
          mine.append(None)
        continue  # a line cut short by a kill, or another evaluation's
      if isinstance(row, dict) and row.get("key") == key:
        mine.append(row)
  counts = collections.Counter(r.get("batch") for r in mine if r is not None)
  trusted = {}
  for j, row in enumerate(mine):
    why = None
    if row is None:
      why = "a damaged line"
    elif row.get("sha256") != _row_digest(row):
      why = f"batch {row.get('batch')}: its sha256 does not match (a damaged or edited row)"
    elif row.get("batch") != j:
      why = f"batch {row.get('batch')} where batch {j} was expected (missing or out of order)"
    elif counts[j] > 1:
      why = f"batch {j} appears {counts[j]} times"
    elif not _row_values_ok(row, None if sizes is None else (sizes[j] if j < len(sizes) else -1)):
      why = f"batch {j}: not the expected number of finite values"
    if why:
      problems.append(why)
      break
    trusted[j] = row
  return trusted


def _row_values_ok(row: dict, size: int | None) -> bool:
  try:
    nats, nfe = np.asarray(row["nats"], np.float64), np.asarray(row["nfe"], np.float64)
  except (KeyError, TypeError, ValueError):
    return False
  return (nats.ndim == 1 and nats.shape == nfe.shape and (size is None or len(nats) == size)
          and bool(np.all(np.isfinite(nats))))


def _drop_partial(path: str, key: str) -> None:
  """Remove this evaluation's rows (it finished); keep other evaluations' rows."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and f'"key": "{key}"' not in line]
  if keep:
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  else:
    os.remove(path)


# --------------------------------------------------------------------------------------------------
# The evaluator.
# --------------------------------------------------------------------------------------------------
class Evaluator:
  """One estimator of one model, compiled once per batch shape and reused for every evaluation."""

  def __init__(self, model, *, estimator: str, eval_cfg, mesh):
    self.model = model
    self.mesh = mesh
    self.settings = Settings.from_config(eval_cfg, estimator).check()
    self.batch_size = int(eval_cfg.batch_size)
    self.nll_fn, self.dequantized = make_nll_fn(model, estimator, eval_cfg)
    rep = parallel.replicated(mesh)
    bsh = parallel.batch_sharding(mesh)

    def nll_and_mask(params, rng, batch, mask):
      nats, nfe = self.nll_fn(params, rng, batch)
      # Replicated outputs: every process sees the whole global batch's values and mask.
      return nats, jnp.asarray(nfe, jnp.float32), mask

    self._jitted = jax.jit(nll_and_mask, in_shardings=(rep, rep, bsh, bsh),
                           out_shardings=(rep, rep, rep))
    self._compiled = {}
    self.compile_seconds = 0.0

  def _precision(self):
    p = self.settings.precision
    return contextlib.nullcontext() if p == "default" else jax.default_matmul_precision(p)

  def compiled(self, params, rng, batch, mask):
    """The program for this batch shape, compiled (ahead of time, under the matmul precision) once."""
    shape = batch["image"].shape
    if shape not in self._compiled:
      t0 = time.time()
      with self._precision():
        self._compiled[shape] = self._jitted.lower(params, rng, batch, mask).compile()
      self.compile_seconds += time.time() - t0
    return self._compiled[shape]

  def _key(self, params, rng, ds, num: int, split: str, step: int) -> str:
    desc = {"settings": dataclasses.asdict(self.settings), "split": split, "step": int(step),
            "num_examples": num, "batch_size": self.batch_size, "unit": self._unit(),
            "data": [getattr(ds, "name", None), int(ds.num_levels), list(ds.images.shape[1:])],
            "rng": np.asarray(jax.random.key_data(rng)).tolist(), "params": _fingerprint(params),
            # The rows' nats bound -log P(k) (a dequantised density's D log(K/2) included); rows written
            # when they held the density's -log p(y) have other keys and are never resumed from.
            "nats": "discrete_bound"}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

  def _unit(self) -> int:
    return math.lcm(int(self.mesh.devices.size), jax.process_count())

  def __call__(self, params, ds, *, rng, split: str, step: int, workdir: str | None = None,
               progress: bool = True, on_batch: Callable[[int], None] | None = None) -> dict:
    """Bits/dim of the split (its first eval.num_examples examples), each example exactly once.

    Args:
      params: the model's parameters (replicated over the mesh). ds: a `data.Dataset`.
      rng: PRNG key (batch i uses fold_in(rng, i)). split, step: recorded in the result.
      workdir: where the per-batch results go (None: not resumable).
      progress: show a progress bar. on_batch: called with the batch index after each recorded batch.
    Returns:
      the eval.json dict.
    """
    from vdiff import train  # pylint: disable=g-import-not-at-top  (train imports this module)
    model, s = self.model, self.settings
    num = len(ds)
    plan = batch_plan(num, self.batch_size, self._unit(), cut_last=s.estimator == "ode")
    bsh = parallel.batch_sharding(self.mesh)
    path = key = None
    done_rows = {}
    if workdir is not None:
      if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, f"eval_{s.estimator}_partial.jsonl")
      key = self._key(params, rng, ds, num, split, step)
      sizes = [max(0, min(start + size, num) - start) for start, size in plan]
      problems = []
      done_rows = _read_partial(path, key, sizes, problems)
      if problems:
        train._say(f"eval {s.estimator}: not resuming from every row of {path} ({'; '.join(problems)}); "  # pylint: disable=protected-access
                   f"recomputing from batch {len(done_rows)}")
    resume = 0
    while resume in done_rows:
      resume += 1
    if jax.process_count() > 1:  # every process must skip the same batches
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      resume = int(multihost_utils.broadcast_one_to_all(np.int32(resume)))
    nats_all = [np.asarray(done_rows[i]["nats"], np.float64) for i in range(resume)]
    nfe_all = [np.asarray(done_rows[i]["nfe"], np.float64) for i in range(resume)]
    if resume:
      train._say(f"eval {s.estimator}: resuming after batch {resume} of {len(plan)} "  # pylint: disable=protected-access
                 f"({sum(len(a) for a in nats_all)} examples done) from {path}")
    compile_before = self.compile_seconds
    bar = train._progress(total=len(plan), desc=f"eval {s.estimator}", enabled=progress,  # pylint: disable=protected-access
                          initial=resume)
    seconds, evaluated = 0.0, 0
    for i in range(resume, len(plan)):
      start, size = plan[i]
      local = _local_batch(ds, start, size, num)
      batch = parallel.global_batch({k: local[k] for k in ("image", "label", "index")}, bsh)
      mask = parallel.global_batch(local["mask"], bsh)
      # The ODE folds each example's index into rng itself (its draws do not depend on the batching);
      # the other estimators draw per batch.
      args = (params, rng if s.estimator == "ode" else jax.random.fold_in(rng, i), batch, mask)
      fn = self.compiled(*args)
      t0 = time.time()
      nats, nfe, mask = fn(*args)
      keep = np.asarray(mask).astype(bool)
      nats, nfe = np.asarray(nats, np.float64)[keep], np.asarray(nfe, np.float64)[keep]
      seconds += time.time() - t0
      evaluated += int(keep.sum())
      nats_all.append(nats)
      nfe_all.append(nfe)
      if path is not None and jax.process_index() == 0:
        with open(path, "a+b") as f:
          f.seek(0, os.SEEK_END)
          if f.tell():  # after half a line left by a kill, start a new line
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
              f.write(b"\n")
          f.write(_partial_row(key, i, step, nats, nfe).encode())
          f.flush()
          os.fsync(f.fileno())
      bar.update(1)
      if on_batch is not None:
        on_batch(i)
    bar.close()
    nats = np.concatenate(nats_all) if nats_all else np.zeros((0,))
    nfe = np.concatenate(nfe_all) if nfe_all else np.zeros((0,))
    n = len(nats)
    bpd = np.asarray(likelihood.nats_to_bpd(nats, model.num_dims), np.float64)
    result = {
        "step": int(step), "split": split, "estimator": s.estimator,
        "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "num_examples": n, "nfe": float(nfe.mean()) if n else 0.0,
        "seconds": seconds, "seconds_per_image": seconds / max(evaluated, 1),
        "compile_seconds": self.compile_seconds - compile_before,
        "convention": convention(s, model.num_levels, _cdm_forward_class(model)),
        "discrete_bound": not self.dequantized,
        "num_levels": model.num_levels, "num_dims": model.num_dims,
        "batch_size": self.batch_size, "num_batches": len(plan), "resumed_after_batch": resume,
        **s.record(model),
    }
    result["summary"] = summary(result)
    if path is not None:
      _drop_partial(path, key)
    return result


def summary(result: dict) -> str:
  """The estimator and its convention in a few words, for the printed line."""
  e = result["estimator"]
  if e == "elbo":
    how = f"elbo, {result['num_time_samples']} time draw(s), discrete bound"
  else:
    deq = result["dequantization"]
    where = f"t0={result['ode_t0']:g}" if e == "ode" else f"class {result['cdm_class']}"
    kind = "discrete bound" if deq == "forward" else "dequantised density + log2(K/2)"
    how = (f"{e}, {deq} dequantisation at {where}, {result['num_dequantization_samples']} draw(s), "
           f"{kind}")
  return f"{how}; condition {result['condition']}; precision {result['matmul_precision']}"


_EVALUATORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def evaluator(model, *, estimator: str, eval_cfg, mesh) -> Evaluator:
  """The Evaluator of this model, estimator and eval settings, built on first use and then reused."""
  s = Settings.from_config(eval_cfg, estimator)
  key = (json.dumps(dataclasses.asdict(s), sort_keys=True), int(eval_cfg.batch_size), mesh)
  cache = _EVALUATORS.setdefault(model, {})
  if key not in cache:
    cache[key] = Evaluator(model, estimator=estimator, eval_cfg=eval_cfg, mesh=mesh)
  return cache[key]


def evaluate(model, params, ds, *, estimator: str, eval_cfg, mesh, rng, split: str, step: int,
             progress: bool = True, workdir: str | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict:
  """NLL of a split's first eval.num_examples examples (0 = all) in bits/dim, with the reused Evaluator.

  Returns the eval.json dict (step, split, bpd, bpd_stderr, estimator, num_examples, nfe, timings, the
  convention and every setting that shaped the number).
  """
  num = len(ds) if not eval_cfg.num_examples else min(len(ds), int(eval_cfg.num_examples))
  sub = ds if num == len(ds) else dataclasses.replace(ds, images=ds.images[:num], labels=ds.labels[:num])
  ev = evaluator(model, estimator=estimator, eval_cfg=eval_cfg, mesh=mesh)
  return ev(params, sub, rng=rng, split=split, step=step, workdir=workdir, progress=progress,
            on_batch=on_batch)
