"""The layer contract: imports run one way, from the commands down to the leaves, with no cycle.

Every import counts, at module level and inside functions (only ``if TYPE_CHECKING:`` blocks,
which never run, are left out), and so do a ``"ppt_bench.module:attr"`` string, which a
registry imports on first use, and a module named to ``importlib.import_module``. Each module
sits in one layer of :data:`LAYERS` (``docs/development.md`` shows the same map, checked below) and
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

# Lowest first: each layer is a set of packages (with all their modules and subpackages) or
# modules. A module may import from its own layer and the layers below; a module's layer is that
# of the longest name in this table that it is or lies under.
LAYERS: list[tuple[str, set[str]]] = [
    ("leaves", {"core"}),
    ("methods", {"methods"}),
    ("data and models", {"data", "models"}),
    ("measurements", {"measure"}),
    ("records, specs and reports", {"results"}),
    ("evaluation and training", {"engine"}),
    ("runners", {"runners"}),
    ("sweeps", {"sweeps"}),
    ("library", {"api", ""}),
    # The contract suite runs the commands as a user does.
    ("commands", {"commands", "cli", "testing"}),
]


def _qualified(short: str) -> str:
    return "ppt_bench" + (f".{short}" if short else "")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the three source folders and their subpackages under ``root``, by its
    import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
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


def layer_of(names: set[str]) -> dict[str, int]:
    """The layer of each module name: that of the longest entry of :data:`LAYERS` it is or lies
    under; a module under none is left out (:func:`test_every_module_has_a_layer`)."""
    entries = {_qualified(m): i for i, (_, members) in enumerate(LAYERS) for m in members}
    level = {}
    for name in names:
        owners = [e for e in entries if name == e or name.startswith(e + ".")]
        # The bare package "ppt_bench" owns only its own __init__, never a module under it.
        owners = [e for e in owners if e != "ppt_bench" or name == "ppt_bench"]
        if owners:
            level[name] = entries[max(owners, key=len)]
    return level


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    level = layer_of(set(graph))
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
    found = set(modules(ROOT))
    missing = sorted(found - set(layer_of(found)))
    assert not missing, f"add these modules or their packages to a layer of LAYERS: {missing}"
    named = {_qualified(m) for _, members in LAYERS for m in members}
    gone = sorted(named - found)
    assert not gone, f"LAYERS names packages or modules that do not exist: {gone}"


def test_the_layers_are_the_subpackages():
    """Each layer below the library is whole packages, so the folder shows the architecture."""
    found = set(modules(ROOT))
    for _, members in LAYERS:
        for member in members - {"", "api", "testing", "cli"}:
            assert any(m.startswith(_qualified(member) + ".") for m in found), member


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_from_a_layer_above():
    assert upward_imports(import_graph(ROOT)) == []


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("bench/core/errors.py", "\n\ndef _f():\n    from ppt_bench import cli\n"),
        ("bench/core/errors.py", "\nimport ppt_bench.methods.patch\n"),
        ("bench/data/loader.py", '\n_LAZY = "ppt_bench.engine.evaluate:evaluate"\n'),
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
    with (tmp_path / "bench/core/errors.py").open("a") as f:
        f.write("\nif TYPE_CHECKING:\n    from ppt_bench.cli import main\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_a_planted_upward_import_fails_without_a_cycle(tmp_path):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    with (tmp_path / "bench/core/keyvalue.py").open("a") as f:
        f.write("\nfrom ppt_bench.data import digits\n")  # a leaf importing the data layer
    graph = import_graph(tmp_path)
    assert find_cycle(graph) is None
    assert upward_imports(graph) == [
        "ppt_bench.core.keyvalue (leaves) imports ppt_bench.data.digits (data and models)"
    ]


def test_the_development_page_shows_these_layers():
    """docs/development.md's table of layers names the same layers in the same order, each with
    its packages and top-level modules."""
    page = (ROOT / "docs" / "development.md").read_text()
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in page.split("## Layers", 1)[1].splitlines()
        if line.startswith("| ") and not line.startswith("| layer")
    ]
    assert [row[0] for row in rows] == [name for name, _ in LAYERS]
    for row, (_, members) in zip(rows, LAYERS, strict=True):
        for member in members - {""}:
            assert f"`{member}" in " ".join(row[1:]), (row[0], member)
