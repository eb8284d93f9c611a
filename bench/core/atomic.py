"""One atomic file writer for results, reports' inputs and checkpoints, and one file lock.

A reader never sees a half-written file, and an interrupted write leaves the old one: the data
goes to a temporary file beside the target, is flushed to disk, then renamed over it. Processes
that must not do the same work at once (append to one results file, build one cache entry,
compute one reference, train the demo model) hold :func:`locked` on it. A path that is a
symbolic link is written through to its target (:func:`target`): the link stays a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _default_mode() -> int:
    """The mode a new file would get: ``0o666`` less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` changes: the target of a symbolic link (through every
    link, also in its folders), made absolute; the path itself, absolute, otherwise. Every
    writer resolves its path here once, so that the temporary file, the rename and the lock
    all land beside the target, and the link stays a link."""
    return Path(os.path.realpath(path))


# The temporary file of a write is ``.<name>.<8 random characters>.tmp`` with its target's name
# cut to this length: the temporary name stays short whatever the target's (a name that fits the
# file system would otherwise get a temporary one that does not).
_TEMP_STEM = 64


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], binary: bool) -> Path:
    """Write ``path`` with ``write(file)``: temporary file, fsync, rename.

    The file keeps the permissions of the one it replaces; a new one gets the usual
    ``0666 & ~umask`` (a temporary file alone would be private, 0600). A symbolic link is
    written through: its target is replaced (:func:`target`).

    Args:
        path: the file to write; its folder must exist.
        write: writes the whole content to the open file.
        binary: open the temporary file in binary mode (else text).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    given, path = Path(path), target(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _default_mode()
    prefix = f".{path.name[:_TEMP_STEM]}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
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
    return given


# What flock raises on a file system without locks (some network mounts): the work goes on
# unlocked there, and the atomic renames still keep every file whole.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the duration of a block; another process that
    asks for the same lock waits until it is released.

    ``path`` is a folder (locked as it is, leaving nothing behind: the lock of a file that is
    replaced by renames must be on its folder) or a lock file, created if missing and left in
    place. The lock goes with the process: a killed holder releases it.

    Raises:
        OSError: the lock file or folder cannot be opened (a missing folder, no permission);
            the callers turn it into advice for the user.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock
