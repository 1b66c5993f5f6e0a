"""Where a trained model's probability-flow ODE likelihood goes wrong, on the quantised Gaussian mixture.

The mixture's exact denoiser is known in closed form. For K-level data k with P(k) = sum_m w_m prod_i
P_mi(k_i) (each component's quantised diagonal Gaussian factorises over dimensions) and z = alpha x + sigma
eps,
    p(m, k_i | z) ~ w_m prod_i P_mi(k_i) N(z_i; alpha x^(k_i), sigma^2)   (a posterior over the K levels
                                                                          per dimension and component),
    E[x | z] = sum_m r_m(z) E_m[x | z],   E[eps | z] = (z - alpha E[x | z]) / sigma,
with r_m(z) the component posterior. This script, for a run trained on `gaussian_mixture`
(experiments/configs/known_density.py), under the run's own (learned) schedule:

  1. the mean squared error of the model's eps against the exact E[eps | z] at several t, beside the
     irreducible error E||eps - E[eps | z]||^2 / D;
  2. the trace of each denoiser's input Jacobian (the divergence the ODE integrates) at the same t;
  3. the forward-dequantisation ODE bound (`ode.ode_nll`, exact divergence) with the exact denoiser, the
     model, and hybrids: the model below a time t_s and the exact denoiser above, and the reverse; each
     as a paired gap to the exact -log2 P(k) / D of the same images.

  python -m experiments.diagnose_ode --workdir DIR --num-examples 8 --split-times 0.05,0.5 --out d.json

Reference: the ODE and the bound are docs/math.md sections 5 and 6; README "Known density".
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import data
from vdiff import likelihood
from vdiff import ode
from vdiff import train
from experiments import bench_likelihood
from experiments import jsonout


def exact_eps_fn(ds, schedule):
  """E[eps | z_t] of the dataset's quantised mixture (ds.metadata means / stds / weights): (z, t) -> eps."""
  means, stds, weights = (np.asarray(ds.metadata[k], np.float64) for k in ("means", "stds", "weights"))
  num_levels = ds.num_levels
  levels = np.arange(num_levels)
  lower, upper = data._bin_edges(levels, num_levels)  # pylint: disable=protected-access
  # log P_m,i(level): [M, D, K], the exact probabilities of each component's quantised Gaussian.
  log_p = data._log_ndtr_diff((lower - means[..., None]) / stds[..., None],  # pylint: disable=protected-access
                              (upper - means[..., None]) / stds[..., None])
  log_p = jnp.asarray(log_p, jnp.float32)
  centres = likelihood.bin_centres(num_levels)
  log_w = jnp.asarray(np.log(weights), jnp.float32)

  def eps_fn(z, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    g = schedule.gamma(t)
    alpha = jnp.sqrt(jax.nn.sigmoid(-g))[:, None, None, None]  # [B, 1, 1, 1]
    var = jax.nn.sigmoid(g)[:, None, None, None]
    zf = z.reshape(z.shape[0], 1, -1, 1)  # [B, 1, D, 1]
    ll = log_p[None] - 0.5 * jnp.square(zf - alpha * centres) / var  # [B, M, D, K]
    post = jax.nn.softmax(ll, axis=-1)
    mean_md = jnp.sum(post * centres, axis=-1)  # [B, M, D]
    r = jax.nn.softmax(log_w + jax.scipy.special.logsumexp(ll, axis=-1).sum(-1), axis=-1)  # [B, M]
    mean = jnp.sum(r[..., None] * mean_md, axis=1)  # [B, D]
    eps = (z.reshape(z.shape[0], -1) - alpha[:, :, 0, 0] * mean) / jnp.sqrt(var[:, :, 0, 0])
    return eps.reshape(z.shape)

  return eps_fn


def _divergence(eps_fn, z, t):
  """tr(d eps / dz) of one example z [H, W, C] at scalar t (D jvps)."""
  f = lambda zf: eps_fn(zf.reshape((1,) + z.shape), t[None]).reshape(-1)
  return jnp.trace(jax.jacfwd(f)(z.reshape(-1)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a run trained on gaussian_mixture")
  parser.add_argument("--num-examples", type=int, default=8, help="first N test images")
  parser.add_argument("--times", default="0,0.02,0.05,0.1,0.2,0.3,0.5,0.7,0.9",
                      help="times of the eps and divergence comparison")
  parser.add_argument("--split-times", default="0.05,0.5",
                      help="t_s of the hybrid denoisers (model below and exact above, and the reverse)")
  parser.add_argument("--rtol", type=float, default=1e-5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  config = bench_likelihood.load_config(args.workdir)
  if config.data.name != "gaussian_mixture":
    raise SystemExit(f"{args.workdir} was trained on {config.data.name!r}; this needs gaussian_mixture.")
  _, model, state, step = train._restore_for_inference(config, args.workdir)  # pylint: disable=protected-access
  params = state.ema_params
  schedule = model.schedule(params)
  ds = train.load_data(config, "test")
  n = args.num_examples
  k = jnp.asarray(ds.images[:n])
  num_dims = int(np.prod(k.shape[1:]))
  truth = -data.gaussian_mixture_log_prob(np.asarray(k), means=ds.metadata["means"],
                                          stds=ds.metadata["stds"], weights=ds.metadata["weights"],
                                          num_levels=ds.num_levels) / (num_dims * math.log(2.0))
  exact = exact_eps_fn(ds, schedule)
  learned = model.eps_fn(params)
  x = likelihood.encode(k, ds.num_levels)
  doc = {"benchmark": "diagnose_ode", "command": "python -m experiments.diagnose_ode " + " ".join(
      sys.argv[1:] if argv is None else argv), "workdir": args.workdir, "step": step, "num_examples": n,
         "params": "ema", "true_bpd_same_images": float(truth.mean()), "denoiser": [], "bounds": []}

  print(f"{'t':>5} {'sigma':>8} {'mse(model, exact)':>18} {'irreducible':>12} {'div model':>10} "
        f"{'div exact':>10} {'mean |diff|':>11}")
  for i, t in enumerate(float(v) for v in args.times.split(",")):
    tt = jnp.full((n,), t, jnp.float32)
    g = schedule.gamma(tt)
    alpha = jnp.sqrt(jax.nn.sigmoid(-g))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(g))[:, None, None, None]
    eps = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(args.seed), i), x.shape)
    z = alpha * x + sigma * eps
    e_exact, e_model = exact(z, tt), learned(z, tt)
    div_m = np.array([float(_divergence(learned, z[j], tt[j])) for j in range(n)])
    div_e = np.array([float(_divergence(exact, z[j], tt[j])) for j in range(n)])
    row = {"t": t, "sigma": float(sigma.ravel()[0]), "mse_model_exact": float(jnp.mean((e_model - e_exact) ** 2)),
           "irreducible": float(jnp.mean((eps - e_exact) ** 2)), "div_model": float(div_m.mean()),
           "div_exact": float(div_e.mean()), "div_abs_diff": float(np.abs(div_m - div_e).mean())}
    doc["denoiser"].append(row)
    print(f"{t:5.2f} {row['sigma']:8.5f} {row['mse_model_exact']:18.5f} {row['irreducible']:12.5f} "
          f"{row['div_model']:10.2f} {row['div_exact']:10.2f} {row['div_abs_diff']:11.2f}", flush=True)

  candidates = [("exact", exact), ("model", learned)]
  def switch(lo, hi, ts):  # lo's eps for t < ts, hi's above
    return lambda z, t: jnp.where((t < ts)[:, None, None, None], lo(z, t), hi(z, t))

  for ts in (float(v) for v in args.split_times.split(",") if v):
    candidates += [(f"model below t={ts:g}, exact above", switch(learned, exact, ts)),
                   (f"exact below t={ts:g}, model above", switch(exact, learned, ts))]
  for name, fn in candidates:
    t0 = time.perf_counter()
    nll = jax.jit(lambda r, kk, fn=fn: ode.ode_nll(r, fn, schedule, kk, num_levels=ds.num_levels,
                                                   dequantization="forward", divergence="exact",
                                                   rtol=args.rtol, atol=args.rtol))
    nats, extras = nll(jax.random.PRNGKey(args.seed + 1), k)
    gap = np.asarray(likelihood.nats_to_bpd(nats, num_dims)) - truth
    row = {"denoiser": name, "paired_gap": float(gap.mean()),
           "paired_gap_stderr": float(gap.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
           "nfe": float(jnp.mean(extras["nfe"])), "seconds": time.perf_counter() - t0}
    doc["bounds"].append(row)
    print(f"ODE forward bound, {name}: paired gap {row['paired_gap']:+.4f} +- "
          f"{row['paired_gap_stderr'] or 0:.4f} bits/dim, nfe {row['nfe']:.0f} ({row['seconds']:.0f} s)",
          flush=True)
  jsonout.emit(doc, args.out or None, indent=1, quiet=True)
  return doc


if __name__ == "__main__":
  main()
