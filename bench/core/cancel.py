"""The one cancellation flag of the process: a signal asks, the work stops at its next check.

The flag has one owner, this module. The ``ppt-bench`` command installs :func:`on_signals`, whose
SIGTERM and SIGINT (Ctrl-C) handlers only call :func:`request`; nothing is raised where the
signal happens to land, so no half-built object (a DataLoader starting its workers, a file
being written) is left behind. The work calls :func:`check` where stopping is clean, and
:func:`check` raises :class:`Cancelled`:

- the runners, between runs (the Ray runner stops its trials through a Tune stopper);
- the accuracy pass and the training loop, between batches; the timed loops, between timed
  rounds and before each model's warm-up; building the image cache, between batches of 32
  images; a sweep's budgets, between the settings it resolves.

So a run stops within one batch or one timed round of the signal, or one step without a loop
inside (building or compiling a model, counting its MACs, waiting for another process's lock on
what it is building). Every file is written whole or not at all, so the runs that finished are
kept in the results file.

A second Ctrl-C raises :class:`KeyboardInterrupt` at once, wherever the process is, for the user
who will not wait for the batch to end; a second SIGTERM changes nothing.

A run that fails after a cancellation was requested is not a failed run: the cancellation is
why (a DataLoader's workers stopped by the same Ctrl-C), so the runners raise
:class:`Cancelled` instead of recording it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# The exit code of a command stopped by each signal, as a shell reports it: 128 + the number.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

_requested = threading.Event()
_reason = ""


class Cancelled(BaseException):
    """The work was asked to stop (:func:`check`); ``reason`` says by what (``SIGTERM``).

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that the handlers that keep one failed
    run from stopping a sweep (``except Exception``) let it through.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def request(reason: str) -> None:
    """Ask the work to stop at its next :func:`check`; the first reason given is kept."""
    global _reason
    if not _requested.is_set():
        _reason = reason
        _requested.set()


def requested() -> bool:
    """Whether a cancellation was requested."""
    return _requested.is_set()


def reason() -> str:
    """What requested the cancellation (``SIGTERM``, ``SIGINT``), or ``""``."""
    return _reason if requested() else ""


def check() -> None:
    """Raise :class:`Cancelled` if a cancellation was requested; else return at once."""
    if _requested.is_set():
        raise Cancelled(_reason)


def clear() -> None:
    """Forget a request (a new command starts with none)."""
    global _reason
    _requested.clear()
    _reason = ""


def _on_signal(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and requested():
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, wherever the process is
    request(name)


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """For the duration of a block, SIGTERM and SIGINT request a cancellation (a second SIGINT
    raises ``KeyboardInterrupt``); the handlers from before are put back after, and the flag
    is cleared before and after. Outside the main thread, where Python runs no signal handler,
    it changes nothing but the flag."""
    clear()
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            clear()
        return
    before = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        clear()


__all__ = ["Cancelled", "check", "clear", "on_signals", "reason", "request", "requested"]
