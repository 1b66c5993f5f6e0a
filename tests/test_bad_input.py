"""Bad input is refused in one line, before any compute, and leaves no work directory behind.

The command lines of the second "nothing lost" attack (each printed a traceback or was accepted without a
word on the old code) run in this process through `experiments.main.run`, which returns the exit status
`python -m experiments.main` would exit with. Then a property-based test draws values across every
declared key's edges (vdiff.config_schema.SCHEMA) and asserts: accepted by the table and by the whole
setup (data, model, estimator, sampler), or refused with one line naming the key and exit status 2.
"""

import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments import main as cli
from experiments.configs import quickstart
from vdiff import config_schema
from vdiff import data as data_lib
from vdiff import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=experiments/configs/quickstart.py:tiny"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def _run(capsys, *args):
  capsys.readouterr()
  rc = cli.run(["experiments.main", *args])
  out = capsys.readouterr()
  lines = [l for l in out.err.splitlines() if l.strip()]
  return rc, lines, out.out


def _npz_files(tmp_path):
  """A good .npz and its damaged, truncated and negatively labelled variants."""
  rng = np.random.RandomState(0)
  good = str(tmp_path / "good.npz")
  data_lib.make_npz(good, rng.randint(0, 256, (64, 4, 4, 1)).astype(np.uint8),
                    rng.randint(0, 256, (16, 4, 4, 1)).astype(np.uint8))
  raw = open(good, "rb").read()
  files = {"truncated": raw[:len(raw) // 2]}
  damaged = bytearray(raw)
  damaged[len(raw) // 3] ^= 0xFF  # inside the compressed train array: its CRC-32 fails
  files["crc"] = bytes(damaged)
  paths = {}
  for name, content in files.items():
    paths[name] = str(tmp_path / f"{name}.npz")
    with open(paths[name], "wb") as f:
      f.write(content)
  paths["negative_labels"] = str(tmp_path / "neg.npz")
  np.savez(paths["negative_labels"], train=np.zeros((64, 4, 4, 1), np.uint8),
           test=np.zeros((16, 4, 4, 1), np.uint8), train_labels=-np.ones(64, np.int64),
           test_labels=-np.ones(16, np.int64))
  paths["missing"] = str(tmp_path / "nowhere.npz")
  return paths


CASES = [
    # (name, extra arguments, what the one line must say). WORKDIR is replaced by a fresh path.
    ("config path misspelt", ["--config=experiments/configs/quickstrat.py", "--workdir=WORKDIR"],
     r"no config file 'experiments/configs/quickstrat.py'.*nearest is 'experiments/configs/quickstart.py'"),
    ("config word misspelt", ["--config=experiments/configs/quickstart.py:tinyy", "--workdir=WORKDIR"],
     r"unknown config argument word\(s\) \['tinyy'\].*did you mean 'tiny'"),
    ("unknown key", [QUICK, "--workdir=WORKDIR", "--config.training.batch_sise=3"],
     r"unknown config key 'training.batch_sise'.*'training.batch_size'"),
    ("seed -1", [QUICK, "--workdir=WORKDIR", "--config.seed=-1"], r"seed must be in \[0, "),
    ("keep -1", [QUICK, "--workdir=WORKDIR", "--config.training.max_checkpoints_to_keep=-1"],
     r"training.max_checkpoints_to_keep must be >= 1, got -1"),
    ("keep 0", [QUICK, "--workdir=WORKDIR", "--config.training.max_checkpoints_to_keep=0"],
     r"training.max_checkpoints_to_keep must be >= 1, got 0"),
    ("b1 1.5", [QUICK, "--workdir=WORKDIR", "--config.optim.b1=1.5"], r"optim.b1 must be in \[0, 1\)"),
    ("eps -1", [QUICK, "--workdir=WORKDIR", "--config.optim.eps=-1"], r"optim.eps must be in \[0, 1\]"),
    ("dropout 1.5", [QUICK, "--workdir=WORKDIR", "--config.model.score.dropout=1.5"],
     r"model.score.dropout must be in \[0, 1\)"),
    ("eta -1", [QUICK, "--workdir=WORKDIR", "--config.sample.eta=-1"], r"sample.eta must be in \[0, 1\]"),
    ("log_every -5", [QUICK, "--workdir=WORKDIR", "--config.training.log_every=-5"],
     r"training.log_every must be >= 1, got -5"),
    ("checkpoint_every -1", [QUICK, "--workdir=WORKDIR", "--config.training.checkpoint_every=-1"],
     r"training.checkpoint_every must be >= 0, got -1"),
    ("warmup -5", [QUICK, "--workdir=WORKDIR", "--config.optim.warmup_steps=-5"],
     r"optim.warmup_steps must be >= 0, got -5"),
    ("nan lr", [QUICK, "--workdir=WORKDIR", "--config.optim.learning_rate=nan"],
     r"optim.learning_rate must be finite"),
    ("sampler misspelt", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=ddpn"],
     r"sample.sampler must be one of .*did you mean 'ddpm'"),
    # The fast and score-based samplers' settings (issue "score-based and fast samplers", bad input).
    ("snr 0", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=pc", "--config.sample.snr=0"],
     r"sample.snr must be > 0, got 0"),
    ("solver misspelt", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=dpm_solver+"],
     r"sample.sampler must be one of .*did you mean 'dpm_solver\+\+'"),
    ("predictor misspelt", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=pc",
                            "--config.sample.predictor=reverse_difusion"],
     r"sample.predictor must be one of .*did you mean 'reverse_diffusion'"),
    ("corrector misspelt", [QUICK, "--workdir=WORKDIR", "--config.sample.corrector=langvin"],
     r"sample.corrector must be one of .*did you mean 'langevin'"),
    ("steps below the order", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=dpm_solver",
                               "--config.sample.order=3", "--config.sample.method=singlestep",
                               "--config.sample.num_steps=2"],
     r"sample.num_steps=2 is below sample.order=3 of the singlestep solver"),
    ("order 4", [QUICK, "--workdir=WORKDIR", "--config.sample.order=4"], r"sample.order must be in \[1, 3\]"),
    ("heun 1 step", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=heun", "--config.sample.num_steps=1"],
     r"sample.num_steps must be >= 2 for heun"),
    ("thresholding without x0", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=dpm_solver",
                                 "--config.sample.thresholding=True"],
     r"sample.thresholding=True applies to \('dpm_solver\+\+',\)"),
    ("langevin step 0", [QUICK, "--workdir=WORKDIR", "--config.sample.sampler=langevin",
                         "--config.sample.step_size=0"], r"sample.step_size must be > 0"),
    ("eval on an empty workdir", [QUICK, "--workdir=WORKDIR", "--mode=eval"],
     r"--mode=eval needs a trained work directory; .* holds no checkpoint"),
    ("sample on an empty workdir", [QUICK, "--workdir=WORKDIR", "--mode=sample"],
     r"--mode=sample needs a trained work directory"),
]


@pytest.mark.parametrize("name,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_command_lines_are_refused_in_one_line(tmp_path, capsys, name, args, message):
  del name
  workdir = str(tmp_path / "w")
  rc, lines, _ = _run(capsys, *[a.replace("WORKDIR", workdir) for a in args])
  assert rc == 2, (rc, lines)
  assert len(lines) == 1, lines
  assert re.search(message, lines[0]), lines[0]
  assert "Traceback" not in lines[0]
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("what", ["file", "under_file"])
def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys, what):
  path = tmp_path / "f"
  path.write_text("keep me")
  workdir = str(path) if what == "file" else str(path / "sub")
  rc, lines, _ = _run(capsys, QUICK, f"--workdir={workdir}")
  assert rc == 2 and len(lines) == 1, lines
  assert ("is a file, not a directory" if what == "file" else "which is a file") in lines[0]
  assert path.read_text() == "keep me"


@pytest.mark.parametrize("which,message", [
    ("truncated", r"cannot be read as an \.npz \(BadZipFile"),
    ("crc", r"cannot be read as an \.npz \(BadZipFile: Bad CRC-32"),
    ("missing", r"does not exist"),
    ("negative_labels", r"has negative labels"),
])
def test_bad_npz_files_are_refused_in_one_line(tmp_path, capsys, which, message):
  path = _npz_files(tmp_path)[which]
  workdir = str(tmp_path / "w")
  rc, lines, _ = _run(capsys, QUICK, f"--workdir={workdir}", "--config.data.name=npz",
                      f"--config.data.path={path}")
  assert rc == 2 and len(lines) == 1, lines
  assert lines[0].startswith("[vdiff] invalid config:") and re.search(message, lines[0]), lines[0]
  assert not os.path.exists(workdir)


def test_every_key_of_every_config_is_declared():
  """The table covers every key of every config file and variant (one table for the validator and
  --help), and its names of choices are the ones the modules act on."""
  import importlib  # pylint: disable=g-import-not-at-top
  names = [n[:-3] for n in os.listdir(os.path.join(REPO, "experiments", "configs"))
           if n.endswith(".py") and n not in ("__init__.py", "base.py")]
  for name in names:
    module = importlib.import_module(f"experiments.configs.{name}")
    variants = getattr(module, "VARIANTS", None) or getattr(module, "FAMILIES", None) or [None]
    for v in variants:
      config = module.get_config(v) if v else module.get_config()
      assert config_schema.errors(config) == [], (name, v, config_schema.errors(config))
  # (evaluate's names are config_schema's own; these modules keep tuples of their own.)
  from vdiff import cdm, ode  # pylint: disable=g-import-not-at-top
  assert config_schema.DIVERGENCES == ode.DIVERGENCES
  assert config_schema.DEQUANTIZATIONS == cdm.DEQUANTIZATIONS
  assert config_schema.CDM_GRIDS == cdm.GRIDS


# --------------------------------------------------------------------------------------------------
# Every key across its edges.
# --------------------------------------------------------------------------------------------------
def _edges(spec: config_schema.Key) -> list:
  """Values at and across a declared range's edges, of the key's own type (the command line refuses
  other types while parsing)."""
  k = spec.kind
  if k == "bool":
    return [True, False]
  if k == "bool_or_none":
    return [None, True, False]
  if k == "choice":
    return list(spec.choices) + [spec.choices[0] + "x", ""]
  if k == "str":
    return ["", " ", "x"]
  if k == "ints":
    lo = int(spec.lo)
    return [(), (lo,), (lo - 1,), (lo, int(spec.hi) + 1)]
  out = [0, 1, -1]
  for bound in (spec.lo, spec.hi):
    if bound is not None:
      out += [bound, bound - 1, bound + 1] if k == "int" else [
          bound, bound - 1e-6 * max(1.0, abs(bound)), bound + 1e-6 * max(1.0, abs(bound))]
  if k == "float":
    out += [math.nan, math.inf, -math.inf, 0.5]
  return [int(v) if k == "int" else float(v) for v in out]


# Architecture sizes whose largest declared values take minutes to trace on this CPU: their accepted
# values above this are checked by the table only (their refusals are checked as for every key).
_SIZE_KEYS = {"model.score.ch", "model.score.num_blocks", "model.encoder.ch", "model.cdm.ch",
              "model.score.num_groups", "model.encoder.num_groups", "model.cdm.num_groups",
              "model.encoder.num_res_blocks", "model.cdm.num_res_blocks", "model.cdm.num_steps",
              "model.num_steps", "data.patch_size", "data.patch_stride"}
_KEYS = sorted(k for k in config_schema.SCHEMA if not k.startswith("data.patch"))


@st.composite
def _key_and_value(draw):
  key = draw(st.sampled_from(_KEYS))
  return key, draw(st.sampled_from(_edges(config_schema.SCHEMA[key])))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_key_and_value())
def test_every_key_across_its_edges_runs_or_is_refused_in_one_line(tmp_path, key_value):
  """Drawn across every declared key's edges (hypothesis, derandomised): the value passes the table and
  the run's whole setup (data, model, estimator, sampler: everything before step 0) or is refused with a
  ConfigError, one line naming the key, and no work directory is written. A traceback (any other
  exception) fails the test."""
  key, value = key_value
  config = quickstart.get_config("tiny")
  parent, leaf = key.rsplit(".", 1) if "." in key else ("", key)
  node = config
  for part in filter(None, parent.split(".")):
    node = node[part]
  try:
    node[leaf] = value
  except (TypeError, ValueError):
    return  # the config's own type check: the command line refuses it while parsing (one line)
  workdir = str(tmp_path / f"w_{abs(hash((key, repr(value))))}")
  spec = config_schema.SCHEMA[key]
  try:
    train.validate_config(config)
    if key not in _SIZE_KEYS or not isinstance(value, int) or value <= 64:
      mesh, train_ds, model, _, _, _ = train.setup(config, workdir)
      del mesh, train_ds, model
  except train.ConfigError as e:
    message = str(e)
    assert "\n" not in message.strip(), message
    assert message.startswith("invalid config:") or key in message or key.split(".")[-1] in message, (
        key, value, message)
    assert spec.problem(value) is None or key in message, (key, value, message)
  else:
    assert spec.problem(value) is None, (key, value, "accepted although outside the table")
  assert not os.path.exists(workdir)


def test_help_prints_every_key_with_its_declared_range():
  """--help ends with the table the validator reads: every SCHEMA key with its range in words and
  base.py's default (old code: --help listed the configs only, no key or range)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-m", "experiments.main", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  text = out.stdout + out.stderr
  defaults = config_schema.flatten(base.get_base_config())
  for key, spec in config_schema.SCHEMA.items():
    line = f"  {key}: {spec.range_text()}"
    if key in defaults:
      line += f" (default {defaults[key]!r})"
    assert line in text, line
