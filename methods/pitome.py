"""PiToMe: token merging that protects informative tokens by an energy score (NeurIPS 2024).

Every block merges ``r = floor(T - T * ratio)`` of its ``T`` patch tokens after the attention
residual (hchautran/PiToMe @ 550b5dee, ``algo/pitome/merge.py`` and ``patch/timm.py``):

- Keys averaged over heads, patch tokens only, L2-normalised: ``S = m m^T``.
- Energy ``E_i = mean_j ELU(S_ij - margin)`` with the margin ``0.75 - 0.75 l / L`` of block ``l``
  of ``L``; tokens are ordered by energy, highest first (the most redundant ones).
- Blocks ``l < ceil(L / 2)`` (bipartite half): all patch tokens alternate, in energy order,
  into A and B; the ``r`` A tokens with the best B match merge into it. Output: prefix, the
  unmerged A tokens (in the order of their best match, as the authors leave them), then B.
- Ties (equal energies, equal best matches) are ordered by torch's default ``argsort``, as in
  the authors' code: see :func:`energy_order`. With the patch's explicit attention
  (``attn_impl="explicit"``, which the authors' timm blocks compute) the logits equal the
  authors' on every image compared; with the default fused attention (SDPA, about 1e-7 from
  explicit softmax attention) an energy within that of another can swap places, and with it
  one merge: a different, equally valid ordering, not a different rule.
- Later blocks: only the ``2r`` highest-energy tokens take part; they alternate into A and B,
  every A token merges into its most similar B token, the others are protected. Output:
  prefix, protected tokens in energy order, then B.

Merging is ToMe's size-weighted average, sizes carried; there is no proportional attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ppt_bench.methods import ops
from ppt_bench.methods.base import KeepRatio
from ppt_bench.methods.contract import KEY_MEAN, Examples, Reduced
from ppt_bench.methods.parts import step

if TYPE_CHECKING:
    pass


def ratio_reduction(num_tokens: int, ratio: float) -> int:
    """Tokens a keep ``ratio`` removes from ``T`` tokens: ``floor(T - T * ratio)``.

    Written as the authors write it, so that float rounding gives the same counts.
    """
    return math.floor(num_tokens - num_tokens * ratio)


def margin(block: int, depth: int) -> float:
    """The energy margin of block ``l`` of ``L``: ``0.75 - 0.75 l / L``."""
    return 0.75 - 0.75 * (block / depth)


@step("score")
def energy_order(metric: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens by decreasing energy, and their cosine similarities.

    Args:
        metric: ``[B, T, d]`` keys averaged over heads, patch tokens only.
        margin: the block's margin.

    Returns:
        ``order [B, T]`` (highest energy first) and ``sim [B, T, T]``.

    Equal energies (identical tokens, or float32 sums that round alike, which random-weight
    models produce often) are ordered as the authors order them: by torch's default
    (unstable) ``argsort``, a comparison sort of each image's row on its own, so the order
    depends only on that image's energies. Which tie comes first decides which tokens
    alternate into A and B, so a stable sort here merges other tokens than the authors' code.
    """
    # F.normalize's figures: each row over its norm, clamped at F.normalize's eps.
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.bmm(m, m.transpose(1, 2))  # [B, T, T], what m @ m.mT runs
    energy = F.elu(sim - margin).mean(dim=-1)  # [B, T]
    # argsort's kernel: the default (unstable) sort, descending.
    return energy.sort(dim=-1, descending=True).indices, sim


def _scores(sim: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """Similarities ``[B, n_a, n_b]`` of the tokens ``a_idx [B, n_a]`` to ``b_idx [B, n_b]``."""
    B, T, _ = sim.shape
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    s = sim.gather(2, b_idx.view(B, 1, n_b).expand(B, T, n_b))  # [B, T, n_b]
    return s.gather(1, a_idx.view(B, n_a, 1).expand(B, n_a, n_b))  # [B, n_a, n_b]


@step("match")
def bsm_slots(sim: torch.Tensor, order: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch tokens of a bipartite block in the order the authors add them up, ``[B, T]``:
    the token behind each output slot (``T - r``), then the merged tokens by decreasing best
    similarity (``r``); and the output slot each merged token joins, ``[B, r]``.

    A and B alternate over the energy order; the ``r`` A tokens with the most similar B partner
    merge into it. Slots: unmerged A ``0 .. n_a - r - 1`` (by decreasing best similarity), then
    B in energy order; a B slot descends from its B token, the merge's destination.
    """
    a_idx, b_idx = order[:, ::2], order[:, 1::2]  # [B, n_a], [B, n_b]
    scores = _scores(sim, a_idx, b_idx)
    # The values and first indices of max.
    node_max, node_idx = scores.amax(dim=-1), scores.argmax(dim=-1)  # [B, n_a]
    # argsort's kernel (ties as the authors order them): the default sort, descending.
    edge_idx = node_max.sort(dim=-1, descending=True).indices  # [B, n_a]
    src = edge_idx[:, :r]
    added = torch.cat([a_idx.gather(1, edge_idx[:, r:]), b_idx, a_idx.gather(1, src)], dim=1)
    return added, node_idx.gather(1, src) + (a_idx.shape[1] - r)


@step("match")
def protected_slots(
    sim: torch.Tensor, order: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch tokens of a block that protects low-energy tokens in the order the authors add
    them up, ``[B, T]``: the token behind each output slot (``T - r``), then the merged tokens
    in energy order (``r``); and the output slot each merged token joins, ``[B, r]``.

    The ``2r`` highest-energy tokens alternate into A and B and every A token merges into its
    most similar B token. Slots: protected tokens ``0 .. T - 2r - 1`` in energy order, then B
    (each the destination of the A tokens merged into it).
    """
    T = order.shape[1]
    a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]  # [B, r] each
    into = _scores(sim, a_idx, b_idx).argmax(dim=-1) + (T - 2 * r)  # [B, r]
    return torch.cat([order[:, 2 * r :], b_idx, a_idx], dim=1), into


@step("merge")
def pitome_step(
    tokens: Reduced, key_mean: torch.Tensor, r: int, num_prefix: int, *, margin: float, bsm: bool
) -> Reduced:
    """Merge ``r`` patch tokens of ``x [B, N, C]`` away, PiToMe's way (see the module docstring).

    Args:
        tokens: ``x [B, N, C]`` (prefix first), ``size [B, N, 1]``, ``source [B, N, N0]`` or None.
        key_mean: ``[B, N, d]`` keys averaged over heads.
        r: tokens to remove, at most ``(N - P) // 2``.
        num_prefix: ``P``; prefix tokens keep slots ``0 .. P - 1``.
        margin: the block's energy margin.
        bsm: the bipartite rule (first half of the blocks) rather than the protecting one.
    """
    if r == 0:
        return tokens
    x, size, source = tokens[:3]
    B, N, C = x.shape
    P, K = num_prefix, N - r
    order, sim = energy_order(key_mean[:, P:], margin)
    # The patch tokens in their order of addition (the token behind each slot, then the merged
    # tokens), and the slot each merged token joins.
    added, into = (bsm_slots if bsm else protected_slots)(sim, order, r)
    added = added + P
    if P:
        prefix = torch.arange(P, device=x.device).expand(B, P)
        added = torch.cat([prefix, added], dim=1)  # [B, N], a permutation
    into = (into + P).view(B, r, 1)
    # Sum as the authors' scatter_reduce does: each destination first, then the tokens merged
    # into it in their order, so that float32 sums round alike and near-equal energies in
    # later blocks stay ordered alike (on a GPU the scatter's order is not fixed).
    size = ops.gather_tokens(size, added)  # a new tensor: the merged sizes are added in place
    weighted = ops.gather_tokens(x, added) * size
    x = weighted[:, :K].scatter_add_(1, into.expand(-1, -1, C), weighted[:, K:])
    size = size[:, :K].scatter_add_(1, into, size[:, K:])
    if source is not None:
        N0 = source.shape[-1]
        source = ops.gather_tokens(source, added)
        source = source[:, :K].scatter_add_(1, into.expand(-1, -1, N0), source[:, K:])
    return Reduced(x / size, size, source, origin=added[:, :K])


@dataclass(frozen=True)
class PiToMe(KeepRatio):
    """PiToMe in every block.

    Args:
        ratio: keep ratio of each block, in (0, 1]: block ``l`` removes
            ``floor(T - T * ratio)`` of its ``T`` patch tokens (at most half). 1 is no change.
    """

    description = "PiToMe (NeurIPS 2024): energy-ordered merging that protects distinctive tokens"
    family = "merging"
    examples = Examples(reducing={"ratio": 0.9}, invalid={"ratio": (0, 1.2)})
    needs = frozenset({KEY_MEAN})
    gives_origin = True

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        depth = self.depth  # the margins and halves depend on it
        T = x.shape[1] - num_prefix
        r = ops.max_reduction(x.shape[1], num_prefix, ratio_reduction(T, self.ratio))
        bsm = block < math.ceil(depth * 0.5)
        tokens = Reduced(x, size, source)
        return pitome_step(
            tokens, feats.key_mean, r, num_prefix, margin=margin(block, depth), bsm=bsm
        )
