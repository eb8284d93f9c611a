"""baseline, ppt, prune and merge against their definitions (each method module's docstring)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ppt_bench.measure.cost import profile_forwards
from ppt_bench.methods import create_method, ops

CORE = ("baseline", "ppt", "prune", "merge")


def test_apply_keeps_weights_and_state_dict_keys(make_model, clone):
    ref = make_model("deit_tiny")
    model = create_method("ppt").apply(clone(ref))
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_deit_small_token_counts_and_prefix_kept(make_model, images, logits):
    model = create_method("ppt", r=50, locations=(3, 6, 9)).apply(
        make_model("deit_small_patch16_224"), trace_source=True
    )
    logits(model, images(2, 224))
    info = model.reduction_info
    assert info.tokens == (197,) * 3 + (147,) * 3 + (97,) * 3 + (49,) * 3
    # The class token still stands for exactly itself.
    assert torch.equal(info.source[:, 0], torch.eye(197)[0].expand(2, -1))


@pytest.mark.parametrize("name", ["ppt", "prune", "merge"])
@pytest.mark.parametrize("arch", ["deit_distilled", "vit_reg"])
def test_prefix_tokens_are_never_removed(make_model, images, logits, clone, img_size, name, arch):
    ref = make_model(arch)
    P = ref.num_prefix_tokens
    model = create_method(name, r=20, locations=(0, 1, 2)).apply(clone(ref), trace_source=True)
    logits(model, images(2, img_size(ref)))
    source = model.reduction_info.source  # [B, N_final, N0]
    N0 = source.shape[-1]
    assert torch.equal(source[:, :P], torch.eye(N0)[:P].expand(2, -1, -1))
    # Every original patch is still represented (merged) or was dropped (pruned), never both.
    covered = source[:, P:, P:].sum(dim=1)
    assert covered.max() <= 1
    n_patch = N0 - P
    expected = n_patch - sum(min(20, t) for t in _removed(n_patch, 20, 3))
    assert model.reduction_info.tokens[-1] == P + expected


def _removed(n_patch: int, r: int, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        k = min(r, n_patch // 2)
        out.append(k)
        n_patch -= k
    return out


def test_ppt_threshold_zero_is_prune_and_inf_is_merge(make_model, images, logits, clone):
    ref = make_model("deit_tiny", img_size=96)
    x = images(3, 96)
    common = {"r": 8, "locations": (2, 5, 8)}
    prune = logits(create_method("prune", prop_attn=True, **common).apply(clone(ref)), x)
    merge = logits(create_method("merge", **common).apply(clone(ref)), x)
    assert torch.equal(
        logits(create_method("ppt", threshold=0, **common).apply(clone(ref)), x), prune
    )
    assert torch.equal(
        logits(create_method("ppt", threshold=math.inf, **common).apply(clone(ref)), x), merge
    )
    # Prune-only skips the (all-zero) proportional-attention bias by default: same up to kernels.
    fast_prune = logits(create_method("prune", **common).apply(clone(ref)), x)
    assert (fast_prune - prune).abs().max() < 1e-5
    # The per-image selection path (finite thresholds) picks the same tensors exactly.
    tiny = create_method("ppt", threshold=1e-30, **common).apply(clone(ref))
    assert torch.equal(logits(tiny, x), prune) and not tiny.reduction_info.stats["pooled"].any()
    huge = create_method("ppt", threshold=1e30, **common).apply(clone(ref))
    assert torch.equal(logits(huge, x), merge) and huge.reduction_info.stats["pooled"].all()


@pytest.fixture
def mixing_threshold(logits, clone):
    """``mixing_threshold(ref, x, common)``: a threshold between the images' score variances at
    the first location."""

    def threshold(ref, x, common) -> float:
        probe = create_method("ppt", threshold=0, **common).apply(clone(ref))
        logits(probe, x)
        var = probe.reduction_info.stats["score_var"][:, 0].sort().values
        mid = len(var) // 2
        return float((var[mid - 1] + var[mid]) / 2)

    return threshold


def test_ppt_mixed_batch_is_batch_independent(mixing_threshold, make_model, images, logits, clone):
    ref = make_model("deit_tiny", img_size=96)
    x = images(4, 96, seed=3)
    x[:2] *= 4  # spread the inputs so that images fall on both sides of the threshold
    common = {"r": 8, "locations": (2, 5, 8)}
    threshold = mixing_threshold(ref, x, common)
    model = create_method("ppt", threshold=threshold, **common).apply(clone(ref))
    batch = logits(model, x)
    pooled = model.reduction_info.stats["pooled"]
    assert pooled[:, 0].any() and not pooled[:, 0].all(), "the batch must mix both branches"
    for i in range(len(x)):
        alone = logits(model, x[i : i + 1])
        assert torch.equal(model.reduction_info.stats["pooled"][0], pooled[i])
        assert (alone[0] - batch[i]).abs().max() < 1e-5


def test_explicit_and_fast_attention_agree_under_reduction(make_model, images, logits, clone):
    ref = make_model("deit3_small")
    x = images(2, 96)
    for name in ("ppt", "prune", "merge"):
        fast = logits(create_method(name, r=6).apply(clone(ref)), x)
        explicit = logits(create_method(name, r=6).apply(clone(ref), attn_impl="explicit"), x)
        assert (fast - explicit).abs().max() < 1e-4, name


@pytest.mark.parametrize("arch", ["deit3_small", "vit_reg", "vit_qknorm"])
def test_folded_bias_equals_the_mask(make_model, images, logits, clone, img_size, arch):
    # The bias in an extra q/k channel gives the logits and the branch choices of the mask;
    # with qk-norm the patch keeps the mask, so the two are equal there too.
    ref = make_model(arch)
    x = images(3, img_size(ref), seed=3)
    x[:1] *= 4
    for name, params in (("ppt", {"threshold": 5e-4}), ("merge", {}), ("tome", {"r": 4})):
        fast = create_method(name, **params).apply(clone(ref))
        folded = create_method(name, **params).apply(clone(ref), attn_impl="fold")
        expected, out = logits(fast, x), logits(folded, x)
        assert (out - expected).abs().max() < 1e-4, (name, arch)
        if "pooled" in fast.reduction_info.stats:
            pooled = fast.reduction_info.stats["pooled"]
            assert torch.equal(folded.reduction_info.stats["pooled"], pooled)


def test_folded_qkv_carries_the_bias_in_one_channel(make_model):
    from ppt_bench.methods.ops import prop_attn_bias
    from ppt_bench.methods.patch.attention import fold_width, folded_qkv

    attn = make_model("deit_tiny", img_size=32).blocks[0].attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 192, generator=g)
    size = torch.randint(1, 5, (2, 5, 1), generator=g).float()
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    fq, fk, fv = folded_qkv(attn, x, prop_attn_bias(size))
    assert fold_width(64) == 72 and fq.shape == (2, 3, 5, 72)
    assert torch.allclose(fq[..., :64], q) and torch.allclose(fk[..., :64], k)
    assert torch.allclose(fv[..., :64], v) and not fv[..., 64:].any()
    bias = (fq @ fk.transpose(-1, -2) - q @ k.transpose(-1, -2)) * attn.scale
    assert torch.allclose(bias, size.log().transpose(1, 2)[:, None].expand_as(bias), atol=1e-5)
    no_bias = make_model("deit_tiny", img_size=32, qkv_bias=False).blocks[0].attn
    assert not folded_qkv(no_bias, x, torch.zeros(2, 1, 1, 5))[1][..., 64:].any()


def test_bf16_mixed_batch_runs_and_keeps_dtype(mixing_threshold, make_model, images, logits, clone):
    ref = make_model("deit_tiny", img_size=96)
    x = images(4, 96, seed=3)
    x[:2] *= 4
    common = {"r": 8, "locations": (2, 5, 8)}
    threshold = mixing_threshold(ref, x, common)
    model = create_method("ppt", threshold=threshold, **common).apply(clone(ref)).to(torch.bfloat16)
    out = logits(model, x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    pooled = model.reduction_info.stats["pooled"]
    assert pooled.any() and not pooled.all()
    # Autocast keeps fp32 weights and runs the matmuls in bf16.
    model32 = create_method("ppt", threshold=threshold, **common).apply(clone(ref))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model32, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.slow
def test_ppt_with_folded_attention_compiles_to_its_eager_logits(
    assert_one_graph, make_model, images, logits
):
    """With the bias in a q/k channel (the fused path is in the contract suite), and the
    compiled model gives the eager logits."""
    model = create_method("ppt", r=4, threshold=1e-3).apply(
        make_model("deit_tiny", img_size=64), attn_impl="fold"
    )
    x = images(2, 64)
    assert_one_graph(model, x, reset=False)
    eager = logits(model, x)
    torch._dynamo.reset()
    compiled = logits(torch.compile(model), x)
    assert (compiled - eager).abs().max() < 1e-4
    assert model.reduction_info.tokens[-1] == 5


def test_merge_matches_tome_definition_on_a_small_case():
    # 1 prefix token + 6 patches, keys chosen so that the best matches are known.
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)
    size = torch.ones(1, 7, 1)
    metric = torch.tensor([[[0, 1], [1, 0], [1, 0.1], [0, 1], [0.2, 1], [1, 0.5], [0.9, 1]]])
    # A = positions 0 (cls), 2, 4, 6; B = positions 1, 3, 5.
    m = ops.bipartite_soft_matching(metric, r=2, num_prefix=1)
    out, out_size = ops.merge_weighted(m, x, size)
    # Best matches: 2->1 (cos 0.995), 4->3 (0.98), 6->5 (0.96): the two most similar merge.
    assert out.shape == (1, 5, 2)
    assert torch.equal(out[0, 0], x[0, 0])  # class token first, untouched
    assert torch.equal(out[0, 1], x[0, 6])  # the unmerged A token
    assert torch.allclose(out[0, 2], (x[0, 1] + x[0, 2]) / 2)
    assert torch.allclose(out[0, 3], (x[0, 3] + x[0, 4]) / 2)
    assert torch.equal(out[0, 4], x[0, 5])
    assert out_size.flatten().tolist() == [1, 1, 2, 2, 1]


def test_significance_scores_follow_the_definition():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 5, 5, generator=g).softmax(-1)  # [B, H, N, N]
    v = torch.randn(2, 3, 5, 4, generator=g)  # [B, H, N, d]
    s = ops.significance_scores(attn[:, :, 0], ops.value_norm(v), num_prefix=1)
    a = attn[:, :, 0, 1:].sum(1)
    n = torch.stack(
        [torch.cat([v[:, h, j] for h in range(3)], -1).norm(dim=-1) for j in range(1, 5)], 1
    )
    expected = a * n / (a * n).sum(-1, keepdim=True)
    assert torch.allclose(s, expected)
    assert torch.allclose(s.sum(-1), torch.ones(2))


def _tome_reference_merge(x, size, metric, r):
    """ToMe's ``bipartite_soft_matching`` (class_token=True) and ``merge_wavg``, transcribed
    from facebookresearch/ToMe ``tome/merge.py``."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size)
    size = merge(size)
    return x / size, size


@pytest.mark.parametrize("r", [1, 5, 12])
def test_merge_gives_tome_tokens_in_tome_order(r):
    # Several unmerged tokens: their order decides the next bipartite split, so it must be ToMe's.
    g = torch.Generator().manual_seed(r)
    x, metric = torch.randn(3, 27, 8, generator=g), torch.randn(3, 27, 4, generator=g)
    size = torch.randint(1, 4, (3, 27, 1), generator=g).float()
    expected_x, expected_size = _tome_reference_merge(x, size, metric, r)
    out_x, out_size = ops.merge_weighted(ops.bipartite_soft_matching(metric, r, 1), x, size)
    assert torch.equal(out_size, expected_size)
    assert torch.allclose(out_x, expected_x, atol=1e-6)


def test_zero_reduction_keeps_training_mode_outputs(make_model, images, clone):
    # With nothing removed the tokens keep their order, so dropout draws the same masks.
    ref = make_model("deit_tiny", img_size=64, proj_drop_rate=0.2, attn_drop_rate=0.2)
    ref.train()
    x = images(2, 64)
    torch.manual_seed(5)
    expected = ref(x)
    for name in ("prune", "merge", "ppt", "topk", "random"):
        model = create_method(name, r=0).apply(clone(ref))
        torch.manual_seed(5)
        assert torch.equal(model(x), expected), name


def test_ppt_waits_for_no_host_value_at_batch_one(make_model, images):
    # At batch 1 the score variance covers a whole tensor, whose CPU kernel reads the mean on
    # the host: one sync per location before the variance was taken per row.
    model = create_method("ppt", r=8).apply(make_model("deit_tiny", img_size=64))
    forward = profile_forwards(model, images(1, 64), 1)[0]
    assert forward.syncs == 0
    assert model.reduction_info.stats["score_var"].shape == (1, 3)


def test_proportional_attention_bias_is_built_once_per_change_of_sizes(make_model, images):
    model = create_method("merge", r=4, locations=(3, 6, 9)).apply(
        make_model("deit_tiny", img_size=64)
    )
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images(1, 64))
    # log(size) after each of the 3 merges, not in each of the 8 blocks that apply it.
    assert sum(e.name == "aten::log" for e in prof.events()) == 3
