"""What a method and the generic patch agree on: the attention features a method may ask for at
a reduction location, where in a block it reduces, and the shape of the model it reduces.

The tensors they exchange (:class:`~ppt_bench.methods.ops.Features` in,
:class:`~ppt_bench.methods.ops.Reduced` out) are in :mod:`ppt_bench.methods.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppt_bench.core.errors import MethodError

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


@dataclass(frozen=True)
class ViTInfo:
    """The shape of a patchable ViT: what a method needs to know to check that it fits.

    Args:
        name: model name.
        depth: transformer blocks.
        embed_dim: channels per token.
        patch_tokens: patch tokens at the default input size.
        prefix_tokens: class, distillation and register tokens.
        class_token: whether one of them is a class token (methods that rank tokens by its
            attention need one).
    """

    name: str
    depth: int
    embed_dim: int
    patch_tokens: int
    prefix_tokens: int
    class_token: bool = True


@dataclass(frozen=True)
class Knob:
    """The parameter a method's budget resolves (:meth:`Method.budget_knob`).

    A sweep at a budget (``--budget macs=0.7``) sets this one parameter to the value that meets
    the budget and keeps every other parameter as given.

    Args:
        param: the parameter's name.
        kind: ``"int"`` (every integer from ``low`` to ``high``), ``"float"`` (any value in
            ``[low, high]``) or ``"choice"`` (one of ``choices``).
        low: the smallest allowed value (``int`` and ``float``).
        high: the largest allowed value (``int`` and ``float``).
        more_at_high: whether a higher value removes more tokens (``r``) rather than fewer
            (``keep_rate``, ``ratio``). Over its range the cost must not rise in that direction.
        choices: the allowed values of a ``"choice"`` knob, in any order.
        digits: decimals a resolved ``float`` value keeps.
    """

    param: str
    kind: str = "int"
    low: float = 0
    high: float = 0
    more_at_high: bool = True
    choices: tuple[Any, ...] = ()
    digits: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "choice"):
            raise MethodError(f"a knob's kind is int, float or choice, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise MethodError(f"knob {self.param!r} of kind choice lists no choices")
        if self.kind != "choice" and not self.low <= self.high:
            raise MethodError(f"knob {self.param!r}: low {self.low} is above high {self.high}")

    def values(self) -> tuple[Any, ...]:
        """Every allowed value of an ``int`` or ``choice`` knob (a ``float`` knob has none)."""
        if self.kind == "int":
            return tuple(range(int(self.low), int(self.high) + 1))
        return self.choices
