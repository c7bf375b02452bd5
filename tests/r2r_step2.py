"""A stand-in for R2R's `step_2_llm_continuation.py` with its command line and its contract:
it reads the whole input CSV (step 1's comparison: one row per token of each sample, its
`data_id` repeated), keeps the half-open range `[--low, --high)` of `data_id`, continues only
the mismatched tokens (prediction != label) and writes one row per mismatched token into
`--output_path` under a name of its own, `generation_results_data_{L}_to_{H}_real.csv`: a
`data_id` repeats there as often as its sample has mismatches. Each call is appended to
`calls.log` beside the input, so a test can count them."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ("--input_path", "--output_path", "--tp_size", "--batch_size"):
    parser.add_argument(flag, required=True)
parser.add_argument("--low", type=int, required=True)
parser.add_argument("--high", type=int, required=True)
args = parser.parse_args()

source = Path(args.input_path)
with (source.parent / "calls.log").open("a") as calls:
    calls.write(f"{args.low} {args.high}\n")
print(f"[INFO] Task range: data_id [{args.low}, {args.high}) ({args.high - args.low} samples)")
with source.open() as f:
    rows = [r for r in csv.DictReader(f) if args.low <= int(r["data_id"]) < args.high]
mismatches = [r for r in rows if r["prediction"] != r["label"]]
target = Path(args.output_path) / f"generation_results_data_{args.low}_to_{args.high}_real.csv"
with target.open("w", newline="") as f:
    fields = ["data_id", "token", "prediction", "label", "continuation"]
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in mismatches:
        writer.writerow({**r, "continuation": f"because {r['label']}"})
samples = len({r["data_id"] for r in mismatches})
print(f"Generated continuations for {len(mismatches)} mismatches in {samples} samples")
print(f"Saved results to {target}")
