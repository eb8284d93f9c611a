"""A third-party package as a plugin author would write it: a method and two metric groups that
reach ppt-bench through entry points alone (see ``ppt_bench_toy-1.0.dist-info``). One group gives
only its units and its report columns; the other declares its metric (unit, direction, table
column, leaderboard ranking and its test), which takes it to the report's table and the
leaderboard.

``distmerge`` is a ToMe variant with another merge score: the same bipartite matching and
size-weighted merge at fixed blocks, with the tokens scored by the Minkowski distance of their
head-averaged keys (the closest merge first) instead of ToMe's cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppt_bench.core import stats
from ppt_bench.measure.metrics import IntervalOverlap, Metric, MetricGroup, Ranked, mean_columns
from ppt_bench.methods import Examples, ops
from ppt_bench.methods.base import BipartiteMerging, FixedBudget, check_float


@dataclass(frozen=True)
class DistanceMerge(BipartiteMerging, FixedBudget):
    """ToMe's merge at fixed blocks, scored by key distance.

    Args:
        r: tokens merged away per reduction block.
        locations: reduction blocks (0-indexed).
        prop_attn: proportional attention (``+ log(size)``) after the first merge.
        p: the order of the Minkowski distance between keys (2: Euclidean).
    """

    description = "a plugin's ToMe variant: bipartite merging scored by key distance"
    family = "merging"
    examples = Examples(reducing={"r": 8, "p": 1.0}, invalid={"p": (0.5,)})
    p: float = 2.0

    def validate(self) -> None:
        super().validate()
        check_float("p", self.p, minimum=1.0)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B, n_a, n_b]``: minus the distance, so that the closest pair scores highest
        (in float32: ``cdist`` has no bf16 kernel on the CPU)."""
        return -torch.cdist(a.float(), b.float(), p=self.p)

    def reduce(self, x, size, feats, *, block, num_prefix, source=None):
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        return ops.merge_step(x, size, source, feats.key_mean, r, num_prefix, score=self.score)


def _weights(run):
    return {"weights_k": sum(p.numel() for p in run.model.parameters()) / 1e3}


WEIGHTS = MetricGroup(
    "weights",
    {"weights_k": "k"},
    _weights,
    mean_columns(("weights (k)", "weights_k", ".1f")),
    help="parameters in thousands",
)


def _confidence(run):
    """mean top-1 probability on fixed random images"""
    images = torch.randn(16, *run.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = run.model(images).softmax(-1).amax(-1)
    return {"confidence": stats.mean(100 * top.numpy())}


CONFIDENCE = MetricGroup(
    "confidence",
    {
        "confidence": Metric(
            "%",
            higher_is_better=True,
            spec=".1f",
            table=True,
            leaderboard=Ranked(
                IntervalOverlap(),
                best="most confident",
                reading="Confidence: the most confident, and those whose interval overlaps.",
            ),
        )
    },
    _confidence,
)
