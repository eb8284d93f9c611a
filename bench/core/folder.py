"""The files an ImageFolder tree loads, listed as torchvision's ``ImageFolder`` lists them, without
torch: what the loader reads, the data's fingerprint and the image cache's key all come from here.

torchvision takes every folder of the root as a class (hidden ones too, links followed), walks
each with ``os.walk(followlinks=True)`` in sorted order and keeps each file whose name ends with
an image extension. :func:`list_image_folder` walks the same way, but stops at a loop of links
(torchvision walks it until the path is too long, loading the same images again and again) and
skips what is not a regular file (a FIFO named ``x.png`` would block the loader forever). Each
file gets a stamp: its resolved path, size, mtime, ctime and inode. A rewrite in place changes
the ctime even when ``touch -r`` puts the mtime back, and a link pointed at other images changes
the resolved path, so neither can pass for the data measured before.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ppt_bench.core.errors import UserError

# torchvision's IMG_EXTENSIONS (a test checks they agree), here so that no torch is imported.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FolderListing:
    """The images of an ImageFolder tree in the loader's order.

    Args:
        classes: the class folders, sorted; a sample's label is its class's index.
        samples: ``(path, label)`` of each image as the loader opens it.
        stamps: what identifies each sample's content (:func:`stamp`), aligned with ``samples``.
        skipped: paths with an image extension that are not regular files (left out).
        outside: sample paths whose file lies outside the root, through links.
    """

    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)


# Folder names that name a split of a data set, not a class: a root holding only these holds
# splits, each its own ImageFolder (``dataset_name`` also reads past them).
SPLIT_NAMES = ("val", "validation", "test", "train")


def class_root(path: str | os.PathLike) -> Path:
    """The folder of class folders: ``path/val`` when there is one (ImageNet's layout), else
    ``path``."""
    root = Path(path).expanduser()
    return root / "val" if (root / "val").is_dir() else root


def is_image_name(name: str) -> bool:
    """Whether ``name`` ends with an image extension (any case), as torchvision decides."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(root: str | os.PathLike) -> list[str]:
    """The class folders of ``root`` as torchvision finds them: every folder, hidden or a
    link, sorted."""
    return sorted(entry.name for entry in os.scandir(root) if _is_dir(entry))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk does
    except OSError:
        return False


def walk(top: str) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """``(folder, its entries that are not folders)`` of ``top`` and each folder below it,
    links followed as ``os.walk(followlinks=True)`` does; a folder that cannot be listed is
    passed over, as there.

    Raises:
        UserError: a link that leads back to a folder it lies in (a loop).
    """
    stack: list[tuple[str, tuple[tuple[tuple[int, int], str], ...]]] = [(top, ())]
    while stack:
        path, ancestors = stack.pop()
        try:
            st = os.stat(path)
            entries = list(os.scandir(path))
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        for seen, where in ancestors:
            if seen == key:
                raise UserError(
                    f"the data folder loops: {path} leads back to {where}; remove that link"
                )
        folders = sorted((e.name for e in entries if _is_dir(e)), reverse=True)
        yield path, [e for e in entries if not _is_dir(e)]
        stack += [(os.path.join(path, name), (*ancestors, (key, path))) for name in folders]


def stamp(resolved: str, st: os.stat_result) -> str:
    """What identifies a file's content without reading it: resolved path, size, mtime_ns,
    ctime_ns and inode."""
    return f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"


def sample_bytes(label: int, stamp_: str) -> bytes:
    """What a content hash (the data's fingerprint, the image cache's key) reads of one sample:
    its label and :func:`stamp`, with the path's bytes as the file system gives them (a file name
    that is not UTF-8 reaches Python with surrogate escapes, which ``str.encode`` refuses)."""
    return os.fsencode(f"{label}\0{stamp_}\n")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def list_image_folder(root: str | os.PathLike) -> FolderListing:
    """The images torchvision's ``ImageFolder(root)`` loads, in its order and with its labels,
    less loops and what is not a regular file.

    Raises:
        UserError: a loop of links.
    """
    root = os.path.expanduser(os.fspath(root))
    real_root = os.path.realpath(root)
    listing = FolderListing(find_classes(root))
    for label, name in enumerate(listing.classes):
        folders = sorted(walk(os.path.join(root, name)), key=lambda folder: folder[0])
        for path, entries in folders:
            real_dir = os.path.realpath(path)
            for entry in sorted(entries, key=lambda e: e.name):
                if is_image_name(entry.name):
                    _add(listing, os.path.join(path, entry.name), label, entry, real_dir, real_root)
    return listing


def _add(
    listing: FolderListing,
    path: str,
    label: int,
    entry: os.DirEntry,
    real_dir: str,
    real_root: str,
) -> None:
    """Add one image file to ``listing``, or to its skipped paths if it is not a regular file."""
    try:
        st = entry.stat()  # of the file a link points to
    except OSError:  # a dangling link
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        listing.skipped.append(path)
        return
    resolved = os.path.realpath(path) if entry.is_symlink() else os.path.join(real_dir, entry.name)
    if not _inside(resolved, real_root):
        listing.outside.append(path)
    listing.samples.append((path, label))
    listing.stamps.append(stamp(resolved, st))
