"""What a method and the generic patch exchange: the one page a method author reads.

At each of its reduction blocks a method (:class:`~ppt_bench.methods.base.Method`, whose hooks
say where and how it reduces) **receives** the tokens ``x [B, N, C]`` (prefix tokens first),
their sizes ``size [B, N, 1]`` (patches each token stands for), the optional ``source`` map and
the attention :class:`Features` it asked for in ``Method.needs``; it **returns** a
:class:`Reduced`: fewer tokens, their sizes, and optionally where each came from, the attention
map over them, the state it **keeps between blocks** (``Reduced.state``, read back as
``Features.state`` at its next block) and the per-image figures it **reports**
(``Reduced.stats``, stacked per location into :attr:`ReductionInfo.stats` after each forward;
a boolean figure becomes the ``<name>_frac_block_<i>`` rows of the tokens metric).

A method also declares what the rest of the harness needs about it (:class:`Examples` for the
shared contract tests, :class:`PlotStyle`, its :class:`Knob` for budgets), and checks that it
fits a model from its :class:`ViTInfo`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ppt_bench.core.errors import MethodError

__all__ = [
    "AFTER_ATTN", "AFTER_MLP", "ATTN", "CLS_ATTN", "FAMILIES", "FEATURES", "IN_ATTN", "KEY_MEAN",
    "REDUCE_POINTS", "VALUE_NORM", "Examples", "Features", "Knob", "PlotStyle", "Reduced",
    "ReductionInfo", "ViTInfo",
]  # fmt: skip

# What a method can ask the patch for at a reduction location (``Method.needs``).
CLS_ATTN = "cls_attn"  # class-token attention row, [B, H, N]
KEY_MEAN = "key_mean"  # keys averaged over heads, [B, N, d]
VALUE_NORM = "value_norm"  # L2 norm of each token's value vector, [B, N]
ATTN = "attn"  # the full post-softmax attention map, [B, H, N, N]
FEATURES = frozenset({CLS_ATTN, KEY_MEAN, VALUE_NORM, ATTN})

# Where in a block a method reduces tokens (``Method.reduce_at``).
AFTER_ATTN = "after_attn"  # after the attention residual, before the MLP
IN_ATTN = "in_attn"  # inside the attention: on the block input, with the attention map
AFTER_MLP = "after_mlp"  # after the MLP residual, on the block output
REDUCE_POINTS = (AFTER_ATTN, IN_ATTN, AFTER_MLP)

# A method's family, which says what it does with the tokens it removes (and its plot marker).
FAMILIES = ("baseline", "pruning", "merging", "hybrid", "other")


class Features(NamedTuple):
    """Attention features of one block, computed only when a method needs them."""

    cls_attn: torch.Tensor | None = None  # class-token attention row, [B, H, N]
    key_mean: torch.Tensor | None = None  # keys averaged over heads, [B, N, d]
    value_norm: torch.Tensor | None = None  # value norm of each token, [B, N]
    attn: torch.Tensor | None = None  # the full post-softmax attention map, [B, H, N, N]
    # The method's per-forward state (Method.initial_state), as its last reduction left it.
    state: Any = None
    # Whether the patch reads Reduced.origin at this reduction (the model's rotary positions
    # follow the tokens); where False a method may skip computing it and leave it None.
    needs_origin: bool = True


class Reduced(NamedTuple):
    """Tokens after a reduction step.

    ``stats`` maps names to per-image figures (``[B]`` tensors) that the method reports at this
    location, such as PPT's branch choice (``pooled``, bool) and the variance that decided it
    (``score_var``); the patch stacks them per location into :attr:`ReductionInfo.stats`. A
    method reports the same names at every location, or none.

    ``attn`` (``[B, H, N', N']``) is required from a method that reduces inside the attention
    (``reduce_at = "in_attn"``): the attention map over the reduced tokens, which the block then
    applies to their values.

    ``origin`` (int64 ``[B, N']``) says which input token each output token descends from: a
    kept token its own index, a merged token its destination's (the token the matching merged
    the others into), so that a token's rotary position follows it. None where a step leaves
    the tokens as they are, where output tokens are mixtures with no single ancestor, or where
    the patch does not read it (``Features.needs_origin`` False: a model without rotary
    embeddings).

    ``state`` is the method's per-forward state after this step (a method with
    :meth:`~ppt_bench.methods.base.Method.initial_state` returns it at every step; for the others
    it stays None).
    """

    x: torch.Tensor  # [B, N', C]
    size: torch.Tensor  # [B, N', 1]
    source: torch.Tensor | None = None  # [B, N', N0] when source tracking is on
    stats: Mapping[str, torch.Tensor] | None = None  # name -> [B], reported per location
    attn: torch.Tensor | None = None
    origin: torch.Tensor | None = None  # [B, N'] int64, index of each token's input token
    state: Any = None  # the method's per-forward state, carried to its next reduction


class ReductionInfo(NamedTuple):
    """What the reduction did in the last forward (``model.reduction_info``).

    Attributes:
        tokens: tokens left after each block (prefix included).
        locations: the reduction blocks, in order.
        stats: name -> ``[B, len(locations)]``, the per-image figures the method reported at
            each location (:attr:`Reduced.stats`): ``stats["pooled"]`` says which images took
            PPT's pooling branch. Empty for a method that reports none.
        source: ``[B, N_final, N0]`` original tokens each final token stands for, when traced.
    """

    tokens: tuple[int, ...]
    locations: tuple[int, ...]
    stats: Mapping[str, torch.Tensor] = {}
    source: torch.Tensor | None = None


@dataclass(frozen=True)
class Examples:
    """Settings of a method that the shared contract tests (:mod:`ppt_bench.testing`) run.

    Args:
        identity: parameters that reduce nothing on any model: the patched model must give the
            unpatched logits. None (the default): the budget knob at its end that removes
            nothing (``r=0``, ``keep_rate=1``).
        reducing: parameters that remove tokens from a 12-block model with 36 to 64 patch
            tokens (the contract suite's small timm backbones).
        invalid: values of its parameters the constructor must refuse with a ``MethodError``
            that names the parameter (``{"keep_rate": (0, 1.5)}``): its ranges, choices and
            the rules of its other types. The refused values of a plain ``bool``, ``int``,
            ``float`` or ``tuple[int, ...]`` parameter need no listing: the suite derives them.
    """

    identity: Mapping[str, Any] | None = None
    reducing: Mapping[str, Any] | None = None
    invalid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlotStyle:
    """How a method is drawn in every plot of every report.

    Args:
        color: a matplotlib colour; None picks one from the method's name.
        marker: a matplotlib marker; None picks one of its family's shapes from its name.
    """

    color: str | None = None
    marker: str | None = None


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
