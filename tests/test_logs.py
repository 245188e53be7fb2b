"""Logging instead of print (issue 21, point 5): library modules log through their module logger, command
lines print their results, one configuration (flowopd.logs) behind every ``--log-level``.

The print scan reads every module of flowopd as source (no import): ``print``, ``sys.stdout.write``,
``sys.stderr.write`` and ``tqdm.write`` are allowed only in the command-line code named in CLI_CODE.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from flowopd import logs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flowopd"

#: module (relative to flowopd/) -> the top-level functions that are command-line code, or None: the whole module
CLI_CODE: dict[str, set[str] | None] = {
    "bench/cli.py": None,  # python -m flowopd.bench
    "paper/__main__.py": None,  # python -m flowopd.paper
    "train/__main__.py": None,  # python -m flowopd.train
    "errors.py": {"run_cli", "_show_warning"},  # the CLIs' error boundary: the one-line error, warnings
    "scorers/server.py": {"_main"},  # serve: prints the URL it serves at (callers read it) and its shutdown
    "train/diagnostics.py": {"main"},
    "train/merge_cli.py": {"main"},
    "train/publish.py": {"main"},
    "train/pretrain.py": {"main"},
    "train/grpo.py": {"main"},
    "train/opd.py": {"main"},
    "train/sft.py": {"main"},
}


def _writes_to_console(node: ast.AST) -> bool:
    if isinstance(node, ast.Name) and node.id == "print":  # a call, or print passed on as a callback
        return True
    if isinstance(node, ast.Attribute) and node.attr == "write":
        target = node.value
        if isinstance(target, ast.Name) and target.id == "tqdm":
            return True
        return (isinstance(target, ast.Attribute) and target.attr in ("stdout", "stderr")
                and isinstance(target.value, ast.Name) and target.value.id == "sys")
    return False


def console_writes(path: Path) -> list[tuple[str, int]]:
    """(top-level function or class.method, line) of every console write in the module at ``path``."""
    found = []
    for top in ast.parse(path.read_text(), filename=str(path)).body:
        scopes = [(top.name, top)] if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef) else []
        if isinstance(top, ast.ClassDef):
            scopes = [(f"{top.name}.{f.name}", f) for f in top.body if isinstance(f, ast.FunctionDef)]
            scopes.append((top.name, ast.Module(body=[s for s in top.body if not isinstance(s, ast.FunctionDef)],
                                                type_ignores=[])))
        if not scopes:
            scopes = [("<module>", top)]
        for name, scope in scopes:
            found += [(name, n.lineno) for n in ast.walk(scope) if _writes_to_console(n)]
    return found


def test_the_scan_finds_every_form_of_console_write(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import sys\nfrom tqdm import tqdm\nprint('top')\n"
        "def f(log=print):\n    sys.stderr.write('x')\n"
        "class C:\n    def g(self):\n        tqdm.write('y')\n        sys.stdout.write('z')\n"
        "def quiet(logger):\n    logger.info('fine')\n    sink = open('f')\n    sink.write('fine')\n"
    )
    assert console_writes(module) == [("<module>", 3), ("f", 4), ("f", 5), ("C.g", 8), ("C.g", 9)]


def test_no_library_module_writes_to_the_console_outside_command_line_code():
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        allowed = CLI_CODE.get(module, set())
        if allowed is None:
            continue
        offending += [f"flowopd/{module}:{line} in {name}" for name, line in console_writes(path)
                      if name not in allowed]
    assert not offending, "print in library code (log through logging.getLogger(__name__)): " + ", ".join(offending)


def test_the_allow_list_names_command_line_code_that_exists():
    for module, functions in CLI_CODE.items():
        path = PACKAGE / module
        assert path.is_file(), f"CLI_CODE: flowopd/{module} does not exist"
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert functions is None or functions <= defined, f"CLI_CODE: flowopd/{module} has no {functions - defined}"


# ---------------------------------------------------------------------------------------------- configuration


@pytest.fixture(autouse=True)
def _restore_flowopd_logger():
    """The command lines below configure the ``flowopd`` logger: leave it as the test found it."""
    logger = logging.getLogger(logs.ROOT)
    handlers, level = logger.handlers[:], logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_info_goes_to_stdout_as_a_plain_line_and_warnings_to_stderr(capsys):
    logs.configure("INFO")
    logging.getLogger("flowopd.bench.evaluate").info("mini-ocr: all 8 images cached in runs/x")
    logging.getLogger("flowopd.train.opd").warning("opd: the KL term's expected policy gradient is zero")
    logging.getLogger("flowopd.train.opd").debug("not at INFO")
    out, err = capsys.readouterr()
    assert out == "mini-ocr: all 8 images cached in runs/x\n"
    assert err == "opd: the KL term's expected policy gradient is zero\n"


def test_a_higher_level_keeps_warnings_and_a_reconfiguration_replaces_the_handler(capsys):
    logs.configure("INFO")
    logs.configure("WARNING")
    logger = logging.getLogger("flowopd.train.runs")
    logger.info("progress")
    logger.warning("resume: save_every = 2 (the checkpoint had 1)")
    assert capsys.readouterr() == ("", "resume: save_every = 2 (the checkpoint had 1)\n")  # once: one handler
    logs.configure(None)  # a subcommand under a dispatcher that set the level already
    logger.info("still quiet")
    assert capsys.readouterr() == ("", "")
    logs.configure("DEBUG")
    logger.debug("now shown")
    assert capsys.readouterr().out == "now shown\n"


def test_the_server_configuration_logs_everything_to_stderr_with_time_stamps(capsys):
    logs.configure("INFO", logs.SERVER_FORMAT, stderr_only=True)
    logging.getLogger("flowopd.scorers.server").info("received SIGTERM, shutting down")
    out, err = capsys.readouterr()
    assert out == "" and err.rstrip().endswith("flowopd.scorers.server INFO: received SIGTERM, shutting down")


def test_configure_refuses_an_unknown_level():
    with pytest.raises(ValueError, match="--log-level 'LOUD': expected one of DEBUG, INFO, WARNING, ERROR"):
        logs.configure("LOUD")


# ---------------------------------------------------------------------------------------------- --log-level


def _bench(argv):
    from flowopd.bench.cli import main

    return main(argv)


def _train(argv):
    from flowopd.train.__main__ import main

    return main(argv)


def _paper(argv):
    from flowopd.paper.__main__ import main

    return main(argv)


def _serve(argv):
    from flowopd.scorers.server import main

    return main(argv)


def _diagnostics(argv):
    from flowopd.train.diagnostics import main

    return main(argv)


def _merge(argv):
    from flowopd.train.merge_cli import main

    return main(argv)


@pytest.mark.parametrize(
    "cli, argv",
    [
        (_bench, ["list", "--log-level", "LOUD"]),
        (_bench, ["check", "results.json", "--log-level=LOUD"]),
        (_train, ["grpo", "recipe.toml", "--log-level", "LOUD"]),
        (_train, ["merge", "--log-level=LOUD", "--adapters", "a", "b", "--out", "c"]),
        (_paper, ["table", "table1", "--log-level", "LOUD"]),
        (_serve, ["mini-geneval", "--log-level", "LOUD"]),
        (_diagnostics, ["rewards", "run", "--out", "x.png", "--log-level", "LOUD"]),
        (_merge, ["--adapters", "a", "b", "--out", "c", "--log-level", "LOUD"]),
    ],
    ids=["bench", "bench=", "train", "train-merge", "paper", "serve", "diagnostics", "merge_cli"],
)
def test_a_bad_log_level_is_refused_naming_the_flag(capsys, cli, argv):
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "--log-level" in err and "'LOUD'" in err and "DEBUG" in err, err


def test_a_log_level_without_a_value_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        _train(["publish", "run", "mini:x", "--log-level"])
    assert stop.value.code == 2 and "--log-level: expected one argument" in capsys.readouterr().err


def test_the_level_reaches_the_library_and_results_still_print(tmp_path, capsys):
    results = REPO / "reports" / "mini" / "base" / "results.json"
    thresholds = tmp_path / "floors.toml"
    thresholds.write_text('[floors.default]\n"mini-geneval/mean" = 0.0\n')
    assert _bench(["check", str(results), "--thresholds", str(thresholds), "--log-level", "warning"]) == 0
    assert logging.getLogger(logs.ROOT).level == logging.WARNING
    assert capsys.readouterr().out == "ok: 1 metrics at or above their floors\n"  # a result, not a log
    assert _bench(["check", str(results), "--thresholds", str(thresholds)]) == 0
    assert logging.getLogger(logs.ROOT).level == logging.INFO  # the default


def test_the_train_dispatcher_takes_the_flag_anywhere_after_the_subcommand(tmp_path, capsys):
    # publish's own arguments are positional: with the flag taken out they are what publish sees
    assert _train(["publish", "--log-level", "ERROR", str(tmp_path / "no-run"), str(tmp_path / "dest")]) == 2
    assert logging.getLogger(logs.ROOT).level == logging.ERROR
    assert "no-run" in capsys.readouterr().err
