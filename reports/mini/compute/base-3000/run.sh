#!/usr/bin/env bash
# What longer pretraining buys (issue 23, "what would move it"): the mini base pretrained 3,000 steps instead of
# 1,500 (the committed recipe, training/configs/mini_pretrain.toml, with max_steps=3000), evaluated on Table 1's
# four benchmarks, then the GRPO-OCR recipe for 24 iterations from it and, beside it, from the committed base.
# About 35 min of pretraining and 2 x 30 min of GRPO on 2 CPU cores (the two GRPO runs in parallel); run from the
# repository root of a clean checkout. Writes runs/base-3000/ and copies the small results here.
set -euo pipefail
PY=${PYTHON:-python}
HERE=reports/mini/compute/base-3000
export FLOWOPD_DATA_DIR=${FLOWOPD_DATA_DIR:-../shared/data}
R=runs/base-3000
mkdir -p "$R"

$PY -m flowopd.train pretrain training/configs/mini_pretrain.toml out=$R/pretrain max_steps=3000
$PY -m flowopd.bench evaluate $R/pretrain --out $R/eval-base-3000 --no-progress
$PY -m flowopd.bench evaluate mini:base --out $R/eval-base-1500 --no-progress
$PY -m flowopd.bench compare $R/eval-base-3000 $R/eval-base-1500

# GRPO-OCR, 24 iterations x 384 rollouts, from each base (the recipe's seed: the same prompt draws)
$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml model=$R/pretrain num_iterations=24 \
    output_dir=$R/grpo-ocr-base-3000 &
$PY -m flowopd.train grpo training/configs/mini_grpo_ocr.toml num_iterations=24 output_dir=$R/grpo-ocr-base-1500 &
wait
for b in 1500 3000; do
  $PY -m flowopd.bench evaluate $R/grpo-ocr-base-$b --benchmarks mini-ocr --out $R/eval-grpo-ocr-base-$b \
      --no-progress
  FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks $PY -m flowopd.bench evaluate $R/grpo-ocr-base-$b \
      --benchmarks mini-ocr-val --out $R/val-grpo-ocr-base-$b --no-progress
done
FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks $PY -m flowopd.bench evaluate $R/pretrain --benchmarks mini-ocr-val \
    --out $R/val-base-3000 --no-progress
FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks $PY -m flowopd.bench evaluate mini:base --benchmarks mini-ocr-val \
    --out $R/val-base-1500 --no-progress

for d in eval-base-3000 eval-grpo-ocr-base-1500 eval-grpo-ocr-base-3000 val-base-3000 val-base-1500 \
         val-grpo-ocr-base-1500 val-grpo-ocr-base-3000; do
  mkdir -p "$HERE/$d" && cp "$R/$d/results.json" "$HERE/$d/" && cp -r "$R/$d/scores" "$HERE/$d/"
done
cp $R/pretrain/train_log.csv "$HERE/pretrain_train_log.csv"
for b in 1500 3000; do cp $R/grpo-ocr-base-$b/metrics.jsonl "$HERE/grpo-ocr-base-$b.metrics.jsonl"; done
