#!/usr/bin/env bash
# How far GRPO moves the policy per rollout batch (issue 23: why the GRPO-OCR teacher climbs so slowly).
# Every mini recipe takes one AdamW step an iteration (updates_per_iteration = 1), so the importance ratio stays 1
# and the clip never acts (../group-noise: train/ratio_* = 1, train/clip_frac = 0 in every iteration); 72
# iterations are 72 optimizer steps. Two arms against ../group-noise's independent-noise arm (the baseline, same
# seed, so the same prompt draws, SDE seeds and windows): four AdamW steps an iteration over quarters of the same
# rollouts (Flow-GRPO's split of a batch into optimizer steps; the sampling cost is unchanged), and one step at
# four times the learning rate. Then mini-ocr-val (1,068 train-split strings, seed 1) of their checkpoints, paired
# against mini:base and against the baseline. Run from the repository root of a clean checkout; the two runs in
# parallel on 2 CPU cores, one thread each, 84-176 s an iteration (86 min each as run); 2-3 min per evaluation.
#
# As run (in a clean checkout of 9b7003e): both arms with num_iterations=48 (output_dir runs/steps/indep-ocr-ARM),
# the evaluations made while the runs went on.
set -euo pipefail
PY=${PYTHON:-python}
HERE=reports/mini/compute/policy-steps
export FLOWOPD_DATA_DIR=${FLOWOPD_DATA_DIR:-../shared/data}
R=runs/policy-steps
N=${N:-48}
mkdir -p "$R"

$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml num_iterations=$N save_every=12 threads=1 \
    same_group_noise=false updates_per_iteration=4 output_dir=$R/upd4 &
$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml num_iterations=$N save_every=12 threads=1 \
    same_group_noise=false learning_rate=4e-3 output_dir=$R/lr4e-3 &
wait

for arm in upd4 lr4e-3; do
  for it in $(seq 12 12 "$N"); do
    d=$R/val-$arm-$it
    FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks $PY -m flowopd.bench evaluate \
      "$R/$arm/checkpoints/iteration-$(printf %06d "$it")" --benchmarks mini-ocr-val --out "$d" --no-progress
    mkdir -p "$HERE/val-$arm-$it"
    cp "$d/results.json" "$HERE/val-$arm-$it/" && cp -r "$d/scores" "$HERE/val-$arm-$it/"
  done
  cp "$R/$arm/metrics.jsonl" "$HERE/grpo-ocr-$arm.metrics.jsonl"
done
$PY $HERE/table.py
