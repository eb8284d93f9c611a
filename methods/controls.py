"""Controls: the simplest selections a token reduction method must beat.

- ``topk``: prune by class-token attention alone (PPT's pruning branch without the value norm).
- ``random``: drop random patch tokens, seeded; the floor for any method.

Both remove ``r`` tokens at fixed locations, exactly like ``prune``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppt_bench.methods import ops
from ppt_bench.methods.base import ScorePrune, check_int
from ppt_bench.methods.contract import CLS_ATTN, Examples
from ppt_bench.methods.parts import step

# Keeps the (seed, block) pairs of any realistic depth apart when mixed into one seed.
_SEED_STRIDE = 10_000
# Hash constants: a Mersenne prime modulus and an odd multiplier below 2**31.
_PRIME, _MIX = 2**31 - 1, 1_103_515_245


@dataclass(frozen=True)
class TopK(ScorePrune):
    """Keep the patch tokens with the highest class-token attention (mean over heads).

    Args:
        r: tokens removed per reduction block.
        locations: reduction blocks.
    """

    description = "control: drop the r tokens the class token attends to least (no value norm)"
    family = "pruning"
    examples = Examples(reducing={"r": 8})
    needs = frozenset({CLS_ATTN})

    def scores(self, x, feats, *, block, num_prefix) -> torch.Tensor:
        return ops.cls_attention_mean(feats.cls_attn, num_prefix)


@step("score")
def random_scores(
    batch: int, num_patches: int, seed: int, block: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pseudo-random scores ``[B, N - P]`` in ``[0, 1)``, a hash of ``(seed, block, position)``.

    Integer arithmetic on the device: the same seed drops the same tokens on every device, and
    the forward stays free of host copies, so it can be captured in a CUDA graph.
    """
    h = torch.arange(batch * num_patches, device=device, dtype=torch.int64).view(batch, -1)
    h = h + (seed * _SEED_STRIDE + block) % _PRIME * _MIX
    for _ in range(3):  # xorshift-multiply rounds; every product stays below 2**63
        h = (h ^ (h >> 13)) % _PRIME
        h = (h * _MIX) % _PRIME
    return h.to(torch.float64).div(_PRIME).to(torch.float32)


@dataclass(frozen=True)
class RandomDrop(ScorePrune):
    """Drop ``r`` random patch tokens per location.

    Args:
        r: tokens removed per reduction block.
        locations: reduction blocks.
        seed: with the same seed and batch size, every forward drops the same tokens.
    """

    description = "control: drop r random tokens per location (seeded)"
    family = "pruning"
    batch_independent = False  # its scores are seeded per position in the batch
    examples = Examples(reducing={"r": 8})
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("seed", self.seed)

    def scores(self, x, feats, *, block, num_prefix) -> torch.Tensor:
        B, N, _ = x.shape
        return random_scores(B, N - num_prefix, self.seed, block, x.device)
