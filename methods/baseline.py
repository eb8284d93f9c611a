"""The unreduced model: no patch at all, so it runs timm's own fused attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ppt_bench.methods.base import Method
from ppt_bench.methods.contract import Examples
from ppt_bench.methods.patch import is_patched


@dataclass(frozen=True)
class Baseline(Method):
    """No token reduction; the model is returned untouched."""

    description = "no reduction: the unpatched timm model with its fused attention"
    family = "baseline"
    examples = Examples()

    def apply(
        self,
        model: nn.Module,
        *,
        trace_source: bool = False,
        attn_impl: str = "fast",
        replace: bool = False,
    ):
        """Return ``model`` unchanged; with ``trace_source`` or explicit attention, patch it with
        no reduction so that it reports token statistics like the other methods. (With no
        merged tokens there is no bias to fold: ``"fold"`` is timm's own attention too.) A model
        that already reduces is refused, as by every method, or with ``replace`` patched to
        reduce nothing."""
        if trace_source or attn_impl == "explicit" or is_patched(model):
            return super().apply(
                model, trace_source=trace_source, attn_impl=attn_impl, replace=replace
            )
        return model
