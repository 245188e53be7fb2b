"""Build reports/mini/opd-modes/README.md's table from the evaluated runs (after run.sh).

    python reports/mini/opd-modes/table.py

For each estimator, its seeds are pooled (`compare A1,A2 B`: the values are seed means, the interval a paired
prompt bootstrap) and compared with the merge init (reports/mini/merge) and GRPO-Mix (reports/mini/grpo-mix) on the
four Table 1 benchmarks and Table 1's Average. pathwise at seed 42 is the published mini:opd-merge
(reports/mini/opd-merge): the same recipe and seed.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
ORDER = ["kl_only+step", "kl_only+to_go", "sample", "sample+to_go", "pathwise", "pathwise+to_go", "gkd", "mixed"]
BENCH = ["mini-geneval", "mini-ocr", "mini-quality", "mini-pick"]
REFERENCES = {"merge init": "reports/mini/merge", "GRPO-Mix": "reports/mini/grpo-mix"}


def runs_of(name: str) -> list[str]:
    found = []
    for seed in (42, 43, 44):
        if name == "pathwise" and seed == 42:
            found.append("reports/mini/opd-merge")
        elif (HERE / f"{name}-s{seed}" / "results.json").is_file():
            found.append(str((HERE / f"{name}-s{seed}").relative_to(ROOT)))
    return found


def compare(runs: list[str], reference: str, out: Path) -> dict[tuple[str, str], dict[str, str]]:
    # compare pools replicates side by side: the single reference run stands once per seed of the estimator
    cmd = [sys.executable, "-m", "flowopd.bench", "compare", ",".join(runs), ",".join([reference] * len(runs)),
           "--benchmarks",
           ",".join(BENCH), "--combined", "table1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out / "compare.csv") as f:
        return {(r["benchmark"], r["metric"]): r for r in csv.DictReader(f)}


def cell(row: dict[str, str], digits: int = 3) -> str:
    star = "*" if row["significant"] == "True" else ""
    return (f"{float(row['diff']):+.{digits}f} [{float(row['ci_low']):+.{digits}f}, "
            f"{float(row['ci_high']):+.{digits}f}]{star}")


def main() -> None:
    lines = ["| estimator | seeds | " + " | ".join(f"{b} (vs merge)" for b in BENCH)
             + " | Average vs merge | Average vs GRPO-Mix |", "|---" * (len(BENCH) + 4) + "|"]
    values = ["| estimator | " + " | ".join(BENCH) + " | Average |", "|---" * (len(BENCH) + 2) + "|"]
    for name in ORDER:
        runs = runs_of(name)
        if not runs:
            continue
        rows = {ref: compare(runs, path, HERE / "compare" / f"{name}-vs-{Path(path).name}")
                for ref, path in REFERENCES.items()}
        merge, mix = rows["merge init"], rows["GRPO-Mix"]
        per_bench = [cell(merge[(b, "mean")]) for b in BENCH]
        avg = ("table1:Average", "combined")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(per_bench)
                     + f" | {cell(merge[avg])} | {cell(mix[avg])} |")
        values.append(f"| {name} | " + " | ".join(f"{float(merge[(b, 'mean')]['value_a']):.3f}" for b in BENCH)
                      + f" | {float(merge[avg]['value_a']):.3f} |")
    first = next(iter(REFERENCES.values()))
    ref_rows = compare(runs_of("pathwise")[:1], first, HERE / "compare" / "_reference")
    values.append("| merge init | " + " | ".join(f"{float(ref_rows[(b, 'mean')]['value_b']):.3f}" for b in BENCH)
                  + f" | {float(ref_rows[('table1:Average', 'combined')]['value_b']):.3f} |")
    (HERE / "table.md").write_text("Differences (paired 95% CI, * excludes 0):\n\n" + "\n".join(lines)
                                   + "\n\nValues (seed means):\n\n" + "\n".join(values) + "\n")
    print((HERE / "table.md").read_text())


if __name__ == "__main__":
    main()
