"""Benchmark the samplers: seconds per sample and samples per second at each step count.

Each (sampler, steps) pair is jitted once, run once to compile (timed separately), then timed `--repeats`
times; the median is reported. The default denoiser is a small flax conv net with random weights on
8x8x1 images so that the network cost is real; `--denoiser analytic` uses the exact Gaussian denoiser
(E[eps | z] = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2), docs/math.md sec. 7) to time the loop itself.
The probability-flow sampler is adaptive: it is timed once per configuration and reports its mean
number of denoiser evaluations per example (nfe) instead of a step count.

  python -m experiments.bench_sample --steps 10,50 --batch 16 --repeats 3 --out bench.json

Prints one JSON document to stdout (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdiff import samplers
from vdiff import schedules
from experiments import jsonout


class TinyScoreNet(nn.Module):
  """A small conv net eps_hat(z, t): three 3x3 convs with a learned embedding of t added to the features."""

  features: int = 32

  @nn.compact
  def __call__(self, z, t):
    emb = nn.Dense(self.features)(jnp.stack([t, jnp.sin(6.28 * t), jnp.cos(6.28 * t)], axis=-1))
    h = nn.Conv(self.features, (3, 3))(z)
    h = nn.silu(h + emb[:, None, None, :])
    h = nn.silu(nn.Conv(self.features, (3, 3))(h))
    return nn.Conv(z.shape[-1], (3, 3))(h)


def make_denoiser(kind: str, shape: tuple[int, ...], schedule: schedules.Schedule):
  if kind == "analytic":
    mu, s = 0.1, 0.5

    def eps_fn(z, t):
      g = schedule.gamma(t).reshape((-1,) + (1,) * (z.ndim - 1))
      a, sg = schedules.alpha_from_gamma(g), schedules.sigma_from_gamma(g)
      return sg * (z - a * mu) / (a**2 * s**2 + sg**2)

    return eps_fn
  if len(shape) != 4:
    raise ValueError(f"--denoiser net needs an image shape H,W,C, got data shape {shape[1:]}.")
  net = TinyScoreNet()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:1]))
  return functools.partial(net.apply, params)


def time_fn(fn, rng, repeats: int) -> tuple[float, list[float], object]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(rng))
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(jax.random.fold_in(rng, r + 1)))
    times.append(time.perf_counter() - t0)
  return compile_s, times, out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", default="10,50,250,1000", help="comma-separated step counts")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--image-shape", default="8,8,1", help="H,W,C of one example (ignored with --dim)")
  parser.add_argument("--dim", type=int, default=None, help="flat data of D dims (analytic denoiser only)")
  parser.add_argument("--denoiser", choices=("net", "analytic"), default="net")
  parser.add_argument("--samplers", default="ddpm,ddim,vdm_ancestral,probability_flow")
  parser.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)

  steps = [int(s) for s in args.steps.split(",") if s]
  event = (args.dim,) if args.dim else tuple(int(s) for s in args.image_shape.split(","))
  shape = (args.batch,) + event
  schedule = schedules.FIXED[args.schedule]()
  eps_fn = make_denoiser(args.denoiser, shape, schedule)
  names = [s for s in args.samplers.split(",") if s]

  results = []
  rng = jax.random.PRNGKey(0)
  for name in names:
    if name == "probability_flow":
      fn = jax.jit(functools.partial(samplers.probability_flow_sample, eps_fn=eps_fn, schedule=schedule,
                                     shape=shape, return_nfe=True))
      compile_s, times, (_, nfe) = time_fn(fn, rng, args.repeats)
      med = statistics.median(times)
      results.append(dict(sampler=name, steps=None, nfe_mean=float(jnp.mean(nfe)), compile_s=compile_s,
                          median_s=med, sec_per_sample=med / args.batch, samples_per_sec=args.batch / med))
      continue
    sampler = getattr(samplers, name)
    for n in steps:
      fn = jax.jit(functools.partial(sampler, eps_fn=eps_fn, schedule=schedule, shape=shape, num_steps=n))
      compile_s, times, _ = time_fn(fn, rng, args.repeats)
      med = statistics.median(times)
      results.append(dict(sampler=name, steps=n, compile_s=compile_s, median_s=med,
                          sec_per_sample=med / args.batch, samples_per_sec=args.batch / med,
                          ms_per_step=1e3 * med / n))

  report = dict(
      config=dict(batch=args.batch, event_shape=list(event), repeats=args.repeats, denoiser=args.denoiser,
                  schedule=args.schedule, steps=steps),
      device=str(jax.devices()[0]), backend=jax.default_backend(), jax=jax.__version__,
      python=platform.python_version(), results=results)
  jsonout.emit(report, args.out, indent=1)


if __name__ == "__main__":
  main()
