"""Import directions (DESIGN.md, "Inside ixc_engine/"): front ends sit on top, nothing below reaches up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ixc_engine"
FRONT_ENDS = ("ixc_engine.cli", "ixc_engine.serve", "ixc_engine.report", "ixc_engine.integrations")


def imported(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (at any depth: lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def reaching(files, banned) -> list[str]:
    return [f"{p.relative_to(PKG.parent)} imports {m}" for p in files for m in sorted(imported(p))
            if any(m == b or m.startswith(b + ".") for b in banned)]


def test_integrations_never_import_the_cli():
    assert reaching(sorted((PKG / "integrations").glob("*.py")), ("ixc_engine.cli",)) == []


@pytest.mark.parametrize("room", ["engine", "models", "formats"])
def test_engine_models_and_formats_never_import_a_front_end(room):
    assert reaching(sorted((PKG / room).rglob("*.py")), FRONT_ENDS) == []


def test_job_helpers_and_ray_integration_import_without_the_cli():
    code = ("import sys, ixc_engine.formats.jobs, ixc_engine.integrations.ray; "
            "assert 'ixc_engine.cli' not in sys.modules, 'cli imported'; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import at import time'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)
