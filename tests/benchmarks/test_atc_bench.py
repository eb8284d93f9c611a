"""ATC's batched clustering against the authors' scikit-learn path, side by side.

The authors (JoakimHaurum/ATC @ 227c94b5) copy each location's distances to the host and run
scikit-learn's ``AgglomerativeClustering`` image by image; :func:`ppt_bench.methods.atc.
cluster_labels` builds the same labels for the batch on the tokens' device. Both are timed on
a batch of 64 DeiT-S images at 224 px: the clustering of one location alone (196 tokens into
176), and the whole patched model (keep 0.9, complete linkage); the target of #23, the batched
path faster than scikit-learn's, is checked on one location with both paths timed in turns.
Run with ``pytest tests/benchmarks/test_atc_bench.py --benchmark-only --benchmark-enable``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import timm
import torch

from ppt_bench.methods import atc, create_method

B, T, D, K = 64, 196, 64, 176


def sklearn_labels(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """The authors' path: ``1 - cos`` to the host, scikit-learn per image, labels back."""
    from sklearn.cluster import AgglomerativeClustering

    dist = atc.cosine_distance(metric).float().cpu().numpy()
    clustering = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = np.stack([clustering.fit(d).labels_ for d in dist])
    return torch.from_numpy(labels).to(metric.device)


@pytest.fixture(scope="module")
def metric() -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="atc-clustering")
@pytest.mark.parametrize("path", ["torch", "sklearn"])
def test_clustering_one_location(benchmark, metric, path):
    fn = atc.cluster_labels if path == "torch" else sklearn_labels
    labels = benchmark.pedantic(fn, args=(metric, K, "complete"), rounds=3, warmup_rounds=1)
    assert labels.shape == (B, T) and int(labels.max()) == K - 1


@pytest.mark.benchmark(group="atc-side-by-side")
@pytest.mark.parametrize("linkage", ["complete", "single"])
def test_torch_is_faster_than_sklearn_side_by_side(benchmark, metric, linkage):
    """Both paths in turns, five rounds after a warm-up: the best of each, as a ratio.

    Average linkage, whose joins are float64 arithmetic on twice the bytes, is not a target.
    """
    seconds = {atc.cluster_labels: [], sklearn_labels: []}

    def both() -> None:
        for fn, times in seconds.items():
            start = time.perf_counter()
            fn(metric, K, linkage)
            times.append(time.perf_counter() - start)

    benchmark.pedantic(both, rounds=5, warmup_rounds=1)
    ours, theirs = min(seconds[atc.cluster_labels]), min(seconds[sklearn_labels])
    print(f"\n{linkage}: torch {ours * 1e3:.0f} ms, scikit-learn {theirs * 1e3:.0f} ms")
    assert ours < theirs, f"torch {ours / theirs:.2f}x the time of scikit-learn"


@pytest.fixture(scope="module")
def deit_small() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.benchmark(group="atc-deit-s")
@pytest.mark.parametrize("path", ["torch", "sklearn"])
def test_deit_s_batch_of_64(benchmark, deit_small, monkeypatch, path):
    if path == "sklearn":
        monkeypatch.setattr(atc, "cluster_labels", sklearn_labels)
    model = create_method("atc", keep_rate=0.9, linkage="complete").apply(deit_small)
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(forward, rounds=2, warmup_rounds=1)
    assert model.reduction_info.tokens[-1] == 143 and out.shape == (B, 1000)


@pytest.mark.benchmark(group="atc-deit-s")
def test_deit_s_batch_of_64_clusterings_side_by_side(benchmark, deit_small, monkeypatch):
    """The clusterings of one forward of DeiT-S on 64 images at 224 (keep 0.9, complete
    linkage: three locations), on the model's own metrics, by both paths in turns: five rounds
    after a warm-up, the best of each. The rest of the forward is the same for both paths."""
    seen: list[tuple[torch.Tensor, int, str]] = []
    ours = atc.cluster_labels

    def recording(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
        seen.append((metric.clone(), k, linkage))
        return ours(metric, k, linkage)

    monkeypatch.setattr(atc, "cluster_labels", recording)
    model = create_method("atc", keep_rate=0.9, linkage="complete").apply(deit_small)
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(x)
    assert [(m.shape[:2], k) for m, k, _ in seen] == [
        ((B, 196), 176),
        ((B, 176), 158),
        ((B, 158), 142),
    ]
    seconds = {ours: [], sklearn_labels: []}

    def both() -> None:
        for fn, times in seconds.items():
            start = time.perf_counter()
            for metric, k, linkage in seen:
                fn(metric, k, linkage)
            times.append(time.perf_counter() - start)

    benchmark.pedantic(both, rounds=5, warmup_rounds=1)
    torch_s, sklearn_s = min(seconds[ours]), min(seconds[sklearn_labels])
    print(f"\nthree locations: torch {torch_s * 1e3:.0f} ms, scikit-learn {sklearn_s * 1e3:.0f} ms")
    assert torch_s < sklearn_s, f"torch {torch_s / sklearn_s:.2f}x the time of scikit-learn"
