"""The CLI stays thin: a command module never imports another command module (shared options live in
cli/options.py, shared rendering in cli/render.py, domain logic in loratool/ops)."""

from __future__ import annotations

import ast
from pathlib import Path

from loratool.cli.main import COMMANDS

CLI = Path(__file__).resolve().parents[2] / "loratool" / "cli"
COMMAND_MODULES = {module for module, _ in COMMANDS.values()}


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from loratool.cli import mix
    return found


def test_command_modules_do_not_import_each_other():
    assert len(COMMAND_MODULES) >= 9
    offenders = {}
    for path in sorted(CLI.glob("*.py")):
        own = f"loratool.cli.{path.stem}"
        bad = sorted((_imported_modules(path) & COMMAND_MODULES) - {own})
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_the_check_sees_an_import_of_a_command(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from loratool.cli.mix import read_inputs\n    from loratool.cli import extract\n")
    assert _imported_modules(probe) & COMMAND_MODULES == {"loratool.cli.mix", "loratool.cli.extract"}
