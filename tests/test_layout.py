"""The house rules of the package, checked on its source: no module over 400 lines, no function
over 60, and no import cycle between modules (docs/layout.md)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = {"fusechat": "fusechat", "merge": "fusechat.merge", "eval": "fusechat.eval"}


def _modules() -> dict[str, Path]:
    """Installed module name -> file (merge/ and eval/ install inside fusechat)."""
    out = {}
    for folder, prefix in NAMESPACE.items():
        for p in (ROOT / folder).rglob("*.py"):
            parts = p.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((prefix, *parts))] = p
    return out


def test_no_module_over_400_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long_functions.append(f"{name}.{node.name}")
    assert long_files == [] and long_functions == []


def test_modules_import_each_other_without_a_cycle():
    """Module-level imports only: a function's own import (for start-up speed) is not a
    dependency of the module."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusechat"):
                target = node.module if node.module in mods else node.module.rsplit(".", 1)[0]
                if target != name:
                    graph[name].add(target)
    assert len(graph) > 20  # the scan sees the package
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, " -> ".join([*path, n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
