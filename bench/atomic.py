"""One atomic file writer for results, reports' inputs and checkpoints.

A reader never sees a half-written file, and an interrupted write leaves the old one: the data
goes to a temporary file beside the target, is flushed to disk, then renamed over it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _default_mode() -> int:
    """The mode a new file would get: ``0o666`` less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], binary: bool) -> Path:
    """Write ``path`` with ``write(file)``: temporary file, fsync, rename.

    The file keeps the permissions of the one it replaces; a new one gets the usual
    ``0666 & ~umask`` (a temporary file alone would be private, 0600).

    Args:
        path: the target; its folder must exist.
        write: writes the whole content to the open file.
        binary: open the temporary file in binary mode (else text).
    """
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _default_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
