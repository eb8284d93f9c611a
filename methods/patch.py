"""One generic patch that turns a timm ``VisionTransformer`` or ``Eva`` into a token-reducing one.

The model keeps its modules and weights (the state dict is unchanged); only its class is swapped
for a subclass whose ``forward_features`` runs the blocks through :func:`reducing_block`, which
follows timm 1.0's ``Block`` exactly (LayerScale, qk-norm, attention output norm, gated
attention, dropout, drop path) and calls the method's ``reduce`` in each reduction block, where
the method's ``reduce_at`` says: after the attention residual (most methods), inside the
attention (the block's attention map is computed, the method reduces the block input and the
map, and the reduced map is applied to the reduced tokens' values) or after the MLP. Prefix
tokens (class, distillation, register) are carried but never reduced.

Two block families run through the same loop: timm's ``Block`` / ``Attention`` and the
``Eva`` family's ``EvaBlock`` / ``EvaAttention`` (EVA-02, DINOv3, PE, ``vit_*_rope_*``: fused or
separate q/k/v projections with their biases, SwiGLU or GLU MLPs, LayerScale as ``gamma_1`` /
``gamma_2``). Small adapters (:func:`project_qkv`, :func:`layer_scale`) give q, k, v and the
residual branches of either.

Rotary position embeddings follow their tokens. The model computes its rope table once per
forward for the patch grid (``[N0, D]``, or ``[depth, H, N0, D]`` for mixed rope, one per block);
the patch carries, for every token, the index of the original patch whose embedding it uses
(``pos [B, N]``, prefix entries unused) and gathers each block's rope from the table with it.
A method that ``gives_origin`` says at each reduction which input token every output token
descends from (``Reduced.origin``: a kept token itself, a merged token the matching's
destination, even where a source merged into it stands for more patches), and the output token
takes that token's position (:func:`follow_origin`). For any other method (DCT, whose output
tokens are mixtures of all input tokens with no destination, or a third-party method) the
method also reduces a one-hot ``[B, N, N]`` membership map through its ``source`` path, and each
output token takes the position of its member weighing most, ``member * size``, the first in
token order among equals (:func:`follow_positions`): a gathered token keeps its own, a
resampled one takes the input token that weighs most in it. Batches stay rectangular and
shapes static.

A method may carry state of its own through a forward with its tokens (GTP-ViT's token graph):
``Method.initial_state`` builds it once, from the tokens entering the first block and the patch
grid of the input, each reduction reads it as ``Features.state`` and returns the next one as
``Reduced.state``. A method that reads the attention map may also change the map its reduction
blocks apply to the values (``Method.edit_attention``: GTP-ViT's sparse attention).

After each forward the model exposes :class:`ReductionInfo` as ``model.reduction_info``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ppt_bench.core.errors import PatchError
from ppt_bench.methods import ops
from ppt_bench.methods.interface import (
    AFTER_ATTN,
    AFTER_MLP,
    ATTN,
    CLS_ATTN,
    IN_ATTN,
    KEY_MEAN,
    REDUCE_POINTS,
    VALUE_NORM,
    ViTInfo,
)
from ppt_bench.methods.ops import Features, Reduced

if TYPE_CHECKING:
    from ppt_bench.methods.base import Method

# "fast": fused SDPA, the proportional-attention bias as an additive mask; "fold": fused SDPA
# with the bias carried in an extra query/key channel, so that no mask is needed (blocks with
# qk-norm fall back to the mask); "explicit": full softmax attention, the reference.
ATTN_IMPLS = ("fast", "fold", "explicit")
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


class ReductionInfo(NamedTuple):
    """What the reduction did in the last forward.

    Attributes:
        tokens: tokens left after each block (prefix included).
        locations: the reduction blocks, in order.
        pooled: ``[B, len(locations)]`` bool, images that took the pooling branch (ppt only).
        score_var: ``[B, len(locations)]`` variance of the significance scores (ppt only).
        source: ``[B, N_final, N0]`` original tokens each final token stands for, when traced.
    """

    tokens: tuple[int, ...]
    locations: tuple[int, ...]
    pooled: torch.Tensor | None = None
    score_var: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass(frozen=True)
class ReductionPlan:
    """A method bound to one model: where it reduces and how attention is computed."""

    method: Method
    locations: tuple[int, ...]
    num_prefix: int
    attn_impl: str = "fast"
    trace_source: bool = False
    track_rope: bool = False  # the model has rotary embeddings: carry each token's position
    rope_per_block: bool = False  # mixed rope: one table per block, ``[depth, H, N0, D]``

    @property
    def bias_from(self) -> int:
        """First block that sees merged sizes: proportional attention starts after it."""
        if not self.method.prop_attn or not self.locations:
            return 1 << 30
        return self.locations[0] + 1


def fold_width(head_dim: int) -> int:
    """Head width with room for the bias channel: the next multiple of 8 above ``head_dim``."""
    return head_dim + 8 - head_dim % 8


def is_eva(module: nn.Module) -> bool:
    """Whether ``module`` is an ``Eva`` model, block or attention (``EvaAttention`` or
    ``AttentionRope``), rather than timm's ViT."""
    return isinstance(module, (Eva, EvaBlock, EvaAttention, AttentionRope))


def can_fold(attn: nn.Module) -> bool:
    """Whether the bias can ride in an extra channel: a plain qkv projection, and q and k not
    normalised per head nor rotated (``Eva`` attention falls back to the mask)."""
    plain = isinstance(attn.qkv, nn.Linear) and not is_eva(attn)
    return plain and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)


def folded_qkv(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, w]`` whose scaled products carry the bias: ``q'.k' * scale = q.k *
    scale + log(size_k)``.

    The qkv projection is zero-padded from ``d`` to ``w = fold_width(d)`` channels per head:
    q's first extra channel is the constant 1 (a bias term), k's holds ``log(size) / scale``
    (written in place), v's are 0, so the attention output's extra channels are 0 and are
    dropped. Fused kernels take ``w`` (a multiple of 8) where they would not take a mask.

    Args:
        attn: a timm ``Attention`` module without qk-norm (:func:`can_fold`).
        x: normalised tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` patches each token stands for.
    """
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    w = fold_width(d)
    weight = F.pad(attn.qkv.weight.view(3, H, d, C), (0, 0, 0, w - d))
    if attn.qkv.bias is None:
        bias = weight.new_zeros(3, H, w)
    else:
        bias = F.pad(attn.qkv.bias.view(3, H, d), (0, w - d))
    bias[0, :, d] = 1.0
    qkv = F.linear(x, weight.reshape(3 * H * w, C), bias.reshape(-1)).view(B, N, 3, H, w)
    qkv[:, :, 1, :, d] = size.log() / attn.scale
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _eva_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, H, N, d]`` (k and v ``[B, H_kv, N, d]`` with grouped-query attention) of an
    ``EvaAttention`` or ``AttentionRope`` before qk-norm and rope, as timm computes them: one
    fused projection (``EvaAttention``: with the q/k/v biases concatenated), or three."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    if attn.qkv is None:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        return tuple(p(x).reshape(B, N, -1, d).transpose(1, 2) for p in projs)
    if getattr(attn, "q_bias", None) is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x) + bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
    return qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)


def _expand_kv(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Grouped-query keys or values ``[B, H_kv, N, d]`` repeated to every head, as timm does."""
    groups = getattr(attn, "num_kv_groups", 1)
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def rotate(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor | None, like: torch.Tensor):
    """Queries or keys ``[B, H, N, d]`` with the rotary embedding ``rope`` applied to the patch
    tokens (the attention's ``num_prefix_tokens`` first ones are left as they are), as timm's
    ``EvaAttention`` does.

    Args:
        rope: ``[Np, D]`` / ``[H, Np, D]`` (the model's table) or ``[B, 1 or H, Np, D]`` (gathered
            per image after a reduction), or None.
        like: the values, whose dtype the result takes.
    """
    if rope is None:
        return t
    P = attn.num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, P:, :], rope, half=attn.rotate_half)
    return torch.cat([t[:, :, :P, :], rotated], dim=2).type_as(like)


def project_qkv(
    attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, d]`` of a timm ``Attention`` or ``EvaAttention``: projected, qk-norm
    applied, and for ``Eva`` the rotary embedding of the current tokens (:func:`rotate`)."""
    B, N, _ = x.shape
    if is_eva(attn):
        q, k, v = _eva_qkv(attn, x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate(attn, q, rope, v), rotate(attn, k, rope, v)
        return q, _expand_kv(attn, k), _expand_kv(attn, v)
    H, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _qk(
    attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ``[B, H, N, d]`` of a timm ``Attention`` (after qk-norm), without v.

    A plain ``nn.Linear`` qkv projection computes only its first ``2 C`` output channels; an
    ``EvaAttention`` computes all three (:func:`project_qkv`).
    """
    if is_eva(attn):
        return project_qkv(attn, x, rope)[:2]
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    if isinstance(attn.qkv, nn.Linear):
        bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * H * d]
        qk = F.linear(x, attn.qkv.weight[: 2 * H * d], bias)
    else:
        qk = attn.qkv(x)[..., : 2 * H * d]
    q, k = qk.reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


def _values(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """v ``[B, H, N, d]`` of a timm ``Attention`` or ``EvaAttention``, without q and k."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    if is_eva(attn):
        if attn.qkv is None:
            return _expand_kv(attn, attn.v_proj(x).reshape(B, N, -1, d).transpose(1, 2))
        if hasattr(attn, "v_bias"):  # EvaAttention: the biases are separate parameters
            bias = attn.v_bias
        else:
            bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * H * d :]
        v = F.linear(x, attn.qkv.weight[2 * H * d :], bias)
        if getattr(attn, "qkv_bias_separate", False) and bias is not None:
            v = F.linear(x, attn.qkv.weight[2 * H * d :]) + bias
    elif isinstance(attn.qkv, nn.Linear):
        bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * H * d :]
        v = F.linear(x, attn.qkv.weight[2 * H * d :], bias)
    else:
        v = attn.qkv(x)[..., 2 * H * d :]
    return v.reshape(B, N, H, d).transpose(1, 2)


def _softmax_attention(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Post-softmax attention ``[B, H, N, N]`` with an optional additive mask."""
    a = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    if mask is not None:
        a = a + mask
    return a.softmax(dim=-1)


def _output(
    attn: nn.Module, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """Heads ``[B, H, N, w]`` to the attention output ``[B, N, C]`` (norm, gate, proj)."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    out = out[..., :d].transpose(1, 2).reshape(B, N, H * d)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _gate(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor | None,
    needs: frozenset[str],
    impl: str = "fast",
    rope: torch.Tensor | None = None,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Features]:
    """timm ``Attention.forward`` (or ``EvaAttention.forward``) that also returns the features a
    method needs.

    Args:
        attn: a timm ``Attention`` or ``EvaAttention`` module.
        x: normalised tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` patches each token stands for, for proportional attention (a
            ``log(size)`` bias per key), or None.
        needs: subset of :data:`~ppt_bench.methods.base.FEATURES`; ``"attn"`` (the full map)
            makes this block compute its attention explicitly.
        impl: one of :data:`ATTN_IMPLS`.
        rope: the rotary embedding of the current patch tokens (:func:`rotate`), or None.
        edit: where the method reads ``"attn"``, its :meth:`~Method.edit_attention` of this
            block: the map it returns is applied to the values and handed to the method.

    Returns:
        The attention output ``[B, N, C]`` (after ``proj``) and the requested features.
    """
    d = attn.head_dim
    gate = _gate(attn, x)
    mask = None
    if size is not None and impl == "fold" and ATTN not in needs and can_fold(attn):
        q, k, v = folded_qkv(attn, x, size)  # [B, H, N, w], the bias inside q.k
    else:
        q, k, v = project_qkv(attn, x, rope)
        if size is not None:
            mask = ops.prop_attn_bias(size).to(q.dtype)  # [B, 1, 1, N]

    cls_attn = full = None
    if impl == "explicit" or ATTN in needs:
        a = _softmax_attention(attn, q, k, mask)  # [B, H, N, N]
        if edit is not None and ATTN in needs:
            a = edit(a)
        if CLS_ATTN in needs:
            cls_attn = a[:, :, 0]
        if ATTN in needs:
            full = a
        out = attn.attn_drop(a) @ v
    else:
        drop = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, scale=attn.scale
        )
        if CLS_ATTN in needs:
            # Only the class token's row is needed: [B, H, 1, N] instead of [B, H, N, N].
            a0 = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if mask is not None:
                a0 = a0 + mask
            cls_attn = a0.softmax(dim=-1)[:, :, 0]

    out = _output(attn, out, x, gate)
    k, v = k[..., :d], v[..., :d]
    feats = Features(
        cls_attn=cls_attn,
        key_mean=k.mean(dim=1) if KEY_MEAN in needs else None,
        value_norm=ops.value_norm(v) if VALUE_NORM in needs else None,
        attn=full,
    )
    return out, feats


def attention_map(
    attn: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor | None,
    needs: frozenset[str],
    rope: torch.Tensor | None = None,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Features:
    """The attention map of a block whose method reduces inside the attention.

    Only q and k are projected: the values are taken after the reduction
    (:func:`apply_attention_map`).

    Args:
        attn: a timm ``Attention`` module.
        x: normalised tokens ``[B, N, C]``.
        size: ``[B, N, 1]`` for proportional attention, or None.
        needs: the method's features; ``value_norm`` is not available here.
        rope: the rotary embedding of the current patch tokens, or None.
        edit: the method's :meth:`~Method.edit_attention` of this block, or None.

    Returns:
        Features with ``attn`` ``[B, H, N, N]`` (post-softmax), and ``cls_attn`` / ``key_mean``
        if asked for.
    """
    q, k = _qk(attn, x, rope)
    mask = None if size is None else ops.prop_attn_bias(size).to(q.dtype)
    a = _softmax_attention(attn, q, k, mask)
    if edit is not None:
        a = edit(a)
    return Features(
        cls_attn=a[:, :, 0] if CLS_ATTN in needs else None,
        key_mean=k.mean(dim=1) if KEY_MEAN in needs else None,
        attn=a,
    )


def apply_attention_map(attn: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The attention output ``[B, N, C]`` of a given map ``a [B, H, N, N]`` on tokens ``x``."""
    return _output(attn, attn.attn_drop(a) @ _values(attn, x), x, _gate(attn, x))


class _State(NamedTuple):
    x: torch.Tensor  # [B, N, C]
    size: torch.Tensor  # [B, N, 1]
    source: torch.Tensor | None  # [B, N, N0]
    # Index into the rope table of the embedding each token uses, [B, N] (prefix entries unused);
    # None while the tokens are still the model's own (no reduction yet) or without rope.
    pos: torch.Tensor | None = None
    # The method's per-forward state (Method.initial_state), None for most methods.
    carried: Any = None


def layer_scale(block: nn.Module, branch: int, t: torch.Tensor) -> torch.Tensor:
    """A residual branch ``[B, N, C]`` through the block's LayerScale: timm's ``ls1`` / ``ls2``
    modules, or ``Eva``'s ``gamma_1`` / ``gamma_2`` parameters (None: no LayerScale)."""
    if hasattr(block, f"gamma_{branch}"):
        gamma = getattr(block, f"gamma_{branch}")
        return t if gamma is None else gamma * t
    return getattr(block, f"ls{branch}")(t)


def block_rope(
    table: torch.Tensor | None, pos: torch.Tensor | None, num_prefix: int
) -> torch.Tensor | None:
    """The rotary embedding of the current patch tokens.

    Args:
        table: the model's rope for the full patch grid, ``[N0, D]`` or (mixed rope, this
            block's) ``[H, N0, D]``; None without rope.
        pos: ``[B, N]`` table index of each token (prefix entries unused), or None while the
            tokens are the model's own: then the table is used as it is, as timm uses it.
        num_prefix: ``P``.

    Returns:
        ``table``, or per image ``[B, 1, N - P, D]`` / ``[B, H, N - P, D]``.
    """
    if table is None or pos is None:
        return table
    idx = pos[:, num_prefix:]  # [B, N - P]
    if table.dim() == 2:
        return table[idx].unsqueeze(1)  # [B, 1, N - P, D], broadcast over heads
    return table[:, idx].transpose(0, 1)  # [H, B, N - P, D] -> [B, H, N - P, D]


def own_positions(batch: int, num_tokens: int, num_prefix: int, device) -> torch.Tensor:
    """The table index of the model's own tokens, ``[B, N]``: patch token ``i`` uses row
    ``i - P`` (prefix entries 0, unused)."""
    patches = torch.arange(num_tokens - num_prefix, device=device)
    return torch.cat([patches.new_zeros(num_prefix), patches]).expand(batch, num_tokens)


def follow_origin(origin: torch.Tensor, pos: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """The rope position of each token after a reduction step that says where each output token
    comes from.

    Args:
        origin: ``[B, N']`` the input token each output token descends from (``Reduced.origin``):
            a kept token itself, a merged token its destination.
        pos: ``[B, N]`` table index of each input token, or None for the model's own tokens.
        num_prefix: ``P``.

    Returns:
        ``[B, N']``: ``pos`` gathered at ``origin``.
    """
    if pos is None:  # the model's own token j uses row j - P (prefix entries 0, unused)
        return (origin - num_prefix).clamp_min(0)
    return pos.gather(1, origin)


def follow_positions(
    member: torch.Tensor, size: torch.Tensor, pos: torch.Tensor | None, num_prefix: int
) -> torch.Tensor:
    """The rope position of each token after a reduction step that does not give its origin
    (a resampling such as DCT, or a method without ``gives_origin``).

    Args:
        member: ``[B, N', N]`` how much of input token ``j`` output token ``i`` holds (the
            method's reduction of a one-hot map: 0/1 after pruning or merging, real weights
            after a resampling such as DCT).
        size: ``[B, N, 1]`` patches each input token stands for.
        pos: ``[B, N]`` table index of each input token, or None for the model's own tokens.
        num_prefix: ``P``.

    Returns:
        ``[B, N']``: each output token's position is that of the member with the largest
        ``member * size`` (for a resampling, the input token that weighs most in it; a gathered
        token's only member), the first in token order among equals. A merge seen this way
        does not say which member was its destination, hence :func:`follow_origin` where the
        method gives it.
    """
    B, N = member.shape[0], member.shape[2]
    if pos is None:
        pos = own_positions(B, N, num_prefix, member.device)
    rep = (member * size.transpose(1, 2).to(member.dtype)).argmax(dim=-1)  # [B, N']
    return pos.gather(1, rep)


def reducing_block(
    block: nn.Module,
    state: _State,
    plan: ReductionPlan,
    index: int,
    rope: torch.Tensor | None = None,
) -> tuple[_State, torch.Tensor | None, torch.Tensor | None]:
    """One timm ``Block`` or ``EvaBlock`` with an optional reduction where the method's
    ``reduce_at`` says: inside the attention, between attention and MLP, or after the MLP.

    Args:
        rope: the model's rope table for this block (:func:`block_rope`), or None.

    Returns:
        The new state, and the per-image ``pooled`` / ``score_var`` of the reduction, if any.
    """
    x, size, source, pos, carried = state
    method = plan.method
    at = method.reduce_at if index in plan.locations else None
    prop_size = size if index >= plan.bias_from else None
    needs = method.needs if at is not None else frozenset()
    red = None
    P = plan.num_prefix
    track = plan.track_rope and rope is not None
    edit = None
    if at is not None and ATTN in needs:
        edit = partial(method.edit_attention, block=index)

    def reduce(x: torch.Tensor, feats: Features) -> tuple[Reduced, torch.Tensor | None]:
        feats = feats._replace(state=carried)
        if not track or method.gives_origin:
            red = method.reduce(x, size, feats, block=index, num_prefix=P, source=source)
            if not track or (red.origin is None and red.x.shape[1] == x.shape[1]):
                return red, pos  # no rope, or the tokens are unchanged
            if red.origin is None:
                raise PatchError(
                    f"{method.name} declares gives_origin but reduced {x.shape[1]} tokens to "
                    f"{red.x.shape[1]} without Reduced.origin; set it or leave gives_origin off"
                )
            # A kept token keeps its own rope, a merged one its destination's.
            return red, follow_origin(red.origin, pos, P)
        # The method reduces a one-hot map of the current tokens along with any traced source,
        # which says which tokens each output token holds: its rope follows from that.
        B, N, _ = x.shape
        probe = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
        both = probe if source is None else torch.cat([source, probe], dim=-1)
        red = method.reduce(x, size, feats, block=index, num_prefix=P, source=both)
        if red.source is None:
            raise PatchError(
                f"{method.name} neither carries the token sources nor gives_origin: it cannot "
                "reduce a model with rotary embeddings, whose positions follow the tokens"
            )
        if red.origin is not None:
            new_pos = follow_origin(red.origin, pos, P)
        else:
            new_pos = follow_positions(red.source[..., -N:], size, pos, P)
        return red._replace(source=None if source is None else red.source[..., :-N]), new_pos

    if at == IN_ATTN:
        feats = attention_map(
            block.attn, block.norm1(x), prop_size, needs, block_rope(rope, pos, P), edit
        )
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
        out = apply_attention_map(block.attn, block.norm1(x), red.attn)
    else:
        out, feats = attention(
            block.attn,
            block.norm1(x),
            prop_size,
            needs,
            plan.attn_impl,
            block_rope(rope, pos, P),
            edit,
        )
    x = x + block.drop_path1(layer_scale(block, 1, out))
    if at == AFTER_ATTN:
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
    x = x + block.drop_path2(layer_scale(block, 2, block.mlp(block.norm2(x))))
    if at == AFTER_MLP:
        red, pos = reduce(x, feats)
        x, size, source, carried = red.x, red.size, red.source, red.state
    if red is None:
        return _State(x, size, source, pos, carried), None, None
    return _State(x, size, source, pos, carried), red.pooled, red.score_var


def run_blocks(
    blocks: nn.Sequential,
    x: torch.Tensor,
    plan: ReductionPlan,
    rope: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ReductionInfo]:
    """Run all blocks on tokens ``x [B, N, C]`` with the plan's reductions.

    Args:
        rope: an ``Eva`` model's rotary embedding table for its patch grid, ``[N0, D]``, or
            ``[depth, H, N0, D]`` with one table per block (``plan.rope_per_block``); None
            without rope.
        grid: ``(rows, cols)`` of the patch grid, for the method's
            :meth:`~Method.initial_state`; None: a square grid of the patch tokens.
    """
    B, N, _ = x.shape
    size = torch.ones_like(x[..., :1])
    source = None
    if plan.trace_source:
        source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
    carried = None
    if plan.locations:
        P = plan.num_prefix
        if grid is None:
            side = math.isqrt(N - P)
            grid = (side, (N - P) // side)
        carried = plan.method.initial_state(x, num_prefix=P, grid=grid)
    state = _State(x, size, source, None, carried)
    tokens: list[int] = []
    pooled: list[torch.Tensor] = []
    score_var: list[torch.Tensor] = []
    for i, block in enumerate(blocks):
        table = rope[i] if rope is not None and plan.rope_per_block else rope
        state, p, v = reducing_block(block, state, plan, i, table)
        tokens.append(state.x.shape[1])
        if p is not None:
            pooled.append(p)
        if v is not None:
            score_var.append(v)
    info = ReductionInfo(
        tokens=tuple(tokens),
        locations=plan.locations,
        pooled=torch.stack(pooled, dim=1) if pooled else None,
        score_var=torch.stack(score_var, dim=1) if score_var else None,
        source=state.source,
    )
    return state.x, info


class ReducingMixin:
    """Mixed into the model's own class by :func:`patch`; overrides ``forward_features``."""

    reduction_plan: ReductionPlan
    reduction_info: ReductionInfo | None

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise PatchError("a token-reducing model does not take attn_mask or is_causal")
        x = self.patch_embed(x)
        # The patch grid of this input: [B, rows, cols, C] with dynamic image sizes.
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        if is_eva(self):
            # Eva's own: absolute position embedding (if any) and the rope table for this input's
            # grid (computed per forward for dynamic sizes); patch dropout is refused at patch time.
            x, rope = self._pos_embed(x)
        else:
            x, rope = self.patch_drop(self._pos_embed(x)), None
        x = self.norm_pre(x)
        x, self.reduction_info = run_blocks(self.blocks, x, self.reduction_plan, rope, grid)
        return self.norm(x)


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
    model: nn.Module, method: Method, *, trace_source: bool = False, attn_impl: str = "fast"
) -> nn.Module:
    """Make ``model`` reduce tokens with ``method``; returns the same object, patched in place.

    Raises:
        PatchError: the model is not a timm ``VisionTransformer`` built from standard blocks nor
            an ``Eva`` built from pre-norm ``EvaBlock`` (:func:`check_patchable`).
        MethodError: the method does not fit the model (:meth:`Method.check_fits`).
    """
    if attn_impl not in ATTN_IMPLS:
        raise PatchError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
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
    return isinstance(model, ReducingMixin)
