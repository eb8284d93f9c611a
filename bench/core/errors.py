"""Errors a user can cause. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ppt_bench.core.atomic import target


class UserError(Exception):
    """A mistake in what the user asked for (name, parameter, path, data, resources).

    The message is one line that says what to do about it.
    """


class MethodError(UserError, ValueError):
    """An unknown method, an unknown parameter or a parameter outside its valid range."""


class PatchError(UserError, TypeError):
    """A model that the generic patch cannot turn into a token-reducing one."""


class ArgumentError(UserError, TypeError):
    """An argument of a library call of a type it does not take; the message names the argument
    and the types it takes."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, whole (a message is quoted in full, never cut
    mid-word), or its type's name when it has none: what a one-line error says of its cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried, since permission bits do not tell
    (root passes them everywhere, and /proc or a read-only mount refuses anyway)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _limit(folder: Path, name: str, default: int) -> int:
    """A limit of the file system that holds ``folder`` (``PC_NAME_MAX``, ``PC_PATH_MAX``), or
    ``default`` where it cannot be read."""
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_name_fits(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`UserError` unless every name in ``path`` and the whole path fit the file
    system of its nearest existing folder (255 bytes a name, 4096 a path on most).

    A name too long would fail only when the file is written, after the work.
    """
    absolute = Path(os.path.abspath(path))
    folder = next((p for p in absolute.parents if _exists(p)), Path(absolute.anchor))
    most = _limit(folder, "PC_NAME_MAX", 255)
    longest = max((len(os.fsencode(part)) for part in absolute.parts), default=0)
    if longest > most:
        raise UserError(
            f"{what} {path}: a name in it is {longest} bytes long, and the file system allows "
            f"{most}: choose a shorter name"
        )
    most = _limit(folder, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(absolute))) >= most:
        raise UserError(
            f"{what} {path} is longer than the {most} bytes the file system allows in a path: "
            "choose a shorter path"
        )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, for one
        return False


def check_free_space(path: str | os.PathLike, size: int, what: str) -> None:
    """Raise :class:`UserError` when the folder that will hold ``path`` (its nearest existing
    one) has less than ``size`` bytes free: a rough check, before the work, of an output whose
    size is known (a checkpoint's weights).

    Args:
        path: where the output goes.
        size: about the bytes it will take.
        what: how the CLI names it (``--out``), for the message.
    """
    real = target(path)
    folder = next((p for p in real.parents if _exists(p)), Path(real.anchor))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell: the write says so if it fails
        return
    if free < size:
        raise UserError(
            f"{what} {path}: {folder} has {free / 1e6:.1f} MB free and the file needs about "
            f"{size / 1e6:.1f} MB: free some space or write elsewhere"
        )


def check_output_path(path: str | os.PathLike, what: str, *, directory: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written: raise :class:`UserError` if not.

    Its names must fit the file system (:func:`check_name_fits`); a file path must not be an
    existing directory; a directory path must not be an existing file; and no existing file may
    stand where one of its parent folders should be (the folders themselves may be missing:
    they are created when writing). A symbolic link is checked where it leads, which is where
    the writers write (:func:`~ppt_bench.core.atomic.target`).

    Args:
        path: where the output goes.
        what: how the CLI names it (``--out``), for the message.
        directory: ``path`` is a folder to write files into.
    """
    path = Path(path)
    check_name_fits(path, what)
    real = target(path)
    check_name_fits(real, what)
    if directory and real.exists() and not real.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: pass a folder path")
    if not directory and real.is_dir():
        raise UserError(f"{what} {path} is a folder: pass a file path")
    for parent in real.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder")
            if not _can_create_in(parent):
                raise UserError(f"{what} {path}: folder {parent} is not writable")
            break
    return path
