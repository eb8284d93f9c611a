"""mctf and dct against their definitions (each method module's docstring) and the counts and
costs of the authors' code."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ppt_bench.core.errors import MethodError, PatchError
from ppt_bench.measure.macs import measure_macs, uncounted_macs
from ppt_bench.methods import Method, create_method, list_methods
from ppt_bench.methods.contract import IN_ATTN, VALUE_NORM
from ppt_bench.methods.dct import dct_ortho, dct_reduce, idct_ortho, transform_matrix
from ppt_bench.methods.mctf import bidirectional_matching, fuse, tokens_to_fuse

MCTF_FAST = {"r": 0.35, "locations": (3, 6, 9)}

# Tokens after each block of DeiT-S at 224 px, read from the authors' code on a random-weight
# model with forward hooks on its blocks: mlvlab/MCTF @ 2004da0c (models/deit.py, mctf_type
# [r,0,0,1,1,1,20,40,1,1,0] as in run/eval_deit_s_mctf*.sh) and Westlake-AI/OpenToMe @ 4b791cbc
# (opentome/timm/dct.py, dct_apply_patch with model.r = r).
AUTHORS_TOKENS = [
    ("mctf", {"r": 16}, (197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21)),
    ("mctf", {"r": 8}, (197, 189, 181, 173, 165, 157, 149, 141, 133, 125, 117, 109)),
    ("mctf", MCTF_FAST, (197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56)),
    ("dct", {"r": 8}, (189, 181, 173, 165, 157, 149, 141, 133, 125, 117, 109, 101)),
    ("dct", {"r": 13}, (184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41)),
    ("dct", {"r": (16, -1.0)}, (165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10, 10)),
]


# -- registry and parameters ------------------------------------------------------------------


def test_methods_are_registered_with_descriptions():
    assert {"mctf", "dct"} <= set(list_methods())
    for name in ("mctf", "dct"):
        method = create_method(name)
        assert method.name == name and method.description
    assert create_method("mctf").reduce_at == "in_attn"
    assert create_method("mctf", one_step_ahead=False).reduce_at == "after_mlp"
    assert create_method("dct").reduce_at == "after_mlp"
    assert create_method("mctf", r=16.0).r == 16  # a whole float is a count, as in TOML


def test_model_limits_are_rejected_at_apply(make_model):
    model = make_model("deit_tiny", img_size=64)
    with pytest.raises(MethodError, match="locations \\[12\\] are outside the model's blocks"):
        create_method("mctf", locations=[3, 12]).apply(model)
    with pytest.raises(MethodError, match="r lists 13 blocks but the model has 12"):
        create_method("dct", r=[1] * 13).apply(make_model("deit_tiny", img_size=64))


def test_reducing_inside_the_attention_cannot_read_value_norms(make_model):
    class Bad(Method):
        reduce_at = IN_ATTN
        needs = frozenset({VALUE_NORM})

    with pytest.raises(PatchError, match="cannot read value_norm"):
        Bad().apply(make_model("deit_tiny", img_size=64))


# -- zero reduction ---------------------------------------------------------------------------


# -- token counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params", "tokens"), AUTHORS_TOKENS)
def test_token_counts_equal_the_authors_code_on_deit_s(
    images, logits, clone, deit_small, name, params, tokens
):
    model = create_method(name, **params).apply(clone(deit_small))
    logits(model, images(1, 224))
    assert model.reduction_info.tokens == tokens


def test_mctf_keeps_at_least_ten_tokens_as_the_authors_code():
    assert tokens_to_fuse(16, 197, 1) == 16
    assert tokens_to_fuse(0.35, 197, 1) == 68  # int(196 * 0.35)
    assert tokens_to_fuse(16, 17, 1) == 7  # 17 - 16 < 10: r becomes 17 - 10
    assert tokens_to_fuse(16, 10, 1) == 0
    assert tokens_to_fuse(100, 197, 1) == 98  # at most half the patch tokens


@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg", "deit3_small", "vit_qknorm"])
@pytest.mark.parametrize("name", ["mctf", "dct"])
def test_prefix_tokens_are_protected_and_traced(
    make_model, images, logits, clone, img_size, arch, name
):
    ref = make_model(arch)
    P = ref.num_prefix_tokens
    N0 = ref.patch_embed.num_patches + P
    model = create_method(name, r=4).apply(clone(ref), trace_source=True)
    logits(model, images(2, img_size(ref)))
    info = model.reduction_info
    n = N0
    for block, count in enumerate(info.tokens):
        if name == "dct" or block >= 1:
            n -= tokens_to_fuse(4, n, P) if name == "mctf" else min(4, (n - P) // 2)
        assert count == n, f"block {block}"
    source = info.source
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    assert (source[:, P:, :P] == 0).all()  # no patch token carries a prefix token
    if name == "mctf":  # fusion only: every patch is in exactly one token
        assert torch.equal(source[:, P:, P:].sum(dim=1), torch.ones(2, N0 - P))


# -- mctf -------------------------------------------------------------------------------------


def test_mctf_matching_follows_the_authors_order():
    # Class token at 0; even patches at 2, 4, 6 (A), odd at 1, 3, 5 (B).
    scores = torch.tensor([[[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.2, 0.1, 0.5]]])
    # Bidirectional, r = 2: A2 (best 0.9) fuses into B1; then B3 (best unfused A: A4, 0.8)
    # fuses into A4. Out: class, A4 (+B3), A6, then B5, B1 (+A2) by descending best score.
    fusion = bidirectional_matching(scores, 2, 7, 1, bidirectional=True)
    assert fusion.num_out == 5
    assert fusion.slots.tolist() == [[0, 4, 4, 1, 1, 3, 2]]
    # Each output token descends from the token left unfused in its slot: B1 took A2 and then
    # fused into A4, whose own position the token keeps.
    assert fusion.origin.tolist() == [[0, 4, 6, 5, 1]]
    # One direction, r = 2: A2 and A4 fuse into B1 and B3; out: class, A6, B1, B3, B5.
    fusion = bidirectional_matching(scores, 2, 7, 1, bidirectional=False)
    assert fusion.slots.tolist() == [[0, 2, 2, 3, 3, 4, 1]]
    assert fusion.origin.tolist() == [[0, 6, 1, 3, 5]]


def test_mctf_fused_attention_keeps_rows_normalised():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 7, 7, generator=g).softmax(dim=-1)
    x = torch.randn(2, 7, 4, generator=g)
    size = torch.tensor([1.0, 2, 1, 3, 1, 1, 2]).expand(2, 7)[..., None]
    fusion = bidirectional_matching(torch.rand(2, 3, 3, generator=g), 2, 7, 1, True)
    out = fuse(fusion, x, size, attn, None, fuse_attn=True)
    assert out.attn.shape == (2, 3, 5, 5)
    assert torch.allclose(out.attn.sum(dim=-1), torch.ones(2, 3, 5))
    assert torch.equal(out.size.sum(dim=1), size.sum(dim=1))
    assert torch.allclose(out.x[:, 0], x[:, 0])  # the class token is fused with nothing


# -- dct --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 8, 196])
def test_dct_is_the_orthonormal_dct_ii(n):
    x = torch.randn(3, n, dtype=torch.float64)
    k, i = torch.arange(n)[:, None].double(), torch.arange(n)[None].double()
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    assert torch.allclose(dct_ortho(x), x @ basis.T, atol=1e-10)
    assert torch.allclose(idct_ortho(dct_ortho(x)), x, atol=1e-10)


def test_dct_reduce_keeps_low_frequencies_and_the_dtype():
    # A constant sequence stays constant, scaled by sqrt(T / (T - r)) as in OpenToMe.
    x = torch.ones(1, 12, 2, dtype=torch.bfloat16)
    out = dct_reduce(x, 4)
    assert out.shape == (1, 8, 2) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), torch.full((1, 8, 2), math.sqrt(12 / 8)), atol=1e-2)
    mix = transform_matrix(12, 8, torch.device("cpu"))  # [8, 12]
    y = torch.randn(2, 12, 3)
    assert torch.allclose(mix @ y, dct_reduce(y, 4), atol=1e-5)
    # Each input token weighs most in the output token at its place in the resampled sequence.
    owner = mix.argmax(dim=0).tolist()
    assert owner == sorted(owner) and set(owner) == set(range(8))


def test_dct_source_is_the_composed_token_mixing(make_model, images, logits, clone, img_size):
    ref = make_model("deit_distilled")  # 2 prefix tokens, 36 patches
    model = create_method("dct", r=[4, 6]).apply(clone(ref), trace_source=True)
    logits(model, images(2, img_size(ref)))
    source = model.reduction_info.source  # [2, 28, 38]
    cpu = torch.device("cpu")
    expected = transform_matrix(32, 26, cpu) @ transform_matrix(36, 32, cpu)  # [26, 36]
    assert torch.equal(source[:, :2], torch.eye(38)[:2].expand(2, -1, -1))
    assert torch.allclose(source[:, 2:, 2:], expected.expand(2, -1, -1), atol=1e-5)
    assert (source[:, 2:, :2] == 0).all()


# -- batches, dtypes, compile -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [("mctf", {"r": 5}), ("mctf", {"r": 5, "one_step_ahead": False}), ("dct", {"r": 5})],
)
def test_a_mixed_batch_equals_its_images_one_at_a_time(
    make_model, images, logits, clone, img_size, name, params
):
    ref = make_model("deit_distilled")
    x = images(3, img_size(ref))
    model = create_method(name, **params).apply(clone(ref))
    batch = logits(model, x)
    single = torch.cat([logits(model, x[i : i + 1]) for i in range(3)])
    assert (batch - single).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("name", "params"),
    [("mctf", {"r": 4}), ("mctf", {"r": 4, "one_step_ahead": False}), ("dct", {"r": 4})],
)
def test_methods_trace_without_graph_breaks(assert_one_graph, make_model, images, name, params):
    model = create_method(name, **params).apply(make_model("deit_tiny", img_size=64))
    assert_one_graph(model, images(2, 64))


# -- costs ------------------------------------------------------------------------------------


def vit_macs(tokens: tuple[int, ...], dim: int = 384, classes: int = 1000) -> float:
    """Linear layers and attention products of DeiT at 224 px whose blocks see ``tokens``
    (``12 N C^2 + 2 N^2 C`` a block), plus patch embedding and head."""
    total = 196 * 3 * 16 * 16 * dim + dim * classes
    return total + sum(12 * n * dim**2 + 2 * n * n * dim for n in tokens)


# GMACs of DeiT-S at 224 px measured with the authors' code ("mctf").
MCTF_GMACS = [({"r": 16}, 2.600), ({"r": 8}, 3.602), (MCTF_FAST, 2.754)]


@pytest.mark.slow
def test_gmacs_on_deit_s_match_the_authors(clone, deit_small):
    x = torch.randn(1, 3, 224, 224)
    for params, expected in MCTF_GMACS:
        model = create_method("mctf", **params).apply(clone(deit_small))
        figures = measure_macs(model, (3, 224, 224), progress=False)
        assert uncounted_macs(model, x) == 0
        assert figures["gmacs"] == pytest.approx(expected, rel=5e-3), params
    # DCT reduces after the MLP: block l runs on the tokens left by block l - 1. Without the
    # FFTs, which the counters skip, the cost is that of OpenToMe's token counts.
    for name, params, tokens in AUTHORS_TOKENS[3:5]:
        model = create_method(name, **params).apply(clone(deit_small))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            figures = measure_macs(model, (3, 224, 224), progress=False)
        fft = uncounted_macs(model, x)
        tokens_in = (197, *tokens[:-1])
        expected_fft = sum(
            384 * 2 * (n * math.log2(n) + m * math.log2(m))
            for n, m in zip([t - 1 for t in tokens_in], [t - 1 for t in tokens], strict=True)
        )
        assert fft == pytest.approx(expected_fft, rel=1e-3)
        without = figures["gmacs"] - fft / 1e9
        assert without == pytest.approx(vit_macs(tokens_in) / 1e9, rel=5e-3), params
        assert figures["gmacs_fvcore"] - fft / 1e9 == pytest.approx(without, rel=5e-3)
