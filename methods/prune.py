"""Prune-only: PPT's pruning branch, keep the tokens with the highest ATS significance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import ScorePrune
from ppt_bench.methods.contract import CLS_ATTN, VALUE_NORM, Examples, Features
from ppt_bench.methods.parts import step


@step("score")
def ats_scores(feats: Features, num_prefix: int) -> torch.Tensor:
    """Normalised significance ``[B, N - P]`` from the class attention row and value norms."""
    return ops.significance_scores(feats.cls_attn, feats.value_norm, num_prefix)


@dataclass(frozen=True)
class Prune(ScorePrune):
    """Prune-only ablation of PPT.

    Args:
        r: tokens removed per reduction block.
        locations: reduction blocks.
        prop_attn: proportional attention after the first reduction. Pruned tokens keep size 1,
            so it changes nothing but the kernel; off by default to keep fused attention.
    """

    description = "PPT's pruning branch: drop the r least significant tokens (ATS score)"
    family = "pruning"
    examples = Examples(reducing={"r": 8})
    needs = frozenset({CLS_ATTN, VALUE_NORM})
    prop_attn: bool = False

    def scores(self, x, feats, *, block, num_prefix) -> torch.Tensor:
        return ats_scores(feats, num_prefix)
