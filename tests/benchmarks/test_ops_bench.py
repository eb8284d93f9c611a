"""Micro-benchmarks of the reduction ops at DeiT-S sizes (``tox -e bench``).

Skipped in the default test run (``--benchmark-skip`` in pyproject); run them with
``pytest tests/benchmarks --benchmark-only --benchmark-enable``. The batch is kept small enough
for a laptop CPU; pass ``--benchmark-...`` options for longer rounds.
"""

from __future__ import annotations

import pytest
import torch

from ppt_bench.methods import ops

# DeiT-S: 197 tokens (1 class token), 384 channels, 6 heads of 64; ppt removes 50 per location.
B, N, C, H, P, R = 16, 197, 384, 6, 1, 50
D = C // H


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(B, N, C, generator=g),
        "size": torch.ones(B, N, 1),
        "cls_attn": torch.rand(B, H, N, generator=g).softmax(-1),
        "v": torch.randn(B, H, N, D, generator=g),
        "key_mean": torch.randn(B, N, D, generator=g),
    }


def test_significance_scores(benchmark, tensors):
    def scores():
        return ops.significance_scores(tensors["cls_attn"], ops.value_norm(tensors["v"]), P)

    out = benchmark(scores)
    assert out.shape == (B, N - P)


def test_bipartite_matching(benchmark, tensors):
    m = benchmark(ops.bipartite_soft_matching, tensors["key_mean"], R, P)
    assert m.src_idx.shape == (B, R, 1)


def test_prune_keep_top_and_gather(benchmark, tensors):
    scores = torch.rand(B, N - P, generator=torch.Generator().manual_seed(1))

    def prune():
        return ops.gather_tokens(tensors["x"], ops.keep_top(scores, N - P - R, P))

    out = benchmark(prune)
    assert out.shape == (B, N - R, C)


def test_merge_weighted(benchmark, tensors):
    m = ops.bipartite_soft_matching(tensors["key_mean"], R, P)
    x, size = benchmark(ops.merge_weighted, m, tensors["x"], tensors["size"])
    assert x.shape == (B, N - R, C) and float(size.sum()) == B * N
