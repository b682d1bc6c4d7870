"""Imports run one way: generation types at the bottom, then tachy.decoding, then the engine above both.

No module of the decoding toolbox imports the engine at run time (type hints only, under TYPE_CHECKING), and
neither side hides an import inside a function to dodge a cycle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tachy"


def runtime_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, level, inside a function) for each import outside ``if TYPE_CHECKING:`` blocks."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                found.append((child.module or "", child.level, in_function))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, 0, in_function) for alias in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_the_decoding_toolbox_never_imports_the_engine_at_run_time():
    for path in sorted((SRC / "decoding").glob("*.py")):
        for module, level, _ in runtime_imports(path):
            name = module if level == 0 else "." * level + module
            assert not (level == 2 and module.startswith("engine")) and "tachy.engine" not in name, \
                f"{path.name} imports {name}"


@pytest.mark.parametrize("path", [SRC / "engine.py", SRC / "generation.py", *sorted((SRC / "decoding").glob("*.py"))],
                         ids=lambda p: p.name if p.parent.name == "tachy" else f"decoding/{p.name}")
def test_no_function_level_imports_of_tachy_modules(path: Path):
    if path.name == "cli.py":   # command handlers import their heavy dependencies when they run
        return
    lazy = [("." * level + module) for module, level, inside in runtime_imports(path)
            if inside and (level > 0 or module.startswith("tachy"))]
    assert not lazy, f"{path.relative_to(SRC)} imports {lazy} inside functions"


@pytest.mark.parametrize("order", [("tachy.engine", "tachy.decoding"), ("tachy.decoding", "tachy.engine"),
                                   ("tachy.decoding.beam", "tachy.engine"), ("tachy.generation", "tachy.batch")])
def test_either_import_order_works(order):
    code = "; ".join(f"import {m}" for m in order)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
