"""``KEY=VALUE`` items of the command line, their values read as TOML: the one reader of
``run --param`` / ``--sweep``, ``train --param`` and ``visualize --method``."""

from __future__ import annotations

import sys
from typing import Any

from ppt_bench.core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_value(text: str, flag: str = "value") -> Any:
    """Read a CLI value as TOML (``50``, ``7e-5``, ``[3, 6, 9]``, ``true``); else a string.

    Raises:
        UserError: a value that starts like a TOML array or inline table (``[``, ``{``) but
            does not parse, such as ``[3,6``: it is a mistake, not a string.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as err:
        if text.lstrip().startswith(("[", "{")):
            raise UserError(
                f"{flag} {text!r} is not valid TOML ({err}): check its brackets and commas, "
                "e.g. [3, 6, 9]"
            ) from None
        return text


def parse_assignment(text: str, flag: str, usage: str | None = None) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read the value with :func:`parse_value`: the one reader of
    ``KEY=VALUE`` items (``run --param``, ``train --param``, ``visualize --method``).

    Args:
        text: the item.
        flag: the flag it came with, for messages.
        usage: what the flag expects, for the message of a malformed item.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip():
        usage = usage or f"KEY=VALUE (e.g. {flag} r=50)"
        raise UserError(f"{flag} expects {usage}, got {text!r}")
    return key, parse_value(value.strip(), f"{flag} {key}:")


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """Read ``KEY=[V1,V2,...]`` for ``--sweep``."""
    key, values = parse_assignment(text, "--sweep")
    if not isinstance(values, list) or not values:
        raise UserError(
            f"--sweep expects KEY=[V1,V2,...] (e.g. --sweep r=[16,32,50]), got {text!r}"
        )
    return key, values


def show_value(value: Any) -> str:
    """A value as a user writes it after ``KEY=`` (tuples as lists), for help and listings."""
    return str(list(value)) if isinstance(value, tuple) else str(value)
