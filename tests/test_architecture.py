"""The layer contract: imports run one way, from the commands down to the leaves, with no cycle.

Every import counts, at module level and inside functions (only ``if TYPE_CHECKING:`` blocks,
which never run, are left out), and so do a ``"ppt_bench.module:attr"`` string, which a
registry imports on first use, and a module named to ``importlib.import_module``. Each module
sits in one layer of :data:`LAYERS` (the README's development section shows the same map) and
imports only from its own layer or those below.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bench": "ppt_bench", "methods": "ppt_bench.methods", "runners": "ppt_bench.runners"}

# Lowest first. A module of one layer may import from its own layer and the layers below.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaves",
        {
            "errors",
            "atomic",
            "folder",
            "identity",
            "defaults",
            "decode",
            "dtypes",
            "stats",
            "keyvalue",
            "registry",
            "settings",
            "methods.ops",
        },
    ),
    (
        "methods",
        {
            "methods.interface",
            "methods.patch",
            "methods.base",
            "methods.schedule",
            "methods.atc",
            "methods.baseline",
            "methods.controls",
            "methods.dct",
            "methods.diffrate",
            "methods.evit",
            "methods.gtp",
            "methods.mctf",
            "methods.merge",
            "methods.pitome",
            "methods.ppt",
            "methods.prune",
            "methods.tofu",
            "methods.tome",
            "methods.registry",
            "methods",
        },
    ),
    ("data and models", {"digits", "imagecache", "data", "digits_model", "models"}),
    (
        "measurements",
        {"accuracy", "macs", "throughput", "outcomes", "report_cells", "metrics"},
    ),
    ("records, specs and reports", {"records", "spec", "plots", "leaderboard", "report"}),
    ("evaluation and training", {"evaluate", "train", "demo_model"}),
    ("runners", {"runners.base", "runners.local", "runners.ray_tune", "runners"}),
    ("sweeps", {"config", "budget", "grid"}),
    ("library", {"api", ""}),
    ("commands", {"cli", "demo", "train_cmd", "visualize"}),
]


def _qualified(short: str) -> str:
    return "ppt_bench" + (f".{short}" if short else "")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the three source folders under ``root``, by its import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module ``name`` imports, every way but ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:  # a submodule by its own name, else the module itself
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            lazy = re.fullmatch(r"([\w.]+):[A-Za-z_]\w*", node.value)  # a "module:attr" entry
            if lazy and lazy.group(1) in known:
                found.add(lazy.group(1))
        elif isinstance(node, ast.Call) and _name(node.func) in ("import_module", "__import__"):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            found.update(a for a in args if isinstance(a, str))
    return {m for m in found if m in known and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of() -> dict[str, int]:
    return {_qualified(m): i for i, (_, members) in enumerate(LAYERS) for m in members}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    level = layer_of()
    return [
        f"{a} ({LAYERS[level[a]][0]}) imports {b} ({LAYERS[level[b]][0]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if level[b] > level[a]
    ]


def unexplained_lazy_imports(root: Path) -> list[str]:
    """Imports inside functions without a comment saying why: on the import's line, or on the
    line above the run of import lines it belongs to."""
    found = []
    for name, path in modules(root).items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        skip = _type_checking_nodes(tree)
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                    continue
                first = node.lineno - 1
                while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                    first -= 1
                block = lines[first : node.end_lineno]
                said = any("#" in line for line in block) or (first > 0 and "#" in lines[first - 1])
                if not said:
                    found.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_imports_inside_functions_say_why():
    assert unexplained_lazy_imports(ROOT) == []


def test_every_module_has_a_layer():
    level = layer_of()
    missing = sorted(set(modules(ROOT)) - set(level))
    assert not missing, f"add these modules to a layer of LAYERS: {missing}"
    gone = sorted(set(level) - set(modules(ROOT)))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_layer_above():
    assert upward_imports(import_graph(ROOT)) == []


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("bench/errors.py", "\n\ndef _f():\n    from ppt_bench import cli\n"),
        ("methods/ops.py", "\nimport ppt_bench.methods.patch\n"),
        ("bench/data.py", '\n_LAZY = "ppt_bench.evaluate:evaluate"\n'),
    ],
)
def test_a_planted_import_that_closes_a_cycle_fails(tmp_path, module, planted):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    assert find_cycle(import_graph(tmp_path)) is None
    with (tmp_path / module).open("a") as f:
        f.write(planted)
    graph = import_graph(tmp_path)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert upward_imports(graph)  # it goes up a layer too


def test_type_checking_imports_do_not_count(tmp_path):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    with (tmp_path / "bench/errors.py").open("a") as f:
        f.write("\nif TYPE_CHECKING:\n    from ppt_bench.cli import main\n")
    assert find_cycle(import_graph(tmp_path)) is None
