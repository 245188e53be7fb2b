#!/usr/bin/env bash
# Shared versus independent starting noise in a GRPO group (issue 23: a lever on the zero-variance groups).
# The mini recipes set same_group_noise = true (a group's 24 samples differ only through their 2 SDE steps);
# Flow-GRPO's default, and GRPOConfig's, is false. Two GRPO-OCR runs from mini:base with the recipe's seed (the
# same prompt draws, SDE seeds and windows; only the starting noise of the samples after each group's first
# differs), 72 iterations each, then mini-ocr-val (1,068 train-split strings, seed 1) of their checkpoints,
# paired against mini:base. Run from the repository root of a clean checkout; about 2 h for the two runs in
# parallel on 2 CPU cores (one thread each, ~100 s an iteration each), 2 min per evaluation.
#
# As run (8536aa7): the shared arm is ../base-3000's 1,500-step run (24 iterations, threads = 4, checkpoints every
# 10; its iteration-24 evaluation and mini:base's are ../base-3000/val-grpo-ocr-base-1500 and val-base-1500),
# resumed here to 48 with the first command below (threads = 1, checkpoints every 12) beside the independent arm;
# then both arms were resumed from 48 to 72 (`num_iterations=72 resume=latest`, under `nice` while CI ran beside
# them; resuming is exact). From scratch, drop `resume=latest` and run both arms from iteration 0 to 72.
set -euo pipefail
PY=${PYTHON:-python}
HERE=reports/mini/compute/group-noise
export FLOWOPD_DATA_DIR=${FLOWOPD_DATA_DIR:-../shared/data}
R=runs/group-noise
mkdir -p "$R"

$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml num_iterations=72 save_every=12 threads=1 \
    output_dir=$R/shared-ocr resume=latest &
$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml num_iterations=72 save_every=12 threads=1 \
    same_group_noise=false output_dir=$R/indep-ocr &
wait

val() { FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks $PY -m flowopd.bench evaluate "$1" \
          --benchmarks mini-ocr-val --out "$2" --no-progress; }
for it in 36 48 60 72; do val $R/shared-ocr/checkpoints/iteration-0000$it $R/val-shared-$it; done
for it in 12 24 36 48 60 72; do val $R/indep-ocr/checkpoints/iteration-0000$it $R/val-indep-$it; done

for d in $R/val-*; do
  n=$(basename "$d"); mkdir -p "$HERE/$n" && cp "$d/results.json" "$HERE/$n/" && cp -r "$d/scores" "$HERE/$n/"
done
cp $R/indep-ocr/metrics.jsonl "$HERE/grpo-ocr-indep.metrics.jsonl"
tail -n +26 $R/shared-ocr/metrics.jsonl > "$HERE/grpo-ocr-shared-25-72.metrics.jsonl"  # after the probe + 24 rows
$PY $HERE/table.py
