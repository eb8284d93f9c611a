"""A token's rotary position follows its origin: kept tokens keep their own, a merged token its
destination's (:mod:`ppt_bench.methods.patch.rope`).

The merge cases are built so that a source merged into a destination stands for more patches
than the destination: there the destination rule and "the member standing for the most patches"
disagree.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ppt_bench.core.errors import PatchError
from ppt_bench.methods import create_method, get_method_class, list_methods, ops
from ppt_bench.methods.merge import Merge
from ppt_bench.methods.patch import blocks as patch_mod
from ppt_bench.methods.patch.rope import follow_origin, follow_positions
from ppt_bench.methods.pitome import bsm_slots, energy_order, protected_slots

# Each method's reducing example, for the methods that say where each token comes from (dct
# resamples: no origin).
REDUCING = {
    name: get_method_class(name).examples.reducing
    for name in list_methods()
    if get_method_class(name).gives_origin and get_method_class(name).examples.reducing
}


def record_positions(monkeypatch) -> list[torch.Tensor | None]:
    """Record each block's token positions (``pos [B, N]``, None while unreduced)."""
    positions: list[torch.Tensor | None] = []
    real = patch_mod.reducing_block

    def spy(block, state, plan, index, rope=None):
        out = real(block, state, plan, index, rope)
        positions.append(out[0].pos)
        return out

    monkeypatch.setattr(patch_mod, "reducing_block", spy)
    return positions


# -- pure functions ---------------------------------------------------------------------------


def test_follow_origin_gathers_the_positions_of_the_origins():
    origin = torch.tensor([[0, 3, 1], [0, 1, 2]])
    pos = torch.tensor([[0, 5, 7, 9], [0, 2, 4, 6]])
    assert follow_origin(origin, pos, num_prefix=1).tolist() == [[0, 9, 5], [0, 2, 4]]
    # The model's own tokens: token j uses row j - P.
    assert follow_origin(origin, None, num_prefix=1).tolist() == [[0, 2, 0], [0, 0, 1]]


@pytest.mark.parametrize("num_prefix", [0, 1, 4])
def test_merge_step_origin_is_each_slots_destination(num_prefix):
    g = torch.Generator().manual_seed(num_prefix)
    B, N, r, P = 3, 21, 6, num_prefix
    x, key_mean = torch.randn(B, N, 8, generator=g), torch.randn(B, N, 4, generator=g)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float()
    red = ops.merge_step(x, size, None, key_mean, r, P)
    m = ops.bipartite_soft_matching(key_mean, r, P)
    slots = ops.merge_slots(m, N)
    pa, pb = (P + 1) // 2, P // 2
    for b in range(B):
        # Sequence positions: A patch k at 2 (pa + k), B patch k at 2 (pb + k) + 1.
        merged = {
            2 * (pa + a): 2 * (pb + d) + 1
            for a, d in zip(m.src_idx[b, :, 0].tolist(), m.dst_idx[b, :, 0].tolist(), strict=True)
        }
        expected = [-1] * (N - r)
        for j in range(N):  # every slot holds one token that was not merged away: its origin
            if j not in merged:
                expected[slots[b, j]] = j
        for j, dst in merged.items():  # a merged token's slot descends from its destination
            assert expected[slots[b, j]] == dst
        assert red.origin[b].tolist() == expected


def test_positions_follow_the_origin_not_the_largest_member():
    # Output token 1 holds input tokens 1 (size 3, a source) and 2 (size 1, the destination).
    member = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    pos = torch.tensor([[0, 10, 20, 30]])
    assert follow_positions(member, size, pos, 1).tolist() == [[0, 10, 30]]
    assert follow_origin(torch.tensor([[0, 2, 3]]), pos, 1).tolist() == [[0, 20, 30]]


@pytest.mark.parametrize("bsm", [True, False])
def test_pitome_origin_is_a_member_and_a_destination(bsm):
    g = torch.Generator().manual_seed(1)
    T, r = 20, 6
    order, sim = energy_order(torch.randn(2, T, 8, generator=g), 0.3)
    added, into = (bsm_slots if bsm else protected_slots)(sim, order, r)
    kept = added[:, : T - r]  # the token behind each slot, then the merged tokens
    assert kept.shape == (2, T - r) and into.shape == (2, r)
    slots = torch.empty_like(added).scatter_(
        1, added, torch.cat([torch.arange(T - r)[None].expand(2, -1), into], 1)
    )
    assert torch.equal(slots.gather(1, kept), torch.arange(T - r).expand(2, -1))
    b_tokens = order[:, 1::2] if bsm else order[:, 1 : 2 * r : 2]
    for b in range(2):
        counts = torch.bincount(slots[b], minlength=T - r)
        for slot in torch.nonzero(counts > 1)[:, 0]:  # a merge: its origin is the B token
            assert kept[b, slot] in b_tokens[b]


# -- on a rope model --------------------------------------------------------------------------


def test_merged_token_keeps_its_destinations_rope_when_a_source_is_larger(
    rope_model, images, logits, monkeypatch
):
    """merge at three blocks: from the second on, sources of two or more patches merge into
    destinations of fewer; every token's position must be its destination's."""
    matchings: list[ops.Matching] = []
    real = ops.bipartite_soft_matching

    def spy(*args):
        m = real(*args)
        matchings.append(m)
        return m

    monkeypatch.setattr(ops, "bipartite_soft_matching", spy)
    positions = record_positions(monkeypatch)
    ref, size = rope_model("eva02", spread_head=False)  # 8 x 8 patches and a class token
    model = create_method("merge", r=16, locations=(2, 5, 8)).apply(ref)
    logits(model, images(2, size, seed=3))
    assert len(matchings) == 3
    P, B = 1, 2
    pa, pb = 1, 0
    larger_sources = 0
    for b in range(B):
        # Independently of the patch: each token as (table index, patches it stands for).
        tokens = [(0, 0)] + [(i, 1) for i in range(64)]
        for m, loc in zip(matchings, (2, 5, 8), strict=True):
            a, dst = tokens[0::2][pa:], [list(t) for t in tokens[1::2][pb:]]
            dst_size = [t[1] for t in dst]
            for s, d in zip(m.src_idx[b, :, 0].tolist(), m.dst_idx[b, :, 0].tolist(), strict=True):
                larger_sources += a[s][1] > dst_size[d]
                dst[d][1] += a[s][1]  # the destination's position stays
            unmerged = [a[i] for i in m.unm_idx[b, :, 0].tolist()]
            tokens = tokens[:P] + unmerged + [tuple(t) for t in dst]
            assert positions[loc][b, P:].tolist() == [p for p, _ in tokens[P:]], (b, loc)
    assert larger_sources > 0  # the case where the largest member is not the destination


def test_every_method_gives_each_token_a_distinct_position_of_its_own_patches(
    rope_model, images, logits, clone, monkeypatch
):
    """A token's position is one of the patches it stands for, no two tokens share one, and no
    method that gives its origin reduces a membership map for it."""
    ref, size = rope_model("eva02", spread_head=False)  # 8 x 8 patches and a class token
    x = images(2, size, seed=4)

    def no_probe(*args, **kwargs):
        raise AssertionError("the one-hot probe ran for a method that gives its origin")

    monkeypatch.setattr(patch_mod, "follow_positions", no_probe)
    positions = record_positions(monkeypatch)
    for name, params in REDUCING.items():
        method = create_method(name, **params)
        assert method.gives_origin, name
        model = method.apply(clone(ref), trace_source=True)
        positions.clear()
        logits(model, x)
        pos, source = positions[-1], model.reduction_info.source  # [B, N], [B, N, 65]
        assert pos is not None and pos.shape[1] < 65, name
        held = source[:, 1:].gather(2, 1 + pos[:, 1:, None])  # [B, N - 1, 1]
        assert (held > 0).all(), name
        for b in range(len(x)):
            assert pos[b, 1:].unique().numel() == pos.shape[1] - 1, name


def test_a_method_that_claims_origins_must_give_them(rope_model, images, logits):
    @dataclasses.dataclass(frozen=True)
    class Forgetful(Merge):
        def reduce(self, x, size, feats, *, block, num_prefix, source=None):
            red = super().reduce(x, size, feats, block=block, num_prefix=num_prefix, source=source)
            return red._replace(origin=None)

    ref, size = rope_model("eva02", spread_head=False)  # 8 x 8 patches and a class token
    model = Forgetful(r=4, locations=(1,)).apply(ref)
    with pytest.raises(PatchError, match=r"without Reduced\.origin"):
        logits(model, images(1, size))


def test_origins_are_asked_for_only_where_positions_follow_the_tokens(
    make_model, rope_model, images, logits, monkeypatch
):
    """A step skips Reduced.origin where the patch does not read it: on a model without rotary
    embeddings every reduction gets ``needs_origin`` false, on a rope model true."""
    asked: list[bool] = []
    origins: list[torch.Tensor | None] = []
    real = Merge.reduce

    def spy(self, x, size, feats, **kwargs):
        red = real(self, x, size, feats, **kwargs)
        asked.append(feats.needs_origin)
        origins.append(red.origin)
        return red

    monkeypatch.setattr(Merge, "reduce", spy)
    model = make_model("deit_tiny", img_size=64)
    logits(create_method("merge", r=4, locations=(1, 2)).apply(model), images(1, 64))
    assert asked == [False, False] and origins == [None, None]
    asked.clear()
    origins.clear()
    ref, size = rope_model("eva02")
    logits(create_method("merge", r=4, locations=(1, 2)).apply(ref), images(1, size))
    assert asked == [True, True] and all(o is not None for o in origins)
