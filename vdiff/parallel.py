"""Data parallelism over every device of every host with jax.jit, a Mesh and NamedSharding; processes
agreeing on a host-side flag (`any_process`: a preemption step, an unreadable checkpoint).

One code path for 1 CPU, 8 GPUs or a TPU pod: parameters are replicated (PartitionSpec()), batches are
split along their example axis over the mesh axis "data". Under jit the loss sees the GLOBAL batch, so
batch statistics such as antithetic time sampling span every device. Multi-host runs call
`initialize_distributed` first; each process then reads only its own slice of the global batch and
`global_batch` assembles the global array with `jax.make_array_from_process_local_data`.
(No pmap: current JAX keeps it in maintenance mode, implemented on jit and shard_map.)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(*, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None,
                           initialization_timeout: int = 300,
                           heartbeat_timeout: int | None = None) -> bool:
  """Start jax.distributed when this is a multi-process run; returns whether it was initialised.

  Explicit arguments win; otherwise VDIFF_COORDINATOR_ADDRESS / VDIFF_NUM_PROCESSES / VDIFF_PROCESS_ID
  are read; otherwise, on clusters and TPU pods that jax detects by itself (SLURM, Open MPI, TPU
  metadata), set VDIFF_DISTRIBUTED=auto to let jax.distributed.initialize() find its peers.

  Faults end the run instead of hanging it: a process that cannot reach its peers fails after
  `initialization_timeout` seconds, and when a process dies the others are stopped by the coordination
  service once its heartbeats have been missing for `heartbeat_timeout` seconds (default 100, or
  VDIFF_HEARTBEAT_TIMEOUT).
  """
  if heartbeat_timeout is None:
    heartbeat_timeout = int(os.environ.get("VDIFF_HEARTBEAT_TIMEOUT", "100"))
  timeouts = dict(initialization_timeout=initialization_timeout,
                  heartbeat_timeout_seconds=heartbeat_timeout)
  coordinator_address = coordinator_address or os.environ.get("VDIFF_COORDINATOR_ADDRESS")
  if num_processes is None and "VDIFF_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["VDIFF_NUM_PROCESSES"])
  if process_id is None and "VDIFF_PROCESS_ID" in os.environ:
    process_id = int(os.environ["VDIFF_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator_address needs num_processes and process_id as well "
                       "(flags or VDIFF_NUM_PROCESSES / VDIFF_PROCESS_ID).")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               **timeouts)
    return True
  if os.environ.get("VDIFF_DISTRIBUTED") == "auto":
    jax.distributed.initialize(**timeouts)
    return True
  return False


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh ("data") over all global devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, leading_axes: int = 0) -> NamedSharding:
  """Split the example axis over the mesh; `leading_axes` unsplit axes come first (steps per dispatch)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(f"the global batch size ({global_batch_size}) must be divisible by the number of "
                     f"devices ({n}) and of processes ({jax.process_count()}).")


def global_batch(local: Any, sharding: NamedSharding, *, batch_axis: int = 0) -> Any:
  """Assemble this process's slice of the batch (a pytree of numpy arrays) into global jax Arrays."""

  def one(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return jax.tree.map(one, local)


def fetch(tree: Any) -> Any:
  """Fully replicated (or fully addressable) arrays -> numpy on this host."""
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


_barrier_count = 0


def barrier(name: str, *, timeout_s: int = 600) -> None:
  """Wait until every process reaches this point (the coordination service's barrier, no device work).

  A device collective (an all-reduce in the train step, an all-gather) creates its CPU communicator on
  first use and waits only 30 s for the other processes; a process still compiling or loading data
  longer than that makes it fail. A barrier before the first such collective lines the processes up.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _barrier_count += 1  # every process calls barriers in the same order, so the names agree
  ocp.multihost.sync_global_processes(f"vdiff_{name}_{_barrier_count}", timeout=timeout_s)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one (a barrier, then an all-gather of one int
  per process).

  How processes agree on a host-side event that reaches them at different moments (SIGTERM at a
  preemption, a checkpoint that one process cannot read): every process calls this at the same point
  of the program, e.g. at the same training step, and all take the same branch. It is a host
  synchronisation, so the train loop calls it every few steps, not every step.
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  barrier("any_process")
  flags = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
  return bool(np.any(np.asarray(flags)))


# --------------------------------------------------------------------------------------------------
# A lost peer.
# --------------------------------------------------------------------------------------------------
EXIT_PEER_LOST = 76  # EX_PROTOCOL: another process of a multi-process run stopped answering
_HEARTBEAT_KEY = "vdiff_heartbeat/{}"


def _lost(message: str) -> None:
  print(f"[vdiff] {message}", file=sys.stderr, flush=True)
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access  # other threads may be stuck in a collective


def start_peer_watchdog(*, lost_after: float | None = None, interval: float = 1.0,
                        newest_checkpoint: Callable[[], Any] | None = None) -> threading.Event | None:
  """In a multi-process run, stop this process within `lost_after` seconds of another one dying.

  Every process writes a heartbeat counter to the coordination service's key-value store every
  `interval` s and reads the others'. When a peer's counter has not moved for `lost_after` seconds
  (default 15, or VDIFF_PEER_TIMEOUT), or the coordinator (process 0) cannot be reached at all, this
  process prints one line naming the lost process and exits with status EXIT_PEER_LOST = 76 at once
  (os._exit: the main thread may be waiting in a collective that will never complete, which gloo
  would otherwise end minutes later with SIGABRT and a C++ stack dump). No checkpoint is written then:
  a checkpoint is a collective of every process, and the state of the step in flight exists on none
  of them in full; the newest checkpoint is the last one saved (named in the line), and rerunning the
  same command on every process resumes from it.

  The coordination service's own heartbeat timeout (`initialize_distributed`, 100 s by default) is
  longer, so this watchdog acts first. Returns the Event that stops the watchdog (None for one process).
  """
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if lost_after is None:
    lost_after = float(os.environ.get("VDIFF_PEER_TIMEOUT", "15"))
  me, n = jax.process_index(), jax.process_count()
  stop = threading.Event()

  def where() -> str:
    step = newest_checkpoint() if newest_checkpoint is not None else None
    return (f"the newest checkpoint is step {step}" if step is not None else "no checkpoint was saved yet")

  def watch():
    beat = 0
    seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
    while not stop.wait(interval):
      beat += 1
      try:
        client.key_value_set(_HEARTBEAT_KEY.format(me), str(beat), allow_overwrite=True)
      except Exception as e:  # pylint: disable=broad-except
        if stop.is_set():
          return
        _lost(f"lost the coordinator (process 0 of {n}): {' '.join(str(e).split())[:200]}. Stopping "
              f"process {me} with exit status {EXIT_PEER_LOST}; {where()} (rerun the same command on "
              f"every process to resume).")
      now = time.monotonic()
      for p, (value, since) in seen.items():
        try:
          new = client.key_value_try_get(_HEARTBEAT_KEY.format(p))
        except Exception:  # pylint: disable=broad-except  # not written yet (NOT_FOUND)
          new = None
        if new != value:
          seen[p] = (new, now)
        # Before a peer's first heartbeat (it may still be loading data or compiling) allow 120 s.
        elif now - since > (lost_after if value is not None else max(lost_after, 120.0)) and \
            not stop.is_set():
          _lost(f"lost process {p} of {n} (no heartbeat for {now - since:.0f} s). Stopping process "
                f"{me} with exit status {EXIT_PEER_LOST}; {where()} (rerun the same command on every "
                f"process to resume).")

  threading.Thread(target=watch, name="vdiff-peer-watchdog", daemon=True).start()
  return stop
