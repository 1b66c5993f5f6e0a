"""Tests of experiments/bench_device.sh and its entry point experiments/bench_device.py.

What runs here (about a minute on a 2-core CPU): the shell script at SIZE=tiny restricted by ROWS to one
row of each kind (the three peak matmuls, VDM's float32 train step, the DDIM sampler, VDM's evaluator),
and the entry point with a one-second row timeout. The full tiny form, every row (`SIZE=tiny bash
experiments/bench_device.sh OUTDIR`), takes about 4 minutes on this CPU and is not run here; the rows
left out share their code with the ones run (the same functions with another family, dtype or sampler).
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import bench_device  # noqa: E402

ROWS = ["peak:bfloat16", "peak:float32_highest", "peak:float32_default", "train:vdm:float32",
        "sample:vdm:ddim", "evaluate:vdm"]


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, **extra)
  env.pop("XLA_FLAGS", None)  # one device, as on a single-accelerator machine
  return env


def _finite_numbers(row):
  """Every number in the row (nested lists and dicts included)."""
  out = []
  for v in row.values():
    if isinstance(v, bool) or v is None or isinstance(v, str):
      continue
    if isinstance(v, (int, float)):
      out.append(float(v))
    elif isinstance(v, list):
      out += [float(x) for x in v if isinstance(x, (int, float))]
    elif isinstance(v, dict):
      out += _finite_numbers(v)
  return out


def test_tiny_script_writes_every_row_with_finite_numbers_and_the_device(tmp_path):
  proc = subprocess.run(["bash", os.path.join(ROOT, "experiments", "bench_device.sh"), str(tmp_path)],
                        env=_env(SIZE="tiny", ROWS=",".join(ROWS)), cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "bench_device.json").read_text())
  assert doc["device"]["device_kind"] and doc["device"]["platform"] == "cpu"
  assert doc["size"] == "tiny"
  # The document lists every row the script knows, measured or not.
  assert [r["name"] for r in doc["results"]] == bench_device.row_names()
  rows = {r["name"]: r for r in doc["results"]}
  for name in ROWS:
    row = rows[name]
    assert row["status"] == "ok", row
    numbers = _finite_numbers(row)
    assert numbers and all(math.isfinite(x) for x in numbers), (name, row)
  for name in ("peak:bfloat16", "peak:float32_highest", "peak:float32_default"):
    assert rows[name]["flops_per_s"] > 0
  train = rows["train:vdm:float32"]
  # fraction_of_peak is the step's FLOP/s over the float32 (highest precision) matmul's FLOP/s.
  assert train["fraction_of_peak"] > 0
  assert math.isclose(train["fraction_of_peak"] * rows["peak:float32_highest"]["flops_per_s"],
                      train["flops_per_step"] / train["seconds_per_step"], rel_tol=1e-9)
  assert train["loss_finite"]
  assert rows["sample:vdm:ddim"]["seconds"] > 0 and math.isfinite(rows["evaluate:vdm"]["mean_nats"])
  assert all(rows[n]["status"] == "skipped" for n in bench_device.row_names() if n not in ROWS)


def test_a_row_past_its_timeout_is_recorded_and_the_json_still_written(tmp_path):
  out = tmp_path / "b.json"
  bench_device.main(["--size", "tiny", "--out", str(out), "--rows", "train:cdm", "--row-timeout-s", "1"])
  doc = json.loads(out.read_text())
  rows = {r["name"]: r for r in doc["results"]}
  assert rows["train:cdm:float32"]["status"] == "timeout"
  assert rows["train:cdm:float32"]["wall_s"] >= 1.0
