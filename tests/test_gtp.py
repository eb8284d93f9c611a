"""gtp (GTP-ViT) against its definition (:mod:`ppt_bench.methods.gtp`): the graphs, the step,
token counts, costs, the patch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ppt_bench.methods.gtp as gtp
from ppt_bench.commands import demo
from ppt_bench.core.errors import MethodError
from ppt_bench.measure.macs import measure_macs
from ppt_bench.methods import create_method, list_methods
from ppt_bench.methods.contract import Reduced
from ppt_bench.methods.gtp import (
    gtp_scores,
    gtp_step,
    normalise,
    semantic_graph,
    sparsify,
    spatial_graph,
)

# A setting of each graph that reduces in every block, with sparse attention and token scales.
REDUCING = {
    "mixed": {"num_prop": 2, "sparsity": 0.7, "alpha": 0.3},
    "spatial": {"num_prop": 2, "graph": "spatial", "alpha": 0.1, "token_scale": False},
    "semantic": {"num_prop": 2, "graph": "semantic", "num_neighbours": 5, "sparsity": 0.9},
}

# The authors' settings: DeiT-S spatial, DeiT-B's mixed table.
OFFICIAL = {
    "P4 spatial": {"num_prop": 4, "graph": "spatial", "alpha": 0.1, "token_scale": False},
    "P4 mixed": {"num_prop": 4, "alpha": 0.4},
    "P8 mixed 0.6": {"num_prop": 8, "sparsity": 0.6, "alpha": 0.1},
    "P14 mixed 0.8": {"num_prop": 14, "sparsity": 0.8, "alpha": 0.3},
}
# Tokens after each block on DeiT-S 224 (197 tokens, 12 blocks), prefix included, as the
# authors' code (Ackesnal/GTP-ViT @ 97a11781, models_v3.py) gives them on a random-weight DeiT-S:
# 197 - P l tokens enter block l. They depend only on P and the token count (DeiT-Ti has them).
AUTHORS_TOKENS = {
    4: [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 153, 149],
    8: [189, 181, 173, 165, 157, 149, 141, 133, 125, 117, 109, 101],
    14: [183, 169, 155, 141, 127, 113, 99, 85, 71, 57, 43, 29],
}
# GMACs of DeiT-S 224 measured with the authors' code and torchprofile.
AUTHORS_GMACS = {
    "P4 spatial": 4.023,
    "P4 mixed": 4.038,
    "P8 mixed 0.6": 3.454,
    "P14 mixed 0.8": 2.601,
}


# -- the definitions, against direct constructions -------------------------------------------


def test_spatial_graph_joins_the_eight_grid_neighbours():
    rows, cols = 3, 5
    expected = torch.zeros(rows * cols, rows * cols, dtype=torch.bool)
    for i in range(rows * cols):
        for j in range(rows * cols):
            dr, dc = abs(i // cols - j // cols), abs(i % cols - j % cols)
            expected[i, j] = i != j and dr <= 1 and dc <= 1
    graph = spatial_graph(rows, cols, torch.device("cpu"))
    assert torch.equal(graph, expected)
    assert graph.sum(dim=1).tolist()[:6] == [3, 5, 5, 5, 3, 5]  # corner, edge, ..., interior


def test_semantic_graph_marks_each_tokens_k_nearest_by_cosine():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 20, 8, generator=g)
    K = 4
    graph = semantic_graph(tokens, K)
    for b in range(2):
        for i in range(20):
            cos = torch.nn.functional.cosine_similarity(tokens[b, i : i + 1], tokens[b], dim=-1)
            cos[i] = -math.inf  # itself excluded
            nearest = set(cos.argsort(descending=True)[:K].tolist())
            assert set(graph[b, i].nonzero().flatten().tolist()) == nearest
    assert not torch.equal(graph, graph.transpose(1, 2))  # directed, not symmetrised


def test_normalised_graph_equals_the_matrix_products_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    adj = torch.rand(3, 30, 30, generator=g) < 0.3
    adj[:, torch.arange(30), (torch.arange(30) + 1) % 30] = True  # no empty row
    a = adj.float()
    d = torch.diag_embed(a.sum(-1) ** (-1 / 2))
    assert torch.equal(normalise(adj, torch.float32), d @ a @ d)


def test_sparsify_zeroes_the_entries_below_the_kth_smallest():
    g = torch.Generator().manual_seed(2)
    attn = torch.rand(2, 3, 7, 7, generator=g).softmax(-1)
    out = sparsify(attn, 0.6)
    k = int(7 * 7 * (1 - 0.6))
    for b in range(2):
        for h in range(3):
            threshold = attn[b, h].flatten().sort().values[k - 1]
            expected = torch.where(attn[b, h] < threshold, 0.0, attn[b, h])
            assert torch.equal(out[b, h], expected)
            assert (out[b, h] == 0).sum() == k - 1  # the k-th smallest itself is kept
    assert sparsify(attn, 1.0) is attn


def test_scores_are_the_max_diagonal_times_the_max_received_attention():
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(2, 3, 6, 6, generator=g).softmax(-1)
    P = 2
    scores = gtp_scores(attn, P)
    for b in range(2):
        for i in range(P, 6):
            diag = max(attn[b, h, i, i] for h in range(3))
            received = max(sum(attn[b, h, q, i] for q in range(6)) for h in range(3))
            assert scores[b, i - P] == pytest.approx(float(diag * received), rel=1e-6)


def test_step_propagates_the_lowest_scores_into_their_neighbours():
    g = torch.Generator().manual_seed(4)
    B, P, T, C, num_prop, alpha = 2, 1, 9, 5, 3, 0.3
    x = torch.randn(B, P + T, C, generator=g)
    size = torch.rand(B, P + T, 1, generator=g) + 0.5
    graph = normalise(spatial_graph(3, 3, torch.device("cpu")).expand(B, T, T), torch.float32)
    scores = torch.rand(B, T, generator=g)
    source = torch.eye(P + T).expand(B, -1, -1)
    out = gtp_step(Reduced(x, size, source), graph, scores, num_prop, alpha, P, scale_sizes=True)
    for b in range(B):
        order = sorted(range(T), key=lambda i: -float(scores[b, i]))
        kept, prop = order[: T - num_prop], order[T - num_prop :]
        assert torch.equal(out.x[b, :P], x[b, :P])
        for slot, i in enumerate(kept):
            gained = sum(graph[b, i, j] * x[b, P + j] for j in prop)
            assert torch.allclose(out.x[b, P + slot], x[b, P + i] + alpha * gained, atol=1e-6)
            s_gained = sum(graph[b, i, j] * size[b, P + j] for j in prop)
            assert torch.allclose(out.size[b, P + slot], size[b, P + i] + alpha * s_gained)
            # The source row: its own patch, and alpha times its share of each propagated one.
            expected = source[b, P + i] + alpha * sum(
                graph[b, i, j] * source[b, P + j] for j in prop
            )
            assert torch.allclose(out.source[b, P + slot], expected)
        assert torch.equal(out.state[b], graph[b][kept][:, kept])  # not renormalised
        assert out.origin[b].tolist() == [0] + [P + i for i in kept]
    plain = gtp_step(Reduced(x, size), graph, scores, num_prop, alpha, P, scale_sizes=False)
    assert torch.equal(plain.size, size.gather(1, out.origin[..., None]))


def reference_forward(model, x: torch.Tensor, method) -> torch.Tensor:
    """Logits of a timm ViT with GTP-ViT written out from its definition, block by block: the
    graph as a matrix product ``D^-1/2 A D^-1/2``, explicit attention, per-head thresholds by
    sorting, an argsort of the scores and the propagation as a matrix product."""
    P = model.num_prefix_tokens
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    B, N, C = tokens.shape
    T = N - P
    cols = model.patch_embed.grid_size[1]
    idx = torch.arange(T)
    r, c = idx // cols, idx % cols
    spatial = ((r[:, None] - r).abs() <= 1) & ((c[:, None] - c).abs() <= 1) & (idx[:, None] != idx)
    m = torch.nn.functional.normalize(tokens[:, P:], dim=-1)
    cos = m @ m.transpose(1, 2)
    kth = cos.sort(dim=-1, descending=True).values[
        ..., method.num_neighbours : method.num_neighbours + 1
    ]
    semantic = (cos >= kth) & (idx[:, None] != idx)
    adj = {"spatial": spatial.expand(B, T, T), "semantic": semantic}.get(method.graph)
    adj = (spatial | semantic if adj is None else adj).float()
    d = torch.diag_embed(adj.sum(-1) ** -0.5)
    graph = d @ adj @ d
    scales = torch.ones(B, N)
    for block in model.blocks:
        attn = block.attn
        H = attn.num_heads
        q, k, v = attn.qkv(block.norm1(tokens)).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        logit = (q * attn.scale) @ k.transpose(-2, -1)
        if method.token_scale:
            logit = logit + scales.log()[:, None, None, :]
        a = logit.softmax(-1)
        kk = int(N * N * (1 - method.sparsity))
        if kk:
            tau = a.reshape(B, H, -1).sort(dim=-1).values[..., kk - 1, None, None]
            a = torch.where(a < tau, 0.0, a)
        out = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        tokens = tokens + block.ls1(out)
        score = a.diagonal(dim1=-2, dim2=-1)[:, :, P:].amax(1) * a[..., P:].sum(-2).amax(1)
        order = score.argsort(dim=-1, descending=True)  # not stable, as the official code
        kept, prop = order[:, : T - method.num_prop], order[:, T - method.num_prop :]
        new_tokens, new_scales, new_graph = [], [], []
        for b in range(B):
            w = graph[b][kept[b]]
            patches, s = tokens[b, P:], scales[b, P:]
            gained = w[:, prop[b]] @ patches[prop[b]]
            new_tokens.append(torch.cat([tokens[b, :P], patches[kept[b]] + method.alpha * gained]))
            s_gained = w[:, prop[b]] @ s[prop[b]]
            new_scales.append(torch.cat([scales[b, :P], s[kept[b]] + method.alpha * s_gained]))
            new_graph.append(w[:, kept[b]])
        tokens, scales, graph = (
            torch.stack(new_tokens),
            torch.stack(new_scales),
            torch.stack(new_graph),
        )
        N, T = tokens.shape[1], T - method.num_prop
        tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("arch", ["deit_tiny", "deit_distilled", "deit3_small"])
@pytest.mark.parametrize(
    "params",
    [
        {"num_prop": 2, "graph": "spatial", "alpha": 0.1, "token_scale": False},
        {"num_prop": 2, "sparsity": 0.6, "alpha": 0.1},
        {"num_prop": 1, "graph": "semantic", "num_neighbours": 3, "sparsity": 0.8, "alpha": 0.3},
    ],
)
def test_patched_model_equals_the_definition_written_out(
    make_model, images, logits, clone, img_size, arch, params
):
    ref = make_model(arch, img_size=96)
    x = images(2, img_size(ref), seed=5)
    method = create_method("gtp", **params)
    with torch.inference_mode():
        expected = reference_forward(ref, x, method)
    got = logits(method.apply(clone(ref)), x)
    assert (got - expected).abs().max() < 1e-4


# -- the authors' code, through its logits ------------------------------------------------------

# Logits of the authors' code (Ackesnal/GTP-ViT @ 97a11781, models_v3.py) on random-weight
# DeiT-Ti and DeiT-S, made on the CPU by tests/reference/make_gtp_reference.py; the weights and
# images are regenerated here from the seeds it records.
with np.load(Path(__file__).parent / "reference" / "gtp_authors_logits.npz") as _fixture:
    AUTHORS = json.loads(str(_fixture["meta"]))
    AUTHORS_LOGITS = {k: torch.from_numpy(_fixture[k]) for k in _fixture.files if k != "meta"}


@pytest.mark.parametrize("key", list(AUTHORS_LOGITS))
def test_logits_equal_the_authors_code(make_model, images, logits, key):
    """At every sparsity: below 1, tokens whose self-attention is zeroed in every head tie at 0
    across the cut (on nearly every image of DeiT-Ti, 3 heads), and the sort must break them as
    theirs does."""
    name, case = key.split(":")
    model = make_model(name, seed=AUTHORS["model_seed"])
    x = images(AUTHORS["images"], AUTHORS["img_size"], seed=AUTHORS["image_seed"])
    got = logits(create_method("gtp", **AUTHORS["cases"][case]).apply(model), x)
    difference = (got - AUTHORS_LOGITS[key]).abs().max()
    assert difference < 1e-4, f"{difference:.3g} (fixture made with torch {AUTHORS['torch']})"


# -- token counts and costs on DeiT-S 224 ------------------------------------------------------


@pytest.mark.parametrize("num_prop", list(AUTHORS_TOKENS))
def test_token_counts_equal_the_authors_code(make_model, images, logits, num_prop):
    model = create_method("gtp", num_prop=num_prop).apply(make_model("deit_tiny_patch16_224"))
    logits(model, images(1, 224))
    assert list(model.reduction_info.tokens) == AUTHORS_TOKENS[num_prop]
    assert AUTHORS_TOKENS[num_prop] == [197 - num_prop * (block + 1) for block in range(12)]


def official_normalisation_macs(patch_tokens: int) -> int:
    """The two ``[T, T]`` matrix products ``D^-1/2 A D^-1/2`` of the official code: ``2 T^3``."""
    return 2 * patch_tokens**3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("setting", list(AUTHORS_GMACS))
def test_deit_s_gmacs_within_half_a_percent_of_the_authors(make_model, images, logits, setting):
    """The counted graph normalisation is the elementwise one that runs (``2 T^2``
    multiplications); with the official code's ``2 T^3`` for its two matrix products in its
    place, the figures are the authors'."""
    params = OFFICIAL[setting]
    model = create_method("gtp", **params).apply(make_model("deit_small_patch16_224"))
    macs = measure_macs(model, (3, 224, 224), progress=False)
    logits(model, images(1, 224))
    assert list(model.reduction_info.tokens) == AUTHORS_TOKENS[params["num_prop"]]
    official = macs["gmacs"] + (official_normalisation_macs(196) - 2 * 196**2) / 1e9
    expected = AUTHORS_GMACS[setting]
    assert official == pytest.approx(expected, rel=5e-3, abs=6e-4), f"{setting}: {official:.4f}"
    assert macs["gmacs"] < expected and macs["gmacs_fvcore"] == pytest.approx(
        macs["gmacs"], rel=5e-3
    )


# -- the generic patch's guarantees ------------------------------------------------------------


def test_registered_with_a_description_and_a_demo_grid(make_model, clone):
    assert "gtp" in list_methods()
    method = create_method("gtp")
    assert method.description and method.needs == {"attn"} and method.prop_attn
    key, values = type(method).demo_grid
    assert demo.grid()["gtp"] == (key, values)
    digits_like = make_model("deit_tiny", img_size=128, patch_size=16)  # 64 patches, as the demo
    for value in values:
        create_method("gtp", **{key: value}).apply(clone(digits_like))


@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg", "deit3_small", "vit_qknorm"])
@pytest.mark.parametrize("graph", list(REDUCING))
def test_mixed_batch_equals_images_one_at_a_time(
    make_model, images, logits, clone, img_size, arch, graph
):
    ref = make_model(arch)
    x = images(3, img_size(ref))
    x[0] *= 3
    model = create_method("gtp", **REDUCING[graph]).apply(clone(ref))
    batch = logits(model, x)
    N = ref.patch_embed.num_patches + ref.num_prefix_tokens
    assert model.reduction_info.tokens[-1] == N - 12 * REDUCING[graph]["num_prop"]
    for i in range(3):
        alone = logits(model, x[i : i + 1])
        assert (alone[0] - batch[i]).abs().max() < 1e-4, f"image {i}"


@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg"])
def test_prefix_tokens_are_carried_and_propagated_patches_traced(traced_source, arch):
    source, P, N0 = traced_source(arch, create_method("gtp", **REDUCING["mixed"]))
    assert source.shape == (2, N0 - 24, N0)
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    patches = source[:, P:, P:]
    own = patches.amax(dim=2)  # a kept token holds its own patch at weight 1
    assert torch.allclose(own, torch.ones_like(own))
    received = (patches > 0).sum(dim=2)  # and, after propagations, other patches with less
    assert (received > 1).any() and (patches <= 1 + 1e-6).all()


def test_non_square_and_dynamic_grids_use_their_rows_and_columns(
    make_model, logits, clone, monkeypatch
):
    seen = []
    real = gtp.spatial_graph
    monkeypatch.setattr(gtp, "spatial_graph", lambda r, c, d: seen.append((r, c)) or real(r, c, d))
    ref = make_model("deit_tiny", img_size=(64, 96))
    model = create_method("gtp", num_prop=1, graph="spatial").apply(clone(ref))
    assert torch.isfinite(logits(model, torch.randn(1, 3, 64, 96))).all()
    assert seen == [(4, 6)]
    dynamic = make_model("deit_tiny", img_size=64, dynamic_img_size=True)
    model = create_method("gtp", num_prop=1, graph="spatial").apply(dynamic)
    assert torch.isfinite(logits(model, torch.randn(1, 3, 80, 112))).all()
    assert seen[-1] == (5, 7) and model.reduction_info.tokens[-1] == 1 + 35 - 12


# -- parameters ---------------------------------------------------------------------------------


def test_settings_that_do_not_fit_the_model_are_errors_at_patch_time(make_model, clone):
    small = make_model("deit_tiny", img_size=64)  # 16 patch tokens, 12 blocks
    with pytest.raises(MethodError, match=r"num_prop=2 in each of 12 blocks .* use num_prop <= 1"):
        create_method("gtp", num_prop=2).apply(clone(small))
    with pytest.raises(MethodError, match=r"use num_neighbours < 16"):
        create_method("gtp", num_prop=1, num_neighbours=16).apply(clone(small))
    create_method("gtp", num_prop=1, num_neighbours=16, graph="spatial").apply(clone(small))
