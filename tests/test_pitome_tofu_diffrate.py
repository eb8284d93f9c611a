"""pitome, tofu and diffrate against their definitions (each method module's docstring) and
their authors' code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ppt_bench.commands import demo
from ppt_bench.core.errors import MethodError, PatchError
from ppt_bench.measure.macs import measure_macs
from ppt_bench.methods import create_method, list_methods
from ppt_bench.methods.contract import Reduced
from ppt_bench.methods.diffrate import diffrate_step
from ppt_bench.methods.pitome import margin, pitome_step
from ppt_bench.methods.tofu import mlerp

FIELD = ("pitome", "tofu", "diffrate")


def shrinking(model, start: float, step: float) -> list[int]:
    """A kept-token schedule for ``model``: ``P + ceil((N - P) (start - step l))``, at least
    ``P + 1``, one count per block."""
    P = model.num_prefix_tokens
    T = model.patch_embed.num_patches
    return [P + max(1, math.ceil(T * (start - step * i))) for i in range(len(model.blocks))]


def diffrate_lists(model) -> dict:
    return {"prune_kept": shrinking(model, 1.0, 0.07), "merge_kept": shrinking(model, 0.95, 0.07)}


def reducing(name: str, model) -> dict:
    """Parameters that reduce tokens in most blocks of ``model``."""
    return diffrate_lists(model) if name == "diffrate" else {"ratio": 0.85}


# -- token counts and costs on DeiT-S 224 ------------------------------------------------------

# Tokens after each block, prefix included, on DeiT-S 224 (197 tokens, 12 blocks), as printed by
# the authors' code on a random-weight DeiT-S: hchautran/PiToMe @ 550b5dee (algo/pitome and
# algo/tofu, the latter the public ToFu re-implementation, whose counts are the paper's) and
# OpenGVLab/DiffRate @ 91ae3e37 (DiffRate/patch/deit.py with the schedules of
# compression_rate.json). The counts depend only on the token count, so DeiT-Ti 224 has them too.
AUTHORS_TOKENS = {
    ("pitome", 0.975): [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151],
    ("pitome", 0.95): [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
    ("pitome", 0.925): [183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82],
    ("pitome", 0.9): [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60],
    ("tofu", 0.95): [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
    ("tofu", 0.925): [183, 170, 158, 147, 136, 126, 117, 109, 101, 94, 87, 81],
    ("tofu", 0.9): [178, 161, 145, 131, 118, 107, 97, 88, 80, 72, 65, 59],
    ("diffrate", "2.3"): [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3],
    ("diffrate", "2.9"): [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3],
    ("diffrate", "3.1"): [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3],
}
# GMACs of DeiT-S 224 measured with the authors' code and torchprofile.
AUTHORS_GMACS = {
    ("pitome", 0.975): 4.034,
    ("pitome", 0.95): 3.462,
    ("pitome", 0.925): 3.010,
    ("pitome", 0.9): 2.610,
    ("tofu", 0.95): 3.447,
    ("tofu", 0.925): 2.983,
    ("tofu", 0.9): 2.595,
    ("diffrate", "2.3"): 2.333,
    ("diffrate", "2.9"): 2.912,
    ("diffrate", "3.1"): 3.115,
}


def method_for(name: str, setting):
    return create_method(
        name, **({"schedule": setting} if name == "diffrate" else {"ratio": setting})
    )


def ratio_counts(ratio: float, depth: int, tokens: int, prefix: int, with_prefix: bool):
    """The definition: ``r = floor(T - T ratio)`` per block, ``T`` with or without the prefix
    tokens, at most half the patch tokens."""
    counts, n = [], tokens
    for _ in range(depth):
        t = n if with_prefix else n - prefix
        n -= min(math.floor(t - t * ratio), (n - prefix) // 2)
        counts.append(n)
    return counts


@pytest.mark.parametrize(("name", "setting"), list(AUTHORS_TOKENS))
def test_token_counts_equal_the_authors_code(make_model, images, logits, name, setting):
    model = method_for(name, setting).apply(make_model("deit_tiny_patch16_224"))
    logits(model, images(1, 224))
    assert list(model.reduction_info.tokens) == AUTHORS_TOKENS[name, setting]
    if name != "diffrate":
        assert AUTHORS_TOKENS[name, setting] == ratio_counts(setting, 12, 197, 1, name == "tofu")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("name", "setting"), list(AUTHORS_GMACS))
def test_deit_s_gmacs_within_half_a_percent_of_the_authors(
    make_model, images, logits, name, setting
):
    model = method_for(name, setting).apply(make_model("deit_small_patch16_224"))
    gmacs = measure_macs(model, (3, 224, 224), progress=False)["gmacs"]  # counts on a copy
    logits(model, images(1, 224))
    assert list(model.reduction_info.tokens) == AUTHORS_TOKENS[name, setting]
    expected = AUTHORS_GMACS[name, setting]
    assert gmacs == pytest.approx(expected, rel=5e-3), f"{name} {setting}: {gmacs:.3f} GMACs"


# -- the generic patch's guarantees ------------------------------------------------------------


def test_methods_are_registered_with_descriptions_and_demo_grids():
    assert set(FIELD) <= set(list_methods())
    for name in FIELD:
        method = create_method(name)
        assert method.name == name and method.description
        key, values = type(method).demo_grid
        assert demo.grid()[name] == (key, values)
        for value in values:  # every demo value is a valid parameter
            create_method(name, **{key: value})


@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg"])
@pytest.mark.parametrize("name", FIELD)
def test_prefix_tokens_are_kept_and_sources_tracked(
    make_model, images, logits, clone, img_size, arch, name
):
    ref = make_model(arch)
    P = ref.num_prefix_tokens
    N0 = ref.patch_embed.num_patches + P
    model = create_method(name, **reducing(name, ref)).apply(clone(ref), trace_source=True)
    logits(model, images(2, img_size(ref)))
    source = model.reduction_info.source
    assert source.shape == (2, model.reduction_info.tokens[-1], N0)
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    covered = source[:, P:, P:].sum(dim=1)  # how many final tokens hold each patch
    if name == "pitome":  # merging only: every patch lives on in exactly one token
        assert torch.equal(covered, torch.ones_like(covered))
    else:  # pruned patches are gone, the others are in one token each
        assert covered.max() == 1 and covered.sum() < covered.numel()


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"schedule": "2.8"}, r"unknown DiffRate schedule '2.8'; valid: .*2\.9"),
        ({"schedule": "8.7"}, r"'ViT-B-DeiT/8.7' or 'ViT-B-MAE/8.7'"),
        ({"schedule": "2.9", "merge_kept": [197] * 12}, r"not both"),
        ({"prune_kept": [197] * 12, "merge_kept": [197] * 11}, r"12 blocks .* 11"),
    ],
)
def test_diffrate_refuses_schedules_it_does_not_have_and_lists_that_disagree(params, match):
    with pytest.raises(MethodError, match=match):
        create_method("diffrate", **params)


def test_diffrate_schedules_by_name():
    assert create_method("diffrate").schedule == "ViT-S-DeiT/2.9"  # the default
    assert create_method("diffrate", schedule="2.3").schedule == "ViT-S-DeiT/2.3"
    method = create_method("diffrate", schedule="ViT-B-MAE/8.7")
    prune, merge = method.counts()
    assert prune[:3] == (197, 192, 166) and merge[-2:] == (23, 23)
    assert len(create_method("diffrate", schedule="ViT-H-MAE/83.7").counts()[0]) == 32
    assert create_method("diffrate", **method.params()) == method  # records round-trip


def test_diffrate_schedule_that_does_not_fit_is_an_error_at_patch_time(make_model, clone):
    short = make_model("deit_tiny", img_size=64, depth=6)
    with pytest.raises(MethodError, match=r"has 12 blocks and the model 6"):
        create_method("diffrate", schedule="2.9").apply(short)
    small = make_model("deit_tiny", img_size=64)  # 17 tokens
    with pytest.raises(MethodError, match=r"searched for 197 tokens and the model has 17"):
        create_method("diffrate", schedule="2.9").apply(small)
    with pytest.raises(MethodError, match=r"exceed the model's 2 prefix tokens, got 2"):
        create_method("diffrate", merge_kept=[38] * 11 + [2]).apply(make_model("deit_distilled"))
    with pytest.raises(MethodError, match=r"has 3 blocks and the model 12"):
        create_method("diffrate", merge_kept=[10, 9, 8]).apply(clone(small))


# -- the steps against the authors' code, on small random cases -------------------------------


def _authors_pitome(x, size, key_mean, ratio, margin_, bsm):
    """hchautran/PiToMe @ 550b5dee, algo/pitome/merge.py (pitome_vision, pitome_bsm, pitome,
    merge_wavg), with one class token."""
    metric = F.normalize(key_mean[:, 1:], p=2, dim=-1)
    B, T, _ = metric.shape
    r = math.floor(T - T * ratio)
    sim = metric @ metric.transpose(-1, -2)
    indices = torch.argsort(F.elu(sim - margin_).mean(dim=-1), descending=True)
    if bsm:
        a_idx, b_idx = indices[..., ::2], indices[..., 1::2]
    else:
        a_idx, b_idx = indices[..., : 2 * r : 2], indices[..., 1 : 2 * r : 2]
    scores = sim.gather(-1, b_idx[:, None].expand(B, T, -1))
    scores = scores.gather(-2, a_idx[..., None].expand(-1, -1, b_idx.shape[-1]))
    node_max, node_idx = scores.max(dim=-1)
    if bsm:
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        keep_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
    else:
        src_idx, dst_idx = None, node_idx[..., None]

    def merge(t):
        cls, t = t[:, :1], t[:, 1:]
        C = t.shape[-1]
        src = t.gather(1, a_idx[..., None].expand(-1, -1, C))
        dst = t.gather(1, b_idx[..., None].expand(-1, -1, C))
        if bsm:
            kept = src.gather(1, keep_idx.expand(-1, -1, C))
            src = src.gather(1, src_idx.expand(-1, -1, C))
        else:
            kept = t.gather(1, indices[:, 2 * r :, None].expand(-1, -1, C))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, C), src, reduce="sum")
        return torch.cat([cls, kept, dst], dim=1)

    total = merge(size)
    return merge(x * size) / total, total, r


@pytest.mark.parametrize("bsm", [True, False])
def test_pitome_step_equals_the_authors_merge(bsm):
    g = torch.Generator().manual_seed(0)
    x, key_mean = torch.randn(3, 37, 16, generator=g), torch.randn(3, 37, 8, generator=g)
    size = torch.randint(1, 4, (3, 37, 1), generator=g).float()
    m = margin(7, 12)
    ref_x, ref_size, r = _authors_pitome(x, size, key_mean, 0.8, m, bsm)
    out = pitome_step(Reduced(x, size, None), key_mean, r, 1, margin=m, bsm=bsm)
    assert r == 7 and out.x.shape == ref_x.shape == (3, 30, 16)
    assert torch.allclose(out.x, ref_x, atol=1e-6) and torch.equal(out.size, ref_size)


def test_mlerp_keeps_the_largest_norm_and_the_mean_direction():
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])
    slots = torch.tensor([[0, 0, 1, 2]])  # tokens 0 and 1 fuse; 2 and 3 stay alone
    out = mlerp(slots, 3, x)
    assert torch.allclose(out[0, 0].norm(), torch.tensor(3.0))
    assert torch.allclose(
        F.normalize(out[0, 0], dim=0), F.normalize(torch.tensor([1.5, 0.5]), dim=0)
    )
    assert torch.equal(out[0, 1:], x[0, 2:])


def test_diffrate_step_prunes_then_merges_with_the_cosine_size_rule():
    # Class token, then four patch tokens; importance ranks patches 4 > 2 > 1 > 3.
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [3.0]]])
    importance = torch.tensor([[0.2, 0.3, 0.1, 0.4]])
    out = diffrate_step(x, size, torch.eye(5)[None], importance, 4, 3, 1)
    # Pruned: patch 3. Merge: patch 1 (least important left) into its most similar kept token,
    # patch 4 (cos 1/sqrt 2, patch 2 has cos 0), never the class token.
    assert torch.allclose(out.x[0], torch.tensor([[5.0, 5.0], [1.0, 0.5], [0.0, 1.0]]))
    assert torch.allclose(out.size[0, :, 0], torch.tensor([1.0, 3.0 + 2.0 / math.sqrt(2), 1.0]))
    assert out.source[0].tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]]
    # Patch 1 (size 2) merged into patch 4: the merged token descends from its destination.
    assert out.origin[0].tolist() == [0, 4, 2]


def test_diffrate_uses_proportional_attention_from_its_first_merge():
    method = create_method("diffrate", schedule="2.9")
    assert method.prop_attn and method.needs == {"cls_attn"}
    # Block 0 keeps all 197 tokens; every block whose count drops is a location.
    assert method.locations_for(12) == tuple(range(12))
    merge_only = create_method("diffrate", merge_kept=[50, 50, 40, 45, 40, 30])
    assert merge_only.locations_for(6) == (0, 2, 5)


def test_models_without_a_class_token(make_model, images, logits, clone):
    ref = make_model("vit_tiny_patch16_224", img_size=96, class_token=False, global_pool="avg")
    assert ref.num_prefix_tokens == 0
    x = images(2, 96)
    for name in ("pitome", "tofu"):
        model = create_method(name, ratio=0.8).apply(clone(ref))
        assert torch.isfinite(logits(model, x)).all()
        assert list(model.reduction_info.tokens) == ratio_counts(0.8, 12, 36, 0, name == "tofu")
    with pytest.raises(PatchError, match="no class token"):
        create_method("diffrate", merge_kept=[30] * 12).apply(clone(ref))
