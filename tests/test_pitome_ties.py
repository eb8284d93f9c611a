"""PiToMe's order of equal energies and equal best matches, against a per-image definition.

Equal energies are common: identical patches (flat regions) have identical keys, and on
random-weight models float32 energies often round alike. Which of two equal tokens comes
first decides which one goes to A and which to B, so the tie rule changes the merged tokens:
PiToMe's authors (hchautran/PiToMe @ 550b5dee, ``algo/pitome/merge.py``) order them with
torch's default ``argsort(descending=True)``, and so does the definition here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppt_bench.methods.contract import Reduced
from ppt_bench.methods.pitome import margin, pitome_step


def _desc(values: torch.Tensor) -> list[int]:
    """Indices of one image's ``values [n]``, largest first, ties as torch's default argsort."""
    return torch.argsort(values[None], dim=-1, descending=True)[0].tolist()


def reference(x, size, key_mean, r, margin_, bsm):
    """PiToMe's step as :mod:`ppt_bench.methods.pitome` defines it, for one image ``x [N, C]``
    with one class token, in loops."""
    m = F.normalize(key_mean[1:], p=2, dim=-1)
    sim = m @ m.T
    order = _desc(F.elu(sim - margin_).mean(dim=-1))
    if bsm:
        a, b = order[::2], order[1::2]
        best = sim[a][:, b].max(dim=-1)
        edges = _desc(best.values)
        merged, kept = edges[:r], [a[e] for e in edges[r:]]
        into = {a[e]: b[best.indices[e]] for e in merged}
    else:
        a, b = order[: 2 * r : 2], order[1 : 2 * r : 2]
        into = {t: b[j] for t, j in zip(a, sim[a][:, b].argmax(dim=-1).tolist(), strict=True)}
        kept = order[2 * r :]
    groups = [[0]] + [[1 + t] for t in kept]
    groups += [[1 + d] + [1 + s for s, dd in into.items() if dd == d] for d in b]
    out_x = torch.stack([(x[g] * size[g]).sum(0) / size[g].sum() for g in groups])
    out_size = torch.stack([size[g].sum(0) for g in groups])
    return out_x, out_size


def tied_metrics(seeds: range, distinct: int, copies: int, dim: int = 8) -> torch.Tensor:
    """Per seed, ``distinct`` random keys each repeated ``copies`` times in a shuffled order,
    after a class token: ``[len(seeds), 1 + distinct * copies, dim]``."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        keys = torch.randn(distinct, dim, generator=g).repeat(copies, 1)
        keys = keys[torch.randperm(len(keys), generator=g)]
        out.append(torch.cat([torch.randn(1, dim, generator=g), keys]))
    return torch.stack(out)


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize(("distinct", "copies"), [(12, 4), (24, 2), (48, 1)])
def test_ties_are_ordered_as_the_definition_over_many_seeds(bsm, distinct, copies):
    seeds = range(40)
    key_mean = tied_metrics(seeds, distinct, copies)  # [40, 49, 8]
    B, N, _ = key_mean.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, 6, generator=g)
    size = torch.randint(1, 4, (B, N, 1), generator=g).float()
    r, m = 10, margin(3 if bsm else 9, 12)
    out = pitome_step(Reduced(x, size, None), key_mean, r, 1, margin=m, bsm=bsm)
    for i in range(B):
        ref_x, ref_size = reference(x[i], size[i], key_mean[i], r, m, bsm)
        torch.testing.assert_close(out.x[i], ref_x, msg=f"seed {i}")
        assert torch.equal(out.size[i], ref_size), f"seed {i}"
