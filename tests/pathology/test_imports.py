"""Every module of the project imports on its own, with its imports at the top (none hidden in a function)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pathology", "wsi_tiling")
MODULES = sorted(p.relative_to(REPO) for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _function_level_project_imports(path: Path) -> list[str]:
    """``line: statement`` of every import of a project module inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else \
                [alias.name for alias in inner.names] if isinstance(inner, ast.Import) else []
            if any(name.split(".")[0] in PACKAGES for name in names):
                found.append(f"{inner.lineno}: {ast.unparse(inner)}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=str)
def test_no_project_import_inside_a_function(path: Path) -> None:
    """A function-level import hides an import circle (e.g. checkpoint -> models -> checkpoint)."""
    assert _function_level_project_imports(REPO / path) == [], path


def _top_level_project_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports at module level (``from a.b import c`` counts ``a.b.c`` when a module)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return {name for name in found if name in known}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> imported modules), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[name] = 2
        path.pop()
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return []


def test_no_import_cycle() -> None:
    """With every import at the top (test above), the module-level import graph must be acyclic."""
    names = {_module_name(p): REPO / p for p in MODULES}
    graph = {name: _top_level_project_imports(path, set(names)) - {name} for name, path in names.items()}
    assert "pathology.models" in graph["pathology.checkpoint"]  # the edge the circle used to hide
    assert _cycle(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def _exports_only_main(path: Path) -> bool:
    """Whether ``path`` declares ``__all__ = ["main"]``: a command, whose work lives in library modules."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return isinstance(node.value, (ast.List, ast.Tuple)) and \
                [ast.literal_eval(e) for e in node.value.elts] == ["main"]
    return False


def test_no_module_uses_a_command_module_as_a_library() -> None:
    """The study once imported ``measure`` from ``pathology model-info``'s module; commands are only
    reached through ``pathology/cli.py``'s dispatch (by name, not by import)."""
    names = {_module_name(p): REPO / p for p in MODULES}
    commands = {name for name, path in names.items() if _exports_only_main(path)}
    assert {"pathology.models.info", "pathology.training.cli"} <= commands
    users = {name: sorted(_top_level_project_imports(path, set(names)) & commands) for name, path in names.items()}
    assert {name: found for name, found in users.items() if found} == {}
