"""Rotary position embeddings that follow their tokens.

An ``Eva`` model computes its rope table once per forward for the patch grid (``[N0, D]``, or
``[depth, H, N0, D]`` for mixed rope, one per block); the patch carries, for every token, the
index of the original patch whose embedding it uses (``pos [B, N]``, prefix entries unused) and
gathers each block's rope from the table with it (:func:`block_rope`).

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
"""

from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat
from torch import nn


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
