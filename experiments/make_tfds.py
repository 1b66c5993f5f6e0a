"""Write a .npz of images as an array_record TFDS dataset, offline and without TensorFlow.

  python -m experiments.make_tfds --npz=FILE.npz --name=my_data --data_dir=DIR

FILE.npz has the keys of vdiff.data.make_npz: `train`, `test` (uint8 images [N, H, W] or [N, H, W, C]),
optional `train_labels`, `test_labels` (integers [N]) and `num_labels`; `num_levels`, if present, must be
256 (vdiff reads TFDS images as 256 levels; other K train directly from the .npz with
--config.data.name=npz). The dataset is then read by `tfds.data_source("my_data", data_dir=DIR)` and by

  python -m experiments.main --config=... --config.data.name=my_data --config.data.data_dir=DIR

Exit status: 0 written, 2 an unusable file or name (one line, `[vdiff] ...`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def make_tfds(npz: str, *, name: str, data_dir: str, version: str = "1.0.0") -> str:
  """The .npz at `npz` (make_npz's keys) as TFDS dataset `name` in `data_dir`; returns its directory."""
  from vdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  missing = [k for k in ("train", "test") if k not in arrays]
  if missing:
    raise ValueError(f"{npz} has no {missing} array(s); expected make_npz's keys train, test "
                     f"[, train_labels, test_labels, num_labels], got {sorted(arrays)}.")
  if "num_levels" in arrays and int(arrays["num_levels"]) != 256:
    raise ValueError(f"{npz} has num_levels={int(arrays['num_levels'])}; TFDS datasets are read as 256 "
                     "levels, so train on this file directly with --config.data.name=npz "
                     f"--config.data.path={npz}.")
  has_labels = [k in arrays for k in ("train_labels", "test_labels")]
  if any(has_labels) and not all(has_labels):
    raise ValueError(f"{npz} must have both train_labels and test_labels or neither.")
  labels = ({"train": arrays["train_labels"], "test": arrays["test_labels"]} if all(has_labels)
            else None)
  num_labels = int(arrays["num_labels"]) if "num_labels" in arrays and labels is not None else None
  return data_lib.write_tfds(name, {"train": arrays["train"], "test": arrays["test"]}, data_dir=data_dir,
                             labels=labels, num_labels=num_labels, version=version)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--npz", required=True, help="the .npz file (vdiff.data.make_npz's keys)")
  parser.add_argument("--name", required=True, help="the TFDS dataset name, snake_case")
  parser.add_argument("--data_dir", required=True, help="the TFDS data directory to write into")
  parser.add_argument("--version", default="1.0.0", help="the dataset version X.Y.Z")
  args = parser.parse_args(argv)
  try:
    path = make_tfds(args.npz, name=args.name, data_dir=args.data_dir, version=args.version)
  except (ValueError, OSError) as e:
    print(f"[vdiff] {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  print(f"[vdiff] wrote {path}; train with --config.data.name={args.name} "
        f"--config.data.data_dir={args.data_dir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
