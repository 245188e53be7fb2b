#!/usr/bin/env bash
# The OPD estimators side by side on the mini world (issue 18): every run is training/configs/mini_opd_merge.toml
# (merge init, MAR 0.04 toward the base, 36 iterations) with only the loss fields overridden, for each seed.
# Usage: bash reports/mini/opd-modes/run.sh [SEED ...]   (default 42 43; two runs at a time, ~10-20 min each on 2 cores)
#        JOBS="pathwise-s43 gkd-s42" bash reports/mini/opd-modes/run.sh   (those runs only)
# Trains into runs/opd-modes/<name>-s<seed>, evaluates the last checkpoint into reports/mini/opd-modes/<name>-s<seed>.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY="${PYTHON:-python}"
declare -A MODES=(
  [kl_only+step]="mode=kl_only"
  [kl_only+to_go]="mode=kl_only kl_advantage=to_go"
  [sample]="mode=kl_only kl_estimator=sample"
  [sample+to_go]="mode=kl_only kl_estimator=sample kl_advantage=to_go"
  [pathwise]="mode=pathwise"
  [pathwise+to_go]="mode=pathwise kl_advantage=to_go"
  [gkd]="mode=gkd"
  [mixed]="mode=mixed kl_grad=pathwise"
)
ORDER=(kl_only+step sample pathwise pathwise+to_go sample+to_go kl_only+to_go gkd mixed)
SEEDS=("$@")
[ $# -gt 0 ] || SEEDS=(42 43)
one() {  # name seed
  local name=$1 seed=$2 tag="$1-s$2"
  local run="runs/opd-modes/$tag" out="reports/mini/opd-modes/$tag"
  if [ ! -f "$out/results.json" ]; then
    # shellcheck disable=SC2086
    nice -n "${NICE:-0}" "$PY" -m flowopd.train opd training/configs/mini_opd_merge.toml output_dir="$run" seed="$seed" progress=false \
      resume=latest ${MODES[$name]} > "$run.log" 2>&1
    nice -n "${NICE:-0}" "$PY" -m flowopd.bench evaluate "$run/checkpoints/iteration-000036/adapter" --out "$out" --no-progress \
      --benchmarks mini-geneval,mini-ocr,mini-quality,mini-pick >> "$run.log" 2>&1
  fi
  echo "done $tag"
}
mkdir -p runs/opd-modes
# JOBS="name-sSEED ..." runs those instead of every estimator at every seed
if [ -z "${JOBS:-}" ]; then
  for seed in "${SEEDS[@]}"; do for name in "${ORDER[@]}"; do JOBS="${JOBS:-} $name-s$seed"; done; done
fi
for job in $JOBS; do
  name=${job%-s*} seed=${job##*-s}
  # pathwise at seed 42 is the recipe itself: the published mini:opd-merge (reports/mini/opd-merge)
  if [ "$job" = "pathwise-s42" ]; then continue; fi
  one "$name" "$seed" &
  if [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; then wait -n; fi
done
wait
