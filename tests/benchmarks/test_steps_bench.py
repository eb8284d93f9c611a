"""Each method's reduction step at batch 1 against its previous implementation, side by side.

DeiT-S sized tokens (B=1, N=197 with a class token, C=384, 6 heads of 64) and the features
each step reads, at the settings of the committed DeiT-S CPU sweep. ``current`` is the
method's ``reduce`` as the patch calls it on a model without rotary embeddings;
``reference`` is the same step written with the functions as they were before the steps were
rewritten with fewer operators (the ``previous_*`` functions below, copied unchanged apart
from their docstrings). Each benchmark records the operators one call launches
(``extra_info["operators"]``); ``test_step_equals_its_reference`` checks, in the default run,
that both give the same tokens and sizes. Run the timings with
``pytest tests/benchmarks/test_steps_bench.py --benchmark-only --benchmark-enable``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ppt_bench.methods import create_method, ops
from ppt_bench.methods.contract import Features, Reduced, ViTInfo
from ppt_bench.methods.controls import random_scores
from ppt_bench.methods.gtp import gtp_scores
from ppt_bench.methods.mctf import Fusion, tokens_to_fuse
from ppt_bench.methods.pitome import margin, ratio_reduction

B, N, C, H, P = 1, 197, 384, 6, 1
D = C // H
DEIT_S = ViTInfo(
    "deit_small_patch16_224", depth=12, embed_dim=C, patch_tokens=N - P, prefix_tokens=P
)


# -- reference: the steps before they were rewritten with fewer operators ----------------------


def previous_significance_scores(cls_attn, v_norm, num_prefix):
    s = cls_attn[..., num_prefix:].sum(dim=1) * v_norm[..., num_prefix:]
    return s / s.sum(dim=-1, keepdim=True)


def previous_cls_attention_mean(cls_attn, num_prefix):
    return cls_attn[..., num_prefix:].mean(dim=1)


def previous_gather_tokens(t, idx):
    idx = idx.reshape(*idx.shape, *[1] * (t.dim() - 2))
    return t.gather(1, idx.expand(-1, -1, *t.shape[2:]))


def previous_keep_top(scores, num_keep, num_prefix):
    B = scores.shape[0]
    top = scores.topk(num_keep, dim=-1, sorted=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, num_prefix)
    return torch.cat([prefix, top], dim=1)


def previous_dropped_mask(keep, num_tokens, num_prefix):
    kept = torch.zeros(keep.shape[0], num_tokens, dtype=torch.bool, device=keep.device)
    kept = kept.scatter(1, keep, torch.ones_like(keep, dtype=torch.bool))
    return ~kept[:, num_prefix:]


def previous_fuse_tokens(t, weights, num_prefix, mode="sum"):
    weighted = t[:, num_prefix:] * weights.to(t.dtype)[..., None]
    if mode == "sum":
        return weighted.sum(dim=1, keepdim=True)
    return weighted.amax(dim=1, keepdim=True)


def previous_cosine_scores(a, b):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.transpose(-1, -2)


def previous_bipartite_soft_matching(metric, r, num_prefix):
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    a, b = metric[..., ::2, :][:, pa:], metric[..., 1::2, :][:, pb:]
    scores = previous_cosine_scores(a, b)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if num_prefix:
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx[..., None].gather(1, src_idx)
    return ops.Matching(num_prefix, unm_idx, src_idx, dst_idx)


def previous_kept_positions(m, num_tokens):
    P = m.num_prefix
    pa, pb = (P + 1) // 2, P // 2
    B, n_unm, _ = m.unm_idx.shape
    n_b = num_tokens - P - n_unm - m.src_idx.shape[1]
    arange = torch.arange(max(P, n_b), device=m.unm_idx.device)
    unm = 2 * (pa + m.unm_idx[..., 0])
    b_pos = 2 * (pb + arange[:n_b]) + 1
    return torch.cat([arange[:P].expand(B, -1), unm, b_pos.expand(B, -1)], dim=1)


def previous_merge_slots(m, num_tokens):
    P, (B, n_unm, _), r = m.num_prefix, m.unm_idx.shape, m.src_idx.shape[1]
    n_a = n_unm + r
    n_b = num_tokens - P - n_a
    arange = partial(torch.arange, device=m.unm_idx.device)
    a_slot = torch.empty(B, n_a, dtype=torch.long, device=m.unm_idx.device)
    a_slot.scatter_(1, m.unm_idx[..., 0], (P + arange(n_unm)).expand(B, -1))
    a_slot.scatter_(1, m.src_idx[..., 0], P + n_unm + m.dst_idx[..., 0])
    b_slot = (P + n_unm + arange(n_b)).expand(B, -1)
    prefix = arange(P)
    slots = torch.empty(B, num_tokens, dtype=torch.long, device=m.unm_idx.device)
    slots[:, 0::2] = torch.cat([prefix[0::2].expand(B, -1), a_slot], dim=1)
    slots[:, 1::2] = torch.cat([prefix[1::2].expand(B, -1), b_slot], dim=1)
    return slots


def previous_prune_slots(keep, num_tokens):
    B, K = keep.shape
    slots = torch.full((B, num_tokens), K, dtype=torch.long, device=keep.device)
    return slots.scatter_(1, keep, torch.arange(K, device=keep.device).expand(B, -1))


def previous_pool(slots, num_out, x, size):
    B, _, C = x.shape
    idx = slots[..., None]
    total = x.new_zeros(B, num_out + 1, C).scatter_add_(1, idx.expand(-1, -1, C), x * size)
    weight = size.new_zeros(B, num_out + 1, 1).scatter_add_(1, idx, size)
    weight = weight[:, :num_out]
    return total[:, :num_out] / weight, weight


def previous_pool_source(slots, num_out, source):
    B, _, N0 = source.shape
    out = source.new_zeros(B, num_out + 1, N0)
    return out.scatter_add_(1, slots[..., None].expand(-1, -1, N0), source)[:, :num_out]


def previous_keep_step(x, size, source, keep):
    return Reduced(
        previous_gather_tokens(x, keep),
        previous_gather_tokens(size, keep),
        None if source is None else previous_gather_tokens(source, keep),
        origin=keep,
    )


def previous_prune_step(x, size, source, scores, r, num_prefix):
    if r == 0:
        return Reduced(x, size, source)
    keep = previous_keep_top(scores, x.shape[1] - num_prefix - r, num_prefix)
    return previous_keep_step(x, size, source, keep)


def previous_pool_step(x, size, source, slots, num_out, origin=None):
    x, size = previous_pool(slots, num_out, x, size)
    source = None if source is None else previous_pool_source(slots, num_out, source)
    return Reduced(x, size, source, origin=origin)


def previous_merge_step(x, size, source, key_mean, r, num_prefix):
    if r == 0:
        return Reduced(x, size, source)
    N = x.shape[1]
    m = previous_bipartite_soft_matching(key_mean, r, num_prefix)
    slots, kept = previous_merge_slots(m, N), previous_kept_positions(m, N)
    return previous_pool_step(x, size, source, slots, N - r, kept)


def previous_ppt(x, size, source, feats, r, num_prefix, threshold):
    """PPT's mixed batch (``branch="auto"``)."""
    scores = previous_significance_scores(feats.cls_attn, feats.value_norm, num_prefix)
    score_var = scores.var(dim=-1, correction=1)
    pooled = score_var < threshold
    N = x.shape[1]
    keep = previous_keep_top(scores, N - num_prefix - r, num_prefix)
    matching = previous_bipartite_soft_matching(feats.key_mean, r, num_prefix)
    merge, prune = previous_merge_slots(matching, N), previous_prune_slots(keep, N)
    slots = torch.where(pooled[:, None], merge, prune)
    origin = torch.where(pooled[:, None], previous_kept_positions(matching, N), keep)
    return previous_pool_step(x, size, source, slots, N - r, origin)._replace(
        stats={"pooled": pooled, "score_var": score_var}
    )


def previous_evit_step(x, size, source, cls_attn, num_keep, num_prefix, fuse):
    keep = previous_keep_top(cls_attn, num_keep, num_prefix)
    kept = previous_keep_step(x, size, source, keep)
    if not fuse:
        return kept
    dropped = previous_dropped_mask(keep, x.shape[1], num_prefix).to(x.dtype)
    fused_x = previous_fuse_tokens(x, cls_attn * dropped, num_prefix)
    fused_size = previous_fuse_tokens(size, dropped, num_prefix)
    fused_origin = num_prefix + (dropped * size[:, num_prefix:, 0]).argmax(dim=1, keepdim=True)
    return Reduced(
        torch.cat([kept.x, fused_x], dim=1),
        torch.cat([kept.size, fused_size], dim=1),
        None
        if source is None
        else torch.cat([kept.source, previous_fuse_tokens(source, dropped, num_prefix, "amax")], 1),
        origin=torch.cat([keep, fused_origin], dim=1),
    )


def previous_energy_order(metric, margin):
    m = F.normalize(metric, p=2, dim=-1)
    sim = m @ m.transpose(-1, -2)
    energy = F.elu(sim - margin).mean(dim=-1)
    return torch.argsort(energy, dim=-1, descending=True), sim


def previous_pitome_scores(sim, a_idx, b_idx):
    B, T, _ = sim.shape
    s = sim.gather(2, b_idx[:, None].expand(B, T, -1))
    return s.gather(1, a_idx[..., None].expand(-1, -1, b_idx.shape[1]))


def previous_bsm_slots(sim, order, r):
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    B, n_a = a_idx.shape
    n_unm = n_a - r
    node_max, node_idx = previous_pitome_scores(sim, a_idx, b_idx).max(dim=-1)
    edge_idx = torch.argsort(node_max, dim=-1, descending=True)
    arange = torch.arange(max(n_a, b_idx.shape[1]), device=sim.device)
    a_slot = torch.empty_like(a_idx)
    a_slot.scatter_(1, edge_idx[:, r:], arange[:n_unm].expand(B, -1))
    a_slot.scatter_(1, edge_idx[:, :r], n_unm + node_idx.gather(1, edge_idx[:, :r]))
    slots = torch.empty_like(order)
    slots.scatter_(1, a_idx, a_slot)
    slots.scatter_(1, b_idx, (n_unm + arange[: b_idx.shape[1]]).expand(B, -1))
    kept = torch.cat([a_idx.gather(1, edge_idx[:, r:]), b_idx], dim=1)
    return slots, kept, a_idx.gather(1, edge_idx[:, :r])


def previous_protected_slots(sim, order, r):
    B, T = order.shape
    a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
    dst = previous_pitome_scores(sim, a_idx, b_idx).argmax(dim=-1)
    n_prot = T - 2 * r
    arange = torch.arange(max(n_prot, r), device=sim.device)
    slots = torch.empty_like(order)
    slots.scatter_(1, order[:, 2 * r :], arange[:n_prot].expand(B, -1))
    slots.scatter_(1, b_idx, (n_prot + arange[:r]).expand(B, -1))
    slots.scatter_(1, a_idx, n_prot + dst)
    return slots, torch.cat([order[:, 2 * r :], b_idx], dim=1), a_idx


def previous_pitome_step(tokens, key_mean, r, num_prefix, *, margin, bsm):
    if r == 0:
        return tokens
    x, size, source = tokens[:3]
    B, N, _ = x.shape
    P = num_prefix
    order, sim = previous_energy_order(key_mean[:, P:], margin)
    patch, kept, merged = (previous_bsm_slots if bsm else previous_protected_slots)(sim, order, r)
    prefix = torch.arange(P, device=x.device).expand(B, P)
    slots = torch.cat([prefix, P + patch], dim=1)
    origin = torch.cat([prefix, P + kept], dim=1)
    add_order = torch.cat([origin, P + merged], dim=1)
    x, size = previous_gather_tokens(x, add_order), previous_gather_tokens(size, add_order)
    source = None if source is None else previous_gather_tokens(source, add_order)
    return previous_pool_step(x, size, source, slots.gather(1, add_order), N - r, origin)


def previous_mlerp(slots, num_out, x):
    B, N, _ = x.shape
    mean, count = previous_pool(slots, num_out, x, x.new_ones(B, N, 1))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    top = norm.new_zeros(B, num_out + 1, 1).scatter_reduce(
        1, slots[..., None], norm, reduce="amax", include_self=False
    )[:, :num_out]
    mean_norm = torch.linalg.vector_norm(mean, dim=-1, keepdim=True)
    scale = top / mean_norm.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(count > 1, mean * scale, mean)


def previous_tofu_step(tokens, key_mean, r, num_prefix, *, prune):
    if r == 0:
        return tokens
    x, size, source = tokens[:3]
    N = x.shape[1]
    m = previous_bipartite_soft_matching(key_mean, r, num_prefix)
    kept = previous_kept_positions(m, N)
    if prune:
        return previous_keep_step(x, size, source, kept)
    slots = previous_merge_slots(m, N)
    B = x.shape[0]
    total = size.new_zeros(B, N - r + 1, 1).scatter_add_(1, slots[..., None], size)
    return Reduced(
        previous_mlerp(slots, N - r, x),
        total[:, : N - r],
        None if source is None else previous_pool_source(slots, N - r, source),
        origin=kept,
    )


def previous_inverse_share(t):
    t = 1 / t
    return t / t.amax(dim=1, keepdim=True)


def previous_fusion_scores(x, attn, size, num_prefix, tau_sim, tau_info, tau_size):
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2

    def split(t):
        return t[:, ::2][:, pa:], t[:, 1::2][:, pb:]

    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = split(metric)
    scores = torch.ones_like(a[..., :1]) * torch.ones_like(b[..., :1]).transpose(1, 2)
    if tau_sim:
        scores = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / tau_sim)
    if tau_info:
        info_a, info_b = split(previous_inverse_share(attn.mean(dim=(1, 2)))[..., None])
        scores = scores * (info_a * info_b.transpose(1, 2)) ** (1 / tau_info)
    if tau_size:
        size_a, size_b = split(previous_inverse_share(size[..., 0])[..., None])
        scores = scores * (size_a * size_b.transpose(1, 2)) ** (1 / tau_size)
    return scores


def previous_bidirectional_matching(scores, r, num_tokens, num_prefix, bidirectional):
    P = num_prefix
    B, n_a, n_b = scores.shape
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    device = scores.device

    def arange(n):
        return torch.arange(n, device=device).expand(B, n)

    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.sort(dim=-1, descending=True, stable=True).indices
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
    if P:
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx.gather(1, src_idx)
    n_unm = n_a - r1
    b_slot = P + n_unm + arange(n_b)
    b_kept = arange(n_b)
    if bidirectional:
        back = scores.gather(1, unm_idx[..., None].expand(-1, -1, n_b)).transpose(1, 2)
        node_max2, node_idx2 = back.max(dim=-1)
        edge_idx2 = node_max2.sort(dim=-1, descending=True, stable=True).indices
        unm2, src2 = edge_idx2[:, r2:], edge_idx2[:, :r2]
        b_slot = torch.empty_like(b_slot)
        b_slot.scatter_(1, unm2, P + n_unm + arange(n_b - r2))
        b_slot.scatter_(1, src2, P + node_idx2.gather(1, src2))
        b_kept = unm2
    a_slot = torch.empty(B, n_a, dtype=torch.long, device=device)
    a_slot.scatter_(1, unm_idx, P + arange(n_unm))
    a_slot.scatter_(1, src_idx, b_slot.gather(1, dst_idx))
    prefix = torch.arange(P, device=device)
    slots = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    slots[:, 0::2] = torch.cat([prefix[0::2].expand(B, -1), a_slot], dim=1)
    slots[:, 1::2] = torch.cat([prefix[1::2].expand(B, -1), b_slot], dim=1)
    pa, pb = (P + 1) // 2, P // 2
    origin = torch.cat([prefix.expand(B, -1), 2 * (pa + unm_idx), 2 * (pb + b_kept) + 1], dim=1)
    return Fusion(slots, num_tokens - r, origin)


def previous_scatter_tokens(t, slots, num_out, dim):
    shape = [1] * t.dim()
    shape[0], shape[dim] = slots.shape
    idx = slots.view(shape).expand_as(t)
    out_shape = list(t.shape)
    out_shape[dim] = num_out
    return t.new_zeros(out_shape).scatter_add_(dim, idx, t)


def previous_fuse(fusion, x, size, attn, source, fuse_attn):
    slots, n = fusion.slots, fusion.num_out
    attn_m = attn.mean(dim=(1, 2))[..., None]
    weight = attn_m * (size / size.amax(dim=1, keepdim=True))
    norm = previous_scatter_tokens(weight, slots, n, 1)
    x = previous_scatter_tokens(x * weight, slots, n, 1) / norm
    fused_attn = None
    if fuse_attn:
        cols = previous_scatter_tokens(attn, slots, n, 3)
        fused_attn = previous_scatter_tokens(cols * weight[:, None], slots, n, 2) / norm[:, None]
    source = None if source is None else previous_pool_source(slots, n, source)
    size = previous_scatter_tokens(size, slots, n, 1)
    return Reduced(x, size, source, attn=fused_attn, origin=fusion.origin)


def previous_diffrate_step(x, size, source, importance, num_pruned, num_merged, num_prefix):
    P = num_prefix
    keep = previous_keep_top(importance, num_pruned - P, P)
    x, size = previous_gather_tokens(x, keep), previous_gather_tokens(size, keep)
    source = None if source is None else previous_gather_tokens(source, keep)
    if num_merged == num_pruned:
        return Reduced(x, size, source, origin=keep)
    B, K = x.shape[0], num_merged
    metric = x / x.norm(dim=-1, keepdim=True)
    sim = metric[:, K:] @ metric[:, :K].transpose(-1, -2)
    sim[..., :P] = float("-inf")
    cos, dst = sim.max(dim=-1)
    slots = torch.cat([torch.arange(K, device=x.device).expand(B, K), dst], dim=1)
    ones = x.new_ones(B, num_pruned, 1)
    x, _ = previous_pool(slots, K, x, ones)
    weight = torch.cat([ones[:, :K], cos[..., None].to(size.dtype)], dim=1)
    grown = size.new_zeros(B, K + 1, 1).scatter_add_(1, slots[..., None], size * weight)
    source = None if source is None else previous_pool_source(slots, K, source)
    return Reduced(x, grown[:, :K], source, origin=keep[:, :K])


def previous_dct_ortho(x):
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v, dim=-1)
    k = -torch.arange(n, dtype=x.dtype, device=x.device) * math.pi / (2 * n)
    out = spec.real * torch.cos(k) - spec.imag * torch.sin(k)
    scale = torch.full((n,), math.sqrt(2 / n), dtype=x.dtype, device=x.device)
    scale[0] = math.sqrt(1 / n)
    return out * scale


def previous_idct_ortho(c):
    n = c.shape[-1]
    scale = torch.full((n,), math.sqrt(n / 2), dtype=c.dtype, device=c.device)
    scale[0] = math.sqrt(n)
    re = c * scale
    im = torch.cat([torch.zeros_like(re[..., :1]), -re.flip(-1)[..., :-1]], dim=-1)
    k = torch.arange(n, dtype=c.dtype, device=c.device) * math.pi / (2 * n)
    cos, sin = torch.cos(k), torch.sin(k)
    spec = torch.complex(re * cos - im * sin, re * sin + im * cos)
    v = torch.fft.ifft(spec, dim=-1).real
    order = [i // 2 if i % 2 == 0 else n - 1 - i // 2 for i in range(n)]
    return v[..., order]


def previous_dct_reduce(x, r):
    t = x.float().transpose(1, 2)
    coeffs = previous_dct_ortho(t)[..., : t.shape[-1] - r]
    return previous_idct_ortho(coeffs).transpose(1, 2).to(x.dtype)


def previous_gtp_step(tokens, graph, scores, num_prop, alpha, num_prefix, *, scale_sizes):
    x, size, source = tokens[:3]
    P, (B, N, _) = num_prefix, x.shape
    T = N - P
    order = scores.argsort(dim=-1, descending=True)
    kept, prop = order[:, : T - num_prop], order[:, T - num_prop :]
    K = T - num_prop
    rows = graph.gather(1, kept[..., None].expand(-1, -1, T))
    w_prop = rows.gather(2, prop[:, None].expand(-1, K, -1))
    graph = rows.gather(2, kept[:, None].expand(-1, K, -1))

    def spread(t):
        patches = t[:, P:]
        received = w_prop.to(t.dtype) @ previous_gather_tokens(patches, prop)
        gathered = previous_gather_tokens(patches, kept)
        return torch.cat([t[:, :P], gathered + alpha * received], dim=1)

    prefix = torch.arange(P, device=x.device).expand(B, P)
    keep = torch.cat([prefix, P + kept], dim=1)
    return Reduced(
        spread(x),
        spread(size) if scale_sizes else previous_gather_tokens(size, keep),
        None if source is None else spread(source),
        origin=keep,
        state=graph,
    )


# -- the steps side by side --------------------------------------------------------------------


def make_tokens() -> dict[str, torch.Tensor]:
    """Tokens after some merges (sizes 1 to 3) and the features of their block."""
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(B, H, N, N, generator=g).softmax(dim=-1)
    v = torch.randn(B, H, N, D, generator=g)
    return {
        "x": torch.randn(B, N, C, generator=g),
        "size": torch.randint(1, 4, (B, N, 1), generator=g).float(),
        "attn": attn,
        "cls_attn": attn[:, :, 0],
        "key_mean": torch.randn(B, H, N, D, generator=g).mean(dim=1),
        "value_norm": ops.value_norm(v),
    }


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    return make_tokens()


# name: (method parameters, block); the settings of results/cpu-deit-small.csv.
CASES = {
    "ppt": ({"r": 36}, 3),
    "prune": ({"r": 36}, 3),
    "topk": ({"r": 36}, 3),
    "random": ({"r": 36}, 3),
    "merge": ({"r": 36}, 3),
    "tome": ({"r": 9}, 0),
    "evit": ({"keep_rate": 0.7806}, 3),
    "pitome-bipartite": ({"ratio": 0.9464}, 2),
    "pitome-protected": ({"ratio": 0.9464}, 8),
    "tofu-prune": ({"ratio": 0.9476}, 2),
    "tofu-merge": ({"ratio": 0.9476}, 8),
    "mctf": ({"r": 10}, 1),
    "diffrate": ({"schedule": "ViT-S-DeiT/3.1"}, 2),  # prunes to 194, merges to 186
    "dct": ({"r": 10}, 0),
    "gtp": ({"num_prop": 9}, 0),
}


def steps(case: str, t: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
    """``(reference, current)``: the step of ``case`` on ``t``, each a call without arguments."""
    name = case.split("-")[0]
    params, block = CASES[case]
    method = create_method(name, **params).bind(DEIT_S)
    x, size = t["x"], t["size"]
    state = None
    if name == "gtp":
        state = method.initial_state(x, num_prefix=P, grid=(14, 14))
    feats = Features(t["cls_attn"], t["key_mean"], t["value_norm"], t["attn"], state, False)

    def current() -> Reduced:
        return method.reduce(x, size, feats, block=block, num_prefix=P)

    r = ops.max_reduction(N, P, params.get("r", 0))
    if name == "ppt":
        reference = partial(previous_ppt, x, size, None, feats, r, P, method.threshold)
    elif name in ("prune", "topk", "random"):

        def reference() -> Reduced:
            if name == "prune":
                scores = previous_significance_scores(t["cls_attn"], t["value_norm"], P)
            elif name == "topk":
                scores = previous_cls_attention_mean(t["cls_attn"], P)
            else:
                scores = random_scores(B, N - P, method.seed, block)
            return previous_prune_step(x, size, None, scores, r, P)

    elif name in ("merge", "tome"):
        reference = partial(previous_merge_step, x, size, None, t["key_mean"], r, P)
    elif name == "evit":
        keep = math.ceil(method.keep_rate * (N - P))

        def reference() -> Reduced:
            cls_attn = previous_cls_attention_mean(t["cls_attn"], P)
            return previous_evit_step(x, size, None, cls_attn, keep, P, fuse=True)

    elif name == "pitome":
        r = ratio_reduction(N - P, method.ratio)
        m, bsm = margin(block, 12), block < 6
        given = Reduced(x, size, None)
        reference = partial(previous_pitome_step, given, t["key_mean"], r, P, margin=m, bsm=bsm)
    elif name == "tofu":
        r = ratio_reduction(N, method.ratio)
        given = Reduced(x, size, None)
        reference = partial(previous_tofu_step, given, t["key_mean"], r, P, prune=block <= 6)
    elif name == "mctf":
        r = tokens_to_fuse(method.r, N, P)

        def reference() -> Reduced:
            taus = method.tau_sim, method.tau_info, method.tau_size
            scores = previous_fusion_scores(x, t["attn"], size, P, *taus)
            fusion = previous_bidirectional_matching(scores, r, N, P, bidirectional=True)
            return previous_fuse(fusion, x, size, t["attn"], None, fuse_attn=True)

    elif name == "diffrate":
        prune, merge = method.counts()
        pruned = min(N, prune[block])
        merged = min(pruned, merge[block])

        def reference() -> Reduced:
            importance = previous_cls_attention_mean(t["cls_attn"], P)
            return previous_diffrate_step(x, size, None, importance, pruned, merged, P)

    elif name == "dct":

        def reference() -> Reduced:
            out = torch.cat([x[:, :P], previous_dct_reduce(x[:, P:], r)], dim=1)
            return Reduced(out, size[:, : N - r])

    else:  # gtp

        def reference() -> Reduced:
            scores = gtp_scores(t["attn"], P)
            return previous_gtp_step(
                Reduced(x, size, None),
                state,
                scores,
                method.num_prop,
                method.alpha,
                P,
                scale_sizes=True,
            )

    return reference, current


def operators(step: Callable) -> int:
    """Operators one call launches (every ``aten::`` event, nested ones included)."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum("::" in e.name for e in prof.events())


@pytest.mark.parametrize("case", list(CASES))
def test_step_equals_its_reference(tokens, case):
    reference, current = steps(case, tokens)
    with torch.inference_mode():
        expected, out = reference(), current()
    assert torch.equal(out.x, expected.x), case
    assert torch.equal(out.size, expected.size), case
    if expected.attn is not None:  # mctf's fused attention map
        assert torch.equal(out.attn, expected.attn), case


@pytest.mark.parametrize("impl", ["reference", "current"])
@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, tokens, case, impl):
    benchmark.group = f"step at batch 1: {case}"
    step = steps(case, tokens)[impl == "current"]
    benchmark.extra_info["operators"] = operators(step)
    with torch.inference_mode():
        out = benchmark(step)
    assert out.x.shape[0] == B
