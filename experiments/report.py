"""Markdown tables and PNG plots of likelihood results, from bench JSON files and run directories.

Inputs:
  --bench    comma-separated JSON files written by experiments/bench_likelihood.py (--out); files joined
             with "+" (runs of one benchmark on the same images, e.g. one command per model) make one
             section and one plot. Each carries
             the command that produced it, its hardware, wall time and data; the run directories it
             evaluated are read too (metrics.jsonl, eval.json, config.json).
  --runs-info  optional JSON {run_dir: {"command": ..., "wall_seconds": ...}} describing how each run was
             trained (the run directory does not record its own command line).
Outputs in --out-dir (default docs/results/):
  results.md                   one section per bench file: estimators, compressor baselines, training runs
  bpd_vs_step_<data>.png       test bits/dim against training step (metrics.jsonl eval rows / eval.json)
  bpd_vs_seconds_<data>.png    bits/dim against seconds per image of each estimator (log x)

  python -m experiments.report --bench docs/results/bench_gaussian_mixture.json,docs/results/bench_digits.json \
      --runs-info docs/results/runs.json --out-dir docs/results

Plots need matplotlib (`pip install vdiff[plots]`); without it only the markdown is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_history(workdir: str) -> dict:
  """Eval rows (step, bpd, stderr), training-loss rows (step, bpd), eval.json and approximate train time.

  metrics.jsonl is read with vdiff.workdir.read_metrics: after a resume each step keeps the row of the
  resumed run (the rows the stopped run logged after its last checkpoint are dropped).
  """
  from vdiff.workdir import read_metrics  # pylint: disable=g-import-not-at-top
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = {}
  for r in rows:
    if "eval_bpd" in r:
      evals[int(r["step"])] = (float(r["eval_bpd"]), float(r.get("eval_bpd_stderr", 0.0)))
  final = _read_json(os.path.join(workdir, "eval.json"))
  if final and "bpd" in final:
    evals.setdefault(int(final["step"]), (float(final["bpd"]), float(final.get("bpd_stderr", 0.0))))
  train = [(int(r["step"]), float(r["bpd"])) for r in rows if "bpd" in r and "loss" in r]
  # Training time from the logged rates: sum over log intervals of (steps in interval) / steps_per_sec.
  seconds, prev = 0.0, 0
  for r in rows:
    if "steps_per_sec" in r and r["steps_per_sec"] > 0:
      seconds += (int(r["step"]) - prev) / float(r["steps_per_sec"])
      prev = int(r["step"])
  return {"evals": sorted((s, b, e) for s, (b, e) in evals.items()), "train": train, "final": final,
          "config": _read_json(os.path.join(workdir, "config.json")), "train_seconds": seconds or None}


def _pm(value, err, digits=3):
  if value is None:
    return "–"
  if err is None:
    return f"{value:.{digits}f}"
  return f"{value:.{digits}f} ± {err:.{digits}f}"


def _secs(s):
  if s is None:
    return "–"
  if s >= 1:
    return f"{s:.2f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.2f} ms"
  return f"{s * 1e6:.1f} µs"


def _hardware_line(hw: dict) -> str:
  load = hw.get("load_average_at_start")
  load_s = f"; load average at start {load[0]:.1f}" if load else ""
  return (f"JAX {hw.get('jax')} on backend `{hw.get('jax_backend')}`, device `{hw.get('device')}` "
          f"(x{hw.get('device_count')}), CPU {hw.get('cpu_model')} with {hw.get('cpu_count')} cores "
          f"({hw.get('cpus_usable')} usable){load_s}; Python {hw.get('python')}, {hw.get('platform')}")


def merge_bench(benches: list[dict]) -> dict:
  """One bench document from several bench_likelihood runs on the same test images (e.g. one run per
  model): their results in order, the commands joined with "; ", the wall times summed, the compressor
  baselines of the first file that has them. The data (name, split, images, shape) must agree."""
  first = benches[0]
  keys = ("name", "split", "num_examples", "shape", "num_levels")
  for b in benches[1:]:
    mismatch = [k for k in keys if b["data"].get(k) != first["data"].get(k)]
    if mismatch:
      raise SystemExit(f"bench files joined with '+' must be on the same data; {mismatch} differ: "
                       f"{[first['data'].get(k) for k in mismatch]} vs {[b['data'].get(k) for k in mismatch]}.")
  merged = dict(first)
  merged["results"] = [r for b in benches for r in b["results"]]
  merged["command"] = "; ".join(b["command"] for b in benches)
  merged["wall_seconds"] = sum(b.get("wall_seconds", 0.0) for b in benches)
  merged["baselines"] = next((b["baselines"] for b in benches if b.get("baselines")), first.get("baselines"))
  return merged


def bench_section(bench: dict, runs_info: dict, plot_names: dict) -> str:
  d = bench["data"]
  lines = [f"## {d['name']}: {d['num_examples']} {d['split']} images, "
           f"{'x'.join(map(str, d['shape']))}, K = {d['num_levels']} levels, D = {d['num_dims']}", ""]
  lines.append(f"- Command: `{bench['command']}`")
  lines.append(f"- Started {bench.get('started')}, wall time {bench.get('wall_seconds', 0):.0f} s "
               "(including restoring the runs and compiling).")
  lines.append(f"- Hardware: {_hardware_line(bench['hardware'])}.")
  if d.get("true_bpd") is not None:
    same = d.get("true_bpd_same_images")
    lines.append(f"- True entropy of the data: {d['true_bpd']:.4f} ± {d['true_bpd_stderr']:.4f} bits/dim "
                 "(Monte-Carlo over 100k draws of the exact -log2 P(k)/D)"
                 + (f"; exact mean -log2 P(k)/D of these very test images: {same:.4f}." if same else "."))
  lines.append("")
  lines.append("Times are per image, after compilation (ahead-of-time compile, timed separately), "
               "batch size in the table, on a CPU shared with other jobs. `gap` = bpd - true entropy "
               "(with both standard errors); `paired gap` = mean over images of (bpd_i - exact "
               "-log2 P(k_i)/D), whose standard error excludes the spread between images.")
  lines.append("")
  head = ("| estimator | images | bits/dim | gap to truth | paired gap | nfe / image | time / image | "
          "batch | compile | step | convention |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for r in bench["results"]:
    conv = "dequantised" if "dequantised" in r["convention"] else "discrete"
    lines.append(
        f"| {r['label']} | {r['num_examples']} | {_pm(r['bpd'], r['bpd_stderr'])} | "
        f"{_pm(r.get('gap_to_true'), r.get('gap_stderr'))} | "
        f"{_pm(r.get('paired_gap'), r.get('paired_gap_stderr'))} | {r['nfe']:.0f}"
        + (f" (max {r['nfe_max']:.0f})" if r.get("nfe_max", r["nfe"]) != r["nfe"] else "")
        + f" | {_secs(r['seconds_per_image'])} | {r['batch_size']} | {r['compile_s']:.1f} s | "
        f"{r['step']} | {conv} |")
  lines.append("")
  b = bench.get("baselines")
  if b:
    lines.append(f"Lossless compressors on the same {b['num_images']} images (bits/dim = 8 bytes / "
                 f"(N D); uniform code log2 K = {b['uniform_bpd']:.3f}; vdiff/baselines.py):")
    lines.append("")
    lines += ["| compressor | bytes | bits/dim | gap to truth | what is counted |", "|---|---|---|---|---|"]
    for m in ("png", "png_net", "lzma", "lzma_per_image", "gzip", "gzip_per_image"):
      if m in b:
        lines.append(f"| {m} | {b[m]['bytes']} | {b[m]['bpd']:.3f} | "
                     f"{_pm(b[m].get('gap_to_true'), None)} | {b[m]['note']} |")
    lines.append("")
  workdirs = []
  for r in bench["results"]:
    if r["workdir"] not in workdirs:
      workdirs.append(r["workdir"])
  if workdirs:
    lines.append("Training runs evaluated above (test bits/dim from the trainer's own evaluation, "
                 "eval.json, EMA parameters):")
    lines.append("")
    lines += ["| run | family | steps | batch | final test bpd | estimator (images) | train time | command |",
              "|---|---|---|---|---|---|---|---|"]
    for w in workdirs:
      h = run_history(w)
      cfg, fin = h["config"] or {}, h["final"] or {}
      info = runs_info.get(w, {})
      wall = info.get("wall_seconds")
      t = (f"{wall:.0f} s wall" if wall else "") + (
          f" (~{h['train_seconds']:.0f} s of steps)" if h["train_seconds"] else "")
      est = f"{fin.get('estimator', '–')} ({fin.get('num_examples', '–')})"
      if fin.get("num_time_samples"):
        est += f", k={fin['num_time_samples']}"
      lines.append(f"| `{w}` | {cfg.get('model', {}).get('family', '–')} | {fin.get('step', '–')} | "
                   f"{cfg.get('training', {}).get('batch_size', '–')} | "
                   f"{_pm(fin.get('bpd'), fin.get('bpd_stderr'))} | {est} | {t or '–'} | "
                   f"`{info.get('command', 'not recorded')}` |")
    lines.append("")
  for title, name in plot_names.items():
    lines.append(f"![{title}]({name})")
  lines.append("")
  return "\n".join(lines)


def _true_entropy_line(ax, true_bpd):
  """The data's true entropy in bits/dim as a dashed line, where it is known."""
  if true_bpd is not None:
    ax.axhline(true_bpd, color="k", ls="--", lw=1, label=f"true entropy {true_bpd:.3f}")


def _save(fig, out_dir: str, name: str) -> str:
  """Lay out, write out_dir/name at 120 dpi, close the figure; returns the file name."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=120)
  plt.close(fig)
  return name


def plot_bench(bench: dict, out_dir: str, tag: str | None = None) -> dict:
  """bpd-vs-step and bpd-vs-seconds plots for one bench file; returns {title: file name}."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("[report] matplotlib is not installed: no plots (pip install vdiff[plots]).", file=sys.stderr)
    return {}
  d = bench["data"]
  tag = tag or d["name"].replace("/", "_")  # file names: bpd_vs_step_<tag>.png, bpd_vs_seconds_<tag>.png
  names = {}
  true_bpd = d.get("true_bpd")

  # 1. Test bpd against training step, one line per run.
  fig, ax = plt.subplots(figsize=(6, 4))
  histories = {}  # workdir -> run_history, each run read once
  for r in bench["results"]:
    if r["workdir"] in histories:
      continue
    h = histories[r["workdir"]] = run_history(r["workdir"])
    if h["evals"]:
      s, b, e = zip(*h["evals"])
      ax.errorbar(s, b, yerr=e, marker="o", capsize=3,
                  label=f"{r['run']} ({r['family']}, test, {h['final']['estimator'] if h['final'] else ''})")
    if h["train"]:
      s, b = zip(*h["train"])
      ax.plot(s, b, alpha=0.3, lw=1, label=f"{r['run']} train batch")
  _true_entropy_line(ax, true_bpd)
  ax.set_xlabel("training step")
  ax.set_ylabel("bits/dim")
  ax.set_title(f"{d['name']}: test bits/dim during training")
  # Training starts far above the final value; keep the interesting range (the truth and the evals).
  evals = [b for h in histories.values() for _, b, _ in h["evals"]]
  if evals:
    lo = min(evals + ([true_bpd] if true_bpd is not None else []))
    ax.set_ylim(max(0.0, lo - 0.5), max(evals) + 0.5)
  ax.legend(fontsize=7)
  names["test bits/dim against training step"] = _save(fig, out_dir, f"bpd_vs_step_{tag}.png")

  # 2. bpd against seconds per image, one point per estimator.
  fig, ax = plt.subplots(figsize=(6, 4))
  # Ten colours cycle; the marker changes with each cycle, so that no two estimators look the same.
  for i, r in enumerate(bench["results"]):
    ax.errorbar(r["seconds_per_image"], r["bpd"], yerr=r["bpd_stderr"], marker="osD^v"[(i // 10) % 5],
                color=f"C{i % 10}", capsize=3,
                label=f"{r['label']} (nfe {r['nfe']:.0f}, n={r['num_examples']})")
  b = bench.get("baselines") or {}
  styles = {"lzma": ":", "gzip": "-."}
  for m, ls in styles.items():
    if m in b:
      ax.axhline(b[m]["bpd"], color="gray", ls=ls, lw=1, label=f"{m} (whole set) {b[m]['bpd']:.2f}")
  _true_entropy_line(ax, true_bpd)
  ax.set_xscale("log")
  ax.set_xlabel("seconds per image (after compilation, log scale)")
  ax.set_ylabel("bits/dim")
  ax.set_title(f"{d['name']}: estimator cost and value ({bench['hardware'].get('jax_backend')})")
  ax.legend(fontsize=6)
  names["bits/dim against seconds per image"] = _save(fig, out_dir, f"bpd_vs_seconds_{tag}.png")
  return names


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--bench", required=True, help="comma-separated bench_likelihood JSON files")
  parser.add_argument("--runs-info", default=None,
                      help="JSON {run_dir: {command, wall_seconds}} of the training runs")
  parser.add_argument("--out-dir", default="docs/results")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  runs_info = _read_json(args.runs_info) if args.runs_info else {}
  command = "python -m experiments.report " + " ".join(sys.argv[1:] if argv is None else argv)
  sections = ["# Likelihood results", "",
              f"Generated by `{command}` from the bench files listed in each section. Every number below "
              "is copied from those JSON files or the run directories they name; bits/dim conventions "
              "follow docs/math.md (discrete = bound on -log2 P(k)/D; dequantised = continuous "
              "density on uniformly dequantised data + log2(K/2)).", ""]
  seen = {}  # data name -> sections so far
  for group in [p for p in args.bench.split(",") if p]:
    # "a.json+b.json": runs of one benchmark on the same images, written by separate commands.
    docs = {p: _read_json(p) for p in group.split("+")}
    missing = [p for p, doc in docs.items() if doc is None]
    if missing:
      raise SystemExit(f"{missing[0]} does not exist.")
    bench = merge_bench(list(docs.values()))
    path = group
    # The first section of a data set names its plots by the data set; later ones add _2, _3, ...
    # (never overwriting an earlier section's plots).
    name = bench["data"]["name"].replace("/", "_")
    seen[name] = seen.get(name, 0) + 1
    tag = name if seen[name] == 1 else f"{name}_{seen[name]}"
    plots = {} if args.no_plots else plot_bench(bench, args.out_dir, tag)
    sections.append(f"<!-- from {path} -->")
    sections.append(bench_section(bench, runs_info or {}, plots))
  out = os.path.join(args.out_dir, "results.md")
  with open(out, "w") as f:
    f.write("\n".join(sections))
  print(out)


if __name__ == "__main__":
  main()
