"""Driver of the parity checks: ``python tests/parity/run.py SIDE WORKDIR [--only NAME,...]``.

SIDE is the environment this interpreter belongs to:

- ``official-torch``: torch 2.14 + image-reward, hpsv2, open_clip, openai clip, transformers 4.46, mmdet 3.3;
- ``official-paddle``: paddleocr 2.9.1 + paddlepaddle 2.6.2 (and flowopd without its dependencies);
- ``ours``: flowopd's own stack (transformers 5);
- ``ours-paddle``: flowopd in the PaddleOCR environment (our OCR scorer driving the official engine);
- ``compare``: no heavy imports; reads what the sides wrote and prints one table row per compared quantity.

Each ``check_<name>.py`` module maps the sides it runs on to functions that take the work directory and return
a JSON-able dict (written to ``WORKDIR/<name>/<side>.json``), and has a ``compare(work)`` that returns rows.
The official sides run first: they build the official model on seeded random weights and save them
(safetensors) for ours to load. A side that fails writes ``<side>.error`` and the others go on; the table then
says what could not be compared and why. ``nox -s parity`` runs the four sides in order.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save_json  # noqa: E402

CHECKS = ("imagereward", "hps", "aesthetic", "pickscore", "openclip", "geneval", "ocr")
SIDES = ("official-torch", "official-paddle", "ours", "ours-paddle", "compare")


def run_side(side: str, work: Path, names: list[str]) -> int:
    failures = 0
    for name in names:
        module = importlib.import_module(f"check_{name}")
        fn = module.STEPS.get(side)
        if fn is None:
            continue
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{side}.error").unlink(missing_ok=True)
        start = time.time()
        print(f"[parity] {side}: {name} ...", flush=True)
        try:
            result = fn(work)
        except Exception as e:  # recorded, reported in the table; the other checks go on
            failures += 1
            (out / f"{side}.error").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            print(f"[parity] {side}: {name} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        result["seconds"] = round(time.time() - start, 1)
        save_json(out / f"{side}.json", result)
        print(f"[parity] {side}: {name} done in {result['seconds']} s", flush=True)
    return failures


def compare(work: Path, names: list[str]) -> int:
    rows = []
    for name in names:
        module = importlib.import_module(f"check_{name}")
        errors = {p.stem: p.read_text().split("\n")[0] for p in sorted((work / name).glob("*.error"))}
        missing = [s for s in module.STEPS if s != "compare" and not (work / name / f"{s}.json").is_file()]
        if errors or missing:
            why = "; ".join(f"{side}: {msg}" for side, msg in errors.items()) or f"not run: {', '.join(missing)}"
            rows.append({"scorer": name, "quantity": "-", "n": 0, "max_abs_diff": None,
                         "tolerance": getattr(module, "TOLERANCE", None), "ok": False, "note": why})
            continue
        rows.extend(module.compare(work))
    header = f"| {'scorer':<12} | {'quantity':<56} | {'n':>4} | {'max abs diff':>12} | {'tolerance':>9} | ok  |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
        lines.append(f"| {r['scorer']:<12} | {r['quantity']:<56} | {r['n']:>4} | {diff:>12} | {tol:>9} | "
                     f"{'yes' if r['ok'] else 'NO ':<3} |")
    notes = [f"- {r['scorer']} / {r['quantity']}: {r['note']}" for r in rows if r.get("note")]
    table = "\n".join(lines + ([""] + notes if notes else []))
    print(table)
    save_json(work / "parity.json", rows)
    (work / "parity.md").write_text(table + "\n")
    print(f"\n[parity] table written to {work / 'parity.md'} and {work / 'parity.json'}")
    return sum(not r["ok"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("work", type=Path)
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks (default: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"error: --only: unknown check(s) {unknown}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if args.side == "compare":
        return 1 if compare(args.work, names) else 0
    failures = run_side(args.side, args.work, names)
    # a failed side is reported by compare; the side itself exits 0 so that the next sides still run
    print(json.dumps({"side": args.side, "failed_checks": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

