"""Errors a user can cause. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for (name, parameter, path, data, resources).

    The message is one line that says what to do about it.
    """


def brief(text: object, limit: int = 160) -> str:
    """The first line of ``text`` in at most ``limit`` characters, cut after a whole word (and
    ended by ``...``) so that a message quoting it never stops mid-word; a first word longer
    than that is kept whole."""
    lines = str(text).strip().splitlines()
    words = lines[0].split() if lines else []
    if len(" ".join(words)) <= limit:
        return " ".join(words)
    kept = words[:1]
    for word in words[1:]:
        if len(" ".join([*kept, word])) > limit - 3:
            break
        kept.append(word)
    return " ".join(kept).rstrip(",;:") + "..."


class MethodError(UserError, ValueError):
    """An unknown method, an unknown parameter or a parameter outside its valid range."""


class PatchError(UserError, TypeError):
    """A model that the generic patch cannot turn into a token-reducing one."""


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried, since permission bits do not tell
    (root passes them everywhere, and /proc or a read-only mount refuses anyway)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_output_path(path: str | os.PathLike, what: str, *, directory: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written: raise :class:`UserError` if not.

    A file path must not be an existing directory; a directory path must not be an existing
    file; and no existing file may stand where one of its parent folders should be (the
    folders themselves may be missing: they are created when writing).

    Args:
        path: where the output goes.
        what: how the CLI names it (``--out``), for the message.
        directory: ``path`` is a folder to write files into.
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: pass a folder path")
    if not directory and path.is_dir():
        raise UserError(f"{what} {path} is a folder: pass a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder")
            if not _can_create_in(parent):
                raise UserError(f"{what} {path}: folder {parent} is not writable")
            break
    return path
