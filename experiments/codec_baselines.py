"""Lossless-codec baselines on one split of a vdiff dataset: a bits/dim table and a JSON document.

Every code of vdiff/baselines.py (PNG per image with and without its per-file headers, lossless WebP,
JPEG XL and JPEG-LS per image, xz and gzip on the raw bytes, whole split and per image) on exactly the
images the models are evaluated on, e.g. the 862 test patches of the photos benchmark:

  python -m experiments.codec_baselines --data=photos
  python -m experiments.codec_baselines --data=photos --patch-size=16 --out=codecs.json
  python -m experiments.codec_baselines --data=digits

bits/dim = 8 B / (N D) of B compressed bytes, directly comparable with a model's discrete bits/dim of the
same integer data (no dequantisation offset). Prints the table (stderr) and the JSON (stdout, and --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

from experiments import bench_likelihood
from experiments import jsonout

ORDER = ("jpegxl", "webp", "jpegls", "png", "png_net", "lzma", "lzma_per_image", "gzip", "gzip_per_image")


def table(doc: dict) -> str:
  """A Markdown table of the baselines, best full code first (png_net is not a full code)."""
  b = doc["baselines"]
  rows = [m for m in ORDER if m in b]
  rows.sort(key=lambda m: (m == "png_net", b[m]["bpd"]))
  d = doc["data"]
  lines = [f"{d['name']} {d['split']}: {b['num_images']} images of {d['shape']} "
           f"(D = {b['num_dims']}), K = {b['num_levels']}; uniform code {b['uniform_bpd']:.3f} bits/dim",
           "", "| codec | bits/dim | bytes | what is counted |", "|---|---|---|---|"]
  for m in rows:
    lines.append(f"| {m} | {b[m]['bpd']:.3f} | {b[m]['bytes']} | {b[m]['note']} |")
  by_group = [m for m in rows if "bpd_by_group" in b[m]]
  if by_group:
    names = list(b[by_group[0]]["bpd_by_group"])
    lines += ["", "bits/dim by photo:", "", "| codec | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for m in by_group:
      lines.append(f"| {m} | " + " | ".join(f"{b[m]['bpd_by_group'][g]:.3f}" for g in names) + " |")
  if b.get("unavailable"):
    lines.append(f"\nleft out (library not installed): {', '.join(b['unavailable'])}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="photos", help="a vdiff.data source name (photos, digits, ...)")
  p.add_argument("--split", default="test")
  p.add_argument("--patch-size", type=int, default=None, help="photos only: the patch side (default 32)")
  p.add_argument("--num-examples", type=int, default=0, help="the first N images only (0 = all)")
  p.add_argument("--methods", default="", help="comma-separated subset of vdiff.baselines.METHODS")
  p.add_argument("--out", default="", help="also write the JSON here")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)

  from vdiff import baselines  # pylint: disable=g-import-not-at-top  (after --help)
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top

  kw = {} if args.patch_size is None else {"patch_size": args.patch_size}
  ds = data_lib.load(args.data, split=args.split, **kw)
  images = ds.images[:args.num_examples] if args.num_examples else ds.images
  methods = tuple(m for m in args.methods.split(",") if m) or None
  t0 = time.perf_counter()
  groups = bench_likelihood.photo_groups(ds, len(images))  # photos: also by test photo
  result = baselines.compress_all(images, ds.num_levels, methods=methods,
                                  **bench_likelihood.group_kwargs(groups))
  seconds = time.perf_counter() - t0
  versions = data_lib.package_versions(("pillow", "imagecodecs", "numpy"))
  if "imagecodecs" in sys.modules:
    import imagecodecs  # pylint: disable=g-import-not-at-top
    versions["libjxl"] = imagecodecs.jpegxl_version()
    versions["charls"] = imagecodecs.jpegls_version()
  meta = {k: v for k, v in ds.metadata.items() if k not in ("photo_index", "patch_origin")}
  doc = {
      "command": " ".join(["python -m experiments.codec_baselines"] + argv),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "python": platform.python_version()},
      "versions": versions,
      "data": {"name": args.data, "split": args.split, "num_examples": len(images),
               "shape": list(ds.shape), "num_levels": ds.num_levels, "metadata": meta},
      "seconds": seconds,
      "baselines": result,
  }
  print(table(doc), file=sys.stderr, flush=True)
  jsonout.emit(doc, args.out or None, indent=1)
  return doc


if __name__ == "__main__":
  main()
