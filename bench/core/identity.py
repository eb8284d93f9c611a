"""What makes an experiment: the content of its weights and data, and the machine it ran on.

These go into every row and into the run id, so that a run with other weights, other images or
on another machine is another run: never skipped as done, never averaged with this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

from ppt_bench.core import network
from ppt_bench.core.atomic import locked
from ppt_bench.core.errors import UserError, first_line
from ppt_bench.core.folder import class_root, list_image_folder, sample_bytes

try:
    VERSION = version("ppt-bench")  # of the code that measures, in every row
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0"
_CHUNK = 1 << 20


@cache
def _file_digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a file's SHA-256, cached while its size, mtime, ctime and
    inode hold (a rewrite in place that restores the mtime still changes the ctime)."""
    st = os.stat(path)
    return _file_digest(
        str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    )


def is_url(checkpoint: str) -> bool:
    return checkpoint.startswith(("http://", "https://"))


def url_file(url: str) -> Path:
    """Where a checkpoint URL is kept: torch hub's ``checkpoints`` folder, under a folder named
    by the hash of the whole URL, so that two URLs ending in the same file name never share a
    copy."""
    import torch  # imported here: the CLI reads identities without torch until it runs

    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(torch.hub.get_dir(), "checkpoints", "ppt-bench", folder, name)


def checkpoint_file(checkpoint: str) -> str:
    """The local file of a checkpoint: a path as it is; a URL downloaded once to
    :func:`url_file` (other processes asking for it meanwhile wait for the download), within
    the network's time limit (:func:`ppt_bench.core.network.timeout`).

    Raises:
        UserError: the URL cannot be downloaded, or its server does not answer in time.
    """
    if not is_url(checkpoint):
        return checkpoint
    path = url_file(checkpoint)
    if path.is_file():
        return str(path)
    import torch  # imported here: as in url_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent), network.time_limit() as seconds:
        if not path.is_file():
            try:  # writes a temporary file beside the target and renames it when complete
                torch.hub.download_url_to_file(checkpoint, str(path), progress=False)
            except (OSError, ValueError) as err:
                reason = network.waited(seconds) if network.timed_out(err) else first_line(err)
                raise UserError(
                    f"could not download checkpoint {checkpoint} ({reason or type(err).__name__}); "
                    "check the URL and the network, or pass a local file"
                ) from None
    return str(path)


def checkpoint_digest(checkpoint: str | None) -> str:
    """The content hash of a checkpoint: a local file, or a URL's copy (downloaded now if it
    is not yet, so that a run id never names a URL without its content); '' for none or a path
    that does not exist (refused later)."""
    if checkpoint is None:
        return ""
    path = checkpoint_file(checkpoint)
    return file_digest(path) if os.path.isfile(path) else ""


def data_fingerprint(data: str | None) -> str:
    """A short hash of a data set: the class folders and the stamps (resolved path, size,
    mtime, ctime, inode) of exactly the files an ImageFolder tree loads, in its order
    (:func:`ppt_bench.core.folder.list_image_folder`); the arrays of the built-in digits; '' for
    synthetic inputs (the seed says which) or a folder that does not exist (refused later).

    Raises:
        UserError: an ImageFolder tree whose links loop.
    """
    if data in (None, "synthetic"):
        return ""
    digest = hashlib.sha1()
    if data == "digits":
        from sklearn.datasets import load_digits  # imported here: seconds, for the digits only

        digits = load_digits()
        digest.update(digits.data.tobytes() + digits.target.tobytes())
        return digest.hexdigest()[:12]
    root = class_root(data)
    if not root.is_dir():
        return ""
    listing = list_image_folder(root)
    digest.update(json.dumps(listing.classes).encode())
    for (_, label), stamp in zip(listing.samples, listing.stamps, strict=True):
        digest.update(sample_bytes(label, stamp))
    return digest.hexdigest()[:12]


def machine() -> str:
    """The name of this machine."""
    return socket.gethostname()
