"""The tidy results schema: one row per (run, metric), written atomically.

Every results CSV has the columns of :data:`COLUMNS`, among them one per common method
parameter (:data:`PARAM_COLUMNS`); any other parameter a run was given gets a column of its own,
named after it and added after those, so a new method's parameters need no change here. Metric
names and units come from the metric groups (:mod:`ppt_bench.measure.metrics`). A finished run is
never lost: each run's rows are appended under the file's lock and flushed to disk (a write cut
short is cut back), so a sweep killed between runs leaves a readable CSV with every finished row.
Reading checks every line and cell, and refuses two rows of one run that disagree.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ppt_bench.core import identity
from ppt_bench.core.atomic import atomic_write, locked, target
from ppt_bench.core.errors import UserError, first_line
from ppt_bench.core.stats import Estimate
from ppt_bench.measure.metrics import unit_of

if TYPE_CHECKING:
    import pandas as pd

    from ppt_bench.results.spec import RunSpec

# Parameters that several methods share; each has a column in every results file.
PARAM_COLUMNS = ("r", "locations", "threshold", "keep_rate")
COLUMNS = (
    "run_id",
    "sweep",
    "model",
    "method",
    "params",
    *PARAM_COLUMNS,
    "batch_size",
    "device",
    "device_name",
    "machine",
    "dtype",
    "compile",
    "checkpoint",
    "checkpoint_sha256",
    "dataset",
    "data_fingerprint",
    "n_images",
    "seed",
    "budget",
    "budget_gmacs",
    "budget_share",
    "budget_speedup",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "unit",
    "timestamp",
    "ppt_bench_version",
    "torch_version",
    "timm_version",
    "git_sha",
    "status",
    "error",
)

# What makes an experiment, added after the first schema: a file written before them lacks them
# (and gains them when a run is appended to it).
IDENTITY_COLUMNS = ("machine", "checkpoint", "checkpoint_sha256", "data_fingerprint", "seed")
# The 95% interval of ``value`` (same unit; empty where none applies), also added later.
INTERVAL_COLUMNS = ("ci_low", "ci_high")
# The budget a run was resolved for (``RunSpec.budget``: its label, its GMACs, the achieved
# share of the unreduced MACs by the counter, and a speed budget's measured speedup of the
# setting as ``value [low, high]``), added later; empty for a run without one.
BUDGET_COLUMNS = ("budget", "budget_gmacs", "budget_share", "budget_speedup")
# Compared only with a baseline that matches, and never averaged together: how and where a run
# was measured, and what makes its experiment (weights, data, seed).
CONTEXT = ("device", "dtype", "compile", "dataset", *IDENTITY_COLUMNS)
REQUIRED_COLUMNS = tuple(
    c for c in COLUMNS if c not in (*IDENTITY_COLUMNS, *INTERVAL_COLUMNS, *BUDGET_COLUMNS)
)

# Columns read back as text: a hex run_id or git sha made only of digits ("012345678901",
# "1e5...") or a version like "0.10" would otherwise be parsed as a number.
TEXT_COLUMNS = (
    "run_id",
    "sweep",
    "params",
    "machine",
    "checkpoint",
    "checkpoint_sha256",
    "data_fingerprint",
    "ppt_bench_version",
    "torch_version",
    "timm_version",
    "git_sha",
    "error",
    "budget",
    "budget_speedup",
)


def varied(runs: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Those of ``columns`` that take more than one value in ``runs``."""
    return [c for c in columns if c in runs and runs[c].astype(str).nunique() > 1]


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the ppt-bench source tree (``-dirty`` if it has uncommitted changes), or
    '' outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return ""
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


@lru_cache(maxsize=1)
def nvidia_driver() -> str:
    """The NVIDIA driver version as nvidia-smi reports it, or '' where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: str) -> dict[str, str]:
    """Versions and the device name that every row records."""
    # Imported here: reading and reporting results needs neither torch nor timm.
    import timm
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
        driver = nvidia_driver()
        device_name += f" (driver {driver}, CUDA {torch.version.cuda})" if driver else ""
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        device_name = f"{cpu_name()} ({cpus} CPUs)"
    return {
        "device_name": device_name,
        "ppt_bench_version": identity.VERSION,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "git_sha": git_sha(),
    }


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return "" if value is None else value


def make_rows(
    spec: RunSpec,
    metrics: dict[str, float],
    *,
    dataset: str = "",
    n_images: int | None = None,
    batch_size: int | None = None,
    status: str = "ok",
    error: str = "",
) -> list[dict[str, Any]]:
    """Rows for one run: one per metric; a failed run is one row with ``metric=""``.

    Args:
        spec: the run.
        metrics: metric name -> value, a number or an :class:`Estimate` with its 95% interval
            (units from the metric groups).
        dataset: name of the data actually used.
        n_images: images evaluated.
        batch_size: the batch size actually used (after out-of-memory backoff), default the spec's.
        status: ``ok``, ``failed`` or ``skipped`` (a budget out of the method's reach).
        error: the one-line error of a failed run.
    """
    env = environment(spec.device)
    params = spec.params
    base = {
        "run_id": spec.run_id,
        "sweep": spec.sweep,
        "model": spec.model,
        "method": spec.method,
        "params": json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
            sort_keys=True,
        ),
        **{k: _cell(params.get(k)) for k in PARAM_COLUMNS},
        **{k: _cell(v) for k, v in sorted(params.items()) if k not in COLUMNS},
        "batch_size": spec.batch_size if batch_size is None else batch_size,
        "device": spec.device,
        "device_name": env["device_name"],
        "machine": spec.machine,
        "dtype": spec.dtype,
        "compile": spec.compile,
        "checkpoint": spec.checkpoint or "",
        "checkpoint_sha256": spec.checkpoint_sha256,
        "dataset": dataset,
        "data_fingerprint": spec.data_fingerprint,
        "n_images": "" if n_images is None else n_images,
        "seed": spec.seed,
        "budget": spec.budget.get("budget", ""),
        "budget_gmacs": _cell(spec.budget.get("target_gmacs")),
        "budget_share": _cell(spec.budget.get("share")),
        "budget_speedup": spec.budget.get("speedup", ""),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{k: env[k] for k in ("ppt_bench_version", "torch_version", "timm_version", "git_sha")},
        "status": status,
        "error": " ".join(error.split()),  # one line, whole
    }
    if status != "ok":
        return [{**base, "metric": "", "value": "", "ci_low": "", "ci_high": "", "unit": ""}]
    return [
        {**base, "metric": name, **_value(value), "unit": unit_of(name)}
        for name, value in metrics.items()
    ]


def error_message(exc: BaseException | str) -> str:
    """One line for the ``error`` column: a user error's own message (or a message given as
    text), else the exception's type and message."""
    if isinstance(exc, str):
        lines = exc.strip().splitlines()
        return lines[0] if lines else ""
    text = first_line(exc)
    if isinstance(exc, UserError) or text == type(exc).__name__:
        return text
    return f"{type(exc).__name__}: {text}"


def failed_rows(spec: RunSpec, exc: BaseException | str) -> list[dict[str, Any]]:
    """The single ``status=failed`` row that records a run that raised ``exc``.

    Args:
        spec: the run.
        exc: the exception, or its message when only that survived (a crashed worker).
    """
    return make_rows(spec, {}, status="failed", error=error_message(exc))


def _value(value: float | Estimate) -> dict[str, float | str]:
    """The ``value``, ``ci_low`` and ``ci_high`` cells of a figure (an :class:`Estimate` or a
    plain number)."""
    value, low, high = value if isinstance(value, Estimate) else (value, math.nan, math.nan)
    return {"value": _number(value), "ci_low": _number(low), "ci_high": _number(high)}


def _number(value: float) -> float | str:
    value = float(value)
    return "" if math.isnan(value) else value


def header_for(rows: Iterable[dict[str, Any]], old: Sequence[str] = ()) -> tuple[str, ...]:
    """The columns of a file holding ``rows`` (after the ``old`` header's rows): :data:`COLUMNS`
    with the other parameter columns, old ones first, inserted after the common ones."""
    extra = [c for c in old if c not in COLUMNS]  # parameter columns of the rows before
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"row lacks columns {sorted(missing)}")
        extra += [c for c in row if c not in COLUMNS and c not in extra]
    cut = COLUMNS.index(PARAM_COLUMNS[-1]) + 1
    return (*COLUMNS[:cut], *extra, *COLUMNS[cut:])


def _to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# What to do about a results CSV that cannot be used, by where it was given.
OUT_ADVICE = "write to a new file with --out"
REPORT_ADVICE = "pass a CSV written by ppt-bench run"


def append_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> bool:
    """Add one run's rows to a results CSV, atomically and under the file's lock.

    The new rows' bytes are appended to the file after a check of its header and its last line
    (a last line without its newline is completed first when it holds a whole row): an append
    costs what its rows cost, however long the file. A run with a parameter that has no column
    yet rewrites the file with the wider header (temporary file, rename). Readers hold the same
    lock, so they see the file either without the new rows or with all of them; a write that
    fails half way is cut back. Under the lock the file is read again from where this process
    last read it, so that processes writing the same file at once lose no run, and a run already
    recorded as ``ok`` is not written again (a second process that ran it too). The file keeps
    its permissions; a new one gets the usual ``0666 & ~umask``. A path that is a symbolic link
    is written through to its target (:func:`~ppt_bench.core.atomic.target`), whose folder holds
    the lock: appends and widening rewrites alike, and the link stays a link.

    Returns:
        Whether the rows were written.

    Raises:
        UserError: the file cannot be written, is not a results CSV, or has a malformed line.
    """
    given, path = path, target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # On the folder: a widening write replaces the file, and a lock on the old file would
        # not hold the new one.
        with locked(path.parent):
            return _append_locked(path, rows)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"cannot write results file {given} ({reason}): {OUT_ADVICE}") from None


def _append_locked(path: Path, rows: Sequence[dict[str, Any]]) -> bool:
    seen = _scan(path, OUT_ADVICE)
    if seen is None:  # a new (or empty) file
        text = _to_csv(rows, header_for(rows), header=True)
        atomic_write(path, lambda f: f.write(text), binary=False)
        return True
    if rows and rows[0]["run_id"] in seen.ok:
        return False
    columns = header_for(rows, seen.header)
    if columns != seen.header:  # a parameter without a column yet: widen the whole file
        old = checked_text(path, OUT_ADVICE)
        text = _to_csv(csv.DictReader(io.StringIO(old)), columns, header=True)
        text += _to_csv(rows, columns, header=False)
        atomic_write(path, lambda f: f.write(text), binary=False)
        return True
    data = _to_csv(rows, columns, header=False).encode()
    _append_bytes(path, (b"" if seen.ends_line else b"\n") + data, seen.size)
    return True


def _append_bytes(path: Path, data: bytes, size: int) -> None:
    """Append ``data`` to a file of ``size`` bytes and flush it to disk; on failure the file is
    cut back to ``size``, so that no half row stays."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


@dataclass
class _Seen:
    """What this process has read of one results file, so that it reads only what was added.

    Attributes:
        file: ``(st_dev, st_ino)``: a file replaced by a rename is read again from the start.
        header: its columns.
        size: the bytes read, up to the end of the last whole line.
        lines: the whole lines read (the header among them), to name a malformed one.
        tail: the last bytes before ``size``, to notice a file rewritten in place.
        ok: the ids of the runs recorded as ``ok`` in those lines.
        ends_line: whether the file ends with a newline; else its last line, a whole row, is
            completed before anything is appended to it.
    """

    file: tuple[int, int]
    header: tuple[str, ...]
    size: int = 0
    lines: int = 0
    tail: bytes = b""
    ok: set[str] = field(default_factory=set)
    ends_line: bool = True


_TAIL = 64  # bytes compared to tell a file that grew from one rewritten
_SEEN: dict[str, _Seen] = {}  # by absolute path


def _scan(path: Path, advice: str) -> _Seen | None:
    """What this process knows of the results file ``path``, brought up to date by reading only
    the lines added since it last read it (the whole file the first time, or when the file was
    replaced or rewritten); None when there is no file or an empty one.

    Every line read must have the header's fields; a last line without its newline must hold a
    whole row.

    Raises:
        UserError: the file is a folder, is not a results CSV or has a malformed line.
    """
    if path.is_dir():
        raise UserError(f"results file {path} is a folder; {advice}")
    if not path.exists():
        return None
    key = os.path.abspath(path)
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        seen = _SEEN.get(key)
        if seen is None or not _unchanged(f, st, seen):
            f.seek(0)
            first = f.readline()
            if not first:
                return None
            header = check_header(path, _decoded(path, first, advice), advice)
            seen = _Seen((st.st_dev, st.st_ino), header)  # the header is read as a row
        f.seek(seen.size)
        data = f.read()
        text = _decoded(path, data, advice)
        status, run_id = seen.header.index("status"), seen.header.index("run_id")
        for row in _checked_rows(path, text, len(seen.header), seen.lines + 1):
            if row[status] == "ok":
                seen.ok.add(row[run_id])
        if data:
            seen.ends_line = data.endswith(b"\n")
        seen.size += data.rfind(b"\n") + 1  # a last line cut short is read again next time
        seen.lines += data.count(b"\n")
        f.seek(max(0, seen.size - _TAIL))
        seen.tail = f.read(seen.size - f.tell())
    _SEEN[key] = seen
    return seen


def _unchanged(f: IO[bytes], st: os.stat_result, seen: _Seen) -> bool:
    """Whether the open file is the one ``seen`` read, grown at most (appended to)."""
    if (st.st_dev, st.st_ino) != seen.file or st.st_size < seen.size:
        return False
    f.seek(seen.size - len(seen.tail))
    return f.read(len(seen.tail)) == seen.tail


def _checked_rows(path: Path, text: str, width: int, line: int) -> Iterator[list[str]]:
    """The rows of ``text``, lines of a results CSV from line number ``line`` on, each checked
    to have the header's ``width`` fields (a cut-short last line has fewer).

    Raises:
        UserError: one line naming the first malformed line and what to do.
    """
    reader = csv.reader(io.StringIO(text))
    try:
        for row in reader:
            if len(row) != width:
                raise UserError(
                    f"results file {path}, line {line + reader.line_num - 1}, has {len(row)} "
                    f"fields where the header has {width}: delete or fix that line"
                )
            yield row
    except csv.Error as err:
        raise UserError(
            f"results file {path}, line {line + reader.line_num - 1}, is not valid CSV ({err}): "
            "delete or fix that line"
        ) from None


def checked_text(path: Path, advice: str) -> str:
    """The text of a results CSV whose every line has the header's fields.

    A last line without its newline (a copy cut short, an editor) is completed when it holds a
    whole row, and refused otherwise: a row appended to it would be glued onto it.

    Raises:
        UserError: one line naming the first malformed line and what to do.
    """
    text = _read_text(path, advice)
    if not text:
        return text
    header = check_header(path, text.splitlines()[0], advice)
    for _ in _checked_rows(path, text, len(header), 1):
        pass
    return text if text.endswith("\n") else text + "\n"


def _read_text(path: Path, advice: str) -> str:
    """The text of a results CSV, or a :class:`UserError` saying why it cannot be read."""
    if path.is_dir():
        raise UserError(f"results file {path} is a folder; {advice}")
    if not path.exists():
        raise UserError(f"results file {path} does not exist; {advice}")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise _not_utf8(path, advice) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"results file {path} cannot be read ({reason}); {advice}") from None


def _decoded(path: Path, data: bytes, advice: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise _not_utf8(path, advice) from None


def _not_utf8(path: Path, advice: str) -> UserError:
    return UserError(f"{path} is not a ppt-bench results CSV (not UTF-8 text); {advice}")


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """The lock the writers of the results file ``path`` hold (on its target's folder), held
    while reading it, so that a read sees no half-appended run; none where its folder is missing
    or cannot be opened (the read then says why)."""
    folder = target(path).parent
    with contextlib.ExitStack() as stack:
        if folder.is_dir():  # (a missing folder would become a lock file of its name)
            with contextlib.suppress(OSError):
                stack.enter_context(locked(folder))
        yield


def check_header(path: Path, header_line: str, advice: str = OUT_ADVICE) -> tuple[str, ...]:
    """The columns of a results CSV from its header line; :class:`UserError` unless it has every
    column of :data:`REQUIRED_COLUMNS`, in order (parameter and identity columns may stand
    between them)."""
    header = tuple(next(csv.reader([header_line]), []))
    if tuple(c for c in header if c in REQUIRED_COLUMNS) != REQUIRED_COLUMNS:
        raise UserError(f"{path} is not a ppt-bench results CSV (its columns differ); {advice}")
    return header


def read_results(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, advice: str = REPORT_ADVICE
) -> pd.DataFrame:
    """Read one or several results CSVs into one frame, checking their columns and cells.

    Args:
        paths: the CSVs.
        advice: what the user should do about a file that is not a results CSV.

    Raises:
        UserError: one line for a file that is not a results CSV, a malformed line, a cell
            that a hand edit left unreadable (``params`` not JSON, ``n_images`` not a number),
            or two rows of one run that give one metric different values.
    """
    import pandas as pd  # imported here: a second or more, and runs that only write need none

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    frames = []
    for i, p in enumerate(paths):
        with _held(p):
            text = checked_text(p, advice)
        check_header(p, text.splitlines()[0] if text else "", advice)
        frame = pd.read_csv(io.StringIO(text), dtype=dict.fromkeys(TEXT_COLUMNS, str))
        _check_cells(p, frame)
        frames.append(frame.assign(_file=i, _line=frame.index + 2))  # the header is line 1
    df = pd.concat(frames, ignore_index=True)
    _check_conflicts(df, paths)
    df = df.drop(columns=["_file", "_line"])
    # Files written before the identity and interval columns existed lack them.
    later = (*IDENTITY_COLUMNS, *INTERVAL_COLUMNS, *BUDGET_COLUMNS)
    df = df.reindex(columns=[*df.columns, *(c for c in later if c not in df)])
    for column in ("budget", "budget_speedup"):
        df[column] = df[column].fillna("").astype(str)
    for column in ("value", *INTERVAL_COLUMNS, "budget_gmacs", "budget_share"):
        df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


# Columns read back as numbers.
NUMBER_COLUMNS = (
    "batch_size",
    "n_images",
    "seed",
    "value",
    *INTERVAL_COLUMNS,
    "budget_gmacs",
    "budget_share",
)


def _check_cells(path: Path, df: pd.DataFrame) -> None:
    """Refuse, in one line, the first cell of a results file that a hand edit left unreadable:
    a number column holding text, a ``params`` cell that is not a JSON object."""
    import pandas as pd  # imported here: see read_results

    for column in (c for c in NUMBER_COLUMNS if c in df):
        cells = df[column]
        bad = cells.notna() & pd.to_numeric(cells, errors="coerce").isna()
        if bad.any():
            raise _bad_cell(path, df, bad.idxmax(), column, "is not a number")
    for value in df["params"].dropna().unique():
        if not _is_params(value):
            first = (df["params"] == value).idxmax()
            raise _bad_cell(path, df, first, "params", "is not a JSON object of parameters")


def _is_params(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _bad_cell(path: Path, df: pd.DataFrame, row: int, column: str, what: str) -> UserError:
    cell = str(df.at[row, column])
    cell = cell if len(cell) <= 40 else cell[:37] + "..."
    return UserError(
        f"results file {path}, line {row + 2}: its {column} cell {cell!r} {what}: fix or "
        "delete that line"
    )


def _check_conflicts(df: pd.DataFrame, paths: Sequence[Path]) -> None:
    """Refuse, in one line naming both rows, two ``ok`` rows of one run that give one metric
    different figures (within one file, or across the files read together): which is right
    cannot be told. Rows that agree (one file given twice, a copy) are no conflict."""
    figures = ["run_id", "metric", "value", "ci_low", "ci_high"]
    figures = [c for c in figures if c in df]
    ok = df[df["status"] == "ok"].drop_duplicates(figures)
    clash = ok[ok.duplicated(["run_id", "metric"], keep=False)]
    if clash.empty:
        return
    first = clash.iloc[0]
    same = clash[(clash["run_id"] == first["run_id"]) & (clash["metric"] == first["metric"])]
    a, b = (
        f"{r['value']} in {paths[r['_file']]} line {r['_line']}"
        for _, r in same.iloc[:2].iterrows()
    )
    raise UserError(
        f"run {first['run_id']} has two values of {first['metric']}: {a} and {b}; delete the "
        "row that is wrong (a run measured again belongs in a new results file)"
    )


def finished_run_ids(path: str | os.PathLike) -> set[str]:
    """Ids of runs already recorded as ``ok`` in ``path`` (empty if it does not exist)."""
    path = target(path)
    with _held(path):
        seen = _scan(path, OUT_ADVICE)
    return set(seen.ok) if seen is not None else set()


def format_params(params: str) -> str:
    """``{"locations": [3, 6], "r": 16}`` -> ``r=16, locations=[3, 6]`` (r first)."""
    d = json.loads(params) if isinstance(params, str) and params else {}
    order = sorted(d, key=lambda k: (k != "r", k))
    return ", ".join(f"{k}={json.dumps(d[k])}" for k in order)
