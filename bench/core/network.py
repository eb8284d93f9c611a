"""The time limit of every read from the network: a checkpoint downloaded from a URL, and the
pretrained weights of a timm tag (from the Hugging Face hub or a plain URL).

A server that accepts the connection but never answers would otherwise hold a run forever.
Within :func:`time_limit`, a connection, and each read on it, that waits longer than
:func:`timeout` seconds fails with ``TimeoutError`` (an ``OSError``); a slow download that keeps
sending is not cut.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Iterator

from ppt_bench.core.errors import UserError

# Seconds a connection or a read may wait for the server, unless TIMEOUT_VARIABLE says.
DEFAULT_TIMEOUT = 60.0
TIMEOUT_VARIABLE = "PPT_BENCH_TIMEOUT"
# The Hugging Face hub client's own limits (10 s by default), set to ours within time_limit
# unless the environment sets them.
_HUB_TIMEOUTS = ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT")


def timeout() -> float:
    """Seconds a network connection or read may wait: ``$PPT_BENCH_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT`.

    Raises:
        UserError: the variable is not a positive number of seconds.
    """
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(
            f"{TIMEOUT_VARIABLE}={text!r} is not a positive number of seconds: set it to one, "
            f"or unset it for the default of {DEFAULT_TIMEOUT:g} s"
        )
    return seconds


@contextlib.contextmanager
def time_limit() -> Iterator[float]:
    """Give every socket opened within it the time limit :func:`timeout` (urllib's, which torch
    hub and timm's URL weights read through, take the default), and the Hugging Face hub
    client, where it is loaded, the same limit; yields the limit in seconds.

    The default is the process's: sockets other threads open meanwhile get the limit too.
    """
    seconds = timeout()
    hub = sys.modules.get("huggingface_hub.constants")  # loaded by timm when it is installed
    names = [n for n in _HUB_TIMEOUTS if hasattr(hub, n) and n not in os.environ]
    saved = {name: getattr(hub, name) for name in names}
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    for name in saved:
        setattr(hub, name, seconds)
    try:
        yield seconds
    finally:
        socket.setdefaulttimeout(before)
        for name, value in saved.items():
            setattr(hub, name, value)


def timed_out(err: BaseException) -> bool:
    """Whether ``err``, or an error it wraps or was raised from (urllib's ``URLError``, the hub
    client's own errors), is a time limit that ran out: a ``TimeoutError`` or an error type
    named ``...Timeout`` (httpx's)."""
    seen: set[int] = set()
    stack: list[object] = [err]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, TimeoutError) or type(item).__name__.endswith("Timeout"):
            return True
        stack += [getattr(item, "reason", None), item.__cause__, item.__context__]
    return False


def waited(seconds: float) -> str:
    """What to say when the server did not answer: the limit, and how to change it."""
    return (
        f"no answer within {seconds:g} s (set {TIMEOUT_VARIABLE} to wait longer, default "
        f"{DEFAULT_TIMEOUT:g} s)"
    )
