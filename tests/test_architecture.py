"""The package's shape, checked: no import cycles, commands on top, a training core of short functions.

The import graph is read from the source (module-level `import dapt...` / `from dapt... import`), so a
cycle is caught even where Python happens to tolerate it at run time.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dapt"
COMMAND_LAYER = ("dapt.commands", "dapt.cli", "dapt.__main__")
TRAINING_CORE = ("dapt.train",)
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """dapt modules imported at module level (top-level statements, not inside functions)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dapt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dapt"):
            found.add(node.module)
            # `from dapt.data import batching` imports the submodule dapt.data.batching
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {name: imports_of(name, tree, known) for name, tree in mods.items()}
    for name in known:  # importing dapt.a.b runs dapt/a/__init__.py first
        parent = name.rsplit(".", 1)[0]
        if "." in name and parent in known and parent != "dapt":
            edges[name].add(parent)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_a_command():
    offenders = [(m, dep) for m, deps in graph().items() if not m.startswith(COMMAND_LAYER)
                 for dep in deps if dep.startswith(COMMAND_LAYER)]
    assert offenders == []


def test_dapt_imports_are_at_module_level():
    """Imports of dapt's own modules inside functions hide the dependency graph (and cycles)."""
    hidden = []
    for name, tree in modules().items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                if (mod or "").startswith("dapt") or (isinstance(node, ast.Import)
                                                      and any(a.name.startswith("dapt") for a in node.names)):
                    hidden.append(f"{name}.{fn.name}")
    assert hidden == []


def test_training_core_functions_fit_on_a_screen():
    long = []
    for name, tree in modules().items():
        if not name.startswith(TRAINING_CORE):
            continue
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{name}.{fn.name}: {lines} lines")
    assert long == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in modules() if m != "dapt.__main__")
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok', len(sys.argv) - 1)"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == f"ok {len(names)}", proc.stderr[-3000:]


def test_python_dash_m_dapt_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "dapt", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("dapt ")
