"""The packages stack in one direction and no modules import each other in a circle.

harmony (the chat format), model (the network) and tools (the built-in tools' machinery) stand alone; engine
(serving) is built on model; server (HTTP) on all of them. An upward import or a circle would tie a lower layer to a higher one's changes, so this
reads every module's imports, as written, and checks both.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Which project packages each package may import.
ALLOWED = {
    "harmony": set(),
    "model": set(),
    "engine": {"model"},
    "tools": set(),
    "server": {"harmony", "model", "engine", "tools"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports: a `from x import y` counts `x.y` when that is a
    module, else `x`. A package a module sits in is not counted: Python runs it first whatever is imported."""
    modules = {_module_name(path): path for package in ALLOWED for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and not (name == target or name.startswith(target + ".")):
                    edges.add(target)
        graph[name] = edges
    return graph


def test_every_package_imports_only_the_layers_below_it() -> None:
    graph = _imports()
    assert {m.split(".")[0] for m in graph} == set(ALLOWED)
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if (package := module.split(".")[0]) != (other := target.split(".")[0])
        and other not in ALLOWED[package]
    )
    assert upward == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = _imports()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert circles == []
