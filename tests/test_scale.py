"""Train at scale (docs/design.md, "Scale"): devices, processes, preemption and TFDS, end to end on CPU.

Every run is the real command line (`python -m experiments.main`) on the `:tiny` quickstart config with
the same flags (`_FLAGS`), in a subprocess whose XLA_FLAGS give it N CPU devices
(--xla_force_host_platform_device_count must be set before jax is imported, hence subprocesses). The
runs' checkpoints are restored in this process (one CPU device) and compared leaf by leaf:

  * 1 device and 4 devices, same global batch and seed: the same state after 3 steps (1e-5);
  * 2 processes x 2 devices (jax.distributed over 127.0.0.1, one shared work directory): the parameters
    and the evaluation of the 1-process 4-device run;
  * SIGKILL after a checkpoint, then the same command again: the state of the run that was never killed
    (1e-6; data order and rng are functions of the step);
  * SIGTERM: exit status 0, a checkpoint at the step the signal arrived, an {"event": "preempted"} row;
  * SIGTERM to one of two processes: both stop at the same step, save it once, and the rerun resumes;
  * tfds.testing.mock_data + tfds.data_source feed train_and_evaluate without TensorFlow.

Speed: the four reference processes (1 device, 4 devices, and the two distributed processes) start
together; XLA compiles at optimisation level 0; every run shares a persistent XLA compilation cache, so
the killed, resumed and preempted runs reuse the 1-device run's executables instead of compiling again.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import quickstart
from vdiff import parallel
from vdiff import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6
# Runs on different device counts are compared after 3 steps, as the issue states. Later, one parameter
# legitimately drifts apart: the attention key bias adds q.b to every logit of a query alike, which the
# softmax cancels, so its true gradient is exactly 0 and what it receives is float32 rounding noise that
# differs with the all-reduce order; Adam divides by sqrt(v) and turns that noise into steps of size ~lr
# (measured: 3e-7 apart after 3 steps, 1e-4 after 8, nothing else above 1e-6). The losses of every step,
# which that bias cannot change, are compared for all steps.
COMPARE_STEP = 3
# Global batch 16 and 8 eval images divide by 1, 2 and 4 devices. Every step is checkpointed and kept,
# so any step of the reference run can be compared with any other run's checkpoint at that step.
_FLAGS = ("--config=experiments/configs/quickstart.py:tiny",
          f"--config.training.num_steps={NUM_STEPS}",
          "--config.training.checkpoint_every=1",
          "--config.training.max_checkpoints_to_keep=100",
          "--config.training.log_every=1",
          "--config.eval.num_examples=8",
          "--config.eval.batch_size=8",
          "--config.sample.num_samples=0")
TIMEOUT = 400  # seconds, for any one subprocess


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int, cache_dir: str) -> dict:
  env = dict(os.environ)
  # Optimisation level 0 halves XLA's CPU compile time (measured: 10-13 s instead of 18-30 s for the
  # tiny train step on 2 loaded cores); every run is compiled the same way, and they are only compared
  # with one another.
  env.update(XLA_FLAGS=(f"--xla_force_host_platform_device_count={num_devices} "
                        "--xla_backend_optimization_level=0"),
             JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _start(workdir: str, *extra, num_devices: int = 1, cache_dir: str, log_name: str = "log"):
  """Start one training process; stdout and stderr go to workdir/../<log_name>.{out,err}."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  base = os.path.join(os.path.dirname(workdir), log_name)
  cmd = [sys.executable, "-m", "experiments.main", *_FLAGS, f"--workdir={workdir}", *extra]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(num_devices, cache_dir),
                          stdout=open(base + ".out", "w"), stderr=open(base + ".err", "w"))
  proc.log_base = base
  return proc


def _finish(proc, timeout: float = TIMEOUT) -> tuple[int, str, str]:
  """Wait for a process (killing it after `timeout`); returns (status, stdout, stderr)."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  out = open(proc.log_base + ".out").read()
  err = open(proc.log_base + ".err").read()
  return proc.returncode, out, err


def _assert_ok(result, what):
  rc, out, err = result
  assert rc == 0, f"{what} exited with {rc}:\n{out[-2000:]}\n{err[-4000:]}"


def _steps(workdir: str) -> list[int]:
  """Finalised checkpoint steps: orbax writes into a temporary directory and renames it to the bare
  step number only when the save is complete, so a name made of digits is a whole checkpoint."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _signal_after_first_checkpoint(proc, workdir: str, signum, timeout: float = TIMEOUT) -> None:
  """Send `signum` as soon as a finalised checkpoint exists (polled every 20 ms)."""
  t0 = time.time()
  try:
    while not _steps(workdir):
      assert proc.poll() is None, f"the run ended (status {proc.returncode}) before its first checkpoint"
      assert time.time() - t0 < timeout, "no checkpoint appeared in time"
      time.sleep(0.02)
    proc.send_signal(signum)
  except BaseException:
    proc.kill()
    proc.wait()
    raise


def _run_until_signalled(workdir: str, signum, *, cache_dir: str, log_name: str,
                         timeout: float) -> tuple[int, str, str]:
  """Start a training run, send `signum` once its first checkpoint is final, wait for it to end."""
  proc = _start(workdir, cache_dir=cache_dir, log_name=log_name)
  _signal_after_first_checkpoint(proc, workdir, signum)
  return _finish(proc, timeout=timeout)


_ABSTRACT = None


def _restore(workdir: str, step: int):
  """The TrainState saved at `step`, restored onto this process's single CPU device, as numpy."""
  global _ABSTRACT
  if _ABSTRACT is None:
    config = quickstart.get_config("tiny")
    mesh, _, _, _, abstract, _ = train.setup(config, workdir)
    _ABSTRACT = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)
  mngr = train.checkpoint_manager(workdir, max_to_keep=1000, async_save=False)
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(_ABSTRACT))
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, state)


def _assert_states_close(a, b, *, atol, fields=("params", "ema_params", "opt_state", "rng", "step")):
  for field in fields:
    la, lb = jax.tree.leaves(getattr(a, field)), jax.tree.leaves(getattr(b, field))
    assert len(la) == len(lb) and la, field
    # Adam's moments scale with the gradient (|mu| ~ 60 for the schedule's endpoints here), so they
    # get the same tolerance relative to their size; parameters, EMA and rng get it absolutely.
    rtol = atol if field == "opt_state" else 0.0
    for x, y in zip(la, lb):
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=field)


def _losses(workdir: str) -> list[float]:
  rows = [r for r in _metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  return [r["loss"] for r in rows]


def _eval(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
# Reference runs: 1 device, 4 devices, and 2 processes x 2 devices, started together.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
  root = tmp_path_factory.mktemp("scale")
  dirs = {k: str(root / k / "w") for k in ("one", "four", "two_procs")}
  port = _free_port()
  procs = {
      "one": _start(dirs["one"], num_devices=1, cache_dir=cache_dir),
      "four": _start(dirs["four"], num_devices=4, cache_dir=cache_dir),
  }
  for i in range(2):
    procs[f"proc{i}"] = _start(
        dirs["two_procs"], f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={i}", num_devices=2, cache_dir=cache_dir, log_name=f"log{i}")
  deadline = time.time() + TIMEOUT
  results = {k: _finish(p, timeout=max(deadline - time.time(), 1)) for k, p in procs.items()}
  return dirs, results


def test_one_and_four_devices_give_the_same_parameters(runs):
  """Same global batch and seed on 1 and on 4 devices: the same state after 3 steps (1e-5) and the
  same loss at every step. Under jit the loss sees the global batch either way; only the reduction
  order of the gradient's all-reduce differs (float32 rounding; see COMPARE_STEP)."""
  dirs, results = runs
  _assert_ok(results["one"], "the 1-device run")
  _assert_ok(results["four"], "the 4-device run")
  assert _steps(dirs["one"]) == _steps(dirs["four"]) == list(range(1, NUM_STEPS + 1))
  a, b = _restore(dirs["one"], COMPARE_STEP), _restore(dirs["four"], COMPARE_STEP)
  assert int(a.step) == int(b.step) == COMPARE_STEP
  _assert_states_close(a, b, atol=1e-5)
  np.testing.assert_allclose(_losses(dirs["one"]), _losses(dirs["four"]), rtol=1e-5)
  # The evaluation (same examples, same noise: threefry draws do not depend on the sharding) agrees too.
  e1, e4 = _eval(dirs["one"]), _eval(dirs["four"])
  assert e1["num_examples"] == e4["num_examples"] == 8
  np.testing.assert_allclose(e1["bpd"], e4["bpd"], rtol=1e-5)


def test_two_processes_match_one_process_with_four_devices(runs):
  """jax.distributed over 127.0.0.1 with 2 processes x 2 CPU devices: each process reads its half of
  every global batch; the run equals the 1-process 4-device run and writes ONE checkpoint tree (the
  shared work directory) that restores."""
  dirs, results = runs
  _assert_ok(results["proc0"], "distributed process 0")
  _assert_ok(results["proc1"], "distributed process 1")
  _assert_ok(results["four"], "the 4-device run")
  assert "test bits/dim" in results["proc0"][1]  # Process 0 reports...
  assert "test bits/dim" not in results["proc1"][1]  # ...and only process 0.
  assert _steps(dirs["two_procs"]) == list(range(1, NUM_STEPS + 1))
  ckpt = os.path.join(dirs["two_procs"], "checkpoints")
  leftovers = [n for n in os.listdir(ckpt) if not n.isdigit()]
  assert not leftovers, f"unfinished checkpoint directories: {leftovers}"
  a, b = _restore(dirs["two_procs"], COMPARE_STEP), _restore(dirs["four"], COMPARE_STEP)
  assert int(a.step) == COMPARE_STEP
  _assert_states_close(a, b, atol=1e-5)
  assert int(_restore(dirs["two_procs"], NUM_STEPS).step) == NUM_STEPS
  # Process 0 alone writes the work-directory files: one metrics row per step (log_every=1), one eval.
  np.testing.assert_allclose(_losses(dirs["two_procs"]), _losses(dirs["four"]), rtol=1e-5)
  # The evaluation splits each GLOBAL eval batch over the processes: same examples, same bits/dim.
  e2, e4 = _eval(dirs["two_procs"]), _eval(dirs["four"])
  assert e2["num_examples"] == e4["num_examples"] == 8
  np.testing.assert_allclose(e2["bpd"], e4["bpd"], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Preemption.
# --------------------------------------------------------------------------------------------------
def test_sigkill_then_resume_equals_an_uninterrupted_run(runs, cache_dir, tmp_path):
  """SIGKILL after the first checkpoint (a save is likely in flight: every step is checkpointed), run
  the same command again: the final state equals the never-killed 1-device run's (1e-6)."""
  dirs, results = runs
  _assert_ok(results["one"], "the 1-device run")
  workdir = str(tmp_path / "w")
  rc, _, _ = _run_until_signalled(workdir, signal.SIGKILL, cache_dir=cache_dir, log_name="killed",
                                  timeout=60)
  assert rc == -signal.SIGKILL
  killed_at = _steps(workdir)[-1]
  # The kill really cut the run short (otherwise the resume below would test nothing).
  assert killed_at < NUM_STEPS and not os.path.exists(os.path.join(workdir, "eval.json"))

  result = _finish(_start(workdir, cache_dir=cache_dir, log_name="resumed"))
  _assert_ok(result, "the resumed run")
  assert "resumed from the checkpoint at step" in result[1]
  assert _steps(workdir)[-1] == NUM_STEPS
  _assert_states_close(_restore(workdir, NUM_STEPS), _restore(dirs["one"], NUM_STEPS), atol=1e-6)
  assert np.isfinite(_eval(workdir)["bpd"])


def _kill_anywhere(runs, cache_dir, tmp_path, num_kills: int, seed: int):
  """SIGKILL the same command at `num_kills` random moments (uniform in 0.5-12 s after each start: in
  the import, the compile, a step, an asynchronous save, the evaluation), rerunning it after each kill,
  then let it finish: the final state and evaluation equal the never-killed 1-device run's bit for
  bit."""
  dirs, results = runs
  _assert_ok(results["one"], "the 1-device run")
  workdir = str(tmp_path / "w")
  rng = np.random.RandomState(seed)
  kills = 0
  for attempt in range(num_kills):
    proc = _start(workdir, cache_dir=cache_dir, log_name=f"attempt{attempt}")
    try:
      proc.wait(timeout=rng.uniform(0.5, 12.0))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      kills += 1
      continue
    break  # it finished before the kill came: nothing left to interrupt
  result = _finish(_start(workdir, cache_dir=cache_dir, log_name="final"))
  _assert_ok(result, "the run after the kills")
  assert kills >= 1
  ours, ref = _restore(workdir, NUM_STEPS), _restore(dirs["one"], NUM_STEPS)
  for field in ("params", "ema_params", "opt_state", "rng", "step"):
    for x, y in zip(jax.tree.leaves(getattr(ours, field)), jax.tree.leaves(getattr(ref, field))):
      np.testing.assert_array_equal(x, y, err_msg=field)
  assert _eval(workdir)["bpd"] == _eval(dirs["one"])["bpd"]
  return kills


def test_killed_at_random_moments_ends_bit_for_bit(runs, cache_dir, tmp_path):
  """A few random kills here; VDIFF_SLOW=1 runs 24 (tests/test_scale.py::test_killed_at_24_...)."""
  _kill_anywhere(runs, cache_dir, tmp_path, num_kills=3, seed=0)


@pytest.mark.skipif(os.environ.get("VDIFF_SLOW") != "1", reason="slow: VDIFF_SLOW=1 runs it")
def test_killed_at_24_random_moments_ends_bit_for_bit(runs, cache_dir, tmp_path):
  assert _kill_anywhere(runs, cache_dir, tmp_path, num_kills=24, seed=1) >= 20


def test_sigterm_checkpoints_where_it_arrives_and_exits_zero(runs, cache_dir, tmp_path):
  """SIGTERM (cluster preemption) mid-run: the trainer finishes the current step, saves a checkpoint
  there, appends {"event": "preempted"} to metrics.jsonl and exits with status 0; that checkpoint is the
  uninterrupted run's state at the same step."""
  dirs, results = runs
  _assert_ok(results["one"], "the 1-device run")
  workdir = str(tmp_path / "w")
  rc, out, err = _run_until_signalled(workdir, signal.SIGTERM, cache_dir=cache_dir,
                                     log_name="preempted", timeout=120)
  assert rc == 0, err[-4000:]
  last = _metrics(workdir)[-1]
  assert last["event"] == "preempted"
  step = last["step"]
  assert 1 <= step < NUM_STEPS, f"SIGTERM arrived after training ended (step {step})"
  assert _steps(workdir)[-1] == step
  assert json.loads(out.strip().splitlines()[-1]) == {"step": step, "preempted": True,
                                                      "signal": "SIGTERM"}
  assert not os.path.exists(os.path.join(workdir, "eval.json"))  # Stopped before the final eval.
  _assert_states_close(_restore(workdir, step), _restore(dirs["one"], step), atol=1e-6)


def _wait_for_training(procs, workdir: str, timeout: float = TIMEOUT) -> None:
  """Return once metrics.jsonl holds a row (log_every=1: the first step is done)."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  try:
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
      for p in procs:
        assert p.poll() is None, f"a process ended (status {p.returncode}) before training"
      assert time.time() - t0 < timeout, "no step was logged in time"
      time.sleep(0.02)
  except BaseException:
    for p in procs:
      p.kill()
      p.wait()
    raise


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(cache_dir, tmp_path):
  """Two processes x 2 devices; SIGTERM to process 1 only, once training runs. Old code: process 1 went
  into the checkpoint save (a cross-process barrier) while process 0 went on into the next step's
  all-reduce, and both hung. Now the processes agree on the signal every PREEMPTION_CHECK_STEPS steps
  (an all-gather at the same steps on both): both exit 0 within 60 s, the work directory holds one
  checkpoint, at the agreed step, and the same command (with num_steps = that step + 1) resumes from it."""
  workdir = str(tmp_path / "w")

  def start(num_steps, name):
    port = _free_port()
    return [_start(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}", f"--config.training.num_steps={num_steps}",
                   "--config.training.checkpoint_every=100000", num_devices=2, cache_dir=cache_dir,
                   log_name=f"{name}{i}") for i in range(2)]

  procs = start(100000, "preempt")
  _wait_for_training(procs, workdir)
  t0 = time.time()
  procs[1].send_signal(signal.SIGTERM)
  results = [_finish(p, timeout=60) for p in procs]
  waited = time.time() - t0
  for i, r in enumerate(results):
    _assert_ok(r, f"process {i} after SIGTERM to process 1")
  assert waited < 60, f"the processes took {waited:.0f} s to stop"
  last = _metrics(workdir)[-1]
  assert last["event"] == "preempted", last
  step = last["step"]
  assert step % train.PREEMPTION_CHECK_STEPS == 0  # the agreed step is a check step
  assert _steps(workdir) == [step]
  assert json.loads(results[0][1].strip().splitlines()[-1])["step"] == step

  procs = start(step + 1, "resume")
  results = [_finish(p) for p in procs]
  for i, r in enumerate(results):
    _assert_ok(r, f"resumed process {i}")
  assert f"resumed from the checkpoint at step {step}" in results[0][1]
  assert _steps(workdir) == [step, step + 1]


# --------------------------------------------------------------------------------------------------
# TFDS without TensorFlow.
# --------------------------------------------------------------------------------------------------
_TFDS_SCRIPT = """
import json, sys
import tensorflow_datasets as tfds
from experiments.configs import quickstart
from vdiff import train
config = quickstart.get_config("tiny")
config.data.name = "mnist"
config.training.update(num_steps=2, checkpoint_every=1, log_every=1)
config.eval.update(batch_size=16, num_examples=16)
config.sample.num_samples = 0
with tfds.testing.mock_data(num_examples=64):
  result = train.train_and_evaluate(config, sys.argv[1])
print(json.dumps({"tensorflow_imported": "tensorflow" in sys.modules, "result": result}))
"""


def test_tfds_mock_data_feeds_the_trainer_without_tensorflow(tmp_path, cache_dir):
  """tfds.testing.mock_data + tfds.data_source (array_record random access) -> train_and_evaluate on
  28x28x1, 256-level 'mnist' records; TensorFlow is never imported. (A subprocess only so that it
  compiles with the same fast XLA flags as the other runs.)"""
  pytest.importorskip("tensorflow_datasets")
  workdir = str(tmp_path / "w")
  proc = subprocess.run([sys.executable, "-c", _TFDS_SCRIPT, workdir], cwd=REPO, env=_env(1, cache_dir),
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not out["tensorflow_imported"]
  ev = _eval(workdir)
  assert ev == out["result"]
  assert np.isfinite(ev["bpd"]) and ev["num_levels"] == 256 and ev["num_dims"] == 28 * 28
  assert ev["num_examples"] == 16 and ev["step"] == 2
  assert _steps(workdir) == [1, 2]


# --------------------------------------------------------------------------------------------------
# A peer that dies.
# --------------------------------------------------------------------------------------------------
def test_a_killed_peer_stops_the_other_process(cache_dir, tmp_path):
  """Two processes; SIGKILL one after the first checkpoint. The survivor must not hang in a collective.
  Old code: it aborted after 56.5 s (coordination-service heartbeat) with SIGABRT and a C++ stack dump.
  Now the peer watchdog (parallel.start_peer_watchdog, VDIFF_PEER_TIMEOUT = 15 s by default) stops it
  within 30 s with one line naming the lost process, exit status 76, and the newest checkpoint named."""
  workdir = str(tmp_path / "w")
  port = _free_port()
  procs = [_start(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", "--config.training.num_steps=100000",
                  num_devices=2, cache_dir=cache_dir, log_name=f"peer{i}") for i in range(2)]
  _signal_after_first_checkpoint(procs[1], workdir, signal.SIGKILL)
  t0 = time.time()
  rc, _, err = _finish(procs[0], timeout=120)
  waited = time.time() - t0
  procs[1].wait()
  assert rc == 76, (rc, err[-2000:])
  assert waited < 30, f"the surviving process took {waited:.0f} s to stop"
  lost = [l for l in err.splitlines() if "lost process 1 of 2" in l]
  assert len(lost) == 1 and "exit status 76" in lost[0] and "the newest checkpoint is step" in lost[0], (
      err[-2000:])
  assert "Traceback" not in err and "SIGABRT" not in err
