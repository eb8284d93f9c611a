"""ToMe's ``r`` schedules (``parse_r``) and the base of the methods that reduce by one.

A schedule says how many tokens each block removes: a constant ``r``, an ``(r, inflection)``
pair, or one ``r`` per block. ``tome`` merges and ``dct`` resamples by it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import Method, check_int, check_r_budget, r_knob, set_field
from ppt_bench.methods.contract import Knob, ViTInfo

if TYPE_CHECKING:
    pass

Schedule = int | tuple[int, float] | tuple[int, ...]

_R_HELP = (
    "r must be an integer >= 0, an (r, inflection) pair with inflection a float in [-1, 1] "
    "(e.g. [16, -1.0]), or a list of integers >= 0, one per block"
)


def parse_schedule(r: Any) -> Schedule:
    """Normalise a user's ``r`` to an int, an ``(int, float)`` pair or a tuple of ints.

    A Python tuple of two items is an ``(r, inflection)`` pair, as in ToMe. From TOML or JSON
    every sequence arrives as a list, so a two-item list whose second item is a float
    (``[16, -1.0]``) is a pair too; any other list gives one ``r`` per block.

    Raises:
        MethodError: anything else, with the forms ``r`` can take.
    """
    if isinstance(r, bool):
        raise MethodError(f"{_R_HELP}, got {r!r}")
    if isinstance(r, int):
        return check_int("r", r)
    if not isinstance(r, Sequence) or isinstance(r, str):
        raise MethodError(f"{_R_HELP}, got {r!r}")
    items = list(r)
    is_pair = len(items) == 2 and (isinstance(r, tuple) or isinstance(items[1], float))
    if is_pair:
        base, inflect = items
        check_int("r of an (r, inflection) pair", base)
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)):
            raise MethodError(f"{_R_HELP}, got {r!r}")
        if not (math.isfinite(inflect) and -1.0 <= inflect <= 1.0):
            raise MethodError(
                f"the inflection of an (r, inflection) pair must be in [-1, 1], got {r!r}"
            )
        return (base, float(inflect))
    for value in items:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MethodError(f"{_R_HELP}, got {r!r}")
    # A trailing 0 changes nothing (lists are padded with 0) and keeps a two-block list from
    # reading as a pair when the method is validated again (``dataclasses.replace``).
    return (*items, 0) if len(items) == 2 else tuple(items)


def is_pair(r: Schedule) -> bool:
    """Whether a normalised schedule is an ``(r, inflection)`` pair."""
    return isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)


def per_block_r(r: Schedule, depth: int) -> tuple[int, ...]:
    """The tokens each of ``depth`` blocks asks to merge away (ToMe's ``parse_r``).

    Args:
        r: a normalised schedule (:func:`parse_schedule`).
        depth: number of blocks ``L``.

    Returns:
        ``L`` requested reductions; each block still merges at most ``(N - P) // 2``.

    Raises:
        MethodError: a per-block list longer than the model.
    """
    if isinstance(r, int):
        return (r,) * depth
    if is_pair(r):
        base, inflect = r
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
        return tuple(int(lo + step * i) for i in range(depth))
    if len(r) > depth and any(r[depth:]):
        raise MethodError(
            f"r lists {len(r)} blocks but the model has {depth}: give at most one r per block"
        )
    return (*r[:depth], *(0,) * (depth - len(r)))


@dataclass(frozen=True)
class Scheduled(Method):
    """A method that removes tokens in the blocks of a ToMe schedule.

    Args:
        r: tokens removed per block: an int (constant), an ``(r, inflection)`` pair
            (``min = int(r * (1 - inflection))``, ``max = 2r - min``, block ``i`` of ``L`` gets
            ``int(min + (max - min) / (L - 1) * i)``; inflection -1 is ToMe's "decreasing"
            schedule), or a list with one ``r`` per block (padded with 0). Default 13, ToMe's
            off-the-shelf setting for ViT-S/16.
    """

    demo_grid = ("r", (2, 3, 4))
    r: Schedule = 13

    def validate(self) -> None:
        set_field(self, "r", parse_schedule(self.r))

    def schedule(self, depth: int) -> tuple[int, ...]:
        """Requested ``r`` of each of ``depth`` blocks."""
        return per_block_r(self.r, depth)

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.schedule(depth)) if r > 0)

    def check_fits(self, info: ViTInfo) -> None:
        """Also refuse an ``r`` list longer than the model's blocks."""
        super().check_fits(info)
        self.schedule(info.depth)

    def check_budget(self, info: ViTInfo, given: Collection[str] = ()) -> None:
        if "r" in given:
            check_r_budget(max(self.schedule(info.depth), default=0), info)

    def budget_knob(self, info: ViTInfo) -> Knob:
        """A constant ``r`` in every block."""
        return r_knob(info)

    def bind(self, info: ViTInfo) -> Method:
        """The schedule resolved for the model's depth: the patched model's
        ``reduction_plan.method`` carries the per-block list, since an ``(r, inflection)`` pair
        only means something for a given depth."""
        return dataclasses.replace(self, r=list(self.schedule(info.depth)))

    def block_r(self, block: int, num_tokens: int, num_prefix: int) -> int:
        """Tokens block ``block`` removes from ``num_tokens``: ``min(r, (N - P) // 2)``."""
        if is_pair(self.r):
            raise MethodError(
                "an (r, inflection) schedule needs the model depth: use .apply(model)"
            )
        requested = self.r if isinstance(self.r, int) else self.r[block]
        return ops.max_reduction(num_tokens, num_prefix, requested)
