#!/usr/bin/env bash
# The reward-hacking monitor on the mini world (issue 23): each single-reward teacher recipe, and the hacking
# ablation (the merge init distilled from the PickScore teacher alone, without MAR), trained with the probe on,
# then drawn by `python -m flowopd.train.diagnostics monitor` into reports/mini/monitor/<name>.png; each run's
# metrics.jsonl is kept beside its plot.
# The runs are the recipes' first iterations (a CPU budget: the GenEval and OCR recipes' 190/320 iterations of 384
# rollouts were made on an H100); since the probe changes nothing that is trained (tests/test_monitor_probe.py),
# they are the first iterations of the committed teachers' own runs on the same device.
# Usage: bash reports/mini/monitor/run.sh            (every run; two at a time)
#        JOBS="grpo-pick hack-pick" bash reports/mini/monitor/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY="${PYTHON:-python}"
declare -A RUNS=(
  [grpo-geneval]="grpo training/configs/mini_grpo_geneval.toml num_iterations=12 monitor_probe_every=3"
  [grpo-ocr]="grpo training/configs/mini_grpo_ocr.toml num_iterations=12 monitor_probe_every=3"
  [grpo-quality]="grpo training/configs/mini_grpo_quality.toml num_iterations=36 monitor_probe_every=6"
  [grpo-pick]="grpo training/configs/mini_grpo_pick.toml num_iterations=36 monitor_probe_every=6"
  [hack-pick]="opd training/configs/mini_opd_mar_hacking.toml mar_weight=0 monitor_probe_every=6"
)
declare -A LABELS=(
  [grpo-geneval]="GRPO-GenEval recipe, first 12 iterations"
  [grpo-ocr]="GRPO-OCR recipe, first 12 iterations"
  [grpo-quality]="GRPO-DeQA recipe, first 36 iterations"
  [grpo-pick]="GRPO-PickScore recipe, first 36 iterations"
  [hack-pick]="OPD from the PickScore teacher alone, no MAR (hacking ablation)"
)
ORDER=(grpo-geneval grpo-ocr grpo-quality grpo-pick hack-pick)
one() {
  local name=$1 run="runs/monitor/$1" out="reports/mini/monitor"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name: %e s wall, %U s user" "$PY" -m flowopd.train ${RUNS[$name]} output_dir="$run" \
    progress=false resume=latest > "$run.log" 2>&1
  "$PY" -m flowopd.train.diagnostics monitor "$run" --labels "${LABELS[$name]}" --out "$out/$name.png" >> "$run.log" 2>&1
  cp "$run/metrics.jsonl" "$out/$name.metrics.jsonl"
  grep "s wall" "$run.log" || true
  echo "done $name"
}
mkdir -p runs/monitor
for name in ${JOBS:-${ORDER[@]}}; do
  one "$name" &
  if [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; then wait -n; fi
done
wait
