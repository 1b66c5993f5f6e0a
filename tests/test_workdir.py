"""The work directory's contract (vdiff/workdir.py): lock, config guard on resume, verified checkpoints,
records that survive a resume.

One tiny run (`base_run`: quickstart:tiny, 10 steps, checkpoints at 5 and 10, samples at 5 and 10) is
trained in this process; each test works on its own copy of that directory. The runs here compile the
same programs as tests/test_reliability.py's, so the session's persistent XLA cache serves them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import report
from experiments.configs import quickstart
from _overrides import set_keys
from vdiff import parallel
from vdiff import train
from vdiff import workdir as wd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = quickstart.get_config("tiny")
  c.training.update(num_steps=10, checkpoint_every=5, sample_every=5)
  c.eval.num_examples = 64
  c.sample.update(num_samples=4, num_steps=5)
  return set_keys(c, overrides)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f != wd.CHECKSUMS_FILE]
  return max(files, key=os.path.getsize)


def _abstract(mesh, abstract):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)


def _restore(workdir, config=None, **kw):
  config = config or _config()
  mesh, _, _, _, abstract, _ = train.setup(config, workdir)
  mngr = wd.checkpoint_manager(workdir, max_to_keep=100, async_save=False)
  try:
    return wd.restore_latest(mngr, _abstract(mesh, abstract), **kw)
  finally:
    mngr.close()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A finished 10-step run; counts how often the sampler is traced (sampling at steps 5 and 10)."""
  workdir = str(tmp_path_factory.mktemp("base") / "w")
  traces = []
  build = train.build_model

  def counting_build(config, ds):
    model = build(config, ds)
    sample = model.sample

    def counted(*args, **kwargs):
      traces.append(1)  # a Python side effect: runs only while jax traces the sampler
      return sample(*args, **kwargs)

    model.sample = counted
    return model

  train.build_model = counting_build
  try:
    result = train.train_and_evaluate(_config(), workdir)
  finally:
    train.build_model = build
  assert result["step"] == 10 and _steps(workdir) == [5, 10]
  return workdir, len(traces)


@pytest.fixture
def run_copy(base_run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(base_run[0], workdir)
  return workdir


# --------------------------------------------------------------------------------------------------
# Config guard.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("model.score.ch", 32), ("data.name", "gaussian_mixture"), ("training.batch_size", 32),
    ("seed", 1), ("optim.learning_rate", 1e-3), ("training.ema_decay", 0.5)])
def test_a_guarded_change_on_resume_is_refused_and_changes_nothing(run_copy, key, value):
  """Old code: the run started anew (the checkpoint's shapes did not fit, which it took for corruption),
  overwrote config.json and let max_to_keep delete the old checkpoints; a batch size, data set or seed
  change resumed silently."""
  before = {p: open(os.path.join(run_copy, p), "rb").read() for p in ("config.json", "metrics.jsonl")}
  with pytest.raises(wd.ConfigChangeError, match=key.replace(".", r"\.")) as e:
    train.train_and_evaluate(_config(**{key: value}), run_copy)
  assert "allow_config_change" in str(e.value)
  assert _steps(run_copy) == [5, 10]
  for p, content in before.items():
    assert open(os.path.join(run_copy, p), "rb").read() == content, p
  assert not os.path.exists(os.path.join(run_copy, wd.CONFIG_CHANGES_FILE))
  assert not os.path.exists(os.path.join(run_copy, wd.LOCK_FILE))


def test_the_refusal_lists_old_and_new_values():
  old = {"model": {"score": {"ch": 16}}, "seed": 0, "training": {"num_steps": 10}}
  new = {"model": {"score": {"ch": 32}}, "seed": 0, "training": {"num_steps": 20}, "eval": {"x": 1}}
  assert wd.config_diff(old, new) == {"model.score.ch": (16, 32), "training.num_steps": (10, 20),
                                      "eval.x": (wd._ABSENT, 1)}  # pylint: disable=protected-access
  flat = {"optim.lr_schedule": "constant"}
  assert wd.is_harmless("training.num_steps", flat) and wd.is_harmless("eval.batch_size", flat)
  assert not wd.is_harmless("training.batch_size", flat) and not wd.is_harmless("model.score.ch", flat)
  # With a cosine decay over training.num_steps, the number of steps changes every learning rate.
  assert not wd.is_harmless("training.num_steps", {"optim.lr_schedule": "cosine"})


def test_a_key_added_later_is_no_change_at_its_old_behaviour():
  # model.score.fourier_damping did not exist when older runs wrote config.json: False is what they ran.
  old = {"model": {"score": {"ch": 16}}}
  assert wd.config_diff(old, {"model": {"score": {"ch": 16, "fourier_damping": False}}}) == {}
  assert wd.config_diff(old, {"model": {"score": {"ch": 16, "fourier_damping": True}}}) == {
      "model.score.fourier_damping": (False, True)}
  assert not wd.is_harmless("model.score.fourier_damping", {})


def test_a_structure_mismatch_is_an_error_not_corruption(run_copy):
  """allow_config_change lets the guard pass; the checkpoint's shapes still do not fit the new model:
  an error naming the leaf and both shapes, and nothing is moved or deleted."""
  config = _config(**{"model.score.ch": 32, "training.allow_config_change": True})
  with pytest.raises(wd.CheckpointMismatchError, match=r"score.*\(16,\).*\(32,\)|score.*: not in"):
    train.train_and_evaluate(config, run_copy)
  assert _steps(run_copy) == [5, 10]
  assert not os.path.exists(os.path.join(run_copy, "checkpoints", wd.CORRUPT))
  assert json.load(open(os.path.join(run_copy, "config.json")))["model"]["score"]["ch"] == 16


def test_a_harmless_change_resumes_and_is_recorded(run_copy):
  """num_steps 10 -> 15 and no samples: resumes at 10, trains to 15; config.json keeps the original, the
  change is a row of config_changes.jsonl at step 10, metrics.jsonl marks the resume."""
  result = train.train_and_evaluate(
      _config(**{"training.num_steps": 15, "sample.num_samples": 0}), run_copy)
  assert result["step"] == 15 and _steps(run_copy) == [5, 10, 15]
  assert json.load(open(os.path.join(run_copy, "config.json")))["training"]["num_steps"] == 10
  rows = [json.loads(l) for l in open(os.path.join(run_copy, wd.CONFIG_CHANGES_FILE))]
  assert len(rows) == 1 and rows[0]["step"] == 10 and rows[0]["guarded_keys_changed"] == []
  assert rows[0]["changes"] == {"training.num_steps": [10, 15], "sample.num_samples": [4, 0]}
  metrics = [json.loads(l) for l in open(os.path.join(run_copy, "metrics.jsonl"))]
  assert {"step": 10, "event": "resumed", "from_step": 10} in metrics


# --------------------------------------------------------------------------------------------------
# Verified checkpoints.
# --------------------------------------------------------------------------------------------------
def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flip", "truncate"])
def test_a_damaged_newest_checkpoint_is_detected_moved_aside_and_saved_again(run_copy, damage, capsys):
  """One flipped byte (old code: restored silently, with EMA values ~1e27) or a truncation in the newest
  checkpoint's largest file: its checksum fails, it moves to checkpoints/corrupt/10, the run resumes
  from 5 and saves step 10 again (old code: orbax skipped the save at 10, an existing step)."""
  step_dir = os.path.join(run_copy, "checkpoints", "10")
  damage(_largest_file(step_dir))
  result = train.train_and_evaluate(_config(**{"sample.num_samples": 0}), run_copy)
  out = capsys.readouterr()
  assert "resumed from the checkpoint at step 5" in out.out, out.out[-2000:]
  assert "checkpoint at step 10 is unusable (checksum mismatch" in out.err
  assert result["step"] == 10 and _steps(run_copy) == [5, 10]
  assert os.listdir(os.path.join(run_copy, "checkpoints", wd.CORRUPT)) == ["10"]
  state, step = _restore(run_copy)
  assert step == 10 and int(state.step) == 10  # the new step 10 verifies and reads back
  assert os.path.exists(os.path.join(step_dir, wd.CHECKSUMS_FILE))
  assert wd.verify_checksums(step_dir) is None


def test_nonfinite_ema_or_optimizer_state_is_not_restored(run_copy):
  """A checkpoint whose EMA or Adam moments hold NaN (checksums written over the bad bytes, as a bad save
  would) is moved aside; old code looked at the parameters only."""
  state, _ = _restore(run_copy)
  mngr = train.checkpoint_manager(run_copy, max_to_keep=100, async_save=False)
  bad = state.replace(opt_state=jax.tree.map(
      lambda a: a * np.nan if np.issubdtype(a.dtype, np.floating) else a, state.opt_state))
  # save_checkpoint refuses non-finite parameters/EMA, so write the bad state through orbax directly.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  assert mngr.save(11, args=ocp.args.StandardSave(bad))
  mngr.close()
  assert _steps(run_copy) == [5, 10, 11]
  config = _config()
  mesh, _, _, _, abstract, _ = train.setup(config, run_copy)
  mngr = train.checkpoint_manager(run_copy, max_to_keep=100, async_save=False)
  state, step = train.restore_latest(mngr, _abstract(mesh, abstract))
  mngr.close()
  assert step == 10
  assert os.listdir(os.path.join(run_copy, "checkpoints", wd.CORRUPT)) == ["11"]


def test_a_skipped_save_is_an_error(run_copy):
  """orbax saves only steps after its newest one; old code ignored the returned False."""
  state, _ = _restore(run_copy)
  mngr = train.checkpoint_manager(run_copy, max_to_keep=100, async_save=False)
  try:
    with pytest.raises(wd.CheckpointSaveError, match="step 7"):
      train.save_checkpoint(mngr, state, 7)
  finally:
    mngr.close()


def test_a_leftover_temporary_directory_is_moved_aside(run_copy, capsys):
  """An orbax temporary directory (a save cut short) is moved to checkpoints/corrupt/ with a message."""
  tmp = os.path.join(run_copy, "checkpoints", "15.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(run_copy, "checkpoints", "5"), tmp)
  os.remove(os.path.join(tmp, "commit_success.txt"))
  train.train_and_evaluate(_config(**{"sample.num_samples": 0}), run_copy)
  assert "moved an unfinished checkpoint save aside" in capsys.readouterr().err
  names = os.listdir(os.path.join(run_copy, "checkpoints"))
  assert not [n for n in names if "orbax-checkpoint-tmp" in n]
  assert os.listdir(os.path.join(run_copy, "checkpoints", wd.CORRUPT)) == [os.path.basename(tmp)]


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_refused_and_deletes_nothing(run_copy, keep):
  """Item 1 of the second "nothing lost" round: a resume with training.max_checkpoints_to_keep=0 (a key
  the guard treats as harmless) and more steps exited 0 with checkpoints/ empty: orbax given
  max_to_keep = 0 deleted every step, the new one included (-1 gave an orbax traceback). Now refused
  before anything is written, and the library's manager refuses it too."""
  with pytest.raises(train.ConfigError, match=rf"training.max_checkpoints_to_keep must be >= 1, got {keep}"):
    train.train_and_evaluate(_config(**{"training.max_checkpoints_to_keep": keep,
                                        "training.num_steps": 15}), run_copy)
  assert _steps(run_copy) == [5, 10]
  with pytest.raises(ValueError, match="max_checkpoints_to_keep must be an integer >= 1"):
    wd.checkpoint_manager(run_copy, max_to_keep=keep)


def test_a_committed_step_carries_its_checksums(run_copy, tmp_path):
  """Item 2: an asynchronous save's checksums.json was written after orbax committed the step (at the
  next save or on close), so a kill -9 in between left the newest step unverified. Now they are written
  before the commit's rename: the moment checkpoints/<step> exists, its checksums.json does, and it
  verifies. Watched without waiting on the manager (which would write them in the old code too)."""
  state, _ = _restore(run_copy)
  workdir = str(tmp_path / "async")
  mngr = wd.checkpoint_manager(workdir, max_to_keep=3, async_save=True)
  try:
    # Two saves back to back: orbax waits for the first's commit inside the second save, so the
    # commits' callbacks must not mix up their steps.
    for step in (20, 21):
      state = state.replace(step=state.step + 1)
      assert wd.save_checkpoint(mngr, state, step)
    for step in (20, 21):
      step_dir = os.path.join(workdir, "checkpoints", str(step))
      t0 = time.time()
      while not os.path.isdir(step_dir):
        assert time.time() - t0 < 60, "the asynchronous save did not commit in 60 s"
        time.sleep(0.001)
      assert os.path.exists(os.path.join(step_dir, wd.CHECKSUMS_FILE)), step
      assert wd.verify_checksums(step_dir) is None
  finally:
    mngr.close()


def test_a_step_without_checksums_is_never_restored(run_copy, capsys):
  """Item 2: the newest step without checksums.json (as a kill -9 between an old vdiff's commit and its
  checksums left it), with one byte flipped, was restored with a warning (one optimiser leaf wrong, a
  final figure off in the 6th digit, exit 0). Now it is unverified: moved aside, and the run resumes
  from the newest verified step, saying so, and trains step 10 again."""
  step_dir = os.path.join(run_copy, "checkpoints", "10")
  os.remove(os.path.join(step_dir, wd.CHECKSUMS_FILE))
  _flip_byte(_largest_file(step_dir))
  result = train.train_and_evaluate(_config(**{"sample.num_samples": 0}), run_copy)
  out = capsys.readouterr()
  assert "resumed from the checkpoint at step 5" in out.out, out.out[-2000:]
  assert "checkpoint at step 10 is unusable (unverified: it has no checksums.json" in out.err
  assert result["step"] == 10 and _steps(run_copy) == [5, 10]
  assert os.listdir(os.path.join(run_copy, "checkpoints", wd.CORRUPT)) == ["10"]
  assert wd.verify_checksums(step_dir) is None


def test_every_key_added_since_the_first_workdir_format_resumes_as_the_old_behaviour(run_copy):
  """Item 8: a config.json written before a key existed (here: without every key added since commit
  d24e44b, the first to write config.json; tests/data/config_keys_d24e44b.json) resumes with the key at
  the value that is the old behaviour; training.compute_dtype used to be refused as a change. Every
  added key is either harmless or in ADDED_KEY_DEFAULTS, and a guarded one at another value is still
  refused."""
  first = json.load(open(os.path.join(REPO, "tests", "data", "config_keys_d24e44b.json")))["config"]
  old_keys = set(wd._flatten(first))  # pylint: disable=protected-access
  path = os.path.join(run_copy, wd.CONFIG_FILE)
  current = json.load(open(path))
  flat = wd._flatten(current)  # pylint: disable=protected-access
  added = sorted(k for k in flat if k not in old_keys)
  assert "training.compute_dtype" in added and "model.cdm.beta_steps" in added
  for key in added:
    assert key in wd.ADDED_KEY_DEFAULTS or wd.is_harmless(key, flat), key

  def drop(d, dotted):
    *parents, leaf = dotted.split(".")
    for p in parents:
      d = d[p]
    del d[leaf]

  for key in added:
    drop(current, key)
  with open(path, "w") as f:
    json.dump(current, f)
  config = _config()
  config.model.cdm.beta_steps = config.model.cdm.num_steps  # the old CDM grid: betas over T steps
  assert wd.check_config(run_copy, config) == {} or all(
      wd.is_harmless(k, flat) for k in wd.check_config(run_copy, config))
  with pytest.raises(wd.ConfigChangeError, match="training.compute_dtype"):
    wd.check_config(run_copy, _config(**{"training.compute_dtype": "bfloat16"}))


def test_extra_checkpoints_are_pruned_on_resume(run_copy):
  """A run killed after a save was finalised but before orbax removed the oldest step keeps one too many
  (4 with max_checkpoints_to_keep=3); its rerun, which has nothing left to train, saved nothing and so
  never removed it. Now the rerun prunes to max_checkpoints_to_keep."""
  state, _ = _restore(run_copy)
  mngr = wd.checkpoint_manager(run_copy, max_to_keep=100, async_save=False)
  for s in (11, 12):
    wd.save_checkpoint(mngr, state, s)
  mngr.close()
  assert _steps(run_copy) == [5, 10, 11, 12]
  train.train_and_evaluate(_config(**{"training.num_steps": 12, "sample.num_samples": 0}), run_copy)
  assert _steps(run_copy) == [10, 11, 12]


# --------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------
def test_readers_keep_the_resumed_rows(tmp_path):
  """A run logged 5, 10, 15, was killed after its checkpoint at 10, resumed and logged 15 and 20 again.
  The reader keeps the resumed run's 15; old report.py returned both 15s."""
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 5, "loss": 5.0, "bpd": 5.0}, {"step": 10, "loss": 4.0, "bpd": 4.0},
          {"step": 15, "loss": 99.0, "bpd": 99.0}, {"step": 15, "eval_bpd": 98.0},
          {"step": 10, "event": "resumed", "from_step": 10},
          {"step": 15, "loss": 3.0, "bpd": 3.0}, {"step": 20, "loss": 2.0, "bpd": 2.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 25, "lo')
  kept = wd.read_metrics(str(path))
  assert [r["step"] for r in kept if "loss" in r] == [5, 10, 15, 20]
  assert [r["loss"] for r in kept if "loss" in r] == [5.0, 4.0, 3.0, 2.0]
  history = report.run_history(str(tmp_path))
  assert history["train"] == [(5, 5.0), (10, 4.0), (15, 3.0), (20, 2.0)]
  assert history["evals"] == []


def test_sampling_compiles_once_and_draws_from_its_own_key(base_run):
  """Samples at steps 5 and 10 trace the sampler once (old code: jax.jit per call, 2 traces). The final
  samples are drawn with sample_key(seed, 10), not PRNGKey(seed), the key the initialisation splits."""
  workdir, traces = base_run
  assert traces == 1, f"the sampler was traced {traces} times"
  config = _config()
  mesh, _, model, _, abstract, _ = train.setup(config, workdir)
  mngr = wd.checkpoint_manager(workdir, max_to_keep=100, async_save=False)
  state, step = wd.restore_latest(mngr, _abstract(mesh, abstract))
  mngr.close()
  fn = train.make_sample_fn(model, config.sample)
  saved = np.load(os.path.join(workdir, "samples_00000010.npz"))["samples"]
  ours = np.asarray(fn(state.ema_params, train.sample_key(config.seed, 10), label=None)[0])
  init_key = np.asarray(fn(state.ema_params, jax.random.PRNGKey(config.seed), label=None)[0])
  np.testing.assert_array_equal(saved, ours)
  assert not np.array_equal(saved, init_key)


# --------------------------------------------------------------------------------------------------
# Lock and signals.
# --------------------------------------------------------------------------------------------------
def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, wd.LOCK_FILE), "w") as f:
    json.dump(holder, f)


_HOLDER = """
import sys, time
from vdiff import workdir as wd
with wd.lock(sys.argv[1]):
  if sys.argv[2] == "garble":  # a holder whose run.lock then reads as garbage (killed mid-write, damaged)
    open(sys.argv[1] + "/run.lock", "w").write("{not json")
  print("held", flush=True)
  time.sleep(120)
"""


def _hold(workdir, how="plain"):
  """A live process holding the work directory's lock (through vdiff.workdir.lock)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir, how], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path, capsys):
  """A live holder is refused, named by its run.lock; once it is killed (-9: nothing cleans up) the kernel
  has released its flock, and the next run takes the directory over with a message."""
  workdir = str(tmp_path / "w")
  live = _hold(workdir)
  try:
    with pytest.raises(wd.WorkdirLockedError, match=f"pid {live.pid} on host .*started"):
      with wd.lock(workdir):
        pass
  finally:
    live.kill()
    live.wait()
  assert os.path.exists(os.path.join(workdir, wd.LOCK_FILE))  # left behind by the kill
  with wd.lock(workdir):
    holder = json.load(open(os.path.join(workdir, wd.LOCK_FILE)))
    assert holder["pid"] == os.getpid()
  assert f"taking over a lock file that no process holds" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(workdir, wd.LOCK_FILE))
  # A run.lock naming another host but held by nobody: nothing holds the directory, it is taken.
  _write_lock(workdir, pid=1, host="elsewhere", start_time="2026-01-01T00:00:00")
  with wd.lock(workdir):
    pass


def test_a_live_holder_with_an_unreadable_lock_file_is_never_taken_over(tmp_path):
  """Item 4 of the second "nothing lost" round: a run.lock that cannot be parsed, a few seconds old, was
  taken over although its holder lived (old code: after 5 s by its age, without asking whether the
  holder lived); the second run then moved the first's in-flight save aside. Now the flock decides:
  refused, however old the file."""
  workdir = str(tmp_path / "w")
  live = _hold(workdir, "garble")
  try:
    path = os.path.join(workdir, wd.LOCK_FILE)
    old = time.time() - 3600
    os.utime(path, (old, old))  # an hour old
    with pytest.raises(wd.WorkdirLockedError, match="in use by another process"):
      with wd.lock(workdir):
        pass
    assert live.poll() is None and open(path).read() == "{not json"
  finally:
    live.kill()
    live.wait()


def test_a_second_sigint_stops_at_once():
  with train._Preemption() as p:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    assert p.requested and p.name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode boundary


def _cli(workdir, *extra):
  cmd = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/quickstart.py:tiny",
         f"--workdir={workdir}", "--config.sample.num_samples=0", "--config.eval.num_examples=64",
         *extra]
  return cmd


def test_two_runs_at_once_and_sigint(tmp_path):
  """The same command twice: the second is refused (exit 75) naming the first's pid; SIGINT then stops
  the first with a checkpoint at the step it reached and exit status 130 (old code: no lock; SIGINT
  raised KeyboardInterrupt without a checkpoint)."""
  workdir = str(tmp_path / "w")
  flags = ("--config.training.num_steps=100000", "--config.training.log_every=1",
           "--config.training.checkpoint_every=100000")
  first = subprocess.Popen(_cli(workdir, *flags), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    t0 = time.time()
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() - t0 < 300, "the first run logged nothing in 300 s"
      time.sleep(0.1)
    second = subprocess.run(_cli(workdir, *flags), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 75, second.stderr[-3000:]
    assert f"in use by pid {first.pid} on host {socket.gethostname()!r}, started" in second.stderr
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert first.returncode == 130, err[-3000:]
  rows = [json.loads(l) for l in open(metrics)]
  assert rows[-1]["event"] == "preempted" and rows[-1]["signal"] == "SIGINT"
  assert _steps(workdir) == [rows[-1]["step"]]
  assert not os.path.exists(os.path.join(workdir, wd.LOCK_FILE))


def test_at_most_two_dispatched_steps_run_ahead_of_the_device(tmp_path, monkeypatch):
  """A signal is acted on at the next dispatch, but the checkpoint then waits for every step already
  dispatched. Counted at each dispatch: how many earlier steps have not finished. Old code let the host
  run ahead without bound (a DiffEnc run queued about 30 steps and took 655 s to stop); now at most
  MAX_STEPS_IN_FLIGHT = 2 are in flight. No log, checkpoint or evaluation inside the 40 steps blocks
  the host here."""
  real = train.jit_train_step
  pending = []

  def counting_jit(step_fn, mesh, **kwargs):
    jitted = real(step_fn, mesh, **kwargs)
    outputs = []

    def call(state, batch):
      pending.append(sum(not o.is_ready() for o in outputs))
      state, metrics = jitted(state, batch)
      outputs.append(metrics["loss"])
      return state, metrics

    return call

  monkeypatch.setattr(train, "jit_train_step", counting_jit)
  config = _config(**{"training.num_steps": 40, "training.checkpoint_every": 1000,
                      "training.log_every": 1000, "training.sample_every": 0,
                      "sample.num_samples": 0})
  train.train_and_evaluate(config, str(tmp_path / "w"))
  assert len(pending) == 40
  assert max(pending) <= 2, f"up to {max(pending)} dispatched steps were unfinished"
