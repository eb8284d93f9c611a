"""One generic patch that turns a timm ``VisionTransformer`` or ``Eva`` into a token-reducing one.

The model keeps its modules and weights (the state dict is unchanged); only its class is swapped
for a subclass whose ``forward_features`` runs the blocks through the block loop
(:mod:`~ppt_bench.methods.patch.blocks`), which calls the method's ``reduce`` in each reduction
block. Three pieces, each a module:

- :mod:`~ppt_bench.methods.patch.attention`: the attention adapters of timm's ``Attention`` and
  ``EvaAttention`` (fused, folded or explicit attention, with the features a method needs);
- :mod:`~ppt_bench.methods.patch.rope`: rotary positions that follow their tokens;
- :mod:`~ppt_bench.methods.patch.blocks`: the block loop, where the method reduces.

Two block families run through the same loop: timm's ``Block`` / ``Attention`` and the ``Eva``
family's ``EvaBlock`` / ``EvaAttention`` (EVA-02, DINOv3, PE, ``vit_*_rope_*``). After each
forward the model exposes :class:`~ppt_bench.methods.contract.ReductionInfo` as
``model.reduction_info``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers.attention import AttentionRope
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ppt_bench.core.errors import PatchError
from ppt_bench.methods.contract import IN_ATTN, REDUCE_POINTS, VALUE_NORM, ReductionInfo, ViTInfo
from ppt_bench.methods.parts import part
from ppt_bench.methods.patch.attention import ATTN_IMPLS, is_eva
from ppt_bench.methods.patch.blocks import ReductionPlan, run_blocks

if TYPE_CHECKING:
    from ppt_bench.methods.base import Method

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = (
    "qkv",
    "q_norm",
    "k_norm",
    "attn_drop",
    "proj",
    "proj_drop",
    "num_heads",
    "head_dim",
    "scale",
)


class ReducingMixin:
    """Mixed into the model's own class by :func:`patch`; overrides ``forward_features``."""

    reduction_plan: ReductionPlan
    reduction_info: ReductionInfo | None

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise PatchError("a token-reducing model does not take attn_mask or is_causal")
        with part("patch_embed"):
            x = self.patch_embed(x)
            # The patch grid of this input: [B, rows, cols, C] with dynamic image sizes.
            grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
            if is_eva(self):
                # Eva's own: absolute position embedding (if any) and the rope table for this
                # input's grid (per forward for dynamic sizes); patch dropout is refused.
                x, rope = self._pos_embed(x)
            else:
                x, rope = self.patch_drop(self._pos_embed(x)), None
            x = self.norm_pre(x)
        x, self.reduction_info = run_blocks(self.blocks, x, self.reduction_plan, rope, grid)
        with part("norm"):
            return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        with part("head"):
            return super().forward_head(x, pre_logits=pre_logits)


_PATCHED_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if issubclass(cls, ReducingMixin):
        return cls
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Reducing{cls.__name__}", (ReducingMixin, cls), {})
    return _PATCHED_CLASSES[cls]


def check_patchable(model: nn.Module) -> None:
    """Raise :class:`PatchError` saying why ``model`` cannot be patched, if it cannot."""
    if is_eva(model):
        _check_eva(model)
        return
    if not isinstance(model, VisionTransformer):
        raise PatchError(
            f"{type(model).__name__} is not a timm VisionTransformer or Eva: token reduction "
            "patches timm ViT/DeiT/EVA models (see `ppt-bench list --models`)"
        )
    for i, block in enumerate(model.blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        attn = getattr(block, "attn", None)
        missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(attn, p)]
        if missing:
            raise PatchError(
                f"block {i} ({type(block).__name__}) is not a pre-norm timm Block with fused qkv "
                f"attention (missing {', '.join(missing)}); this model cannot be patched"
            )


def _check_eva(model: nn.Module) -> None:
    """The ``Eva`` models the patch runs: pre-norm ``EvaBlock`` with ``EvaAttention``, no patch
    dropout, rope (if any) skipping exactly the model's prefix tokens."""
    name = type(model).__name__
    if getattr(model, "patch_drop", None) is not None:
        raise PatchError(f"{name} uses patch dropout: build it with patch_drop_rate=0 to patch it")
    for i, block in enumerate(model.blocks):
        if type(block) is not EvaBlock or type(block.attn) not in (EvaAttention, AttentionRope):
            raise PatchError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}: the "
                "patch runs pre-norm EvaBlock with EvaAttention or AttentionRope only; this model "
                "cannot be patched"
            )
        if model.rope is not None and block.attn.num_prefix_tokens != model.num_prefix_tokens:
            raise PatchError(
                f"block {i} rotates all but {block.attn.num_prefix_tokens} tokens and the model "
                f"has {model.num_prefix_tokens} prefix tokens; this model cannot be patched"
            )


def uses_rope(model: nn.Module) -> bool:
    """Whether ``model`` carries rotary position embeddings (an ``Eva`` with a ``rope``)."""
    return is_eva(model) and getattr(model, "rope", None) is not None


def vit_info(model: nn.Module, name: str | None = None) -> ViTInfo:
    """The shape of a patchable model (:func:`check_patchable`), for :meth:`Method.check_fits`."""
    return ViTInfo(
        name=name or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__,
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        patch_tokens=model.patch_embed.num_patches,
        prefix_tokens=model.num_prefix_tokens,
        class_token=getattr(model, "cls_token", None) is not None,
    )


def patch(
    model: nn.Module,
    method: Method,
    *,
    trace_source: bool = False,
    attn_impl: str = "fast",
    replace: bool = False,
) -> nn.Module:
    """Make ``model`` reduce tokens with ``method``; returns the same object, patched in place.

    Args:
        model: the model.
        method: the method.
        trace_source: also record which original patches each token stands for.
        attn_impl: one of :data:`~ppt_bench.methods.patch.attention.ATTN_IMPLS`.
        replace: a model that already reduces with a method reduces with ``method`` instead
            (its weights are unchanged); without it such a model is refused, since the first
            method would be replaced silently.

    Raises:
        PatchError: the model is not a timm ``VisionTransformer`` built from standard blocks nor
            an ``Eva`` built from pre-norm ``EvaBlock`` (:func:`check_patchable`), or it already
            reduces with a method and ``replace`` is not set.
        MethodError: the method does not fit the model (:meth:`Method.check_fits`).
    """
    if attn_impl not in ATTN_IMPLS:
        raise PatchError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if is_patched(model) and not replace:
        raise PatchError(
            f"the model already reduces tokens with {model.reduction_plan.method.name}: pass a "
            "fresh model (a copy made before the first patch), or replace=True to reduce with "
            f"{method.name} instead"
        )
    check_patchable(model)
    info = vit_info(model)
    method.check_fits(info)
    method = method.bind(info)
    if method.reduce_at not in REDUCE_POINTS:
        raise PatchError(
            f"{method.name}: reduce_at must be one of {REDUCE_POINTS}, got {method.reduce_at!r}"
        )
    if method.reduce_at == IN_ATTN and VALUE_NORM in method.needs:
        raise PatchError(
            f"{method.name} reduces inside the attention, before the values exist: it cannot "
            "read value_norm"
        )
    locations = method.locations_for(len(model.blocks))
    model.__class__ = _reducing_class(type(model))
    model.reduction_plan = ReductionPlan(
        method=method,
        locations=locations,
        num_prefix=model.num_prefix_tokens,
        attn_impl=attn_impl,
        trace_source=trace_source,
        track_rope=uses_rope(model),
        rope_per_block=bool(getattr(model, "rope_mixed", False)),
    )
    model.reduction_info = None
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` reduces tokens with a method (:func:`patch` made it)."""
    return isinstance(model, ReducingMixin)
