"""The accepted lane never reaches into candidate/, quarantine/ or archive/.

import-linter checks static imports (`make test` runs `lint-imports`); this test covers the
dynamic forms it cannot see: `importlib.import_module("candidate...")` and `__import__`.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lukhas

FORBIDDEN = ("candidate", "quarantine", "archive")
ROOT = Path(lukhas.__file__).parent
REPO = ROOT.parent


def _forbidden_literal_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        arg = node.args[0]
        if name in {"import_module", "__import__"} and isinstance(arg, ast.Constant):
            if str(arg.value).split(".")[0] in FORBIDDEN:
                found.append(f"line {node.lineno}: {name}({arg.value!r})")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN:
            found.append(f"line {node.lineno}: from {node.module}")
    return found


def test_no_dynamic_import_of_forbidden_lanes() -> None:
    problems = {
        str(path.relative_to(REPO)): hits
        for path in ROOT.rglob("*.py")
        if (hits := _forbidden_literal_imports(ast.parse(path.read_text(), str(path))))
    }
    assert problems == {}


def test_the_ast_check_catches_importlib_with_a_literal() -> None:
    tree = ast.parse("import importlib\nimportlib.import_module('candidate.x')\n")
    assert _forbidden_literal_imports(tree) == ["line 2: import_module('candidate.x')"]


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter not installed")
def test_import_linter_fails_on_a_static_violation(tmp_path: Path) -> None:
    """Copy the tree, add `import candidate` to lukhas/, and watch the contract break."""
    for name in ("lukhas", "bus", "workers", "candidate"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "tests"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "lukhas" / "leak.py").write_text("import candidate  # noqa: F401\n")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
