"""Faults lose nothing: injected NaNs under both policies, a truncated checkpoint, non-finite states."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import quickstart
from vdiff import parallel
from vdiff import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_NONFINITE = 3


def _cli(workdir, *extra):
  cmd = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/quickstart.py:tiny",
         f"--workdir={workdir}", "--config.sample.num_samples=0", "--config.eval.num_examples=64",
         *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _restore(workdir):
  config = quickstart.get_config("tiny")
  mesh, _, _, _, abstract, _ = train.setup(config, workdir)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)), abstract)
  mngr = train.checkpoint_manager(workdir, max_to_keep=5, async_save=False)
  state, step = train.restore_latest(mngr, abstract)
  mngr.close()
  return state, step


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_nan_at_step_5_skip_policy(tmp_path):
  workdir = str(tmp_path / "skip")
  proc = _cli(workdir, "--config.training.inject_nan_at_step=5", "--config.training.nan_policy=skip")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  counts = [r["nonfinite_count"] for r in rows if "nonfinite_count" in r]
  assert counts[0] == 0 and counts[-1] == 1  # exactly the injected step was skipped
  assert "non-finite step(s) skipped" in proc.stderr
  state, step = _restore(workdir)
  assert step == 20 and _finite(state.params) and _finite(state.ema_params)
  assert int(state.first_nonfinite_step) == 5 and int(state.nonfinite_count) == 1


def test_nan_at_step_5_stop_policy(tmp_path):
  workdir = str(tmp_path / "stop")
  proc = _cli(workdir, "--config.training.inject_nan_at_step=5", "--config.training.nan_policy=stop",
              "--config.training.checkpoint_every=5")
  assert proc.returncode == EXIT_NONFINITE, (proc.returncode, proc.stderr[-2000:])
  assert "non-finite loss or gradient at step 5" in proc.stderr
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["event"] == "stopped_nonfinite" and rows[-1]["first_nonfinite_step"] == 5
  assert not os.path.exists(os.path.join(workdir, "eval.json"))
  state, step = _restore(workdir)
  assert step == 5  # the last checkpoint precedes the bad step
  assert _finite(state.params) and int(state.nonfinite_count) == 0


def test_truncated_latest_checkpoint_falls_back(tmp_path):
  workdir = str(tmp_path / "trunc")
  proc = _cli(workdir)  # checkpoints at steps 10 and 20
  assert proc.returncode == 0, proc.stderr[-2000:]
  step_dir = os.path.join(workdir, "checkpoints", "20")
  # Truncate every data file of the newest checkpoint to half its size.
  cut = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      if size > 64 and not f.endswith("_METADATA"):
        with open(p, "r+b") as fh:
          fh.truncate(size // 2)
        cut += 1
  assert cut > 0
  state, step = _restore(workdir)
  assert step == 10 and _finite(state.params)
  # The unreadable step is kept for inspection, out of the way of the step that replaces it.
  ckpt = os.path.join(workdir, "checkpoints")
  assert os.listdir(os.path.join(ckpt, "corrupt")) == ["20"]
  # Resuming continues from step 10, ends at 20 again and saves step 20 again (old code: orbax skipped
  # the save of an existing step, and the truncated checkpoint stayed the newest).
  proc = _cli(workdir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed from the checkpoint at step 10" in proc.stdout
  state, step = _restore(workdir)
  assert step == 20 and int(state.step) == 20 and _finite(state.ema_params)


def test_nonfinite_state_is_never_saved(tmp_path):
  config = quickstart.get_config("tiny")
  mesh, _, model, init, _, rng = train.setup(config, str(tmp_path))
  state = init(rng)
  bad = state.replace(params=jax.tree.map(lambda a: a * np.nan, state.params))
  mngr = train.checkpoint_manager(str(tmp_path), max_to_keep=3, async_save=False)
  assert train.save_checkpoint(mngr, state, 1)
  assert not train.save_checkpoint(mngr, bad, 2)
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1]
  mngr.close()
