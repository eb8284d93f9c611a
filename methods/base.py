"""The one interface every token reduction method implements.

A method is a frozen dataclass of its parameters, validated on construction. At each of its
locations the generic patch (:mod:`ppt_bench.methods.patch`) hands it the tokens after the
attention residual, with only the attention features it asks for, and takes back fewer tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from ppt_bench.errors import MethodError

if TYPE_CHECKING:
    from torch import nn

# What a method can ask the patch for at a reduction location.
CLS_ATTN = "cls_attn"  # class-token attention row, [B, H, N]
KEY_MEAN = "key_mean"  # keys averaged over heads, [B, N, d]
VALUE_NORM = "value_norm"  # L2 norm of each token's value vector, [B, N]
ATTN = "attn"  # the full post-softmax attention map, [B, H, N, N]
FEATURES = frozenset({CLS_ATTN, KEY_MEAN, VALUE_NORM, ATTN})

# Where in a block a method reduces tokens (``Method.reduce_at``).
AFTER_ATTN = "after_attn"  # after the attention residual, before the MLP (ALGORITHMS.md)
IN_ATTN = "in_attn"  # inside the attention: on the block input, with the attention map
AFTER_MLP = "after_mlp"  # after the MLP residual, on the block output
REDUCE_POINTS = (AFTER_ATTN, IN_ATTN, AFTER_MLP)


class Features(NamedTuple):
    """Attention features of one block, computed only when a method needs them."""

    cls_attn: torch.Tensor | None = None
    key_mean: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None
    attn: torch.Tensor | None = None


class Reduced(NamedTuple):
    """Tokens after a reduction step.

    ``pooled`` (bool ``[B]``) and ``score_var`` (``[B]``) are set by methods that choose a
    branch per image (ppt); they are recorded per location after each forward. ``attn``
    (``[B, H, N', N']``) is required from a method that reduces inside the attention
    (``reduce_at = "in_attn"``): the attention map over the reduced tokens, which the block then
    applies to their values.
    """

    x: torch.Tensor  # [B, N', C]
    size: torch.Tensor  # [B, N', 1]
    source: torch.Tensor | None = None  # [B, N', N0] when source tracking is on
    pooled: torch.Tensor | None = None
    score_var: torch.Tensor | None = None
    attn: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    """Base class: subclasses are frozen dataclasses registered with ``@register_method``.

    Class attributes:
        name: registry name, set by ``register_method``.
        description: one line for ``ppt-bench list``.
        needs: the :data:`FEATURES` this method reads at a location.
        reduce_at: where in a block it reduces, one of :data:`REDUCE_POINTS`:
            ``"after_attn"`` (``reduce`` gets the tokens after the attention residual),
            ``"in_attn"`` (``reduce`` gets the block input and ``feats.attn``, the attention
            map of the block's tokens, and returns the reduced tokens with the attention map
            over them in ``Reduced.attn``; the block applies it to the reduced tokens' values,
            then runs its MLP) or ``"after_mlp"`` (``reduce`` gets the block output).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    reduce_at: ClassVar[str] = AFTER_ATTN

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MethodError` for a parameter outside its valid range."""

    @property
    def prop_attn(self) -> bool:
        """Whether blocks after the first reduction use proportional attention."""
        return False

    def locations_for(self, depth: int) -> tuple[int, ...]:
        """Blocks (0-indexed) where this method reduces tokens in a model of ``depth`` blocks."""
        return ()

    def reduce(
        self,
        x: torch.Tensor,
        size: torch.Tensor,
        feats: Features,
        *,
        block: int,
        num_prefix: int,
        source: torch.Tensor | None = None,
    ) -> Reduced:
        """Reduce tokens ``x [B, N, C]`` (prefix first) at ``block``; see :class:`Reduced`."""
        return Reduced(x, size, source)

    def uncounted_macs(self, tokens: tuple[int, ...], num_prefix: int, dim: int) -> int:
        """Multiply-accumulates of one image that torchprofile and fvcore do not count.

        Args:
            tokens: tokens entering each block, then the tokens after the last block
                (``L + 1`` counts, prefix included).
            num_prefix: ``P``.
            dim: channels ``C``.

        Returns:
            0 unless the method runs operators the counters skip (an FFT, say); then their
            cost by formula, which :func:`ppt_bench.macs.measure_macs` adds to its figures.
        """
        return 0

    def params(self) -> dict[str, Any]:
        """The parameters as plain values (tuples become lists), for records and reports."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def apply(
        self, model: nn.Module, *, trace_source: bool = False, attn_impl: str = "fast"
    ) -> nn.Module:
        """Patch a timm ``VisionTransformer`` in place and return it (same weights).

        Args:
            model: the model; its class is swapped for a reducing subclass.
            trace_source: also record which original patches each token stands for.
            attn_impl: ``"fast"`` (fused SDPA, class-token row only where needed, the
                proportional-attention bias as a mask), ``"fold"`` (the same with the bias in an
                extra query/key channel instead of a mask) or ``"explicit"`` (full softmax
                attention in every block, the reference).
        """
        from ppt_bench.methods.patch import patch

        return patch(model, self, trace_source=trace_source, attn_impl=attn_impl)


# -- parameter checks shared by the methods ---------------------------------------------------


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_locations(value: Any, default: Iterable[int] | None = None) -> tuple[int, ...]:
    """Block indices as a sorted tuple of distinct non-negative ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        locs = tuple(value)
    except TypeError:
        raise MethodError(
            f"locations must be a list of block indices like [3, 6, 9], got {value!r}"
        ) from None
    for loc in locs:
        check_int("each location", loc)
    if len(set(locs)) != len(locs):
        raise MethodError(f"locations must be distinct, got {list(locs)}")
    return tuple(sorted(locs))


def check_locations_fit(locations: tuple[int, ...], depth: int) -> None:
    """A location must name one of the model's blocks, 0 to depth - 1."""
    bad = [loc for loc in locations if loc >= depth]
    if bad:
        raise MethodError(
            f"locations {bad} are outside the model's blocks: valid locations are 0 to {depth - 1}"
        )


def check_float(name: str, value: Any, minimum: float = 0.0, allow_inf: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{name} must be a number >= {minimum}, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < minimum or (math.isinf(value) and not allow_inf):
        bound = f">= {minimum}" + (" (inf allowed)" if allow_inf else " and finite")
        raise MethodError(f"{name} must be {bound}, got {value!r}")
    return value


def set_field(obj: Method, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in ``validate``."""
    object.__setattr__(obj, name, value)
