#!/usr/bin/env bash
# MAR in the reward-hacking setting over three training seeds (issue 23): the merge cold start distilled from the
# GRPO-PickScore teacher alone (training/configs/mini_opd_mar_hacking.toml, 36 iterations) at MAR weight W = 0,
# 0.04 (the public weight, the recipe's) and 0.4, seeds 42 (the published runs), 43 and 44. Each run is evaluated on
# the validation benchmarks (the decision, val-mar-W[-sS]/) and on the test benchmarks (mar-W[-sS]/); seed 42 keeps
# the directory names it was published under (mar-W/, val-mar-W/). Then diversity.py and table.py.
# Usage: bash reports/mini/mar-hacking/run.sh            (the 9 runs, PARALLEL=3 at a time, ~15-20 min per round)
#        JOBS="0-s43 0.4-s44" bash reports/mini/mar-hacking/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY="${PYTHON:-python}"
OUT=reports/mini/mar-hacking
VAL="mini-geneval-val,mini-quality-val,mini-pick-val"
one() {  # weight seed
  local w=$1 seed=$2 tag="$1-s$2" suffix="-s$2"
  [ "$seed" = 42 ] && suffix=""
  local run="runs/mar-hacking/$tag"
  if [ ! -f "$OUT/val-mar-$w$suffix/results.json" ] || [ ! -f "$OUT/mar-$w$suffix/results.json" ] \
      || [ -n "${REDO:-}" ]; then
    /usr/bin/time -f "$tag: %e s wall" "$PY" -m flowopd.train opd training/configs/mini_opd_mar_hacking.toml \
      output_dir="$run" mar_weight="$w" seed="$seed" progress=false resume=latest > "$run.log" 2>&1
    local ckpt="$run/checkpoints/iteration-000036/adapter"
    FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks "$PY" -m flowopd.bench evaluate "$ckpt" \
      --out "runs/mar-hacking/eval/val-mar-$w$suffix" --benchmarks "$VAL" --no-progress >> "$run.log" 2>&1
    "$PY" -m flowopd.bench evaluate "$ckpt" --out "runs/mar-hacking/eval/mar-$w$suffix" \
      --benchmarks mini-geneval,mini-ocr,mini-quality,mini-pick,mini-compbench --no-progress >> "$run.log" 2>&1
    for d in "val-mar-$w$suffix" "mar-$w$suffix"; do
      rm -rf "${OUT:?}/$d"; mkdir -p "$OUT/$d"
      cp -r "runs/mar-hacking/eval/$d/results.json" "runs/mar-hacking/eval/$d/scores" "$OUT/$d/"
    done
  fi
  echo "done $tag"
}
mkdir -p runs/mar-hacking/eval
if [ -z "${JOBS:-}" ]; then
  for seed in 42 43 44; do for w in 0 0.04 0.4; do JOBS="${JOBS:-} $w-s$seed"; done; done
fi
for job in $JOBS; do
  one "${job%-s*}" "${job##*-s}" &
  if [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-3}" ]; then wait -n; fi
done
wait

# Added after the runs (not part of the pre-registered rule): the base's own evaluations, the reference for
# diversity.py/table.py (is a lower diversity with MAR a collapse, or a return toward the base?).
"$PY" -m flowopd.bench evaluate mini:base --out runs/mar-hacking/eval/base \
  --benchmarks mini-geneval,mini-ocr,mini-quality,mini-pick,mini-compbench --no-progress
FLOWOPD_BENCHMARKS_DIR=training/val_benchmarks "$PY" -m flowopd.bench evaluate mini:base \
  --out runs/mar-hacking/eval/val-base --benchmarks "$VAL" --no-progress
for d in base val-base; do
  rm -rf "${OUT:?}/$d"; mkdir -p "$OUT/$d"
  cp -r "runs/mar-hacking/eval/$d/results.json" "runs/mar-hacking/eval/$d/scores" "$OUT/$d/"
done
