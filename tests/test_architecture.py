"""The package's shape, checked: its layers, no import cycles, commands on top, a training core of short
functions.

The import graph is read from the source (`import dapt...` / `from dapt... import`), so a cycle is caught even
where Python happens to tolerate it at run time, and an import that crosses a layer the wrong way is caught
before anything runs it.

The layer map is declared once, below (LAYERS, EDGES; README "Architecture" draws it): a *package* is a
subpackage of dapt or one of its top-level modules; each sits in one layer (base < blocks < jobs < entry) and
imports only packages of its own layer or below, and the package-to-package imports are exactly EDGES, so a
new one is a decision made here, not an accident.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "dapt"
COMMAND_LAYER = ("dapt.commands", "dapt.cli", "dapt.__main__")
TRAINING_CORE = ("dapt.train", "dapt.jobs.trainer")
MAX_FUNCTION_LINES = 60

# Lowest first. A package imports packages of its own layer or of a layer below, never above.
LAYERS = {
    "base": ("dapt", "dapt.version", "dapt.errors", "dapt.io", "dapt.configs", "dapt.config", "dapt.layout",
             "dapt.distributed"),
    "blocks": ("dapt.data", "dapt.model", "dapt.eval", "dapt.observe", "dapt.train"),
    "jobs": ("dapt.jobs", "dapt.serve"),
    "entry": ("dapt.commands", "dapt.cli", "dapt.__main__"),
}
# Every package-to-package import there is, and no other (`dapt` is the package's own __init__).
EDGES = {
    "dapt": {"dapt.version"},
    "dapt.version": set(),
    "dapt.errors": set(),
    "dapt.io": {"dapt.errors"},
    "dapt.configs": {"dapt.errors"},
    "dapt.config": {"dapt.configs", "dapt.errors"},
    "dapt.layout": set(),
    "dapt.distributed": {"dapt.errors"},
    "dapt.data": {"dapt.config", "dapt.distributed", "dapt.errors", "dapt.io", "dapt.version"},
    "dapt.model": {"dapt.config", "dapt.data", "dapt.errors", "dapt.io", "dapt.version"},
    "dapt.eval": {"dapt.config", "dapt.data", "dapt.distributed", "dapt.errors"},
    "dapt.observe": {"dapt.config", "dapt.errors", "dapt.io", "dapt.layout"},
    "dapt.train": {"dapt.config", "dapt.configs", "dapt.data", "dapt.distributed", "dapt.errors", "dapt.eval",
                   "dapt.io", "dapt.model"},
    "dapt.jobs": {"dapt", "dapt.config", "dapt.data", "dapt.distributed", "dapt.errors", "dapt.eval", "dapt.io",
                  "dapt.layout", "dapt.model", "dapt.observe", "dapt.train", "dapt.version"},
    "dapt.serve": {"dapt.data", "dapt.errors", "dapt.eval", "dapt.model"},
    "dapt.commands": {"dapt.config", "dapt.configs", "dapt.errors", "dapt.io", "dapt.jobs", "dapt.model",
                      "dapt.serve", "dapt.train"},
    "dapt.cli": {"dapt.commands", "dapt.version"},
    "dapt.__main__": {"dapt.cli"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
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


def package_of(module: str) -> str:
    """The package a module belongs to: dapt.jobs.trainer -> dapt.jobs; dapt.cli -> dapt.cli; dapt -> dapt."""
    return ".".join(module.split(".")[:2])


def imported_modules(node: ast.Import | ast.ImportFrom, name: str, path: Path, known: set[str]) -> list[str]:
    """The modules one import statement of module `name` (file `path`) names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    # `from dapt.jobs import plan` names the module dapt.jobs.plan; `from dapt.io import read_json` names dapt.io
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def package_imports(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> where, as `file:line: statement`, for every import of a dapt
    module under root/dapt: at module level or inside a function, absolute or relative."""
    files = {module_name(p, root): p for p in sorted((root / "dapt").rglob("*.py"))}
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_modules(node, name, path, set(files)):
                edge = (package_of(name), package_of(target))
                if (target == "dapt" or target.startswith("dapt.")) and edge[0] != edge[1]:
                    where = f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}"
                    if where not in found[edge]:
                        found[edge].append(where)
    return dict(found)


def package_graph(edges) -> dict[str, set[str]]:
    graph_: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph_[a].add(b)
        graph_[b]
    return graph_


def upward(found: dict[tuple[str, str], list[str]]) -> list[str]:
    """Imports of a package in a higher layer than the importer's (or of a package in no layer)."""
    rank = {p: i for i, members in enumerate(LAYERS.values()) for p in members}
    layer = {p: name for name, members in LAYERS.items() for p in members}
    return [f"{a} ({layer.get(a, 'no layer')}) imports {b} ({layer.get(b, 'no layer')}): " + "; ".join(where)
            for (a, b), where in sorted(found.items()) if rank.get(b, len(LAYERS)) > rank.get(a, -1)]


def test_every_package_sits_in_one_layer():
    packages = {package_of(m) for m in modules()}
    placed = [p for members in LAYERS.values() for p in members]
    assert len(placed) == len(set(placed)), "a package in two layers: " + str(sorted(p for p in placed
                                                                                    if placed.count(p) > 1))
    assert packages - set(placed) == set(), "packages in no layer (add them to LAYERS and EDGES)"
    assert set(placed) - packages == set(), "layer members that are not packages of dapt (remove them)"
    assert set(EDGES) == packages


def test_package_imports_are_the_declared_edges():
    found = package_imports()
    new = [f"{a} -> {b} is not declared in EDGES (tests/test_architecture.py):\n    " + "\n    ".join(where)
           for (a, b), where in sorted(found.items()) if b not in EDGES.get(a, set())]
    stale = [f"{a} -> {b} is declared in EDGES but imported nowhere: remove it"
             for a, targets in sorted(EDGES.items()) for b in sorted(targets) if (a, b) not in found]
    assert new + stale == [], "\n".join(new + stale)


def test_imports_go_down_the_layers():
    """Jobs are never imported by building blocks, nor entry points by anything below them: in the
    declaration and in the source."""
    declared = {(a, b): ["declared in EDGES"] for a, targets in EDGES.items() for b in targets}
    assert upward(declared) == []
    assert upward(package_imports()) == []


def test_no_package_level_cycle():
    for name, edges in (("EDGES", {(a, b) for a, targets in EDGES.items() for b in targets}),
                        ("the source", set(package_imports()))):
        cycle = find_cycle(package_graph(edges))
        assert cycle is None, f"package cycle in {name}: " + " -> ".join(cycle)


def test_the_layer_checks_can_fail(tmp_path):
    """A building block importing a job, inside a function and relatively, is found, named and refused."""
    files = {"dapt/__init__.py": "", "dapt/eval/__init__.py": "", "dapt/jobs/__init__.py": "",
             "dapt/eval/metrics.py": "def f():\n    from dapt.jobs import evaluate\n",
             "dapt/eval/scoring.py": "from ..jobs.evaluate import run_evaluation\n",
             "dapt/jobs/evaluate.py": "import dapt.eval.metrics\nfrom dapt import eval\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = package_imports(tmp_path)
    assert found == {("dapt.eval", "dapt.jobs"): ["dapt/eval/metrics.py:2: from dapt.jobs import evaluate",
                                                  "dapt/eval/scoring.py:1: from ..jobs.evaluate import run_evaluation"],
                     ("dapt.jobs", "dapt.eval"): ["dapt/jobs/evaluate.py:1: import dapt.eval.metrics",
                                                  "dapt/jobs/evaluate.py:2: from dapt import eval"]}
    assert upward(found) == ["dapt.eval (blocks) imports dapt.jobs (jobs): dapt/eval/metrics.py:2: from dapt.jobs "
                             "import evaluate; dapt/eval/scoring.py:1: from ..jobs.evaluate import run_evaluation"]
    assert find_cycle(package_graph(found)) == ["dapt.eval", "dapt.jobs", "dapt.eval"]


def test_module_names_written_as_strings_exist():
    """Test hooks and helpers name dapt modules as strings (a meta-path hook patches `dapt.jobs.evaluate`, the
    rank server preloads modules by name): a module that moves must not silently unhook them."""
    known, missing = set(modules()), []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
                        *(ROOT / "launch").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"dapt(\.\w+)+", node.value) and node.value not in known):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert missing == []


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


FRESH = """
import gc, importlib, json, os, sys
from dapt.commands import command, import_without_gc

import_without_gc()  # as the entry points do
for m in sys.argv[1:]:
    importlib.import_module(m)
print('ok', len(sys.argv) - 1)
seen = {"gc while importing": gc.isenabled()}

@command
def start():  # a command, up to deepspeed.initialize's ZeRO optimizer check, which imports DeepSpeed's Muon
    seen.update({"gc in the command": gc.isenabled(), "frozen": gc.get_freeze_count()})
    import deepspeed.runtime.zero.muon.muon_optimizer

start()
print(json.dumps({**seen, "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE"),
                  "compiler": "torch._inductor.compile_fx" in sys.modules}))
"""


@pytest.fixture(scope="module")
def fresh_interpreter() -> tuple[list[str], subprocess.CompletedProcess]:
    """One fresh interpreter (no TORCHDYNAMO_DISABLE of the caller's): every module imported, then what a
    command does at start-up."""
    names = sorted(m for m in modules() if m != "dapt.__main__")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", FRESH, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return names, proc


def test_every_module_imports_in_a_fresh_interpreter(fresh_interpreter):
    names, proc = fresh_interpreter
    assert proc.stdout.splitlines()[-2] == f"ok {len(names)}", proc.stdout[-3000:]


def test_a_command_does_not_import_the_compiler(fresh_interpreter):
    """dapt never compiles: a command sets TORCHDYNAMO_DISABLE=1, so the torch.compile decorators of the
    Muon module DeepSpeed's ZeRO check imports are no-ops, and torch's compiler (inductor's compile_fx and
    ~590 modules with it, ~1.1 s a rank) is not imported."""
    _, proc = fresh_interpreter
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert (seen["TORCHDYNAMO_DISABLE"], seen["compiler"]) == ("1", False), seen


def test_imports_run_without_gc_and_the_command_turns_it_back_on(fresh_interpreter):
    """The entry points import a command with cyclic GC off (each full collection during torch's, DeepSpeed's
    and transformers' imports scans everything imported so far: ~0.5 s a process); the command turns it
    back on with the imported objects frozen (never scanned again)."""
    _, proc = fresh_interpreter
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert (seen["gc while importing"], seen["gc in the command"]) == (False, True), seen
    assert seen["frozen"] > 100_000, seen  # torch, transformers, DeepSpeed: millions of objects


def test_every_entry_point_imports_its_command_without_gc():
    """launch/*.py and dapt.cli call import_without_gc() before they import a command."""
    for path in [*sorted((ROOT / "launch").glob("*.py")), ROOT / "dapt" / "cli.py"]:
        text = path.read_text()
        call = text.find("import_without_gc()")
        imports = (text.find("from dapt.commands."), text.find('import_module(f"dapt.commands.'))
        first = min(i for i in imports if i >= 0)
        assert 0 <= call < first, path


def test_a_users_torchdynamo_setting_is_kept(monkeypatch):
    from dapt.commands import command

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    assert command(lambda: os.environ["TORCHDYNAMO_DISABLE"])() == "0"


def test_python_dash_m_dapt_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "dapt", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("dapt ")
