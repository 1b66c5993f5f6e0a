"""Accelerator benchmark: peak matmul FLOP/s, the three families' train steps, the samplers, the evaluator.

Rows, in this order (each in a fresh child process, see below):

  peak      a large matmul in bfloat16 and in float32 at the highest matmul precision (and float32 at the
            default precision, TF32 on recent NVIDIA GPUs): FLOP/s = 2 n^3 / median time;
  train     the train step (vdiff.train.make_train_step, jitted as the trainer jits it) of VDM, DiffEnc
            (trainable encoder) and CDM, through experiments/bench_train.py's `bench_one`, with
            training.compute_dtype float32 and bfloat16 (VDM, DiffEnc; CDM float32 only): seconds per
            step, compile time, FLOPs per step from the compiled program's cost analysis, and
            fraction_of_peak = (FLOPs / step time) / the peak of the row's precision (bfloat16 rows
            against the bfloat16 matmul, float32 rows against the float32 matmul at highest precision;
            fraction_of_f32_default_peak against the float32 matmul at default precision);
  sample    the VDM model's samplers (vdm_ancestral, ddpm, ddim) with its own score network: seconds per
            chain and per denoiser call;
  evaluate  vdiff.evaluate.Evaluator (the evaluator the trainer uses, at its matmul precision) on one
            batch: VDM's ELBO and CDM's estimator.

Sizes: `paper` is the papers' networks on random 32x32x3 data with 256 levels at the papers' batch per
device (128 for all three: experiments/configs/{vdm,diffenc,cdm}_cifar10.py's training.batch_size), the
global batch being that times the number of devices; `tiny` is the configs' `tiny` networks on 8x8x1 data
(17 levels), batch 4 per device, small matmuls and few sampler steps: it runs on a CPU in about a minute
and is what tests/test_bench_device.py runs.

Timeouts: a child process runs the rows one after another and appends each finished row to a JSON-lines
file; the parent kills it when a row takes longer than --row-timeout-s (the row is recorded with
status "timeout" and a new child carries on with the next row) or when --budget-s is spent (the rest are
recorded as "skipped"). The JSON document (--out) is rewritten after every row, so a slow device still
leaves every row measured so far. experiments/bench_device.sh is the shell entry point.

--rows runs only the rows whose names start with the given prefixes (e.g. `--rows peak,train:vdm`); the
document still lists every row, the others with status "skipped".

  python -m experiments.bench_device --size paper --out /tmp/bench_device/bench_device.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The rows: (kind, name, options). Built without importing jax, so the parent process stays light.
TRAIN = [("vdm", "float32"), ("vdm", "bfloat16"), ("diffenc", "float32"), ("diffenc", "bfloat16"),
         ("cdm", "float32")]
SAMPLERS = ("vdm_ancestral", "ddpm", "ddim")
EVALUATE = ("vdm", "cdm")
SIZES = {
    # per-device batch, matmul n, sampler steps, sampler batch per device, evaluation batch per device
    "paper": dict(batch=128, matmul_n=8192, sample_steps=100, sample_batch=128, eval_batch=128,
                  repeats=5),
    "tiny": dict(batch=4, matmul_n=256, sample_steps=4, sample_batch=4, eval_batch=4, repeats=2),
}


def row_names() -> list[str]:
  names = ["peak:bfloat16", "peak:float32_highest", "peak:float32_default"]
  names += [f"train:{f}:{d}" for f, d in TRAIN]
  names += [f"sample:vdm:{s}" for s in SAMPLERS]
  names += [f"evaluate:{f}" for f in EVALUATE]
  return names


# ----------------------------------------------------------------------------------------------------
# The child: measures rows (jax imported here only).
# ----------------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def measure_peak(dtype: str, precision: str, n: int, repeats: int) -> dict:
  """FLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype` at matmul `precision`, median of `repeats`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  prec = None if precision == "default" else precision
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=prec))
  t, times = _median_time(lambda: f(a, b), repeats)
  return {"dtype": dtype, "precision": precision, "matmul_n": n, "seconds": t,
          "seconds_all": times, "flops_per_s": 2 * n**3 / t}


def _model(family: str, size: str):
  from experiments import bench_train  # pylint: disable=g-import-not-at-top
  from vdiff import models  # pylint: disable=g-import-not-at-top
  config = bench_train.get_config(family, size)
  shape, num_levels = bench_train.SIZES[size]
  model = models.from_config(config.model, data_shape=shape, num_levels=num_levels, num_labels=10)
  return config, model, shape, num_levels


def measure_train(family: str, dtype: str, size: str, opts: dict, peaks: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import bench_train  # pylint: disable=g-import-not-at-top
  from vdiff import parallel  # pylint: disable=g-import-not-at-top
  peak = peaks.get("bfloat16" if dtype == "bfloat16" else "float32_highest")
  row = bench_train.bench_one(family, "paper" if size == "paper" else "tiny", steps_per_dispatch=1,
                              batch=opts["batch"] * jax.device_count(), repeats=opts["repeats"],
                              mesh=parallel.make_mesh(), peak=peak, single_step_flops={},
                              compute_dtype=dtype)
  f32_default = peaks.get("float32_default")
  if row.get("flops_per_s") and f32_default and dtype == "float32":
    row["fraction_of_f32_default_peak"] = row["flops_per_s"] / f32_default
  row["peak_flops_per_s"] = peak
  return row


def measure_sample(sampler: str, size: str, opts: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import bench_train  # pylint: disable=g-import-not-at-top
  _, model, _, _ = _model("vdm", "paper" if size == "paper" else "tiny")
  params = model.init(jax.random.PRNGKey(0))
  num, steps = opts["sample_batch"] * jax.device_count(), opts["sample_steps"]
  fn = jax.jit(lambda p, r: model.sample(p, r, num, num_steps=steps, sampler=sampler))
  t0 = time.perf_counter()
  compiled = fn.lower(params, jax.random.PRNGKey(1)).compile()
  compile_s = time.perf_counter() - t0
  t, times = _median_time(lambda: compiled(params, jax.random.PRNGKey(1)), opts["repeats"])
  flops = float(bench_train._cost(compiled).get("flops", float("nan")))  # pylint: disable=protected-access
  return {"sampler": sampler, "family": "vdm", "num_samples": num, "num_steps": steps,
          "compile_s": compile_s, "seconds": t, "seconds_all": times,
          "seconds_per_denoiser_call": t / steps, "samples_per_s": num / t,
          "xla_flops_per_dispatch": flops}


def measure_evaluate(family: str, size: str, opts: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import bench_train  # pylint: disable=g-import-not-at-top
  from vdiff import evaluate  # pylint: disable=g-import-not-at-top
  from vdiff import parallel  # pylint: disable=g-import-not-at-top
  config, model, shape, num_levels = _model(family, "paper" if size == "paper" else "tiny")
  mesh = parallel.make_mesh()
  params = jax.device_put(model.init(jax.random.PRNGKey(0)), parallel.replicated(mesh))
  batch_size = opts["eval_batch"] * jax.device_count()
  local = bench_train.random_batch(np.random.RandomState(0), 1, batch_size, shape, num_levels)
  bsh = parallel.batch_sharding(mesh)
  batch = parallel.global_batch(local, bsh)
  mask = parallel.global_batch(np.ones((batch_size,), bool), bsh)
  evaluator = evaluate.Evaluator(model, estimator=config.eval.estimator, eval_cfg=config.eval, mesh=mesh)
  rng = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  compiled = evaluator.compiled(params, rng, batch, mask)
  compile_s = time.perf_counter() - t0
  t, times = _median_time(lambda: compiled(params, rng, batch, mask), opts["repeats"])
  nats = compiled(params, rng, batch, mask)[0]
  return {"family": family, "estimator": config.eval.estimator, "batch": batch_size,
          "compile_s": compile_s, "seconds": t, "seconds_all": times, "examples_per_s": batch_size / t,
          "mean_nats": float(jnp.mean(nats))}


def select_rows(rows: str) -> list[str]:
  """The rows whose names start with one of the comma-separated prefixes in `rows` ('' = all), in order."""
  prefixes = [r for r in rows.split(",") if r]
  names = [n for n in row_names() if not prefixes or any(n.startswith(q) for q in prefixes)]
  if not names:
    raise ValueError(f"--rows={rows!r} selects no row; rows are {row_names()}.")
  return names


def run_child(size: str, names: list[str], jsonl: str, peaks: dict) -> None:
  """Measure the rows `names` in order, appending one JSON line per finished row to `jsonl`."""
  opts = SIZES[size]
  for name in names:
    parts = name.split(":")
    t0 = time.perf_counter()
    try:
      if parts[0] == "peak":
        dtype, precision = {"bfloat16": ("bfloat16", "default"), "float32_highest": ("float32", "highest"),
                            "float32_default": ("float32", "default")}[parts[1]]
        row = measure_peak(dtype, precision, opts["matmul_n"], opts["repeats"])
        peaks[parts[1]] = row["flops_per_s"]
      elif parts[0] == "train":
        row = measure_train(parts[1], parts[2], size, opts, peaks)
      elif parts[0] == "sample":
        row = measure_sample(parts[2], size, opts)
      else:
        row = measure_evaluate(parts[1], size, opts)
      row["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      row = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
    row.update(name=name, wall_s=time.perf_counter() - t0)
    with open(jsonl, "a") as f:
      f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------
# The parent: per-row timeouts, the JSON document.
# ----------------------------------------------------------------------------------------------------
def _read_rows(jsonl: str) -> list[dict]:
  if not os.path.exists(jsonl):
    return []
  with open(jsonl) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _device_info(rows: list[dict]) -> dict:
  info = next((r for r in rows if r.get("name") == "device"), None)
  return {k: v for k, v in (info or {}).items() if k not in ("name", "status", "wall_s")}


def _document(args, size: str, rows: list[dict], device: dict, wall_s: float) -> dict:
  """Every row (a row not measured, not selected by --rows or past the budget, has status 'skipped')."""
  measured = {r["name"]: r for r in rows if r.get("name") != "device"}
  results = [measured.get(n, {"name": n, "status": "skipped"}) for n in row_names()]
  return {"benchmark": "bench_device", "size": size, "sizes": SIZES[size], "device": device,
          "command": " ".join(["python -m experiments.bench_device"] + args),
          "row_timeout_s": None, "wall_s": wall_s, "results": results}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", choices=sorted(SIZES), default="paper")
  p.add_argument("--out", required=True, help="the JSON document (rewritten after every row)")
  p.add_argument("--row-timeout-s", type=float, default=None,
                 help="longest time for one row (default: 150 paper, 120 tiny)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="total time; rows not started by then are 'skipped' (default: 460 paper, 600 tiny)")
  p.add_argument("--rows", default="", help="comma-separated row-name prefixes to run (default: all), "
                 "e.g. peak,train:vdm:float32")
  p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # first row, in a child
  p.add_argument("--jsonl", default=None, help=argparse.SUPPRESS)
  p.add_argument("--peaks", default="{}", help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  if args.child is not None:
    import jax  # pylint: disable=g-import-not-at-top
    if args.child == 0:
      d = jax.devices()[0]
      with open(args.jsonl, "a") as f:
        f.write(json.dumps({"name": "device", "device_kind": d.device_kind, "platform": d.platform,
                            "num_devices": jax.device_count(), "jax": jax.__version__,
                            "cpu_count": os.cpu_count(), "machine": platform.machine(),
                            "xla_flags": os.environ.get("XLA_FLAGS", "")}) + "\n")
    run_child(args.size, select_rows(args.rows)[args.child:], args.jsonl, json.loads(args.peaks))
    return {}

  row_timeout = args.row_timeout_s or (150.0 if args.size == "paper" else 120.0)
  budget = args.budget_s or (460.0 if args.size == "paper" else 600.0)
  out = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  jsonl = out + ".rows.jsonl"
  if os.path.exists(jsonl):
    os.remove(jsonl)
  try:
    names = select_rows(args.rows)
  except ValueError as e:
    p.error(str(e))
  t_start = time.monotonic()
  index = 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [os.environ.get("PYTHONPATH", "")]).rstrip(
      os.pathsep))

  def write(rows):
    doc = _document(argv, args.size, rows, _device_info(rows), time.monotonic() - t_start)
    doc["row_timeout_s"], doc["budget_s"] = row_timeout, budget
    from experiments import jsonout  # pylint: disable=g-import-not-at-top
    jsonout.emit(doc, out, indent=2, quiet=True)
    return doc

  while index < len(names) and time.monotonic() - t_start < budget:
    rows = _read_rows(jsonl)
    peaks = {r["name"].split(":")[1]: r["flops_per_s"] for r in rows
             if r.get("name", "").startswith("peak:") and r.get("status") == "ok"}
    cmd = [sys.executable, "-m", "experiments.bench_device", "--size", args.size, "--out", out,
           "--rows", args.rows, "--child", str(index), "--jsonl", jsonl, "--peaks", json.dumps(peaks)]
    child = subprocess.Popen(cmd, env=env, cwd=root)
    done = len([r for r in rows if r["name"] != "device"])
    row_start = time.monotonic()
    while True:
      time.sleep(0.2)
      rows = _read_rows(jsonl)
      now_done = len([r for r in rows if r["name"] != "device"])
      if now_done > done:  # a row finished: its clock restarts
        done, row_start = now_done, time.monotonic()
        write(rows)
        print(f"[bench_device] {rows[-1]['name']}: {rows[-1]['status']} ({rows[-1]['wall_s']:.1f} s)",
              file=sys.stderr, flush=True)
      if child.poll() is not None:
        if done < len(names):  # the child died in a row without recording it
          with open(jsonl, "a") as f:
            f.write(json.dumps({"name": names[done], "status": "error",
                                "error": f"child exited with status {child.returncode}"}) + "\n")
          done += 1
        break
      elapsed, spent = time.monotonic() - row_start, time.monotonic() - t_start
      if elapsed > row_timeout or spent > budget:
        child.kill()
        child.wait()
        status = "timeout" if elapsed > row_timeout else "budget"
        with open(jsonl, "a") as f:
          f.write(json.dumps({"name": names[done], "status": status, "wall_s": elapsed}) + "\n")
        print(f"[bench_device] {names[done]}: {status} after {elapsed:.0f} s", file=sys.stderr, flush=True)
        done += 1
        break
    index = done
  return write(_read_rows(jsonl))


if __name__ == "__main__":
  main()
