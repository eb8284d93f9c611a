"""Attention adapters: timm's ``Attention`` and the ``Eva`` family's ``EvaAttention`` and
``AttentionRope``, computed as timm computes them, that also return the features a method asks
for.

Small adapters (:func:`project_qkv`, :func:`_values`) give q, k and v of either family: fused or
separate q/k/v projections with their biases, grouped-query keys and values, qk-norm, and the
rotary embedding of the current tokens (:func:`~ppt_bench.methods.patch.rope.rotate`). Three
implementations (:data:`ATTN_IMPLS`) compute the attention itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from ppt_bench.methods import ops
from ppt_bench.methods.contract import ATTN, CLS_ATTN, KEY_MEAN, VALUE_NORM, Features
from ppt_bench.methods.parts import part
from ppt_bench.methods.patch.rope import rotate

# "fast": fused SDPA, the proportional-attention bias as an additive mask; "fold": fused SDPA
# with the bias carried in an extra query/key channel, so that no mask is needed (blocks with
# qk-norm fall back to the mask); "explicit": full softmax attention, the reference.
ATTN_IMPLS = ("fast", "fold", "explicit")


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
    attn: nn.Module, x: torch.Tensor, bias: torch.Tensor
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
        bias: ``log(size)`` of the keys, ``[B, 1, 1, N]`` (:func:`~ppt_bench.methods.ops.
            prop_attn_bias`).
    """
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    w = fold_width(d)
    weight = F.pad(attn.qkv.weight.view(3, H, d, C), (0, 0, 0, w - d))
    if attn.qkv.bias is None:
        qkv_bias = weight.new_zeros(3, H, w)
    else:
        qkv_bias = F.pad(attn.qkv.bias.view(3, H, d), (0, w - d))
    qkv_bias[0, :, d] = 1.0
    qkv = F.linear(x, weight.reshape(3 * H * w, C), qkv_bias.reshape(-1)).view(B, N, 3, H, w)
    qkv[:, :, 1, :, d] = bias.view(B, N, 1) / attn.scale
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
    qk = qk.reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
    q, k = qk[0], qk[1]
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


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of ``[B, H, n, k]`` and ``[B, H, k, m]``: the batched product that
    ``torch.matmul`` runs, without its broadcasting steps (fewer operators, the same figures)."""
    B, H, n, _ = a.shape
    m = b.shape[-1]
    return torch.bmm(a.reshape(B * H, n, -1), b.reshape(B * H, -1, m)).view(B, H, n, m)


def _dropout(drop: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``drop(t)``; a dropout module in eval mode is the identity, and is not run."""
    return t if isinstance(drop, nn.Dropout) and not drop.training else drop(t)


def _softmax_attention(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Post-softmax attention ``[B, H, N, N]`` with an optional additive mask."""
    a = _matmul(q * attn.scale, k.transpose(-2, -1))  # [B, H, N, N]
    if mask is not None:
        a = a + mask
    return a.softmax(dim=-1)


def _output(
    attn: nn.Module, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """Heads ``[B, H, N, w]`` to the attention output ``[B, N, C]`` (norm, gate, proj)."""
    B, N, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    if out.shape[-1] != d:  # folded: drop the bias channels
        out = out[..., :d]
    out = out.transpose(1, 2).reshape(B, N, H * d)
    norm = getattr(attn, "norm", None)  # timm's scale-norm (Identity unless enabled)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return _dropout(attn.proj_drop, attn.proj(out))


def _gate(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def _mask(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The proportional-attention bias as an SDPA mask of the queries' dtype (under autocast)."""
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None,
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
        bias: proportional attention's ``log(size)`` per key, ``[B, 1, 1, N]``
            (:func:`~ppt_bench.methods.ops.prop_attn_bias`), or None.
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
    fold = bias is not None and impl == "fold" and ATTN not in needs and can_fold(attn)
    explicit = impl == "explicit" or ATTN in needs
    if explicit:
        path = "map" if ATTN in needs else "explicit"
    else:
        path = "fold" if fold else "fused" if bias is None else "masked"
    cls_attn = full = None
    with part(f"attention.{path}"):
        gate = _gate(attn, x)
        mask = None
        if fold:
            q, k, v = folded_qkv(attn, x, bias)  # [B, H, N, w], the bias inside q.k
        else:
            q, k, v = project_qkv(attn, x, rope)
            mask = _mask(bias, q.dtype)  # [B, 1, 1, N]
        if explicit:
            a = _softmax_attention(attn, q, k, mask)  # [B, H, N, N]
            if edit is not None and ATTN in needs:
                a = edit(a)
            if CLS_ATTN in needs:
                cls_attn = a[:, :, 0]
            if ATTN in needs:
                full = a
            out = _matmul(_dropout(attn.attn_drop, a), v)
        else:
            drop = attn.attn_drop.p if attn.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=drop, scale=attn.scale
            )
        out = _output(attn, out, x, gate)
    if CLS_ATTN in needs and not explicit:
        with part("attention.cls_row"):
            # Only the class token's row is needed: [B, H, N] instead of [B, H, N, N], as the
            # bmm that _matmul would run on the row [B, H, 1, N].
            B, H, N, _ = k.shape
            q0 = (q[:, :, 0] * attn.scale).view(B * H, 1, -1)
            a0 = torch.bmm(q0, k.transpose(-2, -1).reshape(B * H, -1, N)).view(B, H, N)
            if mask is not None:
                a0 = a0 + mask.view(B, 1, N)
            cls_attn = a0.softmax(dim=-1)
    if not needs:
        return out, Features()
    with part("method.score"):  # the features a method scores its tokens by
        if fold:  # drop the bias channels
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
    bias: torch.Tensor | None,
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
        bias: proportional attention's ``log(size)`` per key, ``[B, 1, 1, N]``, or None.
        needs: the method's features; ``value_norm`` is not available here.
        rope: the rotary embedding of the current patch tokens, or None.
        edit: the method's :meth:`~Method.edit_attention` of this block, or None.

    Returns:
        Features with ``attn`` ``[B, H, N, N]`` (post-softmax), and ``cls_attn`` / ``key_mean``
        if asked for.
    """
    with part("attention.map"):
        q, k = _qk(attn, x, rope)
        a = _softmax_attention(attn, q, k, _mask(bias, q.dtype))
        if edit is not None:
            a = edit(a)
    with part("method.score"):
        return Features(
            cls_attn=a[:, :, 0] if CLS_ATTN in needs else None,
            key_mean=k.mean(dim=1) if KEY_MEAN in needs else None,
            attn=a,
        )


def apply_attention_map(attn: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The attention output ``[B, N, C]`` of a given map ``a [B, H, N, N]`` on tokens ``x``."""
    with part("attention.map"):
        out = _matmul(_dropout(attn.attn_drop, a), _values(attn, x))
        return _output(attn, out, x, _gate(attn, x))
