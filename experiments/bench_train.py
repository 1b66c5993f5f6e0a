"""Benchmark the jitted train step: examples/s, seconds/step, compile time, FLOPs and the share of peak.

For each family (vdm, diffenc, cdm) and size, the model is built from the family's config
(experiments/configs/<family>_cifar10.py; DiffEnc with its `trainable` encoder) through vdiff.models,
exactly as the trainer builds it:

  tiny   the config's `tiny` word (CPU-sized networks) on random 8x8x1 data with 17 levels (the shape of
         the quickstart digits);
  paper  the paper config's network unchanged, on random 32x32x3 data with 256 levels;
  known_density  experiments/configs/known_density.py's networks (vdm; diffenc with
         model.encoder.kind=trainable; cdm) on random 4x4x1 data with 256 levels (that config's batch
         is 128: pass --batch 128).

The train step is vdiff.train.make_train_step jitted by vdiff.train.jit_train_step (state replicated and
donated, batch split over every device), with `steps_per_dispatch` optimisation steps per call (lax.scan
over a leading steps axis). Each variant is lowered and compiled once (timed: compile_s), run once to
warm up, then timed `--repeats` times; seconds_per_step is the median dispatch time / steps_per_dispatch.

FLOPs come from XLA's cost analysis of the compiled single-step program (compiled.cost_analysis());
XLA counts a while loop's body once, whatever its trip count, so the scanned program's own figure is
reported separately (xla_flops_per_dispatch) and flops_per_step always comes from the one-step program.
The practical peak is measured: the FLOP/s of a large float32 matmul (2 n^3 / time) on the same devices.

  python -m experiments.bench_train --families vdm,diffenc,cdm --sizes tiny --steps-per-dispatch 1,4 \
      --repeats 5 --batch 16 --out bench_train.json

--remat 0,1 adds rows with the score network's ResNet blocks rematerialised (model.score.remat) and
--compute-dtypes float32,bfloat16 rows with training.compute_dtype=bfloat16 (vdm and diffenc only): each
row carries the compiled program's memory (compiled.memory_analysis(): temp_size_in_bytes is the scratch
besides arguments and outputs, where stored activations live).

Prints one JSON document to stdout (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import models
from vdiff import parallel
from vdiff import train
from experiments import jsonout

# family -> (config module, argument words). DiffEnc is benchmarked with its trainable encoder: the
# non-trainable variant runs the VDM score network alone, which the `vdm` row already measures.
FAMILY_CONFIGS = {"vdm": ("vdm_cifar10", ()), "diffenc": ("diffenc_cifar10", ("trainable",)),
                  "cdm": ("cdm_cifar10", ())}
SIZES = {"tiny": ((8, 8, 1), 17), "paper": ((32, 32, 3), 256),
         "known_density": ((4, 4, 1), 256)}  # data shape, number of levels


def get_config(family: str, size: str, *, remat: bool = False, compute_dtype: str = "float32"):
  if size == "known_density":  # one config file, the family as its argument word
    module = importlib.import_module("experiments.configs.known_density")
    config = module.get_config(family + (",trainable" if family == "diffenc" else ""))
  else:
    name, words = FAMILY_CONFIGS[family]
    module = importlib.import_module(f"experiments.configs.{name}")
    words = words + (("tiny",) if size == "tiny" else ())
    config = module.get_config(",".join(words) or None)
  config.model.score.remat = remat
  config.training.compute_dtype = compute_dtype
  return config


def _memory(compiled) -> dict:
  """XLA's buffer assignment of the compiled program (compiled.memory_analysis()), in bytes; temp is the
  scratch the program needs besides its arguments and outputs (what remat and bfloat16 reduce)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _cost(compiled) -> dict:
  """XLA's cost analysis as one dict (older jax returned a list with one dict per program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def measure_matmul_peak(*, n: int = 2048, repeats: int = 5) -> dict:
  """Practical peak: FLOP/s of an n x n float32 matmul (2 n^3 FLOPs), median of `repeats`."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {"matmul_n": n, "seconds": t, "flops_per_s": 2 * n**3 / t}


def random_batch(rng: np.random.RandomState, n: int, batch: int, shape, num_levels: int) -> dict:
  lead = (batch,) if n == 1 else (n, batch)
  return {"image": rng.randint(0, num_levels, lead + tuple(shape)).astype(np.int32),
          "label": rng.randint(0, 10, lead).astype(np.int32)}


def bench_one(family: str, size: str, *, steps_per_dispatch: int, batch: int, repeats: int,
              mesh, peak: float | None, single_step_flops: dict, remat: bool = False,
              compute_dtype: str = "float32") -> dict:
  config = get_config(family, size, remat=remat, compute_dtype=compute_dtype)
  shape, num_levels = SIZES[size]
  model = models.from_config(config.model, data_shape=shape, num_levels=num_levels, num_labels=10,
                             compute_dtype=compute_dtype)
  tx = train.optimizer_from_config(config)
  t = config.training
  state = train.init_state(model, tx, jax.random.PRNGKey(0), mesh)
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  n = steps_per_dispatch
  step_fn = train.make_train_step(model, ema_decay=t.ema_decay, nan_policy=t.nan_policy)
  jitted = train.jit_train_step(step_fn, mesh, steps_per_dispatch=n)
  bsh = parallel.batch_sharding(mesh, leading_axes=0 if n == 1 else 1)
  local = random_batch(np.random.RandomState(0), n, batch // jax.process_count(), shape, num_levels)
  data = parallel.global_batch(local, bsh, batch_axis=0 if n == 1 else 1)

  t0 = time.perf_counter()
  lowered = jitted.lower(state, data)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  cost = _cost(compiled)
  xla_flops = float(cost.get("flops", float("nan")))
  if n == 1 and not remat:  # remat adds recomputation FLOPs: the model's FLOPs are the plain step's
    single_step_flops[(family, size, batch)] = xla_flops

  state, metrics = compiled(state, data)  # Warm-up (first-run allocations).
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  per_step = statistics.median(times) / n
  flops = single_step_flops.get((family, size, batch))
  row = {
      "family": family, "size": size, "steps_per_dispatch": n, "batch": batch, "remat": remat,
      "compute_dtype": compute_dtype, "memory": _memory(compiled),
      "data_shape": list(shape), "num_levels": num_levels, "num_params": num_params,
      "lower_s": lower_s, "compile_s": compile_s,
      "seconds_per_dispatch": [round(x, 6) for x in times],
      "seconds_per_step": per_step, "examples_per_s": batch / per_step,
      "xla_flops_per_dispatch": xla_flops,
      "flops_per_step": flops,
      "flops_per_s": flops / per_step if flops else None,
      "fraction_of_peak": (flops / per_step / peak) if (flops and peak) else None,
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  }
  return row


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--families", default="vdm,diffenc,cdm")
  p.add_argument("--sizes", default="tiny")
  p.add_argument("--steps-per-dispatch", default="1,4")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=16, help="global batch size")
  p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-FLOP/s matmul; 0 skips")
  p.add_argument("--remat", default="0", help="comma list of 0/1: rows without / with model.score.remat")
  p.add_argument("--compute-dtypes", default="float32", help="comma list of training.compute_dtype values")
  p.add_argument("--out", default="")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  families = [f for f in args.families.split(",") if f]
  sizes = [s for s in args.sizes.split(",") if s]
  spds = sorted({int(s) for s in args.steps_per_dispatch.split(",") if s})
  for f in families:
    if f not in FAMILY_CONFIGS:
      p.error(f"unknown family {f!r}; expected some of {sorted(FAMILY_CONFIGS)}")
  for s in sizes:
    if s not in SIZES:
      p.error(f"unknown size {s!r}; expected some of {sorted(SIZES)}")
  if 1 not in spds:
    spds = [1] + spds  # The one-step program supplies flops_per_step.
  mesh = parallel.make_mesh()
  if args.batch % jax.device_count():
    p.error(f"--batch ({args.batch}) must be divisible by the number of devices ({jax.device_count()})")

  peak = measure_matmul_peak(n=args.matmul_n) if args.matmul_n > 0 else None
  peak_flops = peak["flops_per_s"] if peak else None
  remats = [bool(int(x)) for x in args.remat.split(",") if x]
  dtypes = [d for d in args.compute_dtypes.split(",") if d]
  # Variants other than the plain float32 one (remat, bfloat16) apply to the score network: vdm, diffenc.
  variants = [(r, d) for d in dtypes for r in remats]
  results, flops = [], {}
  for family in families:
    for size in sizes:
      for n, (remat, dtype) in [(n, v) for v in variants for n in spds]:
        if (remat or dtype != "float32") and family == "cdm":
          continue
        row = bench_one(family, size, steps_per_dispatch=n, batch=args.batch, repeats=args.repeats,
                        mesh=mesh, peak=peak_flops, single_step_flops=flops, remat=remat,
                        compute_dtype=dtype)
        base = next((r for r in results if r["family"] == family and r["size"] == size
                     and r["steps_per_dispatch"] == 1 and r["remat"] == remat
                     and r["compute_dtype"] == dtype), None)
        if base is not None and n != 1:
          row["speedup_vs_1_step_per_dispatch"] = base["seconds_per_step"] / row["seconds_per_step"]
        results.append(row)
        if args.out:  # The rows so far, so that a long run stopped part-way keeps what it measured.
          jsonout.emit(_report(argv, peak, results), args.out, indent=2, quiet=True)
        print(f"[bench_train] {family} {size} x{n} remat={int(remat)} {dtype}: "
              f"{row['seconds_per_step']:.4g} s/step, compile {row['compile_s']:.1f} s, temp "
              f"{row['memory'].get('temp_size_in_bytes', float('nan')) / 2**20:.1f} MiB",
              file=sys.stderr, flush=True)
  report = _report(argv, peak, results)
  jsonout.emit(report, args.out, indent=2)
  return report


def _report(argv, peak, results) -> dict:
  return {
      "benchmark": "train_step",
      "command": " ".join(["python -m experiments.bench_train"] + argv),
      "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
                 "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
                 "machine": platform.machine()},
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "peak": peak,
      "results": results,
  }


if __name__ == "__main__":
  main()
