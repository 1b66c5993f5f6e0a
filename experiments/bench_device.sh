#!/usr/bin/env bash
# Accelerator benchmark (experiments/bench_device.py): peak bf16 / float32 matmul FLOP/s, the train steps
# of VDM, DiffEnc and CDM at the papers' size and batch per device (float32 and bfloat16), the samplers
# and the evaluator, in under eight minutes on a GPU or TPU; JSON with the device named and each train
# step's fraction of the measured peak.
#
#   bash experiments/bench_device.sh OUTDIR                 # paper size (GPU / TPU)
#   SIZE=tiny bash experiments/bench_device.sh OUTDIR       # CPU-sized networks (a few minutes on a CPU)
#
# Writes OUTDIR/bench_device.json (rewritten after every row, so a run stopped part-way keeps its rows)
# and OUTDIR/bench_device.json.rows.jsonl. ROW_TIMEOUT_S and BUDGET_S override the per-row and total
# time limits (defaults: 150 s and 460 s at paper size).
set -euo pipefail
SIZE="${SIZE:-paper}"
OUTDIR="${1:-bench_device_out}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR"
OUT="$(cd "$OUTDIR" && pwd)/bench_device.json"
ARGS=(--size "$SIZE" --out "$OUT")
[[ -n "${ROW_TIMEOUT_S:-}" ]] && ARGS+=(--row-timeout-s "$ROW_TIMEOUT_S")
[[ -n "${BUDGET_S:-}" ]] && ARGS+=(--budget-s "$BUDGET_S")
[[ -n "${ROWS:-}" ]] && ARGS+=(--rows "$ROWS")
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -m experiments.bench_device "${ARGS[@]}"
echo "wrote $OUT"
