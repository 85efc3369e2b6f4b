"""The import layering of docs/architecture.md, checked on the source (no imports executed).

Every import counts, the ones inside functions too: a lazy import that closes a circle is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "jobs")
# Pure math: torch/numpy and the standard library only, so each function can be tested exactly on its own.
MATH_MODULES = {"actors.math"}
MATH_MAY_IMPORT = {"torch", "numpy", "math", "dataclasses", "typing", "collections", "functools", "itertools",
                   "__future__", "enum", "numbers"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def _imports(name: str, path: Path) -> set[str]:
    """Every module name this file imports, resolved to absolute dotted names (``from a import b`` gives a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Edges between this project's modules. Importing a package's ``__init__`` only for a sub-module counts
    as importing the sub-module; an ``__init__`` that re-exports is a real node."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(name, path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                edges.add(imported)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_lazy_imports_included():
    assert _cycles(_graph()) == []


def test_actors_never_import_jobs():
    modules = _modules()
    offenders = {name: sorted(i for i in _imports(name, path) if i == "jobs" or i.startswith("jobs."))
                 for name, path in modules.items() if name.startswith("actors")}
    assert {k: v for k, v in offenders.items() if v} == {}


def _is_math(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in MATH_MODULES)


def test_math_modules_import_only_torch_numpy_and_each_other():
    modules = _modules()
    math_modules = [name for name in modules if _is_math(name)]
    assert len(math_modules) >= 5, math_modules  # the losses, PPO math, log-probs, batches, Best-of-N at least
    bad = {}
    for name in math_modules:
        wrong = sorted(i for i in _imports(name, modules[name])
                       if i.split(".")[0] not in MATH_MAY_IMPORT and not _is_math(i))
        if wrong:
            bad[name] = wrong
    assert bad == {}


def test_jobs_top_level_holds_entry_points_only():
    """Each module directly under jobs/ is a command (``python -m jobs.<name>``) with a ``__main__`` guard."""
    missing = [p.name for p in sorted((ROOT / "jobs").glob("*.py"))
               if p.name != "__init__.py" and 'if __name__ == "__main__":' not in p.read_text(encoding="utf-8")]
    assert missing == []


def test_platform_has_no_python():
    """A package named ``platform`` would shadow the standard library's module for Ray and everything else."""
    assert sorted(str(p) for p in (ROOT / "platform").rglob("*.py")) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package):
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}
