"""The parts of a forward, labelled for the profiler only while it profiles them.

The patch and the methods open a range around each part of the forward (:func:`part`): the
patch embedding, each attention path, the MLP, the norms and residuals, each of the method's own
steps, the head. A range is a ``torch.profiler.record_function`` named ``ppt::<part>``, opened
only inside :func:`labelled`; elsewhere :func:`part` returns a shared no-op context (well under
a microsecond, where an open ``record_function`` costs several even with no profiler running),
so the timed forwards carry no ranges, and ``torch.compile`` traces through it without a graph
break.

Part names (``ppt_bench.measure.cost`` reads them back):

- ``patch_embed``, ``norm``, ``residual``, ``mlp``, ``head``: the model's own parts;
- ``attention.<path>``: the attention of a block as it was computed, one of :data:`ATTENTION`;
- ``method``: the method's work outside a named step (its call, its state, rope bookkeeping);
  ``method.<step>``, one of :data:`STEPS`: a step the method names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn
from torch.profiler import record_function

PREFIX = "ppt::"
# fused: SDPA without a mask; masked: SDPA with the proportional-attention mask; fold: SDPA with
# the bias in an extra channel; cls_row: the class token's attention row beside fused SDPA;
# map: an explicit attention map a method reads (and its application to the values);
# explicit: softmax attention computed in full (attn_impl="explicit").
ATTENTION = ("fused", "masked", "fold", "cls_row", "map", "explicit")
# What a method's own steps are called: score the tokens, match or cluster them, build a graph,
# merge or gather them, unmerge (restore) them.
STEPS = ("score", "match", "cluster", "graph", "merge", "gather", "unmerge")
MODEL_PARTS = ("patch_embed", "norm", "residual", "mlp", "head")

F = TypeVar("F", bound=Callable[..., Any])
_NULL = contextlib.nullcontext()
_labelled = False


def part(name: str) -> contextlib.AbstractContextManager[object]:
    """The range of one part of the forward, a no-op outside :func:`labelled`.

    Args:
        name: a model part, ``attention.<path>``, ``method`` or ``method.<step>``.
    """
    return record_function(PREFIX + name) if _labelled else _NULL


@contextlib.contextmanager
def labelled() -> Iterator[None]:
    """Open the parts' ranges in the forwards run inside (for the profiler that times them)."""
    global _labelled
    before, _labelled = _labelled, True
    try:
        yield
    finally:
        _labelled = before


def is_labelled() -> bool:
    return _labelled


def step(name: str) -> Callable[[F], F]:
    """Decorate a function as one of a method's steps (``method.<name>``, one of :data:`STEPS`):
    its calls are that step's range inside :func:`labelled`, plain calls elsewhere."""
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}: one of {', '.join(STEPS)}")

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def in_range(*args: Any, **kwargs: Any) -> Any:
            if not _labelled:
                return fn(*args, **kwargs)
            with record_function(f"{PREFIX}method.{name}"):
                return fn(*args, **kwargs)

        return in_range  # type: ignore[return-value]

    return decorate


# The ranges of a model that runs its own forward (the unreduced model, not patched): its
# modules by name, each opening its part's range while it runs. A block's own range is
# ``residual``: what it computes outside its modules is its two residual additions.
_MODULE_PARTS = {
    "patch_embed": "patch_embed",
    "norm_pre": "patch_embed",
    "norm1": "norm",
    "norm2": "norm",
    "mlp": "mlp",
}
_MODEL_PARTS = {"patch_embed": "patch_embed", "norm_pre": "patch_embed", "norm": "norm"}
# Methods of the model that run between its modules, wrapped for the duration.
_MODEL_METHODS = {"_pos_embed": "patch_embed", "forward_head": "head"}


def _attention_part(attn: nn.Module) -> str:
    """timm's own attention: fused SDPA where the module uses it, else explicit softmax."""
    return "attention.fused" if getattr(attn, "fused_attn", False) else "attention.explicit"


@contextlib.contextmanager
def module_ranges(model: nn.Module) -> Iterator[None]:
    """Open the parts' ranges around the modules of a model that is not patched (timm's own
    ``VisionTransformer`` or ``Eva`` forward), by forward hooks removed on exit."""
    handles = []

    def hook(module: nn.Module, name: str) -> None:
        def enter(*_: Any) -> None:
            ranges.append(record_function(PREFIX + name).__enter__())

        def leave(*_: Any) -> None:
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    def wrap(method: str, name: str) -> None:
        plain = getattr(model, method)

        @functools.wraps(plain)
        def in_range(*args: Any, **kwargs: Any) -> Any:
            with record_function(PREFIX + name):
                return plain(*args, **kwargs)

        setattr(model, method, in_range)  # an instance attribute, deleted on exit
        wrapped.append(method)

    ranges: list[Any] = []
    wrapped: list[str] = []
    for method, name in _MODEL_METHODS.items():
        if callable(getattr(model, method, None)) and method not in vars(model):
            wrap(method, name)
    for name, module in model.named_children():
        if name in _MODEL_PARTS:
            hook(module, _MODEL_PARTS[name])
    for block in getattr(model, "blocks", ()):
        hook(block, "residual")
        hook(block.attn, _attention_part(block.attn))
        for name, module in block.named_children():
            if name in _MODULE_PARTS:
                hook(module, _MODULE_PARTS[name])
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for method in wrapped:
            delattr(model, method)
