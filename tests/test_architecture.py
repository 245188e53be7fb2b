"""The house rules of docs/architecture.md, checked from the source (issue 21).

- no import circle between flowopd's packages, counting imports inside functions (a lazy import is for an
  optional heavy third-party dependency, never to hide a circle);
- no module imports another module's private (``_name``) name;
- no library module over 700 lines.

The checks read the modules' syntax trees, so they see every import statement, wherever it sits.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowopd"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every flowopd import in a module, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "flowopd" or target.startswith("flowopd."):
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in MODULES:
                        found.append((submodule, "", node.lineno))
                    else:
                        found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("flowopd")]
    return found


def _room(module: str) -> str:
    """The package a module belongs to: flowopd.bench.cli -> flowopd.bench; top-level modules are their own."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edges() -> list[tuple[str, str, int]]:
    return [(m, target, line) for m, p in MODULES.items() for target, _, line in _imports(m, p)]


def test_the_scanner_sees_function_level_and_relative_imports(tmp_path):
    """The checks below can fail: the scanner finds an import inside a function, and a private name."""
    src = "def f():\n    from flowopd.bench import evaluate\n    from flowopd.train.grpo import _secret\n"
    path = tmp_path / "x.py"
    path.write_text(src)
    found = _imports("flowopd.fake.x", path)
    assert ("flowopd.bench.evaluate", "", 2) in found
    assert ("flowopd.train.grpo", "_secret", 3) in found
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_circle_between_packages():
    graph: dict[str, set[str]] = collections.defaultdict(set)
    why: dict[tuple[str, str], str] = {}
    for module, target, line in _edges():
        a, b = _room(module), _room(target)
        if a != b and b != "flowopd":
            graph[a].add(b)
            why.setdefault((a, b), f"{MODULES[module].relative_to(ROOT)}:{line}")
    cycles = _cycles(graph)
    detail = [
        " -> ".join(c) + "  (" + ", ".join(f"{a}->{b} at {why[a, b]}" for a in c for b in c if (a, b) in why) + ")"
        for c in cycles
    ]
    assert not cycles, "package circles:\n" + "\n".join(detail)


def test_no_circle_between_modules():
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for module, target, _ in _edges():
        if target in MODULES and target != module and not MODULES[target].name == "__init__.py":
            graph[module].add(target)
    assert not _cycles(graph)


def test_no_import_of_another_modules_private_name():
    offenders = []
    scanned = dict(MODULES)
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        scanned[f"benchmarks.{path.stem}"] = path
    for module, path in scanned.items():
        for target, name, line in _imports(module, path):
            if name.startswith("_") and not name.startswith("__"):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{name}")
    assert not offenders, "\n".join(offenders)


def test_no_library_module_over_700_lines():
    long = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    over = [f"{MODULES[m].relative_to(ROOT)}: {n} lines" for m, n in sorted(long.items()) if n > MAX_LINES]
    assert not over, f"over {MAX_LINES} lines:\n" + "\n".join(over)
