"""The package boundaries hold: no import circle in app/ or workers/, the API never imports workers/, the
schemas never reach the plugin registry, and the Python client stays light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    """Each module of app/ and workers/ and the modules of those packages it imports, at module level or inside
    a function alike (a deferred import hides a circle, it does not remove it)."""
    modules = {}
    for package in ("app", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
            guard.body = []  # imports for annotations only never run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_of_app_or_workers_imports_itself_in_a_circle() -> None:
    assert _cycles(_imports()) == []


def test_the_finder_sees_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_api_never_imports_workers() -> None:
    graph = _imports()
    composing = {"app.cli"}  # the composition root may start a supervisor
    leaks = {m: sorted(t for t in targets if t.startswith("workers")) for m, targets in graph.items()
             if m.startswith("app") and m not in composing}
    assert {m: t for m, t in leaks.items() if t} == {}


def test_the_schemas_never_reach_the_plugin_registry() -> None:
    """A spec is resolved against the table its caller passes: validating one imports no plugin."""
    graph = _imports()
    assert {m: sorted(graph[m]) for m in graph if m.startswith("app.schemas") and "app.plugins" in graph[m]} == {}


def test_the_client_imports_neither_optuna_nor_numpy() -> None:
    """`from app.client import Client` in a fresh interpreter: a script that only talks to the API does not pay
    for the search's libraries."""
    heavy = ("optuna", "numpy", "torch", "sqlalchemy", "app.plugins", "app.ml")
    code = ("import sys; from app.client import Client; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
