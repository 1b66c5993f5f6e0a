"""The work directory's contract: one run at a time, the config the run started with, checkpoints that read
back exactly as they were written, and append-only records.

A work directory holds (process 0 writes every file; docs/math.md does not enter here):

  run.lock              flock(2)-held by the run that holds the directory; JSON {pid, host, start_time,
                        ...} naming it
  config.json           the config the run STARTED with; a resume never rewrites it
  config_changes.jsonl  one row per resume that changed a key: {"step", "changes": {key: [old, new]}, ...}
  metrics.jsonl         one JSON object per logged step, plus event rows ({"event": "resumed", ...});
                        `read_metrics` keeps, for every step, the row of the timeline that was resumed
  tensorboard/          the same scalars as TensorBoard event files
  eval.json             the last evaluation
  eval_history.jsonl    every evaluation result that a later one replaced (`replace_json`)
  checkpoints/<step>/   orbax CheckpointManager steps; `checksums.json` inside each holds the sha256 of
                        every file of the step, written before orbax commits the step (so a
                        committed step always has it)
  checkpoints/corrupt/  checkpoints that failed verification and orbax temporary directories left by a
                        killed or failed save, moved aside (never deleted) for inspection

Guarantees (each tried by a test in tests/test_workdir.py or tests/test_reliability.py):
  * `lock`: a second run on the same directory is refused with the holder's pid, host and start time
    while the holder lives (the kernel's flock, released when the holder dies, kill -9 included); a
    run.lock nobody holds is taken over with a message. A live holder is never taken over, whatever
    its run.lock holds.
  * `check_config`: a resume that changes a key outside `HARMLESS_KEYS` (the model, the data, the batch,
    the seed, the optimiser, ...) is refused before anything is written, listing every differing key,
    unless `training.allow_config_change=True`; changes that are allowed are recorded.
  * `restore_latest`: the newest checkpoint that carries its checksums, whose checksums match, whose
    arrays read back and whose parameters, EMA parameters and optimiser state are finite; a checkpoint
    failing any of these is reported and moved to checkpoints/corrupt/<step>, so that the step is
    trained and saved again (a step without checksums is never restored unverified). A
    checkpoint whose tree of shapes and dtypes differs from the run's state is an error naming the
    difference, never taken for corruption: nothing is moved or deleted.
  * `save_checkpoint`: a save that orbax skips is an error, not a silent no-op.
  * `replace_json`: eval.json and eval_<estimator>.json are replaced only after their earlier content
    has been appended to eval_history.jsonl (tests/test_cli.py).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import threading
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("vdiff")

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt"
CHECKSUMS_FILE = "checksums.json"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"

# The keys a resume may change without changing what the run computes (the state's structure, the data,
# the order and randomness of the updates): how long to train, how and when to log, checkpoint, evaluate
# and sample. A key is harmless when it equals one of these or lies below one ("eval" covers
# "eval.batch_size"). Every other key (model.*, data.*, optim.*, seed, training.batch_size,
# training.ema_decay, ...) is guarded: changing it on resume is refused unless
# training.allow_config_change=True.
HARMLESS_KEYS = (
    "training.num_steps",            # guarded instead when optim.lr_schedule='cosine': it sets the decay
    "training.log_every",
    "training.eval_every",
    "training.checkpoint_every",
    "training.sample_every",
    "training.max_checkpoints_to_keep",
    "training.async_checkpointing",
    "training.steps_per_dispatch",   # data and rng are functions of the step, not of the dispatch
    "training.allow_config_change",
    "model.score.remat",             # recomputes activations in the backward pass: the same function
    "eval",
    "sample",
)
# Keys whose harmlessness depends on another key: (key, condition on the new config, why).
_CONDITIONALLY_GUARDED = (
    ("training.num_steps", lambda flat: flat.get("optim.lr_schedule") == "cosine",
     "with optim.lr_schedule='cosine' the decay length is training.num_steps"),
)

# Keys added to the config after work directories may have been written. A config.json without one ran
# with the value given here (what vdiff computed before the key existed), so absent and this value
# describe the same run; any other new value is a change like any other.
#
# Every key added to experiments/configs/base.py since the first work-directory format (commit d24e44b,
# the first to write config.json; its keys are tests/data/config_keys_d24e44b.json) is either here or
# harmless (tests/test_workdir.py checks both, and that such a resume is accepted). A value may be a
# function of the old config's flat keys where the old behaviour depended on another key.
ADDED_KEY_DEFAULTS = {
    "model.score.fourier_damping": False,
    "model.cdm.grid": "ddpm",
    # The old CDM grid: DDPM's betas over T = model.cdm.num_steps steps (now resampled from beta_steps).
    "model.cdm.beta_steps": lambda old_flat: old_flat.get("model.cdm.num_steps"),
    "training.ema_warmup": False,
    "training.compute_dtype": "float32",
    "eval.params": "ema",
    "sample.params": "ema",
}


def _added_key_default(key: str, old_flat: dict):
  value = ADDED_KEY_DEFAULTS[key]
  return value(old_flat) if callable(value) else value


class WorkdirError(RuntimeError):
  """The work directory cannot be used as asked; the message says why and what to do."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the work directory's lock."""


class ConfigChangeError(WorkdirError):
  """A resume would change a guarded config key."""


class CheckpointMismatchError(WorkdirError):
  """A checkpoint's tree of shapes and dtypes differs from the state the run builds."""


class NoCheckpointError(WorkdirError):
  """--mode=eval or sample found no restorable checkpoint in the work directory."""


class CheckpointSaveError(WorkdirError):
  """orbax did not save a checkpoint it was asked to save."""


def _is_main() -> bool:
  return jax.process_index() == 0


def _say(msg: str, *, err: bool = False) -> None:
  if _is_main():
    print(f"[vdiff] {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any process (no collective in a 1-process run)."""
  if jax.process_count() == 1:
    return bool(flag)
  from vdiff import parallel  # pylint: disable=g-import-not-at-top
  return parallel.any_process(flag)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from vdiff import parallel  # pylint: disable=g-import-not-at-top
    parallel.barrier(name)


# --------------------------------------------------------------------------------------------------
# JSON records.
# --------------------------------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
  """Write JSON atomically (temporary file + rename): readers never see half a file. Process 0 only."""
  if not _is_main():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def append_jsonl(path: str, obj) -> None:
  """Append one JSON object as a line. Process 0 only."""
  if not _is_main():
    return
  with open(path, "a") as f:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


EVAL_HISTORY = "eval_history.jsonl"


def replace_json(path: str, obj) -> None:
  """`write_json(path, obj)` that loses nothing: an earlier content of path that differs from obj is
  first appended to eval_history.jsonl beside it, as {"file": name, "replaced_at": time, "result": old},
  so that an evaluation with other settings, or of a later checkpoint, never erases an earlier one.
  Earlier content that is not JSON is kept as {"text": ...}. Process 0 only."""
  if not _is_main():
    return
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    try:
      old = {"result": json.loads(text)}
    except json.JSONDecodeError:
      old = {"text": text}
    if old.get("result") != json.loads(json.dumps(obj)):  # compared as they read back from JSON
      append_jsonl(os.path.join(os.path.dirname(path), EVAL_HISTORY),
                   {"file": os.path.basename(path), "replaced_at": _now(), **old})
  write_json(path, obj)


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl as the run that finished them saw them.

  A resumed run continues from its last checkpoint N and logs steps after N again; it marks the place
  with {"event": "resumed", "from_step": N}. Every row logged before that mark with a step after N
  belongs to the abandoned stretch and is dropped, so each step keeps the value the resumed run logged
  (the last one). The "resumed" rows themselves are kept. A line cut short by a killed run is skipped.
  """
  rows: list[dict] = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a killed run
      if row.get("event") == "resumed":
        n = int(row["from_step"])
        rows = [r for r in rows if int(r.get("step", 0)) <= n or r.get("event") == "resumed"]
      rows.append(row)
  return rows


class Scalars:
  """metrics.jsonl rows mirrored as TensorBoard scalars (workdir/tensorboard; tensorboardX writes the
  event files without TensorFlow). Process 0 only."""

  def __init__(self, workdir: str):
    self._writer = None
    if _is_main():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict) -> None:
    if self._writer is None:
      return
    step = int(row["step"])
    for k, v in row.items():
      # "time" (a unix timestamp) is the event's own wall time in TensorBoard; as a float32 scalar it
      # would lose its seconds (float32 resolves 2^-23 of 1.7e9, about 200 s).
      if k not in ("step", "time") and isinstance(v, (int, float)):
        self._writer.add_scalar(k, float(v), step)
    self._writer.flush()

  def image(self, tag: str, image, step: int) -> None:
    """One uint8 picture [H, W, C] (C = 1 or 3, e.g. vdiff.grid.make_grid's sample grid) at `step`."""
    if self._writer is None:
      return
    self._writer.add_image(tag, np.asarray(image, np.uint8), int(step), dataformats="HWC")
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


# --------------------------------------------------------------------------------------------------
# The lock.
# --------------------------------------------------------------------------------------------------
# The lock is the kernel's: an exclusive flock(2) on run.lock, held through an open file descriptor for
# the whole run. The kernel releases it when its holder exits, however it exits (kill -9 included), so
# whether the holder lives is never guessed from a pid, a host name or the file's age: if the flock can
# be taken, nobody holds the directory; if not, somebody does, whatever run.lock says (a live holder may
# be killed between creating the file and writing its JSON, and an unreadable file is then simply
# "someone"). run.lock's JSON only names the holder in the refusal.
#
# Where it holds: local file systems (ext4, xfs, btrfs, tmpfs, ...) and NFS (Linux emulates flock on NFS
# with byte-range locks held by the server, so two hosts exclude each other; NFSv3 needs the lockd/NLM
# service, NFSv4 has locks in the protocol). Where it does not: file systems without locking, such as
# some FUSE mounts (gcsfuse, s3fs) and NFS mounted with `nolock` (there flock is local to one host).
# Where flock fails with an error, the run is refused with that error (VDIFF_NO_LOCK=1 runs without a
# lock, at the user's risk: nothing then stops a second run on the same directory).
def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux /proc), None where unavailable. With the
  pid it identifies a process in the lock's description."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    # Field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
    return int(stat[stat.rindex(")") + 2:].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _describe(holder: dict | None) -> str:
  if not holder:
    return "another process (its run.lock names none yet: it is being written, or cannot be read)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('start_time')}"
          + (f" ({' '.join(holder['argv'])})" if holder.get("argv") else ""))


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


class _Lock(NamedTuple):
  fd: int
  holder: dict


def acquire_lock(workdir: str) -> _Lock:
  """Take the work directory's exclusive lock: flock(LOCK_EX | LOCK_NB) on run.lock, then write this
  process's {pid, host, start_time, argv} into it. Returns the held lock (keep it until release_lock).

  Raises WorkdirLockedError naming the holder when another process holds the flock (alive by
  definition: the kernel drops the flock of a process that dies). A run.lock that nobody holds (left by
  a killed run) is taken over with a message. Raises WorkdirError when the file system refuses flock.
  """
  path = os.path.join(workdir, LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _now(),
        "start_ticks": _start_ticks(os.getpid()), "argv": list(sys.argv)}
  for _ in range(20):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLockedError(
          f"the work directory {workdir} is in use by {_describe(_read_lock(path))}, which holds "
          f"the lock on {path}. Wait for that run to end, or use another --workdir.") from None
    except OSError as e:
      os.close(fd)
      raise WorkdirError(
          f"the file system of {workdir} does not support file locks (flock on {path}: {e}); put the "
          f"work directory on a local or NFS file system, or set VDIFF_NO_LOCK=1 to run without a "
          f"lock (nothing then stops a second run on this directory).") from None
    # The file may have been removed (released) between our open and our flock: then we hold a lock
    # on a file nobody else will open. Only a lock on the file at `path` counts.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    before = os.read(fd, 1 << 16)
    if before.strip():
      try:
        previous = json.loads(before)
      except ValueError:
        previous = None
      _say(f"taking over a lock file that no process holds ({path}; "
           + (f"left by {_describe(previous)}" if isinstance(previous, dict) else "unreadable")
           + ").", err=True)
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(me, indent=2, sort_keys=True) + "\n").encode())
    os.fsync(fd)
    return _Lock(fd, me)
  raise WorkdirLockedError(f"could not take the lock {path} (it kept changing hands).")


def release_lock(workdir: str, mine: _Lock) -> None:
  """Remove run.lock and release the flock (removed while still held, so that no other process can take
  a lock on the file this one is about to drop; acquire_lock checks that its locked file is the one at
  the path)."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    if os.fstat(mine.fd).st_ino == os.stat(path).st_ino:
      os.remove(path)
  except FileNotFoundError:
    pass
  finally:
    os.close(mine.fd)  # releases the flock


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Hold the work directory's lock for the block. Process 0 takes it for the whole run; every process
  learns whether it succeeded, so that a refused multi-process run ends on all processes at once.
  VDIFF_NO_LOCK=1 skips the lock (for file systems without flock; see above)."""
  os.makedirs(workdir, exist_ok=True)
  mine, error = None, None
  if _is_main() and os.environ.get("VDIFF_NO_LOCK") != "1":
    try:
      mine = acquire_lock(workdir)
    except WorkdirError as e:
      error = e
  if _any_process(error is not None):
    raise error or WorkdirLockedError(f"process 0 could not lock the work directory {workdir}.")
  try:
    yield
  finally:
    if mine is not None:
      release_lock(workdir, mine)


# --------------------------------------------------------------------------------------------------
# The config guard.
# --------------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _missing(value) -> str:
  return "<absent>" if value is _ABSENT else repr(value)


_ABSENT = object()


def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} for every key whose value differs or that one side lacks.

  A key of ADDED_KEY_DEFAULTS that the old config lacks counts as its default there."""
  fo, fn = _flatten(old), _flatten(new)
  fo = {**{k: _added_key_default(k, fo) for k in ADDED_KEY_DEFAULTS if k in fn}, **fo}
  return {k: (fo.get(k, _ABSENT), fn.get(k, _ABSENT)) for k in sorted(set(fo) | set(fn))
          if fo.get(k, _ABSENT) != fn.get(k, _ABSENT)}


def is_harmless(key: str, new_flat: dict) -> bool:
  """Whether a resume may change `key` (see HARMLESS_KEYS)."""
  for k, guarded_if, _ in _CONDITIONALLY_GUARDED:
    if key == k and guarded_if(new_flat):
      return False
  return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


def config_as_json(config) -> dict:
  """The config as config.json stores it (tuples become lists), so that the two compare equal."""
  return json.loads(config.to_json_best_effort())


def latest_step(workdir: str) -> int | None:
  """The newest committed checkpoint step in workdir/checkpoints (read from the directory), or None."""
  d = os.path.join(workdir, CHECKPOINTS)
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps) if steps else None


def has_checkpoints(workdir: str) -> bool:
  d = os.path.join(workdir, CHECKPOINTS)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check_config(workdir: str, config) -> dict[str, tuple[Any, Any]]:
  """Compare `config` with the config.json of a run to be resumed; return the changes (maybe empty).

  Nothing is compared when the directory holds no checkpoint (a new run) or no config.json (written
  by a vdiff without it). Raises ConfigChangeError listing every changed guarded key with its old and
  new value, unless config.training.allow_config_change is True. Reads only; writes nothing.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not has_checkpoints(workdir) or not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  new = config_as_json(config)
  changes = config_diff(old, new)
  new_flat = _flatten(new)
  guarded = {k: v for k, v in changes.items() if not is_harmless(k, new_flat)}
  allow = bool(config.training.get("allow_config_change", False))
  if guarded and not allow:
    lines = "\n".join(f"  {k}: {_missing(a)} -> {_missing(b)}" for k, (a, b) in guarded.items())
    raise ConfigChangeError(
        f"{workdir} holds checkpoints of a run with a different config ({path}); resuming with these "
        f"changes would alter the state's structure or what the run computes:\n{lines}\n"
        f"Use a fresh --workdir, or pass --config.training.allow_config_change=True to resume anyway "
        f"(the change is recorded in {CONFIG_CHANGES_FILE}). Keys a resume may change freely: "
        f"{', '.join(HARMLESS_KEYS)}.")
  return changes


def record_config(workdir: str, config, *, step: int, changes: dict) -> None:
  """config.json for a new run; for a resume, config.json stays the original and the changes (if any)
  are appended to config_changes.jsonl with the step they take effect at."""
  path = os.path.join(workdir, CONFIG_FILE)
  if step == 0 or not os.path.exists(path):
    write_json(path, config_as_json(config))
    return
  if changes:
    new_flat = _flatten(config_as_json(config))
    append_jsonl(os.path.join(workdir, CONFIG_CHANGES_FILE), {
        "step": int(step), "time": _now(),
        "changes": {k: [None if a is _ABSENT else a, None if b is _ABSENT else b]
                    for k, (a, b) in changes.items()},
        "guarded_keys_changed": sorted(k for k in changes if not is_harmless(k, new_flat))})
    _say(f"resuming at step {step} with changed config keys (recorded in {CONFIG_CHANGES_FILE}): "
         + ", ".join(f"{k}: {_missing(a)} -> {_missing(b)}" for k, (a, b) in changes.items()))


# --------------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != CHECKSUMS_FILE:
        out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  """checksums.json: the sha256 of every file below a checkpoint step (atomically).

  orbax's step metadata file (_CHECKPOINT_METADATA: the step's timestamps and handler names) is left
  out: orbax rewrites it with the commit time after the checksums are written (see CheckpointManager).
  A damaged one fails orbax's own read at restore."""
  sums = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)
          if rel != _ORBAX_STEP_METADATA}
  tmp = os.path.join(step_dir, CHECKSUMS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "sha256", "files": sums}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS_FILE))


UNVERIFIED = "a step without checksums.json"


def verify_checksums(step_dir: str) -> str | None:
  """None if checksums.json lists every file with its sha256 and each is there with it, else what
  differs. A step without checksums.json is not verified: that is a problem too (`UNVERIFIED`), since
  every step vdiff commits carries its checksums (see CheckpointManager)."""
  path = os.path.join(step_dir, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return UNVERIFIED
  try:
    with open(path) as f:
      sums = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its {CHECKSUMS_FILE} cannot be read ({type(e).__name__})"
  if not sums:
    return f"its {CHECKSUMS_FILE} lists no file"
  bad = []
  for rel, digest in sums.items():
    p = os.path.join(step_dir, rel)
    if not os.path.exists(p):
      bad.append(f"{rel} is missing")
    elif _sha256(p) != digest:
      bad.append(f"{rel} ({os.path.getsize(p)} bytes) does not match its sha256")
  return "; ".join(bad) or None


class CheckpointManager(ocp.CheckpointManager):
  """orbax's CheckpointManager whose every step carries checksums.json from the moment it exists.

  orbax writes a step into a temporary directory `<step>.orbax-checkpoint-tmp-*` and commits it by
  renaming that to `<step>`. Its post-finalisation callback runs after the arrays are written and
  before that rename; there the checksums are written into the temporary directory, so they are part
  of the commit: a kill -9 at any moment leaves either an uncommitted temporary directory (moved aside
  at the next start) or a step with its checksums. (vdiff before this wrote them after the rename, at
  the next save or on close, and a kill in between left the newest step unverified for a whole
  checkpoint interval.) A step found without checksums.json is therefore not one vdiff committed, and
  `restore_latest` does not restore it.

  Saves always go through orbax's asynchronous checkpointer (the callback exists only there);
  `is_async=False` waits for each save to be committed before `save` returns.
  """

  def __init__(self, directory, *, max_to_keep: int, is_async: bool):
    # Steps handed to orbax whose commit has not run yet, in save order: orbax commits one save at a
    # time, in order, and a save may be handed over (save N + 1) before the previous commit's callback
    # has run (orbax waits for commit N inside save N + 1).
    self._uncommitted: collections.deque[int] = collections.deque()
    self._uncommitted_lock = threading.Lock()
    self._is_async = is_async
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._checksums_before_commit))
    # The handler named up front, so that item_metadata reads a step's tree before any restore.
    super().__init__(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())

  def _checksums_before_commit(self) -> None:
    """orbax's post-finalisation callback (its background thread, before the commit's rename)."""
    with self._uncommitted_lock:
      step = self._uncommitted.popleft() if self._uncommitted else None
    if step is None or not _is_main():
      return
    ckpt_dir = str(self.directory)
    names = [n for n in os.listdir(ckpt_dir) if n.startswith(f"{step}{_ORBAX_TMP}")]
    if not names and os.path.isdir(os.path.join(ckpt_dir, str(step))):
      names = [str(step)]  # a file system where orbax commits in place (a commit-file protocol)
    for name in names:
      write_checksums(os.path.join(ckpt_dir, name))

  def save(self, step, *args, **kwargs) -> bool:
    with self._uncommitted_lock:
      self._uncommitted.append(int(step))
    try:
      saved = super().save(step, *args, **kwargs)
    except BaseException:
      self._forget(int(step))
      raise
    if not saved:
      self._forget(int(step))
    elif not self._is_async:
      super().wait_until_finished()
    return saved


  def _forget(self, step: int) -> None:
    with self._uncommitted_lock:
      if step in self._uncommitted:
        self._uncommitted.remove(step)


def checkpoint_manager(workdir: str, *, max_to_keep: int, async_save: bool = True) -> CheckpointManager:
  """The run's CheckpointManager, keeping the newest `max_to_keep` >= 1 steps (orbax given 0 keeps none,
  the step just saved included; None would keep every step: pass a large number instead)."""
  if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
    raise ValueError(f"training.max_checkpoints_to_keep must be an integer >= 1 (the newest verified "
                     f"checkpoint is always kept), got {max_to_keep!r}.")
  return CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINTS), max_to_keep=max_to_keep,
                           is_async=async_save)


def _move_aside(ckpt_dir: str, name: str) -> str:
  """Move checkpoints/<name> to checkpoints/corrupt/<name> (a numbered suffix if that exists)."""
  dest_dir = os.path.join(ckpt_dir, CORRUPT)
  os.makedirs(dest_dir, exist_ok=True)
  dest = os.path.join(dest_dir, name)
  i = 1
  while os.path.exists(dest):
    dest = os.path.join(dest_dir, f"{name}.{i}")
    i += 1
  os.replace(os.path.join(ckpt_dir, name), dest)
  return dest


def move_aside_temporary(workdir: str) -> list[str]:
  """Move orbax temporary directories (`*.orbax-checkpoint-tmp*`, left by a killed or failed save) to
  checkpoints/corrupt/, with a message; returns where they went. Call before the manager exists."""
  ckpt_dir = os.path.join(workdir, CHECKPOINTS)
  moved = []
  if _is_main() and os.path.isdir(ckpt_dir):
    for name in sorted(os.listdir(ckpt_dir)):
      if _ORBAX_TMP in name:
        dest = _move_aside(ckpt_dir, name)
        _say(f"moved an unfinished checkpoint save aside: {os.path.join(ckpt_dir, name)} -> {dest}",
             err=True)
        moved.append(dest)
  _barrier("vdiff_move_aside_temporary")
  return moved


def _norm_path(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _leaf_specs(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  return {_norm_path(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def structure_mismatch(saved_metadata, abstract_state) -> str | None:
  """None if the checkpoint's tree (paths, shapes, dtypes) equals the state's, else the differences."""
  want, have = _leaf_specs(abstract_state), _leaf_specs(saved_metadata)
  lines = []
  for p in sorted(set(want) - set(have))[:5]:
    lines.append(f"{'.'.join(p)} {want[p][0]} {want[p][1]}: not in the checkpoint")
  for p in sorted(set(have) - set(want))[:5]:
    lines.append(f"{'.'.join(p)} {have[p][0]} {have[p][1]}: in the checkpoint, not in the state")
  for p in sorted(set(want) & set(have)):
    if want[p] != have[p] and len(lines) < 15:
      lines.append(f"{'.'.join(p)}: checkpoint {have[p][0]} {have[p][1]}, state {want[p][0]} "
                   f"{want[p][1]}")
  n_missing, n_extra = len(set(want) - set(have)), len(set(have) - set(want))
  if not lines:
    return None
  return (f"{n_missing} leaves missing, {n_extra} extra, "
          f"{sum(want[p] != have[p] for p in set(want) & set(have))} of different shape or dtype; "
          + "; ".join(lines))


def all_finite(tree) -> bool:
  """Whether every floating-point leaf holds only finite values (one transfer to the host)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


def _check_step(mngr, step: int, abstract_state) -> tuple[Any, str | None]:
  """(state, None) for a good checkpoint, (None, why) for an unreadable one; raises on a mismatch."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  problem = verify_checksums(step_dir)
  if problem == UNVERIFIED:
    return None, (f"unverified: it has no {CHECKSUMS_FILE}, so it was not committed by this vdiff "
                  f"(a kill during a save of an older vdiff, or a copy): it is not restored unverified")
  if problem:
    return None, f"checksum mismatch: {problem}"
  try:
    metadata = mngr.item_metadata(step)
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
  except Exception as e:  # pylint: disable=broad-except
    return None, f"its metadata cannot be read ({type(e).__name__}: {_first_line(e)})"
  mismatch = structure_mismatch(tree, abstract_state)
  if mismatch:
    raise CheckpointMismatchError(
        f"the checkpoint at step {step} ({step_dir}) does not hold this run's state: {mismatch}. "
        f"The model or optimiser config differs from the one that wrote it; nothing was changed. "
        f"Use the config it was trained with, or a fresh --workdir.")
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # pylint: disable=broad-except
    return None, f"it cannot be read ({type(e).__name__}: {_first_line(e)})"
  for name in ("params", "ema_params", "opt_state"):
    if not all_finite(getattr(state, name)):
      return None, f"its {name} hold non-finite values"
  return state, None


def _first_line(e: BaseException) -> str:
  s = str(e)
  return s.splitlines()[0] if s else ""


def restore_latest(mngr, abstract_state, *, move_aside: bool = True) -> tuple[Any, int | None]:
  """Restore the newest checkpoint that verifies (see the module docstring); (None, None) if none does.

  A checkpoint that fails its checksums, cannot be read or holds non-finite values is reported and
  moved to checkpoints/corrupt/<step> (`move_aside`; otherwise only skipped, for readers that do not
  own the directory), and the previous step is tried: a bad save loses one interval, never the run,
  and the step it held is saved again when training gets there. Raises CheckpointMismatchError
  (moving nothing) when a checkpoint's structure differs from the state's. Every process checks; a
  checkpoint bad for any process is bad for all.
  """
  ckpt_dir = str(mngr.directory)
  for step in sorted(mngr.all_steps(), reverse=True):
    state, problem = _check_step(mngr, step, abstract_state)
    if not _any_process(problem is not None):
      return state, step
    problem = problem or "another process could not restore it"
    if not move_aside:
      _say(f"checkpoint at step {step} is unusable ({problem}); skipped, trying an older one",
           err=True)
      continue
    _barrier(f"vdiff_restore_checked_{step}")
    dest = os.path.join(ckpt_dir, CORRUPT, str(step))
    if _is_main():
      dest = _move_aside(ckpt_dir, str(step))
    _say(f"checkpoint at step {step} is unusable ({problem}); moved to {dest}, trying an older one",
         err=True)
    _barrier(f"vdiff_restore_moved_{step}")
    mngr.reload()
  return None, None


def prune(mngr, max_to_keep: int) -> None:
  """Delete the oldest steps beyond max_to_keep: a run killed after a save was finalised but before
  orbax removed the old steps leaves one too many, and a finished run's rerun saves nothing that would
  trigger orbax's own clean-up."""
  steps = sorted(mngr.all_steps())
  if max_to_keep and len(steps) > max_to_keep:
    for step in steps[:len(steps) - max_to_keep]:
      mngr.delete(step)


def save_checkpoint(mngr, state, step: int) -> bool:
  """Save `state` as `step`; False (and nothing written) if the state holds a non-finite value or was
  frozen by nan_policy='stop' (a bad state never replaces a good one, and a frozen one is not saved
  under a later step's name). Raises CheckpointSaveError if orbax declines the save (e.g. the step or
  a later one exists already)."""
  if not all_finite((state.params, state.ema_params)):
    log.error("not saving step %d: the state holds non-finite values.", step)
    return False
  if bool(jax.device_get(state.halted)):
    log.error("not saving step %d: training stopped at a non-finite step (nan_policy='stop').", step)
    return False
  if not mngr.save(step, args=ocp.args.StandardSave(state)):
    raise CheckpointSaveError(
        f"orbax did not save the checkpoint of step {step} in {mngr.directory} (existing steps: "
        f"{list(mngr.all_steps())}); orbax saves only steps after its newest one.")
  return True
