"""The family study: VDM vs DiffEnc vs CDM, and variance-minimising schedules, on scikit-learn digits.

Every variant of experiments/configs/study.py is trained with the same data, seed, batch size and number
of steps through `vdiff.train.train_and_evaluate` (in-process, one work directory per variant), and then
measured with its EMA parameters on the 300 test images:

  * bpd, bpd_stderr, estimator: the trainer's final evaluation (eval.json; ELBO for VDM / DiffEnc, the
    one-step likelihood on dequantised data, + log2(K/2), for CDM).
  * train wall seconds (the train_and_evaluate call minus its evaluation pass, compile included) and the
    steady-state training throughput from metrics.jsonl (logs after the first, compile excluded).
  * seconds_per_image of the likelihood estimator, measured properly: the estimator is jitted once,
    warmed up on one batch (compile), then full passes over the test set at the config's eval batch size
    are timed with block_until_ready and the median pass is divided by the number of images. Timed with
    the config's Monte-Carlo samples per image (eval.num_time_samples: time samples for the ELBO,
    dequantisation draws for CDM) and with one sample (one network evaluation per image for both).
    (eval.json's own seconds_per_image includes the compilation of the first batch.)
  * var_ldiff (VDM / DiffEnc): the Monte-Carlo variance of the one-sample continuous-time diffusion loss
    L_diff (nats^2) over independent draws of t ~ U[0, 1) and eps ~ N(0, I), per test image, averaged over
    the test images; with its mean, the pooled (images x draws) variance and the learned gamma(t).

  * analysis (after all variants, or alone with --analyze_only): the side-by-side numbers to quote --
    every test image's bits/dim averaged over 64 Monte-Carlo draws with the PAIRED difference to VDM,
    and the estimators timed interleaved (round-robin), so that a shared machine's load hits all alike.

  python -m experiments.study_families --variants=vdm,cdm,pinned,pinned_varmin,diffenc_nt,diffenc_tr \
      --steps=1500 --workroot=/tmp/study/runs --out=/tmp/study/study.json

Training resumes exactly (data order and randomness are functions of the step, constant learning rate
after warm-up), so a study can be extended: `--steps=1000` then `--steps=1500` on the same workroot
gives the 1500-step models of an uninterrupted run (train seconds are then per invocation).

Prints one JSON document (and writes it to --out after every variant, so a partial study survives).
A variant whose work directory already holds a checkpoint resumes from it (train_and_evaluate's
behaviour); the JSON then says `resumed_from_step` and its train seconds cover only the remainder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import study
from vdiff import data as data_lib
from vdiff import diffenc
from vdiff import likelihood
from vdiff import train
from vdiff import vdm


def _existing_step(workdir: str):
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return None
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
  return max(steps) if steps else None


def _steady_steps_per_sec(workdir: str):
  path = os.path.join(workdir, "metrics.jsonl")
  rates = []
  with open(path) as f:
    for line in f:
      m = json.loads(line)
      if "steps_per_sec" in m:
        rates.append(m["steps_per_sec"])
  return float(np.median(rates[1:])) if len(rates) > 1 else None


def _test_batches(ds, batch_size: int):
  """The test split in fixed batches (the last one padded), as the evaluator reads it."""
  out = []
  for local in data_lib.eval_batches(ds, batch_size, process_index=0, process_count=1):
    out.append(({"image": jnp.asarray(local["image"]), "label": jnp.asarray(local["label"])},
                np.asarray(local["mask"]).astype(bool)))
  return out


def time_estimator(model, params, ds, eval_cfg, estimator: str, *, num_samples: int,
                   repeats: int) -> dict:
  """Seconds per test image of the likelihood estimator after compilation (median of `repeats` passes)."""
  cfg = eval_cfg.copy_and_resolve_references()
  cfg.num_time_samples = num_samples
  nll_fn, _ = train.make_nll_fn(model, estimator, cfg)
  jitted = jax.jit(nll_fn)
  batches = _test_batches(ds, cfg.batch_size)
  rng = jax.random.PRNGKey(123)
  t0 = time.perf_counter()
  jax.block_until_ready(jitted(params, rng, batches[0][0]))  # compile + first run
  compile_s = time.perf_counter() - t0
  n = int(sum(m.sum() for _, m in batches))
  passes = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for i, (batch, _) in enumerate(batches):
      out = jitted(params, jax.random.fold_in(rng, 1000 * r + i), batch)
    jax.block_until_ready(out)
    passes.append(time.perf_counter() - t0)
  return {"seconds_per_image": float(np.median(passes)) / n, "passes_seconds": passes,
          "num_samples_per_image": num_samples, "batch_size": int(cfg.batch_size),
          "num_images": n, "first_batch_seconds_with_compile": compile_s}


def diffusion_loss_draws(model, params, ds, *, num_draws: int, seed: int = 7) -> np.ndarray:
  """L_diff [num_draws, N] in nats: continuous-time one-sample diffusion loss of every test image for
  independent draws (t ~ U[0, 1) iid, not stratified; eps ~ N(0, I)), fixed parameters."""
  if model.num_steps is not None:
    raise ValueError("var_ldiff is measured for continuous-time models (model.num_steps = 0).")
  x_all = likelihood.encode(jnp.asarray(ds.images), model.num_levels)
  schedule = model.schedule(params)
  eps_fn = model.eps_fn(params)
  enc = model.encoder(params)

  @jax.jit
  def one_draw(rng, x):
    r_t, r_e = jax.random.split(rng)
    t = jax.random.uniform(r_t, (x.shape[0],))
    eps = jax.random.normal(r_e, x.shape)
    if enc is None:
      return vdm.diffusion_loss(x, t, eps, schedule=schedule, eps_fn=eps_fn)
    return diffenc.diffusion_loss(x, t, eps, schedule=schedule, encoder=enc, eps_fn=eps_fn)

  rng = jax.random.PRNGKey(seed)
  out = []
  for d in range(num_draws):
    out.append(np.asarray(one_draw(jax.random.fold_in(rng, d), x_all)))
  return np.stack(out)


def variance_summary(draws: np.ndarray, num_dims: int) -> dict:
  per_example_var = draws.var(axis=0, ddof=1)           # [N]
  n = per_example_var.shape[0]
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  return {
      "var_ldiff": float(per_example_var.mean()),
      "var_ldiff_stderr": float(per_example_var.std(ddof=1) / math.sqrt(n)),
      "std_ldiff": float(math.sqrt(per_example_var.mean())),
      "var_ldiff_pooled": float(draws.var(ddof=1)),
      "mean_ldiff": float(draws.mean()),
      "mean_ldiff_bpd": float(draws.mean() * to_bpd),
      "std_ldiff_bpd": float(math.sqrt(per_example_var.mean()) * to_bpd),
      "var_ldiff_units": "nats^2 per image, one (t, eps) draw; variance over draws, mean over images",
      "var_ldiff_draws": int(draws.shape[0]), "var_ldiff_images": int(n),
  }


def run_variant(name: str, *, steps: int, workroot: str, num_draws: int, repeats: int) -> dict:
  config = study.get_config(name)
  config.training.num_steps = steps
  workdir = os.path.join(workroot, name)
  resumed = _existing_step(workdir)
  t0 = time.time()
  with contextlib.redirect_stdout(sys.stderr):  # the trainer's messages; stdout carries only the JSON
    ev = train.train_and_evaluate(config, workdir)
  total = time.time() - t0
  rec = {
      "family": config.model.family, "bpd": ev["bpd"], "bpd_stderr": ev["bpd_stderr"],
      "estimator": ev["estimator"], "convention": ev["convention"], "steps": ev["step"],
      "batch_size": config.training.batch_size, "seed": config.seed,
      "train_seconds": total - ev["seconds"], "train_and_eval_seconds": total,
      "train_steps_per_sec_steady": _steady_steps_per_sec(workdir),
      "eval_json_seconds_per_image_incl_compile": ev["seconds_per_image"],
      "eval_nfe_per_image": ev["nfe"], "num_test_images": ev["num_examples"],
      "workdir": workdir,
  }
  if resumed is not None:
    rec["resumed_from_step"] = resumed
  _, model, state, _ = train._restore_for_inference(config, workdir)  # pylint: disable=protected-access
  params = state.ema_params
  rec["num_params"] = {k: int(sum(np.prod(a.shape) for a in jax.tree.leaves(v)))
                       for k, v in params.items()}
  test_ds = train.load_data(config, config.eval.split)
  k = int(config.eval.num_time_samples)
  rec["timing"] = time_estimator(model, params, test_ds, config.eval, ev["estimator"],
                                 num_samples=k, repeats=repeats)
  rec["seconds_per_image"] = rec["timing"]["seconds_per_image"]
  rec["timing_1sample"] = time_estimator(model, params, test_ds, config.eval, ev["estimator"],
                                         num_samples=1, repeats=repeats)
  rec["seconds_per_image_1sample"] = rec["timing_1sample"]["seconds_per_image"]
  if config.model.family in ("vdm", "diffenc"):
    draws = diffusion_loss_draws(model, params, test_ds, num_draws=num_draws)
    rec.update(variance_summary(draws, model.num_dims))
    sched = model.schedule(params)
    ts = jnp.linspace(0.0, 1.0, 11)
    rec["gamma_t"] = [round(float(g), 3) for g in np.asarray(sched.gamma(ts))]
    rec["dgamma_t"] = [round(float(g), 3) for g in np.asarray(sched.dgamma(ts))]
    rec["schedule"] = config.model.schedule.kind
    rec["variance_minimization"] = bool(config.model.schedule.variance_minimization)
    if config.model.family == "diffenc":
      rec["encoder"] = config.model.encoder.kind
  else:
    rec["var_ldiff"] = None
    rec["cdm_num_classes"] = config.model.cdm.num_steps + 2
    rec["cdm_w_ce"] = config.model.cdm.w_ce
  return rec


def _load(name: str, workroot: str):
  config = study.get_config(name)
  with contextlib.redirect_stdout(sys.stderr):
    _, model, state, step = train._restore_for_inference(  # pylint: disable=protected-access
        config, os.path.join(workroot, name))
  return config, model, state.ema_params, step, train.load_data(config, config.eval.split)


def analyze(variants, workroot: str, *, precise_samples: int, timing_rounds: int,
            reference: str = "vdm") -> dict:
  """Side-by-side measurements of the trained variants (EMA parameters of their newest checkpoints).

  precise: every test image's NLL averaged over `precise_samples` Monte-Carlo draws of the variant's own
    estimator (ELBO: stratified t and eps; CDM: the dequantisation noise), its mean bits/dim with the
    standard error over images, and the PAIRED difference to `reference` on the same images (the image-to-
    image spread cancels; this is the comparison to quote).
  timing: interleaved -- every round times one full pass over the test set for every variant, with one
    and with eval.num_time_samples Monte-Carlo samples per image, after a compiled warm-up; the median
    over rounds per image. Interleaving exposes every variant to the same load of a shared machine.
  """
  loaded = {name: _load(name, workroot) for name in variants}
  out = {"precise_samples": precise_samples, "timing_rounds": timing_rounds, "reference": reference,
         "precise": {}, "timing": {}}
  per_image = {}
  for name, (config, model, params, step, ds) in loaded.items():
    nll = jax.jit(lambda p, r, b, model=model: model.nll(p, r, b)[0])
    batch = {"image": jnp.asarray(ds.images), "label": jnp.asarray(ds.labels)}
    rng = jax.random.PRNGKey(2024)
    nats = np.mean([np.asarray(nll(params, jax.random.fold_in(rng, i), batch))
                    for i in range(precise_samples)], axis=0)
    # Family.nll's nats bound -log P(k) for every family (a dequantised density's D log(K/2) included).
    bpd = np.asarray(likelihood.nats_to_bpd(nats, model.num_dims))
    per_image[name] = bpd
    out["precise"][name] = {"bpd": float(bpd.mean()),
                            "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
                            "estimator": model.native_estimator, "step": int(step),
                            "dequantized": bool(model.dequantized)}
  if reference in per_image:
    for name, bpd in per_image.items():
      if name == reference:
        continue
      d = bpd - per_image[reference]
      out["precise"][name][f"minus_{reference}"] = float(d.mean())
      out["precise"][name][f"minus_{reference}_stderr"] = float(d.std(ddof=1) / math.sqrt(len(d)))
  fns = {}
  for name, (config, model, params, step, ds) in loaded.items():
    batches = _test_batches(ds, config.eval.batch_size)
    n = int(sum(m.sum() for _, m in batches))
    for k in sorted({1, int(config.eval.num_time_samples)}):
      cfg = config.eval.copy_and_resolve_references()
      cfg.num_time_samples = k
      jitted = jax.jit(train.make_nll_fn(model, model.native_estimator, cfg)[0])
      jax.block_until_ready(jitted(params, jax.random.PRNGKey(0), batches[0][0]))  # compile
      fns[(name, k)] = (jitted, params, batches, n, int(config.eval.batch_size))
  passes = {key: [] for key in fns}
  for r in range(timing_rounds):
    for key, (jitted, params, batches, n, _) in fns.items():
      t0 = time.perf_counter()
      for i, (batch, _) in enumerate(batches):
        res = jitted(params, jax.random.fold_in(jax.random.PRNGKey(r), i), batch)
      jax.block_until_ready(res)
      passes[key].append(time.perf_counter() - t0)
  for (name, k), (_, _, _, n, bs) in fns.items():
    out["timing"].setdefault(name, {"estimator": loaded[name][1].native_estimator,
                                    "batch_size": bs, "num_images": n})
    out["timing"][name][f"seconds_per_image_{k}sample"] = float(np.median(passes[(name, k)])) / n
    out["timing"][name][f"passes_seconds_{k}sample"] = [round(x, 4) for x in passes[(name, k)]]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default=",".join(study.VARIANTS),
                 help=f"comma-separated subset of {study.VARIANTS}")
  p.add_argument("--steps", type=int, default=1500, help="training steps for every variant")
  p.add_argument("--workroot", default="/tmp/vdiff_study", help="one work directory per variant")
  p.add_argument("--out", default="", help="write the JSON document here too (after every variant)")
  p.add_argument("--var_draws", type=int, default=64, help="(t, eps) draws per test image for var_ldiff")
  p.add_argument("--timing_repeats", type=int, default=3, help="timed passes over the test set")
  p.add_argument("--precise_samples", type=int, default=64,
                 help="Monte-Carlo draws per test image for the side-by-side (paired) bits/dim")
  p.add_argument("--timing_rounds", type=int, default=11, help="rounds of the interleaved timing")
  p.add_argument("--analyze_only", action="store_true",
                 help="no training: only the side-by-side analysis of the trained work directories")
  p.add_argument("--no_analysis", action="store_true", help="skip the side-by-side analysis")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = set(variants) - set(study.VARIANTS)
  if unknown:
    p.error(f"unknown variant(s) {sorted(unknown)}; expected some of {study.VARIANTS}")
  os.makedirs(args.workroot, exist_ok=True)
  doc = {"command": " ".join([os.path.basename(sys.executable), "-m", "experiments.study_families"]
                             + (argv if argv is not None else sys.argv[1:])),
         "data": "digits (scikit-learn, 8x8, 17 levels, 1497 train / 300 test)",
         "steps": args.steps, "device": str(jax.devices()[0]), "variants": {}}
  t_all = time.time()
  for name in ([] if args.analyze_only else variants):
    print(f"[study] {name}: training {args.steps} steps", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
      rec = run_variant(name, steps=args.steps, workroot=args.workroot, num_draws=args.var_draws,
                        repeats=args.timing_repeats)
    except Exception:  # pylint: disable=broad-except
      rec = {"error": traceback.format_exc()}
      print(rec["error"], file=sys.stderr, flush=True)
    rec["variant_wall_seconds"] = time.time() - t0
    doc["variants"][name] = rec
    doc["total_wall_seconds"] = time.time() - t_all
    if args.out:
      with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"[study] {name} done in {rec['variant_wall_seconds']:.0f} s: "
          f"bpd={rec.get('bpd')} var_ldiff={rec.get('var_ldiff')}", file=sys.stderr, flush=True)
  if not args.no_analysis:
    done = [v for v in variants if args.analyze_only or "error" not in doc["variants"].get(v, {})]
    print(f"[study] side-by-side analysis of {done}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
      doc["analysis"] = analyze(done, args.workroot, precise_samples=args.precise_samples,
                                timing_rounds=args.timing_rounds)
    except Exception:  # pylint: disable=broad-except
      doc["analysis"] = {"error": traceback.format_exc()}
      print(doc["analysis"]["error"], file=sys.stderr, flush=True)
    doc["analysis"]["wall_seconds"] = time.time() - t0
    doc["total_wall_seconds"] = time.time() - t_all
    if args.out:
      with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
  print(json.dumps(doc, indent=2), flush=True)
  return doc


if __name__ == "__main__":
  main()
