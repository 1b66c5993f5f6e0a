"""Benchmark the likelihood estimators of trained runs on the same test images, beside lossless compressors.

For each trained run (`--workdirs name=DIR,...`; the model is rebuilt from DIR/config.json, or from
`--configs name=path.py[:words]`, and its newest checkpoint's EMA parameters are restored) and the same
first `--num-examples` test images:

  elbo   VDM / DiffEnc negative ELBO with k Monte-Carlo time samples per image, for each k of
         `--elbo-samples` (k network evaluations per image; the k estimates are averaged per image).
         A discrete bound on -log2 P(k) / D: no dequantisation offset (docs/math.md sec. 2).
  cdm    CDM one-step likelihood (CDM Thm 3.2), m = `--dequantization-samples` classifier evaluations
         per image, for each dequantisation of `--cdm-dequantization`: uniform (class 0, a density on
         uniformly dequantised data, + log2(K/2) bits/dim, docs/math.md sec. 4) and forward (class
         t = cdm.forward_class, 1 unless its noise is below half a bin, with the K-level decoder at
         abar_t: a discrete bound, no offset).
  ode    probability-flow ODE (docs/math.md sec. 6), any family (CDM through its gradient denoiser),
         adaptive Dormand-Prince, rtol = atol = `--ode-tol`, Hutchinson divergence, on the first
         `--ode-examples` images (slow on a CPU), for each dequantisation of `--ode-dequantization`:
         uniform (+ log2(K/2) bits/dim) or forward (the ODE from `--ode-t0` to 1 with the K-level
         decoder at t0: a discrete bound comparable with the ELBO, no offset).
  With m > 1 the dequantised estimators are importance-weighted (log-mean-exp over the m draws).

Every entry reports bits/dim, its standard error over images, network evaluations per image (nfe) and
seconds per image measured after compilation: each estimator is compiled ahead of time
(`jax.jit(...).lower(...).compile()`, timed separately as compile_s), then called once on the first batch
(warm-up, discarded) and then timed over all batches with the results fetched to the host. Where the data
has a known entropy (`true_bpd`, data of known density), the gap to it is reported with the combined
standard error; where the exact per-image -log2 P(k) is available (gaussian_mixture with its default
parameters, uniform) also the PAIRED gap mean_i(bpd_i - true_i), whose standard error excludes the
image-to-image spread that every estimator shares (much smaller). The compressor baselines
(vdiff/baselines.py) are computed on the same images, and each estimator's gap to each per-image
code is paired over its images (`paired_gap_to_codec`: mean_i(bpd_i - code_i) and its standard error).
On the photos benchmark every estimator and every per-image codec is also broken down by test photo
(`bpd_by_group`, the mean over that photo's images).

  python -m experiments.bench_likelihood --workdirs vdm=/tmp/kd/vdm,cdm=/tmp/kd/cdm \
      --num-examples 500 --elbo-samples 1,10,100 --ode on --ode-examples 16 --out bench.json
  python -m experiments.bench_likelihood --workdirs vdm=/tmp/quickstart --num-examples 32 \
      --elbo-samples 100 --ode-dequantization uniform,forward --ode-examples 32
  python -m experiments.bench_likelihood --data digits --num-examples 300   # compressors only

Prints one JSON document (and writes it to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import sys
import time

import numpy as np


def _parse_pairs(text: str | None, what: str) -> dict[str, str]:
  out = {}
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise SystemExit(f"{what}: expected name=value, got {item!r}.")
    name, value = item.split("=", 1)
    out[name.strip()] = value.strip()
  return out


def load_config(workdir: str, config_file: str | None = None):
  """The run's config: `config_file` (path.py[:words]) if given, else workdir/config.json."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if config_file:
    path, _, arg = config_file.partition(":")
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} does not exist; pass --configs NAME=path/to/config.py[:words].")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def hardware() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu_model = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu_model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {
      "jax_backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
      "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "cpus_usable": usable,
      "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__, "python": platform.python_version(), "platform": platform.platform(),
  }


# --------------------------------------------------------------------------------------------------
# Exact per-image -log2 P(k) / D, where the data's distribution is known.
# --------------------------------------------------------------------------------------------------
def per_image_true_bpd(ds) -> np.ndarray | None:
  """Exact -log2 P(k) / D of each image, or None when the distribution is not known here.

  gaussian_mixture: only with the loader's default mixture (the trainer passes no mixture arguments);
  the parameters are redrawn exactly as `vdiff.data._load_gaussian_mixture` draws them. The result is
  checked against the loader's Monte-Carlo `true_bpd` (it must agree within 5 standard errors), so a
  change in data.py makes this return None rather than a wrong number.
  """
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  from vdiff import likelihood  # pylint: disable=g-import-not-at-top
  if ds.true_bpd is None:
    return None
  if ds.name == "uniform":
    return np.full(len(ds), ds.true_bpd)
  if ds.name != "gaussian_mixture":
    return None
  try:
    defaults = {k: p.default for k, p in
                inspect.signature(data_lib._load_gaussian_mixture).parameters.items()}  # pylint: disable=protected-access
    if ds.num_levels != defaults["num_levels"] or ds.shape != tuple(defaults["shape"]):
      return None
    rng = data_lib._random_state(data_lib._TAG_MIXTURE, defaults["mixture_seed"])  # pylint: disable=protected-access
    m, d = defaults["num_components"], ds.num_dims
    means = rng.uniform(-0.5, 0.5, (m, d))
    stds = rng.uniform(0.1, 0.3, (m, d))
    nats = -data_lib.gaussian_mixture_log_prob(ds.images, means=means, stds=stds, weights=None,
                                               num_levels=ds.num_levels)
  except (AttributeError, KeyError, ValueError):
    return None
  bits = np.asarray(likelihood.nats_to_bpd(nats, ds.num_dims), np.float64)
  se = math.hypot(bits.std(ddof=1) / math.sqrt(len(bits)), ds.true_bpd_stderr or 0.0)
  if abs(bits.mean() - ds.true_bpd) > 5 * se:
    print(f"[bench] per-image truth disagrees with true_bpd ({bits.mean():.4f} vs {ds.true_bpd:.4f}); "
          "not using it.", file=sys.stderr)
    return None
  return bits


# --------------------------------------------------------------------------------------------------
# Estimators: (params, rng, batch) -> (nats [B], nfe [B] or scalar), and whether they are dequantised.
# --------------------------------------------------------------------------------------------------
def _eval_cfg(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(condition="none", **kw))


def elbo_fn(model, k: int):
  """Negative ELBO averaged over k independent time samples per image (the trainer's evaluator:
  a fori_loop, compiled once whatever k)."""
  from vdiff import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.make_nll_fn(model, "elbo", _eval_cfg(num_time_samples=k))


def cdm_fn(model, *, dequantization: str = "uniform", num_samples: int = 1):
  """The CDM one-step density with m dequantisation draws per image (m network evaluations)."""
  from vdiff import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.make_nll_fn(model, "cdm", _eval_cfg(dequantization=dequantization,
                                                      num_dequantization_samples=num_samples))


def ode_fn(model, *, tol: float, divergence: str, dequantization: str = "uniform",
           num_samples: int = 1, t0: float = 0.0):
  from vdiff import evaluate  # pylint: disable=g-import-not-at-top
  cfg = _eval_cfg(ode_rtol=tol, ode_atol=tol, ode_divergence=divergence, dequantization=dequantization,
                  num_dequantization_samples=num_samples, ode_t0=t0)
  return evaluate.make_nll_fn(model, "ode", cfg)


def run_estimator(fn, params, ds, *, batch_size: int, seed: int, dequantized: bool,
                  warmup: bool = True, precision: str = "highest", per_example: bool = False) -> dict:
  """Per-image bits/dim of `fn` over every image of ds (masked padding), timed after compilation
  (compiled under jax.default_matmul_precision(precision)).

  fn is an `evaluate.make_nll_fn` estimator: its nats bound -log P(k) (a uniformly dequantised
  density's D log(K/2) included), so bits/dim are nats_to_bpd(nats, D); `dequantized` (its flag) only
  names the convention.

  per_example: fn folds each example's index into the key itself (the ODE estimator), so it gets the
  same key for every batch and each image's draws do not depend on the batch size, as in
  `vdiff.evaluate`; otherwise batch i gets fold_in(key, i), as the evaluator gives the ELBO and CDM."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  from vdiff import likelihood  # pylint: disable=g-import-not-at-top
  # "index": each example's position in ds (the ODE draws its noise per example from it).
  batches = [{"image": b["image"], "label": b["label"], "mask": b["mask"],
              "index": np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)}
             for i, b in enumerate(data_lib.eval_batches(ds, batch_size))]
  rng = jax.random.PRNGKey(seed)
  strip = lambda b: {"image": b["image"], "label": b["label"], "index": b["index"]}
  t0 = time.perf_counter()
  with (contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision)):
    compiled = jax.jit(fn).lower(params, rng, strip(batches[0])).compile()
  compile_s = time.perf_counter() - t0
  warmup_s = None
  if warmup:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, jax.random.fold_in(rng, 10_000), strip(batches[0])))
    warmup_s = time.perf_counter() - t0
  nats, nfe, masks = [], [], []
  t0 = time.perf_counter()
  for i, b in enumerate(batches):
    n_i, f_i = compiled(params, rng if per_example else jax.random.fold_in(rng, i), strip(b))
    nats.append(np.asarray(n_i))  # fetching to the host waits for the result
    nfe.append(np.broadcast_to(np.asarray(f_i, np.float64), n_i.shape))
    masks.append(b["mask"].astype(bool))
  seconds = time.perf_counter() - t0
  mask = np.concatenate(masks)
  nats = np.concatenate(nats)[mask]
  nfe = np.concatenate(nfe)[mask]
  bpd = np.asarray(likelihood.nats_to_bpd(nats, ds.num_dims), np.float64)
  n = len(bpd)
  return {
      "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
      "num_examples": n, "nfe": float(nfe.mean()), "nfe_max": float(nfe.max()),
      "seconds": seconds, "seconds_per_image": seconds / n, "compile_s": compile_s,
      "warmup_s": warmup_s, "batch_size": batch_size,
      "convention": ("continuous density on uniformly dequantised data, + log2(K/2) bits/dim"
                     if dequantized else "discrete bound on -log P(k) (no dequantisation offset)"),
      "per_image_bpd": bpd,
  }


def add_gaps(entry: dict, ds, truth: np.ndarray | None) -> dict:
  """Gap to the data's true bits/dim (unpaired, and paired per image when the truth is known)."""
  bpd = entry.pop("per_image_bpd")
  entry["per_image_bpd"] = [round(float(b), 6) for b in bpd]  # kept for pairing across bench files
  if ds.true_bpd is not None:
    entry["gap_to_true"] = entry["bpd"] - ds.true_bpd
    entry["gap_stderr"] = math.hypot(entry["bpd_stderr"], ds.true_bpd_stderr or 0.0)
  if truth is not None:
    diff = bpd - truth[:len(bpd)]
    entry["true_bpd_same_images"] = float(truth[:len(bpd)].mean())
    entry["paired_gap"] = float(diff.mean())
    entry["paired_gap_stderr"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
  return entry


def add_paired_gap(entry: dict, bpd: np.ndarray, reference: np.ndarray | None, name: str) -> dict:
  """The paired gap mean_i(bpd_i - ref_i) to another estimator of the same run on the same images, with
  its standard error over images.

  Only when the reference ran on exactly these images (the same count, so the same batches): the ELBO's
  antithetic time draws t_i = (u + i / B) mod 1 give neighbouring images of one batch nearly the same
  time, so over a prefix of a larger batch the per-image ELBOs are correlated and their mean is far
  noisier than their spread says (on digits, the first 64 of a 300-image batch averaged 2.096 bits/dim
  with k = 100 draws, the same 64 as their own batch 1.882)."""
  if reference is None or len(reference) != len(bpd):
    return entry
  entry[f"paired_gap_to_{name}"], entry[f"paired_gap_to_{name}_stderr"] = _mean_and_stderr(
      np.asarray(bpd) - np.asarray(reference))
  return entry


def _mean_and_stderr(diff: np.ndarray) -> tuple[float, float]:
  """The mean of per-image differences and its standard error over images (0 for one image)."""
  return float(diff.mean()), (float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0)


def add_codec_gaps(entry: dict, codes: dict) -> dict:
  """Each per-image code's paired gap to an estimator: mean_i(bpd_i - code_i) over the estimator's
  images (the first len(per_image_bpd) of the codes' images) and its standard error over images, as
  entry["paired_gap_to_codec"][method] = {"gap", "stderr"}. A negative gap codes these images in
  fewer bits than the codec; the standard error excludes the image-to-image spread that both share.

  codes: `baselines.compress_all(..., per_image=True)`; methods without "bpd_per_image" (the
  whole-array codes) are left out, and so is everything where the codes cover fewer images."""
  bpd = np.asarray(entry["per_image_bpd"], np.float64)
  gaps = {}
  for method, code in codes.items():
    if not isinstance(code, dict) or "bpd_per_image" not in code or len(code["bpd_per_image"]) < len(bpd):
      continue
    gap, stderr = _mean_and_stderr(bpd - np.asarray(code["bpd_per_image"][:len(bpd)], np.float64))
    gaps[method] = {"gap": gap, "stderr": stderr}
  if gaps:
    entry["paired_gap_to_codec"] = gaps
  return entry


def subset(ds, n: int):
  n = min(n, len(ds)) if n else len(ds)
  return dataclasses.replace(ds, images=ds.images[:n], labels=ds.labels[:n])


def photo_groups(ds, n: int | None = None):
  """(photo of each of the first n images, int [n]; the photos' names), or None where the dataset does
  not record a photo per image (every source but `photos`)."""
  meta = ds.metadata or {}
  if "photo_index" not in meta:
    return None
  n = len(ds) if n is None else n
  return np.asarray(meta["photo_index"])[:n], [p["name"] for p in meta["photos"]]


def group_kwargs(groups) -> dict:
  """`photo_groups` as the keyword arguments of baselines.compress_all (nothing where it is None)."""
  return {} if groups is None else {"groups": groups[0], "group_names": groups[1]}


def by_photo(per_image_bpd, groups) -> dict | None:
  """{photo name: mean bits/dim of its images} over the photos present, from `photo_groups`."""
  if groups is None:
    return None
  index, names = groups
  x = np.asarray(per_image_bpd, np.float64)
  index = index[:len(x)]
  return {names[i]: float(x[index == i].mean()) for i in np.unique(index)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", default="",
                      help="comma-separated name=DIR of trained runs (e.g. vdm=/tmp/kd/vdm,cdm=/tmp/kd/cdm)")
  parser.add_argument("--configs", default="",
                      help="optional name=path.py[:words] overriding DIR/config.json for those runs")
  parser.add_argument("--data", default=None,
                      help="dataset name for the test data and the baselines (default: the runs' "
                           "config data.name; required without --workdirs)")
  parser.add_argument("--split", default="test")
  parser.add_argument("--num-examples", type=int, default=500, help="first N test images (0 = all)")
  parser.add_argument("--elbo-samples", default="1,10,100",
                      help="comma-separated k: time samples per image for the ELBO")
  parser.add_argument("--ode", choices=("on", "off"), default="on")
  parser.add_argument("--ode-examples", default="16",
                      help="images for the ODE estimator: N for every run, or name=N,... per run "
                           "(runs not named get 16)")
  parser.add_argument("--ode-tol", type=float, default=1e-5, help="rtol = atol of the ODE solver")
  parser.add_argument("--ode-divergence", choices=("hutchinson", "exact"), default="hutchinson")
  parser.add_argument("--ode-dequantization", default="uniform",
                      help="comma-separated dequantisations of the ODE: uniform, forward")
  parser.add_argument("--cdm-dequantization", default="uniform",
                      help="comma-separated dequantisations of the CDM one-step density: uniform, forward")
  parser.add_argument("--dequantization-samples", type=int, default=1,
                      help="m: dequantisation draws per image of the cdm and ode estimators "
                           "(importance-weighted)")
  parser.add_argument("--ode-t0", type=float, default=0.0, help="time of z for the forward-dequantised ODE")
  parser.add_argument("--precision", choices=("default", "high", "highest"), default="highest",
                      help="matmul/conv precision every estimator is compiled under")
  parser.add_argument("--ode-warmup", choices=("on", "off"), default="on",
                      help="run the ODE once before timing (doubles its cost; compilation is always "
                           "separate)")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--baselines", choices=("on", "off"), default="on")
  parser.add_argument("--params", choices=("ema", "raw"), default="ema",
                      help="the EMA parameters (default) or the raw ones (a run too short for its EMA decay)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--paired-to", default="",
                      help="an estimator label of each run (e.g. elbo_k100): every other entry of that run "
                           "on the same images (the same count) also gets its paired gap to it")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)

  t_start = time.time()
  import jax  # pylint: disable=g-import-not-at-top  (after --help)
  from vdiff import baselines  # pylint: disable=g-import-not-at-top
  from vdiff import cdm  # pylint: disable=g-import-not-at-top
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  from vdiff import train  # pylint: disable=g-import-not-at-top

  runs = _parse_pairs(args.workdirs, "--workdirs")
  config_files = _parse_pairs(args.configs, "--configs")
  configs = {name: load_config(d, config_files.get(name)) for name, d in runs.items()}
  data_name = args.data or (next(iter(configs.values())).data.name if configs else None)
  if data_name is None:
    raise SystemExit("give --workdirs or --data.")
  ref_cfg = next(iter(configs.values()), None)
  seed = int(ref_cfg.seed) if ref_cfg is not None else 0
  load_kw = {}
  if ref_cfg is not None and ref_cfg.data.name == data_name:
    load_kw = dict(data_dir=ref_cfg.data.data_dir or None, path=ref_cfg.data.path or None)
  full = data_lib.load(data_name, split=args.split, seed=seed, **load_kw)
  ds = subset(full, args.num_examples)
  truth = per_image_true_bpd(ds)
  groups = photo_groups(full, len(ds))  # photos: each result and codec is also broken down by photo
  hw = hardware()

  doc = {
      "command": " ".join(["python -m experiments.bench_likelihood"] + list(sys.argv[1:] if argv is None
                                                                           else argv)),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "hardware": hw,
      "data": {"name": data_name, "split": args.split, "num_examples": len(ds),
               "num_examples_in_split": len(full), "shape": list(ds.shape), "num_levels": ds.num_levels,
               "num_dims": ds.num_dims, "seed": seed, "true_bpd": full.true_bpd,
               "true_bpd_stderr": full.true_bpd_stderr,
               "true_bpd_same_images": float(truth.mean()) if truth is not None else None,
               "per_image_truth": truth is not None},
      "settings": {"elbo_samples": args.elbo_samples, "ode": args.ode, "ode_examples": args.ode_examples,
                   "ode_tol": args.ode_tol, "ode_divergence": args.ode_divergence,
                   "ode_dequantization": args.ode_dequantization, "ode_t0": args.ode_t0,
                   "cdm_dequantization": args.cdm_dequantization,
                   "dequantization_samples": args.dequantization_samples,
                   "precision": args.precision, "condition": "none", "batch_size": args.batch_size},
      "results": [], "baselines": None,
  }

  ks = [int(k) for k in args.elbo_samples.split(",") if k.strip()]
  m = args.dequantization_samples
  if m < 1:
    raise SystemExit(f"--dequantization-samples must be >= 1, got {m}.")
  if "=" in args.ode_examples:
    ode_examples = {name: int(v) for name, v in _parse_pairs(args.ode_examples, "--ode-examples").items()}
  else:
    ode_examples = {name: int(args.ode_examples) for name in runs}
  for name, workdir in runs.items():
    config = configs[name]
    if config.data.name != data_name:
      raise SystemExit(f"run {name!r} was trained on {config.data.name!r}, not on {data_name!r}.")
    t0 = time.perf_counter()
    _, model, state, step = train._restore_for_inference(config, workdir)  # pylint: disable=protected-access
    params = state.params if args.params == "raw" else state.ema_params
    restore_s = time.perf_counter() - t0
    common = {"run": name, "workdir": workdir, "family": model.family_name, "step": step,
              "params": args.params, "restore_s": restore_s}
    jobs = []
    if model.native_estimator == "elbo":
      jobs += [(f"elbo_k{k}", {"estimator": "elbo", "time_samples": k}, elbo_fn(model, k), ds, True)
               for k in ks]
    elif model.native_estimator == "cdm":
      for deq in _names(args.cdm_dequantization, "--cdm-dequantization"):
        jobs.append((f"cdm_{deq}", {"estimator": "cdm", "dequantization": deq,
                                    "dequantization_samples": m,
                                    "cdm_class": (cdm.forward_class(model.abar, model.num_levels)
                                                  if deq == "forward" else 0)},
                     cdm_fn(model, dequantization=deq, num_samples=m), ds, True))
    n_ode = ode_examples.get(name, 16)
    if args.ode == "on" and n_ode > 0:
      for deq in _names(args.ode_dequantization, "--ode-dequantization"):
        jobs.append((f"ode_{deq}", {"estimator": "ode", "ode_tol": args.ode_tol,
                                    "ode_divergence": args.ode_divergence, "dequantization": deq,
                                    "dequantization_samples": m,
                                    "ode_t0": args.ode_t0 if deq == "forward" else 0.0},
                     ode_fn(model, tol=args.ode_tol, divergence=args.ode_divergence,
                            dequantization=deq, num_samples=m, t0=args.ode_t0),
                     subset(ds, n_ode), args.ode_warmup == "on"))
    per_image = {}  # label -> bits/dim per image, for --paired-to
    for label, meta, (fn, dequantized), sub, warm in jobs:
      print(f"[bench] {name}: {label} on {len(sub)} images ...", file=sys.stderr, flush=True)
      entry = run_estimator(fn, params, sub, batch_size=min(args.batch_size, len(sub)),
                            seed=args.seed, dequantized=dequantized,
                            warmup=warm, precision=args.precision,
                            per_example=meta["estimator"] == "ode")
      per_image[label] = entry["per_image_bpd"]
      if args.paired_to and label != args.paired_to:
        entry = add_paired_gap(entry, entry["per_image_bpd"], per_image.get(args.paired_to),
                               args.paired_to)
      entry = add_gaps(entry, sub, truth)
      if groups is not None:
        entry["bpd_by_group"] = by_photo(entry["per_image_bpd"], groups)
      doc["results"].append(dict(common, label=f"{name}/{label}", **meta, **entry))
      # Written after every estimator, marked partial: a slow ODE that is cut short loses nothing else.
      _write(dict(doc, partial=True, wall_seconds=time.time() - t_start), args.out)
      print(f"[bench]   {entry['bpd']:.4f} +- {entry['bpd_stderr']:.4f} bpd, nfe {entry['nfe']:.1f}, "
            f"{entry['seconds_per_image'] * 1e3:.3f} ms/image", file=sys.stderr, flush=True)

  if args.baselines == "on":
    t0 = time.perf_counter()
    doc["baselines"] = baselines.compress_all(ds.images, ds.num_levels, per_image=True,
                                              **group_kwargs(groups))
    doc["baselines"]["seconds"] = time.perf_counter() - t0
    for entry in doc["results"]:
      add_codec_gaps(entry, doc["baselines"])
      best = min(entry.get("paired_gap_to_codec", {}).items(),
                 key=lambda kv: doc["baselines"][kv[0]]["bpd"], default=None)
      if best is not None:
        print(f"[bench] {entry['label']} - {best[0]} (the best per-image code), paired over "
              f"{len(entry['per_image_bpd'])} images: {best[1]['gap']:+.4f} +- {best[1]['stderr']:.4f} "
              "bits/dim", file=sys.stderr, flush=True)
    if full.true_bpd is not None:
      for m in baselines.METHODS:
        if m in doc["baselines"]:
          doc["baselines"][m]["gap_to_true"] = doc["baselines"][m]["bpd"] - full.true_bpd
  doc["wall_seconds"] = time.time() - t_start
  doc.pop("partial", None)
  text = _write(doc, args.out)
  print(text)
  return doc


def _names(text: str, flag: str) -> list[str]:
  names = [w.strip() for w in text.split(",") if w.strip()]
  bad = [w for w in names if w not in ("uniform", "forward")]
  if bad or not names:
    raise SystemExit(f"{flag}: expected a comma-separated subset of uniform,forward; got {text!r}.")
  return names


def _write(doc: dict, path: str | None) -> str:
  """The JSON text of doc, also written (atomically) to path if given."""
  text = json.dumps(doc, indent=1)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(path + ".tmp", path)
  return text


if __name__ == "__main__":
  main()
