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
from typing import Any

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
