"""The package logs through `logging` (no print outside its command-line entry points); -q / -v on the CLI."""
import ast
import json
import logging
from pathlib import Path

import pytest

from tests.conftest import REPO
from voiceprint.serving import cli
from voiceprint.core import log
from voiceprint.core.outputs import versions_path, write_metrics

# Command-line modules and entry points, whose output is their product (JSON, file names, flags).
CLI_MODULES = {"cli.py"}


def _entry_point_lines(tree: ast.Module) -> set[int]:
    """Lines of ``def main`` functions and ``if __name__ == "__main__":`` blocks: a module's command line."""
    lines = set()
    for node in ast.walk(tree):
        is_main = isinstance(node, ast.FunctionDef) and node.name == "main"
        is_guard = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
        if is_main or is_guard:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_the_package_prints_nothing_outside_its_command_lines():
    offenders = []
    for path in sorted((REPO / "voiceprint").rglob("*.py")):
        if path.name in CLI_MODULES:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        allowed = _entry_point_lines(tree)
        offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                      and node.lineno not in allowed]
    assert offenders == []


def test_every_module_that_logs_uses_its_own_logger():
    for path in sorted((REPO / "voiceprint").rglob("*.py")):
        text = path.read_text()
        if "logging.getLogger(" in text:
            assert "logger = logging.getLogger(__name__)" in text or path.name == "log.py", path


@pytest.fixture
def package_logger():
    """The CLI configures the package logger: put it back as it was after each test."""
    logger = logging.getLogger(log.PACKAGE_LOGGER)
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.mark.parametrize("flags, shown", [([], {"info", "warning"}), (["-q"], {"warning"}),
                                          (["--quiet"], {"warning"}), (["-v"], {"debug", "info", "warning"})])
def test_quiet_and_verbose_set_what_the_cli_shows(tmp_path, capsys, package_logger, flags, shown):
    assert cli.main(["speakers", "list", "--registry", str(tmp_path / "r.sqlite"), *flags]) == 0
    capsys.readouterr()
    module_logger = logging.getLogger("voiceprint.training.fit")
    module_logger.debug("a debug line")
    module_logger.info("an info line")
    module_logger.warning("a warning line")
    err = capsys.readouterr().err
    said = {level for level, line in (("debug", "debug voiceprint.training.fit: a debug line"),
                                      ("info", "an info line"), ("warning", "warning: a warning line"))
            if line in err}
    assert said == shown


def test_quiet_and_verbose_together_are_a_usage_error(tmp_path, package_logger):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["speakers", "list", "--registry", str(tmp_path / "r.sqlite"), "-q", "-v"])
    assert exit_.value.code == 2


def test_metrics_hold_numbers_and_the_versions_go_beside_them(tmp_path):
    write_metrics(tmp_path / "metrics" / "eval.json", {"eer": 0.25, "n": 3})
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text()) == {"eer": 0.25, "n": 3}
    assert versions_path(tmp_path / "metrics" / "eval.json") == tmp_path / "versions" / "eval.json"
    versions = json.loads((tmp_path / "versions" / "eval.json").read_text())
    assert versions["python"] and "numpy" in versions
    assert versions_path(Path("out/report.json")) == Path("out/report.versions.json")
