"""The package's layout rules: no import cycles between llamac's modules, no module over 500 lines,
no benchmark code in the op modules, and only llamac.engine.backend imports CuPy."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llamac"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


NAMES = {_name(p) for p in MODULES}


def _imports(path: Path) -> set:
    """llamac modules this module imports, at any depth of its code (a function-level import is
    still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` depends on the module; `from mod import name` on mod
            candidates = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in NAMES else node.module
                          for a in node.names]
        else:
            continue
        for name in candidates:
            while name and name not in NAMES:
                name = name.rpartition(".")[0]
            if name.startswith("llamac"):
                found.add(name)
    return found - {_name(path)}


def _graph() -> dict:
    return {_name(p): _imports(p) for p in MODULES}


def _cycle(graph: dict):
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_under_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


@pytest.mark.parametrize("path", sorted((PACKAGE / "ops").glob("*.py")), ids=lambda p: p.name)
def test_op_modules_hold_no_benchmark_code(path):
    tree = ast.parse(path.read_text())
    names = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [n for n in names if n.startswith(("bench", "_bench", "_time"))]
    assert "llamac.bench" not in {_ for _ in _imports(path)}


def test_only_the_backend_imports_cupy():
    importers = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "cupy" or m.startswith(("cupy.", "cupy_backends", "cupyx")) for m in mods):
                importers.add(_name(path))
    assert importers == {"llamac.engine.backend"}
