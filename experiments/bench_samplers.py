"""Sample quality against the number of network evaluations (NFE) for every sampler, on data of known density.

Default: the continuous Gaussian mixture of `vdiff.data`'s `gaussian_mixture` (its default 4 components in
D = 16, drawn from RandomState(mixture_seed)), sampled with its EXACT denoiser E[eps | z_t] =
-sigma_t grad log p_t(z) (`vdiff.sample_quality.mixture_eps_fn`, docs/math.md sec. 7), so no training is
needed and every error is the sampler's. For each sampler and NFE budget it reports
`vdiff.sample_quality.mixture_quality`: the cross-entropy -E log2 p(x) / D of the samples under the true
density beside the mixture's differential entropy (Monte Carlo), their gap with a standard error, and the
component frequencies (true posterior) against the weights.

With --workdir DIR (a run trained on gaussian_mixture) the run's EMA model and learned schedule replace the
exact denoiser; samples are decoded to the run's K levels and scored by the exact discrete probabilities
against the dataset's discrete entropy (Dataset.true_bpd).

  python -m experiments.bench_samplers --out bench_samplers.json [--plot nfe.png] [--nfe 10,20,50,100]

Samplers (their NFE parameter): ddpm / ddim (steps), dpm_solver++ 2M (steps), dpm_solver 3S
(singlestep order 3, steps), heun (2N - 1), pc_em (Euler-Maruyama, N), pc_rd_langevin (reverse diffusion +
one Langevin corrector step, 2N), langevin (annealed, 5 steps per level, 5L + 1).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import numpy as np

from vdiff import data
from vdiff import dpm_solver
from vdiff import sample_quality
from vdiff import samplers
from vdiff import schedules
from vdiff import score_samplers
from experiments import jsonout


def _nfe_map(name: str, nfe: int) -> tuple[dict, int] | None:
  """Options giving at most `nfe` evaluations, and the NFE they give (None if the budget is too small)."""
  if name in ("ddpm", "ddim", "dpm_solver++_2m", "pc_em"):
    return dict(num_steps=nfe), nfe
  if name == "dpm_solver_3s":
    return (dict(num_steps=nfe), nfe) if nfe >= 3 else None
  if name == "heun":
    n = (nfe + 1) // 2
    return (dict(num_steps=n), 2 * n - 1) if n >= 2 else None
  if name == "pc_rd_langevin":
    n = nfe // 2
    return (dict(num_steps=n), 2 * n) if n >= 1 else None
  if name == "langevin":
    levels = (nfe - 1) // 5
    return (dict(num_noise_levels=levels), 5 * levels + 1) if levels >= 2 else None
  raise KeyError(name)


SAMPLERS = {
    "ddpm": lambda rng, eps_fn, sched, shape, **kw: (
        samplers.ddpm(rng, eps_fn, sched, shape, clip_x0=False, **kw), kw["num_steps"]),
    "ddim": lambda rng, eps_fn, sched, shape, **kw: (
        samplers.ddim(rng, eps_fn, sched, shape, grid_steps=max(1000, kw["num_steps"]), **kw),
        kw["num_steps"]),
    "dpm_solver++_2m": lambda rng, eps_fn, sched, shape, **kw: dpm_solver.dpm_solver(
        rng, eps_fn, sched, shape, algorithm="dpm_solver++", order=2, method="multistep",
        skip_type="logSNR", **kw)[:2],
    "dpm_solver_3s": lambda rng, eps_fn, sched, shape, **kw: dpm_solver.dpm_solver(
        rng, eps_fn, sched, shape, algorithm="dpm_solver", order=3, method="singlestep",
        skip_type="logSNR", **kw)[:2],
    "heun": lambda rng, eps_fn, sched, shape, **kw: dpm_solver.heun(rng, eps_fn, sched, shape, **kw)[:2],
    "pc_em": lambda rng, eps_fn, sched, shape, **kw: score_samplers.pc_sampler(
        rng, eps_fn, sched, shape, predictor="euler_maruyama", corrector="none", **kw)[:2],
    "pc_rd_langevin": lambda rng, eps_fn, sched, shape, **kw: score_samplers.pc_sampler(
        rng, eps_fn, sched, shape, predictor="reverse_diffusion", corrector="langevin", **kw)[:2],
    "langevin": lambda rng, eps_fn, sched, shape, **kw: score_samplers.annealed_langevin(
        rng, eps_fn, sched, shape, steps_per_level=5, step_size=2e-5, **kw)[:2],
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nfe", default="10,20,50,100,200", help="comma-separated NFE budgets")
  parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated sampler names")
  parser.add_argument("--num-samples", type=int, default=2000)
  parser.add_argument("--schedule", choices=("linear", "cosine"), default="cosine")
  parser.add_argument("--mixture-seed", type=int, default=0)
  parser.add_argument("--entropy-samples", type=int, default=100_000)
  parser.add_argument("--workdir", default=None, help="a run trained on gaussian_mixture (else the exact denoiser)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  parser.add_argument("--plot", default=None, help="write a PNG of the gap against NFE (needs matplotlib)")
  args = parser.parse_args(argv)
  budgets = [int(v) for v in args.nfe.split(",") if v]
  names = [v for v in args.samplers.split(",") if v]
  for n in names:
    dpm_solver.check_choice(n, list(SAMPLERS), "--samplers")

  if args.workdir:
    from vdiff import train  # pylint: disable=import-outside-toplevel
    from experiments import bench_likelihood  # pylint: disable=import-outside-toplevel
    config = bench_likelihood.load_config(args.workdir)
    if config.data.name != "gaussian_mixture":
      raise SystemExit(f"{args.workdir} was trained on {config.data.name!r}; this needs gaussian_mixture.")
    _, model, state, step = train._restore_for_inference(config, args.workdir)  # pylint: disable=protected-access
    sched = model.schedule(state.ema_params)
    eps_fn = model.eps_fn(state.ema_params)
    ds = train.load_data(config, "test")
    meta, num_levels, shape = ds.metadata, ds.num_levels, ds.images.shape[1:]
    entropy = (ds.true_bpd, ds.true_bpd_stderr)
    source = {"workdir": args.workdir, "step": step, "params": "ema"}
  else:
    ds = data.load("gaussian_mixture", split="test", seed=0, mixture_seed=args.mixture_seed, num_examples=1,
                   entropy_samples=2)
    meta, num_levels, shape = ds.metadata, None, ds.images.shape[1:]
    sched = schedules.FIXED[args.schedule]()
    eps_fn = sample_quality.mixture_eps_fn(sched, means=meta["means"], stds=meta["stds"],
                                           weights=meta["weights"])
    entropy = sample_quality.mixture_entropy_bpd(means=meta["means"], stds=meta["stds"],
                                                 weights=meta["weights"], num_samples=args.entropy_samples,
                                                 seed=args.seed)
    source = {"denoiser": "exact (continuous mixture)", "schedule": args.schedule}

  batch_shape = (args.num_samples,) + tuple(shape)
  rows = []
  t_all = time.time()
  for name in names:
    for budget in budgets:
      opts = _nfe_map(name, budget)
      if opts is None:
        continue
      kw, _ = opts
      if num_levels is not None:
        kw = dict(kw, num_levels=num_levels)
      fn = jax.jit(functools.partial(SAMPLERS[name], eps_fn=eps_fn, sched=sched, shape=batch_shape, **kw))
      t0 = time.time()
      x, nfe = fn(jax.random.PRNGKey(args.seed))
      x = np.asarray(x)
      seconds = time.time() - t0
      r = sample_quality.mixture_quality(x, means=meta["means"], stds=meta["stds"], weights=meta["weights"],
                                         num_levels=num_levels, entropy=entropy)
      rows.append({"sampler": name, "nfe": int(nfe), **{k: r[k] for k in (
          "cross_entropy_bpd", "cross_entropy_bpd_stderr", "entropy_bpd", "gap_bpd", "gap_bpd_stderr", "tv",
          "max_abs_z", "num_nonfinite")}, "seconds_incl_compile": round(seconds, 3)})
      print(f"{name:16s} nfe={int(nfe):4d} gap={r['gap_bpd']:+.4f}+-{r['gap_bpd_stderr']:.4f} "
            f"tv={r['tv']:.3f}", file=sys.stderr)
  doc = {"benchmark": "bench_samplers", "command": "python -m experiments.bench_samplers " + " ".join(
      sys.argv[1:] if argv is None else argv), **source, "num_samples": args.num_samples,
         "num_dims": int(np.prod(shape)), "entropy_bpd": float(entropy[0]),
         "entropy_bpd_stderr": float(entropy[1]), "device": str(jax.devices()[0].platform),
         "total_seconds": round(time.time() - t_all, 1), "rows": rows}
  jsonout.emit(doc, args.out)
  if args.plot:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
      pts = [(r["nfe"], r["gap_bpd"]) for r in rows if r["sampler"] == name]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("NFE")
    ax.set_ylabel("cross-entropy - entropy (bits/dim)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
  return doc


if __name__ == "__main__":
  main()
