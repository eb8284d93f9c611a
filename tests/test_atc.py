"""atc against its definition (:mod:`ppt_bench.methods.atc`), scikit-learn's clustering and
the authors' token counts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ppt_bench.commands.visualize import sources_per_location, token_owner
from ppt_bench.core.errors import MethodError
from ppt_bench.engine.evaluate import evaluate
from ppt_bench.measure.macs import measure_macs, uncounted_macs
from ppt_bench.methods import atc, create_method
from ppt_bench.methods.atc import (
    LINKAGES,
    atc_step,
    choose_path,
    cluster_labels,
    cluster_labels_loop,
    cosine_distance,
    num_clusters,
)
from ppt_bench.methods.contract import Reduced
from ppt_bench.results.spec import RunSpec

DEIT_S = "deit_small_patch16_224"

# Tokens after each block of DeiT-S at 224 px in the authors' code, JoakimHaurum/ATC @ 227c94b5
# (ATC_setup/models/atc.py): K = int(196 * keep_rate**k) clusters plus the class token at
# blocks 3, 6, 9; keep 0.9 gives K = 176, 158, 142 and keep 0.7 gives K = 137, 96, 67.
AUTHORS_TOKENS = [
    ({"keep_rate": 0.9}, (197, 197, 197, 177, 177, 177, 159, 159, 159, 143, 143, 143)),
    ({"keep_rate": 0.7}, (197, 197, 197, 138, 138, 138, 97, 97, 97, 68, 68, 68)),
]
# GMACs of DeiT-S at 224 px from the authors' code ("atc").
AUTHORS_GMACS = [
    ({"keep_rate": 0.9, "linkage": "complete"}, 3.964),
    ({"keep_rate": 0.7, "linkage": "average"}, 2.983),
]


def sklearn_labels(metric: torch.Tensor, k: int, linkage: str) -> np.ndarray:
    """The authors' clustering: scikit-learn on ``1 - cos``, one image at a time."""
    from sklearn.cluster import AgglomerativeClustering

    dist = cosine_distance(metric).numpy()
    clustering = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    return np.stack([clustering.fit(d).labels_ for d in dist])


def random_metrics(seeds: range, tokens: int = 196, dim: int = 16) -> torch.Tensor:
    """One random metric ``[T, d]`` per seed, stacked into a batch."""
    return torch.stack(
        [torch.randn(tokens, dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def tied_metrics(seed: int, tokens: int = 40) -> torch.Tensor:
    """``[3, T, 4]`` metrics whose distances tie: repeated tokens (distance 0 between copies,
    equal distances to the others), and two images of small integer vectors (few distinct
    cosines)."""
    g = torch.Generator().manual_seed(seed)
    distinct = torch.randn(tokens // 4, 4, generator=g)
    repeated = distinct[torch.randint(0, tokens // 4, (tokens,), generator=g)]
    grid = torch.randint(1, 4, (2, tokens, 4), generator=g).float() - 2 * torch.eye(4)[:1]
    return torch.cat([repeated[None], grid])


# -- parameters -------------------------------------------------------------------------------


def test_a_keep_rate_that_leaves_no_cluster_is_refused(make_model):
    with pytest.raises(MethodError, match="leaves no cluster"):
        create_method("atc", keep_rate=0.05).apply(make_model("deit_tiny", img_size=64))


# -- the clustering ---------------------------------------------------------------------------


@pytest.mark.parametrize("linkage", LINKAGES)
def test_partitions_and_labels_equal_scikit_learn(linkage):
    metric = random_metrics(range(24))  # 24 seeds, one image each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's note that it builds the full tree
        for k in (176, 137, 40, 1):
            ours = cluster_labels(metric, k, linkage).numpy()
            theirs = sklearn_labels(metric, k, linkage)
            assert ours.min() == 0 and ours.max() == k - 1
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{linkage}, {k} clusters")


@pytest.mark.parametrize("linkage", LINKAGES)
def test_the_loop_equals_scikit_learn_ties_included(linkage):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(6):
            metric = tied_metrics(seed)
            assert (cosine_distance(metric) < 1e-6).sum() > metric.shape[0] * metric.shape[1]
            for k in (1, 2, 7, 20, 39):
                np.testing.assert_array_equal(
                    cluster_labels_loop(metric, k, linkage).numpy(),
                    sklearn_labels(metric, k, linkage),
                    err_msg=f"{linkage}, seed {seed}, {k} clusters",
                )


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize(("batch", "tokens", "ks"), [(1, 196, (176, 67)), (3, 37, (1, 20, 36))])
def test_both_paths_give_the_same_labels_and_tokens(linkage, batch, tokens, ks):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(batch, 1 + tokens, 8, generator=g)
    size = torch.randint(1, 4, (batch, 1 + tokens, 1), generator=g).float()
    key_mean = torch.randn(batch, 1 + tokens, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in ks:
            loop = cluster_labels_loop(key_mean[:, 1:], k, linkage)
            assert torch.equal(loop, cluster_labels(key_mean[:, 1:], k, linkage))
            np.testing.assert_array_equal(loop.numpy(), sklearn_labels(key_mean[:, 1:], k, linkage))
            reduced = [
                atc_step(Reduced(x, size, None), key_mean, k, 1, linkage, path)
                for path in ("loop", "batched")
            ]
            for a, b in zip(*reduced, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


def test_single_linkage_paths_agree_on_ties():
    """Both build SciPy's minimum spanning tree, tied edges in its order (complete and average
    linkage break ties in another order on the batched path: see the module)."""
    for seed in range(6):
        metric = tied_metrics(seed)
        for k in (2, 7, 20, 39):
            loop = cluster_labels_loop(metric, k, "single")
            assert torch.equal(loop, cluster_labels(metric, k, "single"))


def test_auto_takes_the_loop_on_the_cpu_and_the_batched_path_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert (choose_path("auto", cpu), choose_path("auto", gpu)) == ("loop", "batched")
    for forced in ("loop", "batched"):
        assert choose_path(forced, cpu) == choose_path(forced, gpu) == forced
    with pytest.raises(MethodError, match="cluster_path must be one of auto, loop, batched"):
        create_method("atc", cluster_path="gpu")


@pytest.mark.parametrize(("cluster_path", "taken"), [("auto", "loop"), ("batched", "batched")])
def test_the_path_taken_is_the_one_reported(
    make_model, images, logits, clone, monkeypatch, cluster_path, taken
):
    ref = make_model("deit_tiny", img_size=128)
    x = images(2, 128)
    expected = logits(create_method("atc", keep_rate=0.8).apply(clone(ref)), x)

    def refused(*args):
        raise AssertionError("the other path ran")

    other = "cluster_labels" if taken == "loop" else "cluster_labels_loop"
    monkeypatch.setattr(atc, other, refused)
    model = create_method("atc", keep_rate=0.8, cluster_path=cluster_path).apply(clone(ref))
    assert torch.equal(logits(model, x), expected)
    stats = model.reduction_info.stats
    assert torch.equal(stats["cluster_loop"], torch.full((2, 3), taken == "loop"))


@pytest.mark.parametrize("cluster_path", ["loop", "batched"])
def test_both_paths_trace_without_graph_breaks(assert_one_graph, make_model, images, cluster_path):
    model = create_method("atc", keep_rate=0.8, cluster_path=cluster_path)
    assert_one_graph(model.apply(make_model("deit_tiny", img_size=64)), images(2, 64))


def test_the_path_is_recorded_in_the_rows_but_not_in_the_run_id():
    common = dict(model="deit_tiny_patch16_224", method="atc", batch_size=2, n_images=2)
    common |= dict(workers=0, metrics=("tokens",))
    auto = RunSpec(params={"keep_rate": 0.8}, **common)
    forced = RunSpec(params={"keep_rate": 0.8, "cluster_path": "batched"}, **common)
    assert forced.run_id == auto.run_id
    assert RunSpec(params={"keep_rate": 0.7}, **common).run_id != auto.run_id
    rows = {r["metric"]: r for r in evaluate(forced, progress=False)}
    assert [rows[f"cluster_loop_frac_block_{i}"]["value"] for i in (3, 6, 9)] == [0.0] * 3
    assert rows["tokens_block_11"]["params"] == '{"cluster_path": "batched", "keep_rate": 0.8}'
    assert rows["tokens_block_11"]["run_id"] == auto.run_id


def test_clusters_join_the_closest_pairs_first():
    # Four points on a line: 0 and 1 are closest, then 2 and 3; complete linkage then joins
    # the two pairs, single linkage joins 1 and 2 first.
    angles = torch.tensor([0.0, 0.1, 0.35, 0.5])
    metric = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # [1, 4, 2]
    two = cluster_labels(metric, 2, "complete")[0]
    assert two[0] == two[1] and two[2] == two[3] and two[0] != two[2]
    three = cluster_labels(metric, 3, "single")[0]
    assert three[0] == three[1] and len(set(three.tolist())) == 3


def test_step_is_the_size_weighted_mean_of_each_cluster():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 30, 8, generator=g)
    size = torch.randint(1, 4, (2, 31, 1), generator=g).float()
    key_mean = torch.randn(2, 31, 4, generator=g)
    out = atc_step(Reduced(x, size, None), key_mean, 10, 1, "average")
    labels = cluster_labels(key_mean[:, 1:], 10, "average")
    for b in range(2):
        torch.testing.assert_close(out.x[b, 0], x[b, 0])
        assert out.size[b, 0] == size[b, 0]
        for c in range(10):
            members = 1 + (labels[b] == c).nonzero()[:, 0]
            w = size[b, members]
            torch.testing.assert_close(out.x[b, 1 + c], (x[b, members] * w).sum(0) / w.sum())
            assert out.size[b, 1 + c] == w.sum()
            # origin: the member standing for the most patches, the first among equals
            best = members[w[:, 0] == w.max()][0]
            assert out.origin[b, 1 + c] == best


# -- the method in a model --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("params", "tokens"), AUTHORS_TOKENS)
def test_token_counts_equal_the_authors_code_on_deit_s(make_model, images, logits, params, tokens):
    model = create_method("atc", **params).apply(make_model(DEIT_S))
    logits(model, images(1, 224))
    assert model.reduction_info.tokens == tokens


def test_cluster_counts_follow_the_initial_token_count(make_model, images, logits):
    assert [num_clusters(196, 0.9, k) for k in (1, 2, 3)] == [176, 158, 142]
    assert [num_clusters(196, 0.7, k) for k in (1, 2, 3)] == [137, 96, 67]
    model = create_method("atc", keep_rate=0.8).apply(make_model("deit_tiny", img_size=128))
    logits(model, images(1, 128))  # 64 patches: 51, 40, 32 clusters
    assert model.reduction_info.tokens == (65,) * 3 + (52,) * 3 + (41,) * 3 + (33,) * 3


@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg"])
def test_prefix_tokens_are_protected_and_every_patch_is_in_one_cluster(traced_source, arch):
    source, P, N0 = traced_source(arch, create_method("atc", keep_rate=0.8))
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    assert torch.equal(source[:, P:, P:].sum(dim=1), torch.ones(2, N0 - P))


@pytest.mark.parametrize("linkage", LINKAGES)
def test_a_batch_equals_its_images_one_at_a_time(
    make_model, images, logits, clone, img_size, linkage
):
    ref = make_model("deit_distilled")
    x = images(3, img_size(ref))
    model = create_method("atc", keep_rate=0.8, linkage=linkage).apply(clone(ref))
    batch = logits(model, x)
    single = torch.cat([logits(model, x[i : i + 1]) for i in range(3)])
    assert (batch - single).abs().max() < 1e-5


@pytest.mark.slow
def test_gmacs_on_deit_s_match_the_authors(make_model, clone):
    deit_small = make_model(DEIT_S)
    x = torch.randn(1, 3, 224, 224)
    for params, expected in AUTHORS_GMACS:
        model = create_method("atc", **params).apply(clone(deit_small))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            figures = measure_macs(model, (3, 224, 224), progress=False)
        assert uncounted_macs(model, x) == 0
        assert figures["gmacs"] == pytest.approx(expected, rel=5e-3), params
        assert figures["gmacs_fvcore"] == pytest.approx(expected, rel=5e-3), params


# -- on a GPU ---------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("linkage", LINKAGES)
def test_labels_on_cuda_equal_the_cpu_labels(linkage):
    metric = random_metrics(range(8))
    expected = cluster_labels(metric, 137, linkage)
    assert torch.equal(cluster_labels(metric.cuda(), 137, linkage).cpu(), expected)


def test_visualize_tints_each_cluster_as_one_group(make_model, images):
    model = make_model("deit_tiny", img_size=128)  # 64 patches: 51, 40, 32 clusters
    method = create_method("atc", keep_rate=0.8)
    found = sources_per_location(model, method, images(1, 128))
    assert [(block, n) for block, n, _ in found] == [(3, 52), (6, 41), (9, 33)]
    for _, n, source in found:
        owner, sizes = token_owner(source[0], 1)
        assert len(np.unique(owner)) == n - 1 and (owner >= 0).all()  # one colour per cluster
        assert sizes.sum() == 64
