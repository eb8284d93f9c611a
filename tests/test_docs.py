"""The documentation runs: the examples of README.md and docs/*.md, their links and the names
they give.

An example is a fenced ``python`` block, run as it is, or a fenced ``bash`` block, whose
``ppt-bench`` commands run in-process (``ppt_bench.cli.main``) and must exit with 0 (a
``> FILE`` at the end of a command writes its output to FILE). Each block runs in its own
temporary folder holding a copy of the committed ``results/`` and ``reports/``, so a command can
read the committed CSVs and write reports. A block that cannot run on a CPU in seconds (it needs
ImageNet, a GPU, pretrained weights, a cluster or minutes) has, on the line before it::

    <!-- not-run: REASON -->

and shows up here as a skip with that reason (``pytest -rs``). A bash block with a command other
than ``ppt-bench`` must have one.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ppt_bench.cli import main
from ppt_bench.measure import metrics
from ppt_bench.methods import get_method_class, list_methods, registry
from ppt_bench.methods.registry import methods_markdown
from ppt_bench.runners import ENTRY_POINT_GROUP as RUNNERS_GROUP

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash")
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
OBJECT = re.compile(r"\bppt_bench(?:\.\w+)+")
# Names of the entry-point groups plugins register in, which are not modules.
ENTRY_POINT_GROUPS = {registry.ENTRY_POINT_GROUP, metrics.ENTRY_POINT_GROUP, RUNNERS_GROUP}
SOURCE_PATH = re.compile(r"`((?:bench|methods|runners|tests)/[\w./-]+)`")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None  # the reason it is not run, or None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The python and bash blocks of ``page``, each with the reason it is not run, if any."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group(2) not in RUNNABLE:
            continue
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        marker = NOT_RUN.fullmatch(before)
        code = "\n".join(line.removeprefix(m.group(1)) for line in m.group(3).splitlines())
        line = text.count("\n", 0, m.start()) + 1
        reason = marker.group(1).strip() if marker else None
        found.append(Example(page, line, m.group(2), code, reason))
    return found


EXAMPLES = [example for page in PAGES for example in examples(page)]


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block, as argument lists: continuations joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [args for line in joined.splitlines() if (args := shlex.split(line, comments=True))]


def run_command(args: list[str]) -> None:
    if args[0] != "ppt-bench":
        pytest.fail(
            f"{args[0]!r} is not a ppt-bench command: mark its block <!-- not-run: REASON -->"
        )
    args, out = args[1:], None
    if ">" in args:
        at = args.index(">")
        args, out = args[:at], Path(args[at + 1])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed) if out else contextlib.nullcontext():
        code = main(args)
    assert code == 0, f"ppt-bench {shlex.join(args)} exited with {code}"
    if out:
        assert printed.getvalue(), f"ppt-bench {shlex.join(args)} printed nothing"
        out.write_text(printed.getvalue())


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_the_example_runs(example, tmp_path, monkeypatch, one_thread):
    if example.not_run is not None:
        pytest.skip(f"{example.id} not run: {example.not_run}")
    for folder in ("results", "reports"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    if example.lang == "python":
        exec(compile(example.code, example.id, "exec"), {"__name__": "__docs__"})
    else:
        found = commands(example.code)
        assert found, f"{example.id}: a bash block without a command"
        for args in found:
            run_command(args)


def test_every_not_run_marker_says_why_before_an_example():
    for page in PAGES:
        markers = NOT_RUN.findall(without_blocks(page.read_text()))
        assert all(reason.strip() for reason in markers), f"{page.name}: a marker without reason"
        skipped = [e for e in examples(page) if e.not_run is not None]
        assert len(skipped) == len(markers), f"{page.name}: a marker not right before a block"


def test_the_readme_starts_with_the_three_commands():
    first = next(e for e in examples(ROOT / "README.md"))
    lines = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert lines == ['pip install -e ".[dev]"', "ppt-bench demo", "pytest -q"]


def without_blocks(text: str) -> str:
    return FENCE.sub("", text)


def prose(text: str) -> str:
    """``text`` without its fenced blocks and inline code, where links are not links."""
    return re.sub(r"`[^`\n]*`", "", without_blocks(text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(without_blocks(page.read_text())):
        base = slug(heading)
        name, n = base, 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def has_anchor(file: Path, anchor: str) -> bool:
    return not anchor or file.suffix != ".md" or anchor in anchors(file)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not (file.is_relative_to(ROOT) and file.exists()) or not has_anchor(file, anchor):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def resolve(name: str) -> object:
    """The object a dotted ``ppt_bench`` name names: its longest module, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if module == err.name or module.startswith(f"{err.name}."):
                continue  # not a module: an attribute of a shorter one
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_objects_and_source_files_exist(page):
    text = page.read_text()
    missing = []
    for name in sorted(set(OBJECT.findall(text)) - ENTRY_POINT_GROUPS):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    missing += [p for p in sorted(set(SOURCE_PATH.findall(text))) if not (ROOT / p).exists()]
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_the_methods_page_holds_the_registry_s_table():
    """The methods table of docs/methods.md is what the registry declares (``ppt-bench list
    --markdown``), so it cannot drift from the methods' classes."""
    page = (ROOT / "docs" / "methods.md").read_text()
    start = page.index("-->\n", page.index("<!-- methods-table:start")) + len("-->\n")
    block = page[start : page.index("<!-- methods-table:end -->")].rstrip("\n") + "\n"
    built_in = [
        m for m in list_methods() if get_method_class(m).__module__.startswith("ppt_bench.")
    ]
    assert block == methods_markdown(built_in), (
        "docs/methods.md's methods table is out of date: replace it with the built-in methods' "
        "part of `ppt-bench list --markdown`"
    )
