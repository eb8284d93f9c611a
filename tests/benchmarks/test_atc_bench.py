"""ATC's two clustering paths against the authors' scikit-learn path, side by side.

The authors (JoakimHaurum/ATC @ 227c94b5) copy each location's distances to the host and run
scikit-learn's ``AgglomerativeClustering`` image by image. :func:`ppt_bench.methods.atc.
cluster_labels_loop` (``cluster_path="loop"``) does the same on the host with SciPy's linkage
directly; :func:`ppt_bench.methods.atc.cluster_labels` (``"batched"``) builds the same labels for
the whole batch on the tokens' device. Timed here:

- at batch 1 (DeiT-S at 224 px: 196 patch tokens into 176 clusters, complete linkage), ATC's
  reduction step of one location by each path, and the whole patched model; the loop, which
  ``"auto"`` takes on the CPU, is checked to be the fastest of the three, timed in turns;
- on a batch of 64: the clustering of one location alone, and the whole patched model (keep
  0.9, complete linkage); the target of #23, the batched path faster than scikit-learn's, is
  checked on one location with both paths timed in turns.

Run with ``pytest tests/benchmarks/test_atc_bench.py --benchmark-only --benchmark-enable``.
"""

from __future__ import annotations

import time
import warnings
from unittest import mock

import numpy as np
import pytest
import timm
import torch

from ppt_bench.methods import atc, create_method
from ppt_bench.methods.contract import Reduced

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


# The clustering of each path: ``(metric [B, T, d], k, linkage) -> labels [B, T]``.
PATHS = {"loop": atc.cluster_labels_loop, "batched": atc.cluster_labels, "sklearn": sklearn_labels}


def reduction_step(path: str, tokens: Reduced, key_mean: torch.Tensor) -> Reduced:
    """ATC's step at one location of DeiT-S (class token, 196 patch tokens into 176) by one
    path; scikit-learn's labels take the batched path's place."""
    if path == "sklearn":
        with mock.patch.object(atc, "cluster_labels", sklearn_labels):
            return atc.atc_step(tokens, key_mean, K, 1, "complete", "batched")
    return atc.atc_step(tokens, key_mean, K, 1, "complete", path)


@pytest.fixture(scope="module")
def one_image() -> tuple[Reduced, torch.Tensor]:
    """DeiT-S's tokens ``[1, 197, 384]`` and head-averaged keys ``[1, 197, 64]`` at 224 px."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1 + T, 384, generator=g)
    return Reduced(x, torch.ones(1, 1 + T, 1), None), torch.randn(1, 1 + T, D, generator=g)


@pytest.mark.benchmark(group="atc-step-batch-1")
@pytest.mark.parametrize("path", list(PATHS))
def test_reduction_step_at_batch_1(benchmark, one_image, path):
    out = benchmark.pedantic(reduction_step, args=(path, *one_image), rounds=20, warmup_rounds=2)
    assert out.x.shape == (1, 1 + K, 384)


@pytest.mark.benchmark(group="atc-step-batch-1")
def test_loop_is_fastest_at_batch_1_side_by_side(benchmark, one_image):
    """The three paths in turns, twenty rounds after a warm-up: the best of each. The loop is
    what ``cluster_path="auto"`` takes on the CPU."""
    seconds = {path: [] for path in PATHS}

    def all_three() -> None:
        for path, times in seconds.items():
            start = time.perf_counter()
            reduction_step(path, *one_image)
            times.append(time.perf_counter() - start)

    benchmark.pedantic(all_three, rounds=20, warmup_rounds=1)
    best = {path: min(times) for path, times in seconds.items()}
    print("\nbatch 1, one step: " + ", ".join(f"{p} {t * 1e3:.2f} ms" for p, t in best.items()))
    assert best["loop"] < min(best["batched"], best["sklearn"]), best


@pytest.fixture(scope="module")
def metric() -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="atc-clustering")
@pytest.mark.parametrize("path", list(PATHS))
def test_clustering_one_location(benchmark, metric, path):
    labels = benchmark.pedantic(
        PATHS[path], args=(metric, K, "complete"), rounds=3, warmup_rounds=1
    )
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


def patched(deit_small: torch.nn.Module, monkeypatch, path: str) -> torch.nn.Module:
    """DeiT-S with ATC (keep 0.9, complete linkage) clustering by ``path``; scikit-learn's labels
    take the batched path's place."""
    if path == "sklearn":
        monkeypatch.setattr(atc, "cluster_labels", sklearn_labels)
    cluster_path = "loop" if path == "loop" else "batched"
    method = create_method("atc", keep_rate=0.9, linkage="complete", cluster_path=cluster_path)
    return method.apply(deit_small)


@pytest.mark.benchmark(group="atc-deit-s-batch-1")
@pytest.mark.parametrize("path", list(PATHS))
def test_deit_s_batch_of_1(benchmark, deit_small, monkeypatch, path):
    model = patched(deit_small, monkeypatch, path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(forward, rounds=10, warmup_rounds=2)
    assert model.reduction_info.tokens[-1] == 143 and out.shape == (1, 1000)


@pytest.mark.benchmark(group="atc-deit-s")
@pytest.mark.parametrize("path", list(PATHS))
def test_deit_s_batch_of_64(benchmark, deit_small, monkeypatch, path):
    model = patched(deit_small, monkeypatch, path)
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(forward, rounds=2, warmup_rounds=1)
    assert model.reduction_info.tokens[-1] == 143 and out.shape == (B, 1000)


@pytest.mark.benchmark(group="atc-deit-s")
def test_deit_s_batch_of_64_clusterings_side_by_side(benchmark, deit_small, monkeypatch):
    """The clusterings of one forward of DeiT-S on 64 images at 224 (keep 0.9, complete
    linkage: three locations), on the model's own metrics, by the three paths in turns: five
    rounds after a warm-up, the best of each. The rest of the forward is the same for all."""
    seen: list[tuple[torch.Tensor, int, str]] = []
    ours = atc.cluster_labels

    def recording(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
        seen.append((metric.clone(), k, linkage))
        return ours(metric, k, linkage)

    monkeypatch.setattr(atc, "cluster_labels", recording)
    model = patched(deit_small, monkeypatch, "batched")
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(x)
    assert [(m.shape[:2], k) for m, k, _ in seen] == [
        ((B, 196), 176),
        ((B, 176), 158),
        ((B, 158), 142),
    ]
    loop = atc.cluster_labels_loop
    seconds = {ours: [], loop: [], sklearn_labels: []}

    def all_three() -> None:
        for fn, times in seconds.items():
            start = time.perf_counter()
            for metric, k, linkage in seen:
                fn(metric, k, linkage)
            times.append(time.perf_counter() - start)

    benchmark.pedantic(all_three, rounds=5, warmup_rounds=1)
    torch_s, sklearn_s = min(seconds[ours]), min(seconds[sklearn_labels])
    print(
        f"\nthree locations: torch {torch_s * 1e3:.0f} ms, loop {min(seconds[loop]) * 1e3:.0f} "
        f"ms, scikit-learn {sklearn_s * 1e3:.0f} ms"
    )
    assert torch_s < sklearn_s, f"torch {torch_s / sklearn_s:.2f}x the time of scikit-learn"
