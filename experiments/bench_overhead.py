"""The cost of vdiff's guarantees: its full train step against a bare step, a sampler step against a bare
denoiser call, on the same network, parameters and batch.

Train step:
  full  vdiff.train.make_train_step jitted by vdiff.train.jit_train_step, as the trainer runs it (the
        non-finite guard, EMA, step counter and per-step key, metrics; state replicated and donated);
  bare  jit of value_and_grad of the same loss (mean of model.loss) followed by the same optax update,
        parameters and optimiser state donated, nothing else.
Sampler step (VDM ancestral, `--sample-steps` steps over a batch of `--sample-batch`):
  full  vdiff.samplers.vdm_ancestral with the family's eps_fn (schedule, parameterisation, the update and
        its noise), per step = whole chain / steps;
  bare  a lax.scan of the same number of plain network calls net.apply(params, z, g_norm) -> z, per
        step = whole chain / steps: the floor any sampler's loop body pays.

Each program is lowered and compiled ahead of time, `--compile-repeats` times in alternation with its
counterpart, each time from a fresh jit (compile_s: their median; compile_s_all: each), run once to warm
up, then timed `--repeats` times in alternation (full, bare, bare, full, ...: each pair's order flips so that
neither side always runs second). Reported: median and minimum seconds of each, the median of the paired
ratios full / bare, and the HLO instruction count of each compiled program (lines of
compiled.as_text() that define a value) with XLA's FLOP count.

  python -m experiments.bench_overhead --sizes tiny --repeats 20 --out docs/results/bench_overhead.json

Sizes: `tiny` (the vdm config's `tiny` word, 8x8x1 data, 17 levels) and `4x64` (4 ResNet blocks x 64
channels with the middle attention, learned scalar schedule, 32x32x3 data, 256 levels).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdiff import models
from vdiff import parallel
from vdiff import samplers
from vdiff import train
from experiments import bench_train
from experiments import jsonout

SIZES = {"tiny": ("tiny", (8, 8, 1), 17), "4x64": ("paper", (32, 32, 3), 256)}

_INSTR = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=")


def hlo_instructions(compiled) -> int:
  """Number of HLO instructions (value definitions) in a compiled program's text."""
  return sum(1 for line in compiled.as_text().splitlines() if _INSTR.match(line))


def get_config(size: str, compute_dtype: str = "float32", remat: bool = False):
  base_size, _, _ = SIZES[size]
  config = bench_train.get_config("vdm", base_size)
  if size == "4x64":
    config.model.score.update(ch=64, num_blocks=4, attention=True)
  if "compute_dtype" in config.training:
    config.training.compute_dtype = compute_dtype
  if "remat" in config.model.score:
    config.model.score.remat = remat
  return config


def _compile(fn, *args):
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  c1 = time.process_time()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  # CPU seconds of this process (all of XLA's compile threads): the compile's work, which other
  # processes on a shared machine stretch less than its wall time.
  c2 = time.process_time()
  cost = bench_train._cost(compiled)  # pylint: disable=protected-access
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
                    "hlo_instructions": hlo_instructions(compiled),
                    "flops": float(cost.get("flops", float("nan")))}


def _compile_alternating(make_a, make_b, repeats: int):
  """Compile two programs `repeats` times each in alternation (a, b, b, a, ...), each from a fresh jit
  (so nothing is served from a cache): returns (compiled_a, info_a, compiled_b, info_b) of the last
  compile of each, with compile_s / compile_cpu_s the medians over the repeats of the wall and CPU
  seconds, and compile_s_all / compile_cpu_s_all every one.

  make_a() / make_b() return (jitted function, args). One compile of each is a noisy figure on a shared
  machine, and whichever compiles first in a pair shares its time with whatever else runs; alternation
  and the median make the ratio of the two a paired measurement.
  """
  wall = {"a": [], "b": []}
  cpu = {"a": [], "b": []}
  last = {}
  for r in range(max(1, repeats)):
    for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
      fn, args = (make_a if key == "a" else make_b)()
      last[key] = _compile(fn, *args)
      wall[key].append(last[key][1]["compile_s"])
      cpu[key].append(last[key][1]["compile_cpu_s"])
  infos = []
  for key in ("a", "b"):
    info = dict(last[key][1], compile_s=statistics.median(wall[key]),
                compile_s_all=[round(x, 3) for x in wall[key]],
                compile_cpu_s=statistics.median(cpu[key]), compile_cpu_s_all=[round(x, 3) for x in cpu[key]])
    infos.append(info)
  return last["a"][0], infos[0], last["b"][0], infos[1]


def _interleave(run_a, run_b, repeats: int):
  """Times of run_a and run_b, `repeats` pairs, each pair's order flipped from the previous one."""
  ta, tb = [], []
  for r in range(repeats):
    order = ((run_a, ta), (run_b, tb)) if r % 2 == 0 else ((run_b, tb), (run_a, ta))
    for fn, out in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - t0)
  return ta, tb


def _summary(full_t, bare_t, full_info, bare_info, per: int = 1) -> dict:
  ratios = [a / b for a, b in zip(full_t, bare_t)]
  return {
      "full": dict(full_info, median_s=statistics.median(full_t) / per, min_s=min(full_t) / per,
                   times_s=[round(x, 6) for x in full_t]),
      "bare": dict(bare_info, median_s=statistics.median(bare_t) / per, min_s=min(bare_t) / per,
                   times_s=[round(x, 6) for x in bare_t]),
      "ratio_median_of_pairs": statistics.median(ratios),
      "ratio_of_medians": statistics.median(full_t) / statistics.median(bare_t),
      "ratio_of_minima": min(full_t) / min(bare_t),
  }


def train_step_programs(size: str, *, batch: int, mesh, compile_repeats: int = 1) -> dict:
  """The full and the bare train step of `size`, compiled ahead of time on the same state and batch.

  Returns a dict: model, state (the full step's, donated by it), data, rng; params and opt_state (the
  bare step's own copies, donated by it); full and bare (the compiled programs) and full_info /
  bare_info (lower_s, compile_s, hlo_instructions, flops; compile_s the median of `compile_repeats`
  alternated compiles, `_compile_alternating`).
  """
  config = get_config(size)
  _, shape, num_levels = SIZES[size]
  model = models.from_config(config.model, data_shape=shape, num_levels=num_levels, num_labels=0)
  tx = train.optimizer_from_config(config)
  t = config.training
  state = train.init_state(model, tx, jax.random.PRNGKey(0), mesh)
  local = bench_train.random_batch(np.random.RandomState(0), 1, batch, shape, num_levels)
  data = parallel.global_batch(local, parallel.batch_sharding(mesh), batch_axis=0)
  # The bare step's own copies of the parameters and optimiser state (the full step donates its state).
  params = jax.tree.map(jnp.copy, state.params)
  opt_state = jax.tree.map(jnp.copy, state.opt_state)
  rng = jax.random.PRNGKey(1)

  def make_full():
    step = train.make_train_step(model, ema_decay=t.ema_decay, nan_policy=t.nan_policy)
    return train.jit_train_step(step, mesh, steps_per_dispatch=1), (state, data)

  def make_bare():
    def bare_step(params, opt_state, rng, batch):
      def loss_fn(p):
        return jnp.mean(model.loss(p, rng, batch, train=True)[0])
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(bare_step, donate_argnums=(0, 1)), (params, opt_state, rng, data)

  full_c, full_info, bare_c, bare_info = _compile_alternating(make_full, make_bare, compile_repeats)
  return {"model": model, "state": state, "data": data, "rng": rng, "params": params,
          "opt_state": opt_state, "full": full_c, "bare": bare_c, "full_info": full_info,
          "bare_info": bare_info}


def bench_train_step(size: str, *, batch: int, repeats: int, mesh, compile_repeats: int = 1) -> dict:
  _, shape, _ = SIZES[size]
  p = train_step_programs(size, batch=batch, mesh=mesh, compile_repeats=compile_repeats)
  full_c, bare_c, data, rng, state = p["full"], p["bare"], p["data"], p["rng"], p["state"]
  box = {"state": state, "params": p["params"], "opt": p["opt_state"]}

  def run_full():
    box["state"], metrics = full_c(box["state"], data)
    return box["state"], metrics

  def run_bare():
    box["params"], box["opt"], loss = bare_c(box["params"], box["opt"], rng, data)
    return box["params"], box["opt"], loss

  run_full(), run_bare()  # Warm-up.
  jax.block_until_ready((box["state"], box["params"]))
  ft, bt = _interleave(run_full, run_bare, repeats)
  num_params = int(sum(x.size for x in jax.tree.leaves(box["state"].params)))
  row = {"what": "train_step", "size": size, "batch": batch, "data_shape": list(shape),
         "num_params": num_params, "num_param_leaves": len(jax.tree.leaves(box["state"].params))}
  row.update(_summary(ft, bt, p["full_info"], p["bare_info"]))
  return row


def bench_sampler_step(size: str, *, batch: int, steps: int, repeats: int, compile_repeats: int = 1) -> dict:
  config = get_config(size)
  _, shape, num_levels = SIZES[size]
  model = models.from_config(config.model, data_shape=shape, num_levels=num_levels, num_labels=0)
  params = model.init(jax.random.PRNGKey(0))
  z_init = jax.random.normal(jax.random.PRNGKey(2), (batch,) + shape, jnp.float32)
  rng = jax.random.PRNGKey(3)

  def full_chain(params, rng, z_init):
    return samplers.vdm_ancestral(rng, model.eps_fn(params), model.schedule(params), z_init.shape,
                                  num_steps=steps, z_init=z_init)

  def bare_chain(params, z_init):
    g = jnp.linspace(1.0, 0.0, steps, endpoint=False, dtype=jnp.float32)

    def body(z, g_norm):
      return model.net.apply({"params": params["score"]}, z, jnp.full(z.shape[:1], g_norm)), None

    return jax.lax.scan(body, z_init, g)[0]

  # Fresh jits of fresh functions each time, so that a repeated compile is not served from a cache.
  full_c, full_info, bare_c, bare_info = _compile_alternating(
      lambda: (jax.jit(lambda *a: full_chain(*a)), (params, rng, z_init)),
      lambda: (jax.jit(lambda *a: bare_chain(*a)), (params, z_init)), compile_repeats)
  run_full = lambda: full_c(params, rng, z_init)
  run_bare = lambda: bare_c(params, z_init)
  jax.block_until_ready((run_full(), run_bare()))
  ft, bt = _interleave(run_full, run_bare, repeats)
  row = {"what": "sampler_step", "sampler": "vdm_ancestral", "size": size, "batch": batch,
         "steps_per_chain": steps, "note": "median_s / min_s are per step (chain time / steps); "
         "hlo_instructions and flops are of the whole chain program"}
  row.update(_summary(ft, bt, full_info, bare_info, per=steps))
  return row


def table(results) -> str:
  lines = ["| what | size | full median s | bare median s | full min s | bare min s | paired median "
           "ratio | ratio of minima | HLO instr full / bare | compile s full / bare |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    f, b = r["full"], r["bare"]
    lines.append(f"| {r['what']} | {r['size']} | {f['median_s']:.4g} | {b['median_s']:.4g} | "
                 f"{f['min_s']:.4g} | {b['min_s']:.4g} | {r['ratio_median_of_pairs']:.3f} | "
                 f"{r['ratio_of_minima']:.3f} | {f['hlo_instructions']} / {b['hlo_instructions']} | "
                 f"{f['compile_s']:.2f} / {b['compile_s']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="tiny")
  p.add_argument("--what", default="train,sampler")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--batch", type=int, default=0, help="train batch; 0 = 16 (tiny) or 32 (4x64)")
  p.add_argument("--sample-batch", type=int, default=16)
  p.add_argument("--sample-steps", type=int, default=16)
  p.add_argument("--compile-repeats", type=int, default=3,
                 help="compiles of each program, alternated; compile_s is their median")
  p.add_argument("--out", default="")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  for s in sizes:
    if s not in SIZES:
      p.error(f"unknown size {s!r}; expected some of {sorted(SIZES)}")
  what = [w for w in args.what.split(",") if w]
  mesh = parallel.make_mesh()
  results = []
  for size in sizes:
    batch = args.batch or (16 if size == "tiny" else 32)
    if "train" in what:
      results.append(bench_train_step(size, batch=batch, repeats=args.repeats, mesh=mesh,
                                      compile_repeats=args.compile_repeats))
    if "sampler" in what:
      results.append(bench_sampler_step(size, batch=args.sample_batch, steps=args.sample_steps,
                                        repeats=args.repeats, compile_repeats=args.compile_repeats))
    print(table(results), file=sys.stderr, flush=True)
  report = {"benchmark": "overhead", "command": " ".join(["python -m experiments.bench_overhead"] + argv),
            "device": {"platform": jax.devices()[0].platform, "num_devices": jax.device_count()},
            "jax": jax.__version__, "results": results, "table": table(results)}
  jsonout.emit(report, args.out, indent=2, quiet=True)
  print(table(results))
  return report


if __name__ == "__main__":
  main()
