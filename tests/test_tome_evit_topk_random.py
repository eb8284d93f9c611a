"""tome, evit, topk and random against their definitions (each method module's docstring) and
the published figures."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import create_method, ops
from ppt_bench.methods.evit import evit_step
from ppt_bench.methods.tome import per_block_r

EXTRA = ("tome", "evit", "topk", "random")


# -- published costs --------------------------------------------------------------------------

# GMACs of DeiT-S at 224 px (each paper's "GFLOPs" counts multiply-accumulates: DeiT-S is 4.6).
# ToMe, arXiv 2210.09461, DeiT-S results (as listed on paperswithcode.com/paper/
#   token-merging-your-vit-but-faster): r=8 3.4, r=13 2.7, r=16 2.3.
# EViT, arXiv 2202.07800, model zoo of github.com/youweiliang/evit (README, "MACs (G)"):
#   keep rate 0.7 with token fusion 3.0.
PUBLISHED_GMACS = [
    ("baseline", {}, 4.6),
    ("tome", {"r": 8}, 3.4),
    ("tome", {"r": 13}, 2.7),
    ("tome", {"r": 16}, 2.3),
    ("evit", {"keep_rate": 0.7}, 3.0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params", "published"), PUBLISHED_GMACS)
def test_macs_match_the_published_figures(clone, deit_small, name, params, published):
    from torchprofile import profile_macs

    model = create_method(name, **params).apply(clone(deit_small))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torchprofile names the ops it counts as free
        gmacs = profile_macs(model, torch.randn(1, 3, 224, 224)) / 1e9
    # The papers print one decimal: the measured figure must round to it (within 0.05 GMACs).
    # What remains is the matching, the weighted averages and EViT's fused token, which the
    # papers either leave out or round away.
    assert abs(gmacs - published) <= 0.05, f"{name} {params}: {gmacs:.3f} GMACs vs {published}"


# -- zero reduction and registry --------------------------------------------------------------


# -- tome -------------------------------------------------------------------------------------


def test_tome_schedules_follow_tome_parse_r():
    assert per_block_r(8, 12) == (8,) * 12
    # (r, inflection): min = int(r (1 - inflect)), max = 2r - min, linear in between, floored.
    assert per_block_r((8, -1.0), 12) == (16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0)
    assert per_block_r((8, 0.5), 12) == (4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12)
    assert per_block_r((8, 0.0), 12) == (8,) * 12
    assert per_block_r((4, 2, 1), 6) == (4, 2, 1, 0, 0, 0)
    assert per_block_r((4, 2, 0, 0), 2) == (4, 2)  # trailing zeros past the last block are fine


def test_tome_schedule_from_toml_lists():
    # TOML gives lists: a float second item makes a pair, integers make a per-block list.
    assert create_method("tome", r=[8, -1.0]).r == (8, -1.0)
    assert create_method("tome", r=(8, -1)).r == (8, -1.0)  # a tuple is a pair, as in ToMe
    assert create_method("tome", r=[8, 4]).schedule(4) == (8, 4, 0, 0)
    assert create_method("tome", r=(8, 0)).schedule(4) == (8, 8, 8, 8)
    # Records store lists, and dataclasses.replace validates again: neither changes a schedule.
    for r in ([8, -1.0], [8, 4], [8, 1], 8, [3, 0, 2, 5]):
        method = create_method("tome", r=r)
        assert create_method("tome", **method.params()) == method
        assert dataclasses.replace(method, prop_attn=False).schedule(12) == method.schedule(12)


@pytest.mark.parametrize("r", [5, (5, -1.0), [6, 0, 4, 12]])
def test_tome_token_counts_follow_the_schedule(make_model, images, logits, clone, img_size, r):
    ref = make_model("deit_distilled")  # 2 prefix tokens, 36 patches, 12 blocks
    P = ref.num_prefix_tokens
    method = create_method("tome", r=r)
    model = method.apply(clone(ref), trace_source=True)
    logits(model, images(2, img_size(ref)))
    info = model.reduction_info
    requested = method.schedule(12)
    assert info.locations == tuple(i for i, k in enumerate(requested) if k > 0)
    n = 38
    for block, k in enumerate(requested):
        n -= min(k, (n - P) // 2)
        assert info.tokens[block] == n, f"block {block}"
    # Merging only: every patch is in exactly one token, prefix tokens stand for themselves.
    source = info.source
    assert torch.equal(source[:, :P], torch.eye(38)[:P].expand(2, -1, -1))
    assert torch.equal(source[:, P:, P:].sum(dim=1), torch.ones(2, 36))


def test_tome_is_merge_in_every_block(make_model, images, logits, clone):
    ref = make_model("deit_tiny", img_size=96)
    x = images(2, 96)
    tome = logits(create_method("tome", r=3).apply(clone(ref)), x)
    merge = logits(create_method("merge", r=3, locations=range(12)).apply(clone(ref)), x)
    assert torch.equal(tome, merge)


def test_tome_list_longer_than_the_model_is_rejected_at_apply(make_model):
    method = create_method("tome", r=[1] * 13)
    with pytest.raises(MethodError, match="r lists 13 blocks but the model has 12"):
        method.apply(make_model("deit_tiny", img_size=64))


# -- evit -------------------------------------------------------------------------------------


def _evit_counts(n_patch: int, keep_rate: float, steps: int, fuse: bool) -> list[int]:
    counts = []
    for _ in range(steps):
        kept = math.ceil(keep_rate * n_patch)
        if kept < n_patch:
            n_patch = kept + int(fuse)
        counts.append(n_patch)
    return counts


@pytest.mark.parametrize("arch", ["deit_tiny", "deit_distilled", "vit_reg"])
@pytest.mark.parametrize(("keep_rate", "fuse"), [(0.7, True), (0.5, False), (0.9, True)])
def test_evit_token_counts_and_sources(
    make_model, images, logits, clone, img_size, arch, keep_rate, fuse
):
    ref = make_model(arch, **({"img_size": 64} if arch == "deit_tiny" else {}))
    P = ref.num_prefix_tokens
    N0 = ref.patch_embed.num_patches + P
    model = create_method("evit", keep_rate=keep_rate, locations=(1, 4, 7), fuse=fuse).apply(
        clone(ref), trace_source=True
    )
    logits(model, images(2, img_size(ref)))
    info = model.reduction_info
    counts = _evit_counts(N0 - P, keep_rate, 3, fuse)
    assert [info.tokens[b] - P for b in (1, 4, 7)] == counts
    source = info.source
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    covered = source[:, P:, P:].sum(dim=1)  # [B, N0 - P]
    if fuse:  # the dropped patches live on in the fused token, the last one
        assert torch.equal(covered, torch.ones_like(covered))
        assert source[:, -1, P:].sum(dim=-1).min() >= 1
    else:
        assert covered.max() <= 1 and (covered.sum(-1) == counts[-1]).all()


def test_evit_step_fuses_the_dropped_tokens_by_unnormalised_attention():
    # 1 prefix token and 4 patch tokens; the class token attends most to patches 3 and 1.
    x = torch.arange(5 * 2, dtype=torch.float32).reshape(1, 5, 2)
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0]]])
    source = torch.eye(5)[None]
    cls_attn = torch.tensor([[0.1, 0.3, 0.2, 0.4]])  # patches 1..4 (positions 1..4)
    out = evit_step(x, size, source, cls_attn, num_keep=2, num_prefix=1, fuse=True)
    # Prefix, then kept in descending attention (positions 4, 2), then the fused token.
    assert torch.equal(out.x[0, :3], x[0, [0, 4, 2]])
    assert torch.allclose(out.x[0, 3], 0.1 * x[0, 1] + 0.2 * x[0, 3])
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 5.0]
    assert out.source[0, 3].tolist() == [0, 1, 0, 1, 0]
    dropped = evit_step(x, size, None, cls_attn, num_keep=2, num_prefix=1, fuse=False)
    assert dropped.x.shape == (1, 3, 2) and dropped.source is None


def _evit_reference(model, x, keep_rate: float, locations, fuse: bool) -> torch.Tensor:
    """EViT's own Block.forward (github.com/youweiliang/evit, evit.py) on a timm DeiT."""
    t = model._pos_embed(model.patch_embed(x))
    for i, blk in enumerate(model.blocks):
        B, N, C = t.shape
        h = blk.norm1(t)
        attn = blk.attn
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        t = t + attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        left = math.ceil(keep_rate * (N - 1))
        if i in locations and left < N - 1:
            cls_attn = a[:, :, 0, 1:].mean(dim=1)  # [B, N - 1]
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            non_cls = t[:, 1:]
            kept = non_cls.gather(1, idx[..., None].expand(-1, -1, C))
            parts = [t[:, :1], kept]
            if fuse:
                mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                compl = mask.nonzero()[:, 1].reshape(B, -1)  # complement_idx
                non_topk = non_cls.gather(1, compl[..., None].expand(-1, -1, C))
                weights = cls_attn.gather(1, compl)
                parts.append((non_topk * weights[..., None]).sum(dim=1, keepdim=True))
            t = torch.cat(parts, dim=1)
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_the_official_block(make_model, images, logits, clone, fuse):
    ref = make_model("deit_tiny", img_size=96)
    x = images(3, 96)
    with torch.inference_mode():
        expected = _evit_reference(ref, x, 0.6, (3, 6, 9), fuse)
    model = create_method("evit", keep_rate=0.6, fuse=fuse).apply(clone(ref))
    assert (logits(model, x) - expected).abs().max() < 1e-5


# -- controls ---------------------------------------------------------------------------------


def test_topk_keeps_the_highest_class_attention(make_model, images, logits, clone, img_size):
    ref = make_model("deit_distilled")
    P = ref.num_prefix_tokens
    x = images(2, img_size(ref))
    model = create_method("topk", r=10, locations=(0,)).apply(clone(ref), trace_source=True)
    logits(model, x)
    kept = model.reduction_info.source[:, P:, P:].argmax(dim=-1)  # original patch of each token
    # The class-token attention of block 0, computed directly.
    with torch.inference_mode():
        t = ref._pos_embed(ref.patch_embed(x))
        attn = ref.blocks[0].attn
        B, N, _ = t.shape
        q, k, _ = attn.qkv(ref.blocks[0].norm1(t)).reshape(B, N, 3, attn.num_heads, -1).unbind(2)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(attn.scale).softmax(-1)[:, :, 0, P:]
        expected = a.mean(dim=1).topk(N - P - 10, dim=-1).indices
    for i in range(B):
        assert set(kept[i].tolist()) == set(expected[i].tolist())


def test_random_is_reproducible_per_seed(make_model, images, logits, clone):
    ref = make_model("deit_tiny", img_size=96)
    x = images(3, 96)

    def run(seed):
        model = create_method("random", r=8, seed=seed).apply(clone(ref), trace_source=True)
        return logits(model, x), model.reduction_info.source

    out, source = run(1)
    again, source_again = run(1)
    other, source_other = run(2)
    assert torch.equal(out, again) and torch.equal(source, source_again)
    assert not torch.equal(source, source_other)
    assert (out - other).abs().max() > 1e-4
    # Each image drops its own random patches, and never more than once.
    assert not torch.equal(source[0], source[1])
    covered = source[:, 1:, 1:].sum(dim=1)
    assert covered.max() <= 1 and (covered.sum(-1) == 36 - 24).all()


def test_random_needs_no_attention_features():
    assert create_method("random").needs == frozenset()
    assert create_method("topk").needs == {"cls_attn"}
    assert not create_method("evit").prop_attn and create_method("tome").prop_attn


def test_fused_token_helpers_keep_dtype_and_shape():
    t = torch.randn(2, 6, 4, dtype=torch.bfloat16)
    keep = torch.tensor([[0, 3, 1], [0, 5, 2]])
    dropped = ops.dropped_mask(keep, 6, 1)
    assert dropped.tolist() == [[False, True, False, True, True], [True, False, True, True, False]]
    fused = ops.fuse_tokens(t, dropped, 1)
    assert fused.shape == (2, 1, 4) and fused.dtype == torch.bfloat16
    assert torch.allclose(fused[0, 0].float(), t[0, [2, 4, 5]].float().sum(0), atol=0.05)
