"""ATC: Agglomerative Token Clustering (ECCV 2024; JoakimHaurum/ATC @ 227c94b5).

At the ``k``-th location, after the attention residual, the patch tokens are clustered into
``K_k = int(T_0 * keep_rate**k)`` clusters (``T_0`` the model's initial patch tokens) by
agglomerative clustering of the distances ``1 - cos`` between their keys averaged over heads
(``ATC_setup/models/atc.py``). Each cluster becomes one token, the size-weighted mean of its
members; sizes add up. Output: prefix, then the clusters in scikit-learn's label order.

The authors run scikit-learn's ``AgglomerativeClustering(metric="precomputed")`` per image on
the host. :func:`cluster_labels` builds the same partition and the same labels on the tokens'
device for the whole batch at once:

- The dendrogram. Every step joins the two closest clusters; the distance of the joined cluster
  to each other one follows the Lance-Williams rule of the linkage (complete: the larger of the
  two distances, single: the smaller, average: their mean weighted by the clusters' sizes), in
  float64 as SciPy computes it. Each cluster's nearest neighbour is cached, so a step rescans
  only the clusters whose neighbour was one of the two it joined (the joined cluster's row
  always). For these linkages the distances of successive joins never decrease, so the steps
  come in the order of SciPy's sorted linkage matrix, and nodes are numbered as SciPy numbers
  them (leaves ``0 .. T-1``, the ``s``-th join ``T + s``, children smaller id first).
- The cut and the labels. scikit-learn undoes the last ``K - 1`` joins with a heap of node ids
  (``sklearn.cluster._agglomerative._hc_cut``) and labels each cluster by its position in that
  heap; :func:`heap_labels` replays the same heap operations for the whole batch.

Costs: torchprofile and fvcore see the model's layers and the pooling; the clustering is one
custom operator that neither sees. Its multiply-accumulates are the cosine matrix,
``T^2 d`` per location (``d`` the head dim; 6.1 M on DeiT-S at keep 0.9, 0.15% of the model),
which the authors' figures count and these leave out; the joins themselves are comparisons.

Ties: among pairs at the same distance the step joins the one with the lowest cluster index,
then the lowest partner (a cluster's index is the lowest index among its leaves). SciPy's
nearest-neighbour chain may take tied pairs in another order, so only untied distances (any
real image; random metrics) are guaranteed the same partition as scikit-learn's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ppt_bench.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import (
    KeepAtLocations,
    Method,
)
from ppt_bench.methods.interface import KEY_MEAN, Knob, ViTInfo
from ppt_bench.methods.ops import Reduced

LINKAGES = ("complete", "average", "single")


def num_clusters(patch_tokens: int, keep_rate: float, k: int) -> int:
    """Clusters at the ``k``-th location (1-based): ``int(T_0 * keep_rate**k)``, as the authors."""
    return int(patch_tokens * keep_rate**k)


def cosine_distance(metric: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between every pair of tokens: ``[B, T, d] -> [B, T, T]``, in float64.

    The cosine is computed in the metric's dtype (float32 for bf16/fp16 metrics) as the
    authors do, then widened, since SciPy builds the tree in float64.
    """
    m = metric if metric.dtype == torch.float64 else metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    return (1 - m @ m.transpose(-1, -2)).double()


def agglomerative_tree(
    dist: torch.Tensor, linkage: str, cut: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full dendrogram of every image, and the node each leaf belongs to after ``cut`` joins.

    Args:
        dist: ``[B, T, T]`` symmetric distances (float64; the diagonal is ignored).
        linkage: ``"complete"``, ``"average"`` or ``"single"``.
        cut: joins after which the leaves' nodes are recorded (``T - K`` for ``K`` clusters).

    Returns:
        ``children [B, T - 1, 2]`` (int64, SciPy's numbering: join ``s`` makes node ``T + s``
        from its two children, smaller id first) and ``leaf_node [B, T]`` (the node holding each
        leaf after ``cut`` joins).
    """
    B, T, _ = dist.shape
    dev = dist.device
    inf = float("inf")
    eye = torch.eye(T, dtype=torch.bool, device=dev)
    D = dist.masked_fill(eye, inf).contiguous()  # [B, T, T], a cluster lives at its lowest leaf
    b_all = torch.arange(B, device=dev)
    cols = torch.arange(T, device=dev)
    rows = D.view(B * T, T)
    rowmin, rowarg = D.min(dim=-1)  # [B, T] nearest neighbour of each cluster (first on ties)
    node = cols.expand(B, T).clone()  # node id of the cluster held at each index
    count = D.new_ones(B, T)  # leaves per cluster (average linkage)
    where = cols.expand(B, T).clone()  # the index holding each leaf's cluster
    children = torch.empty(B, max(T - 1, 0), 2, dtype=torch.long, device=dev)
    leaf_node = node.clone()
    sparse = not dist.is_cuda  # rescan only the stale rows; on a GPU a full rescan is cheaper
    for s in range(T - 1):
        if s == cut:
            leaf_node = node.gather(1, where)
        i = rowmin.argmin(dim=-1)  # [B] the closest pair: lowest index first on ties
        j = rowarg.gather(1, i[:, None])[:, 0]
        a, b = torch.minimum(i, j), torch.maximum(i, j)  # the joined cluster lives at a
        na, nb = node.gather(1, a[:, None]), node.gather(1, b[:, None])  # [B, 1]
        children[:, s] = torch.cat([torch.minimum(na, nb), torch.maximum(na, nb)], dim=1)
        node.scatter_(1, a[:, None], T + s)
        ra, rb = b_all * T + a, b_all * T + b  # rows of D viewed as [B * T, T]
        da, db = rows.index_select(0, ra), rows.index_select(0, rb)  # [B, T]
        if linkage == "complete":
            new = torch.maximum(da, db)
        elif linkage == "single":
            new = torch.minimum(da, db)
        else:
            ca, cb = count.gather(1, a[:, None]), count.gather(1, b[:, None])
            new = (ca * da + cb * db) / (ca + cb)
            count.scatter_add_(1, a[:, None], cb)
        gone = (cols == b[:, None]) | (cols == a[:, None])  # [B, T]
        new = new.masked_fill(gone, inf)
        # b leaves: its row and column become inf; a's row and column take the joined values.
        D[b_all, b] = inf
        D[b_all, :, b] = inf
        D[b_all, a] = new
        D[b_all, :, a] = new
        where = torch.where(where == b[:, None], a[:, None], where)
        # Nearest neighbours: a and the rows that pointed at a or b are rescanned, the others
        # can only have gained a closer (or an equal, lower-index) neighbour in a.
        stale = (rowarg == a[:, None]) | (rowarg == b[:, None])
        if linkage == "single":
            stale = torch.zeros_like(stale)  # single: a's distance to them is their old minimum
        stale |= cols == a[:, None]
        closer = (new < rowmin) | ((new == rowmin) & (a[:, None] < rowarg))
        rowmin = torch.where(closer, new, rowmin)
        rowarg = torch.where(closer, a[:, None], rowarg)
        if sparse:
            bi, ki = stale.nonzero(as_tuple=True)
            m, mi = rows.index_select(0, bi * T + ki).min(dim=-1)
            rowmin[bi, ki], rowarg[bi, ki] = m, mi
        else:
            m, mi = D.min(dim=-1)
            rowmin, rowarg = torch.where(stale, m, rowmin), torch.where(stale, mi, rowarg)
        rowmin = rowmin.masked_fill(cols == b[:, None], inf)
    if cut >= T - 1:
        leaf_node = node.gather(1, where)
    return children, leaf_node


def single_linkage_tree(dist: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single linkage as SciPy builds it: Prim's minimum spanning tree from leaf 0, its edges
    sorted by length (stable), then numbered as joins (``scipy.cluster.hierarchy.linkage``,
    ``mst_single_linkage`` and ``label``), so that tied edges come in SciPy's order.

    Args and returns as :func:`agglomerative_tree`.
    """
    B, T, _ = dist.shape
    dev = dist.device
    inf = float("inf")
    b_all = torch.arange(B, device=dev)
    reach = dist.new_full((B, T), inf)  # distance of each leaf to the tree
    merged = torch.zeros(B, T, dtype=torch.bool, device=dev)
    x = torch.zeros(B, dtype=torch.long, device=dev)
    edges = torch.empty(B, max(T - 1, 0), 2, dtype=torch.long, device=dev)
    length = dist.new_empty(B, max(T - 1, 0))
    for s in range(T - 1):
        merged[b_all, x] = True
        reach = torch.minimum(reach, dist[b_all, x])  # [B, T]
        y = reach.masked_fill(merged, inf).argmin(dim=-1)  # first of the closest
        edges[:, s, 0], edges[:, s, 1] = x, y
        length[:, s] = reach[b_all, y]
        x = y
    order = length.sort(dim=-1, stable=True).indices  # [B, T - 1]
    edges = edges.gather(1, order[..., None].expand(-1, -1, 2))
    node = torch.arange(T, device=dev).expand(B, T).clone()  # each leaf's cluster node
    children = torch.empty_like(edges)
    leaf_node = node.clone()
    for s in range(T - 1):
        if s == cut:
            leaf_node = node.clone()
        nx, ny = node[b_all, edges[:, s, 0]], node[b_all, edges[:, s, 1]]
        children[:, s, 0], children[:, s, 1] = torch.minimum(nx, ny), torch.maximum(nx, ny)
        joined = (node == nx[:, None]) | (node == ny[:, None])
        node = torch.where(joined, T + s, node)
    if cut >= T - 1:
        leaf_node = node
    return children, leaf_node


def heap_labels(children: torch.Tensor, leaf_node: torch.Tensor, k: int) -> torch.Tensor:
    """scikit-learn's cluster labels: the position of each leaf's cluster in ``_hc_cut``'s heap.

    ``_hc_cut`` starts from the root, and ``k - 1`` times pushes the two children of the largest
    node in the heap (negated ids, ``heappush`` then ``heappushpop``); the labels are the final
    heap positions. The same operations are replayed here on ``[B, k]`` tensors; every image
    takes the same number of steps and only the sifting paths differ.

    Args:
        children: ``[B, T - 1, 2]`` from :func:`agglomerative_tree`.
        leaf_node: ``[B, T]`` each leaf's node after ``T - k`` joins.
        k: clusters.

    Returns:
        ``[B, T]`` int64 labels in ``0 .. k - 1``.
    """
    B, T = leaf_node.shape
    dev = leaf_node.device
    heap = torch.zeros(B, k, dtype=torch.long, device=dev)  # negated node ids
    heap[:, 0] = -(2 * T - 2)
    b_all = torch.arange(B, device=dev)
    for n in range(1, k):  # heap size before the push
        top = -heap[:, 0]
        kids = children[b_all, top - T]  # [B, 2]
        # heappush(heap, -kids[0]): the path from position n to the root is the same for all.
        levels = (n + 1).bit_length()  # positions on the path: n, its parent, ..., the root
        path_t = ((n + 1) >> torch.arange(levels, device=dev)) - 1  # no host-to-device copy
        vals = heap[:, path_t]  # [B, L + 1]; vals[:, 0] is the free slot
        item = -kids[:, 0]
        above = vals[:, 1:] > item[:, None]  # parents the item passes (a prefix of the path)
        cnt = above.sum(dim=1, keepdim=True)  # [B, 1]
        idx = torch.arange(levels, device=dev)
        shifted = torch.cat([vals[:, 1:], vals[:, -1:]], dim=1)
        heap[:, path_t] = torch.where(
            idx < cnt, shifted, torch.where(idx == cnt, item[:, None], vals)
        )
        # heappushpop(heap, -kids[1]): the root (the largest node) is always the one replaced.
        size = n + 1
        item = -kids[:, 1]
        pos = torch.zeros(B, dtype=torch.long, device=dev)
        child = 2 * pos + 1
        for _ in range(size.bit_length()):  # Python's _siftup: the smaller child moves up
            valid = child < size
            right = child + 1
            hc = heap.gather(1, child.clamp(max=size - 1)[:, None])[:, 0]
            hr = heap.gather(1, right.clamp(max=size - 1)[:, None])[:, 0]
            take_right = (right < size) & ~(hc < hr)
            chosen = torch.where(take_right, right, child)
            moved = torch.where(take_right, hr, hc)
            cur = heap.gather(1, pos[:, None])[:, 0]
            heap[b_all, pos] = torch.where(valid, moved, cur)
            pos = torch.where(valid, chosen, pos)
            child = torch.where(valid, 2 * pos + 1, torch.full_like(pos, size))
        # then _siftdown(heap, 0, pos) with the item
        depth = max(size - 1, 1).bit_length()
        anc = [pos]
        for _ in range(depth):
            anc.append(((anc[-1] + 1) >> 1) - 1)
        anc_t = torch.stack(anc, dim=1)  # [B, depth + 1], -1 past the root
        live = anc_t >= 0
        anc_c = anc_t.clamp(min=0)
        vals = heap.gather(1, anc_c)
        above = (vals[:, 1:] > item[:, None]) & live[:, 1:]
        cnt = above.int().cumprod(dim=1).sum(dim=1, keepdim=True)
        idx = torch.arange(depth + 1, device=dev)
        shifted = torch.cat([vals[:, 1:], vals[:, -1:]], dim=1)
        new = torch.where(idx < cnt, shifted, torch.where(idx == cnt, item[:, None], vals))
        write = live & (idx <= cnt)
        heap.scatter_(
            1, torch.where(write, anc_c, anc_c[:, :1]), torch.where(write, new, new[:, :1])
        )
    label_of = torch.zeros(B, 2 * T - 1, dtype=torch.long, device=dev)
    label_of.scatter_(1, -heap, torch.arange(k, device=dev).expand(B, k))
    return label_of.gather(1, leaf_node)


@torch.library.custom_op("ppt_bench::atc_labels", mutates_args=())
def cluster_labels(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """scikit-learn's ``AgglomerativeClustering(k, metric="precomputed", linkage=linkage)``
    labels of ``1 - cos`` of ``metric [B, T, d]``, for every image at once: ``[B, T]`` int64.

    A custom operator, so that ``torch.compile`` takes the ``T - 1`` joins as one opaque step
    (its output shape depends only on the input's) instead of unrolling them.
    """
    T = metric.shape[1]
    dist = cosine_distance(metric)
    with _one_cpu_thread(not dist.is_cuda):
        if linkage == "single":
            children, leaf_node = single_linkage_tree(dist, T - k)
        else:
            children, leaf_node = agglomerative_tree(dist, linkage, T - k)
        return heap_labels(children, leaf_node, k)


@contextmanager
def _one_cpu_thread(on: bool) -> Iterator[None]:
    """The joins and the heap are ~T steps of ``[B, T]`` operations, too small to split over
    threads: on the CPU they run on one (several threads only wait on each other, badly so on
    a shared machine)."""
    threads = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on:
            torch.set_num_threads(threads)


@cluster_labels.register_fake
def _(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    return metric.new_empty(metric.shape[:2], dtype=torch.long)


def atc_step(
    tokens: Reduced, key_mean: torch.Tensor, k: int, num_prefix: int, linkage: str
) -> Reduced:
    """Cluster the patch tokens of ``x [B, N, C]`` into ``k`` tokens.

    Args:
        tokens: ``x [B, N, C]`` (prefix first), ``size [B, N, 1]``, ``source [B, N, N0]`` or None.
        key_mean: ``[B, N, d]`` keys averaged over heads.
        k: clusters, fewer than ``N - P``.
        num_prefix: ``P``; prefix tokens keep slots ``0 .. P - 1``.
        linkage: ``"complete"``, ``"average"`` or ``"single"``.

    Returns:
        Prefix tokens, then cluster ``0 .. k - 1`` (scikit-learn's labels), each the size-weighted
        mean of its members with their total size. A cluster's ``origin`` is its member standing
        for the most patches, the first in token order among equals.
    """
    x, size, source = tokens[:3]
    B, N, _ = x.shape
    P = num_prefix
    labels = cluster_labels(key_mean[:, P:], k, linkage)  # [B, T]
    prefix = torch.arange(P, device=x.device).expand(B, P)
    slots = torch.cat([prefix, P + labels], dim=1)  # [B, N]
    # origin: the largest member, first in token order; sizes are whole patch counts here
    T = N - P
    rank = (size[:, P:, 0].round().long() << 20) + (T - 1 - torch.arange(T, device=x.device))
    best = rank.new_full((B, k), -1).scatter_reduce(1, labels, rank, "amax")  # [B, k]
    origin = torch.cat([prefix, P + T - 1 - (best & ((1 << 20) - 1))], dim=1)  # [B, P + k]
    return ops.pool_step(x, size, source, slots, P + k, origin)


@dataclass(frozen=True)
class ATC(KeepAtLocations):
    """Agglomerative token clustering at fixed blocks.

    Args:
        keep_rate: the ``k``-th location keeps ``int(T_0 * keep_rate**k)`` clusters of the
            model's ``T_0`` patch tokens, in (0, 1]; 1 is no change.
        locations: reduction blocks (default 3, 6, 9, as the authors' DeiT models).
        linkage: ``"complete"`` (default), ``"average"`` or ``"single"``.
        prop_attn: proportional attention (``+ log(size)``) after the first reduction.
    """

    description = "ATC: agglomerative clustering of the tokens into int(T0 * keep_rate^k)"
    needs = frozenset({KEY_MEAN})
    demo_grid = ("keep_rate", (0.9, 0.8, 0.7))
    keep_rate: float = 0.9
    linkage: str = "complete"
    prop_attn: bool = True

    def validate(self) -> None:
        super().validate()
        if self.linkage not in LINKAGES:
            raise MethodError(f"linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return self.locations if self.keep_rate < 1.0 else ()

    def budget_knob(self, info: ViTInfo) -> Knob:
        """``keep_rate`` from one cluster left at the last location to keeping every token."""
        lowest = ((1 + 1e-9) / info.patch_tokens) ** (1 / len(self.locations))
        return Knob("keep_rate", "float", min(lowest, 1.0), 1.0, more_at_high=False)

    def bind(self, info: ViTInfo) -> Method:
        bound = copy.copy(self)
        object.__setattr__(bound, "_patch_tokens", info.patch_tokens)
        return bound

    def check_fits(self, info: ViTInfo) -> None:
        super().check_fits(info)
        last = num_clusters(info.patch_tokens, self.keep_rate, len(self.locations))
        if self.keep_rate < 1.0 and last < 1:
            raise MethodError(
                f"keep_rate={self.keep_rate} leaves no cluster of the {info.patch_tokens} patch "
                f"tokens of {info.name} by location {len(self.locations)}: use a larger keep_rate"
            )

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        T0 = getattr(self, "_patch_tokens", None)
        if T0 is None:
            raise MethodError("atc needs the model's patch tokens: patch with .apply(model)")
        k = num_clusters(T0, self.keep_rate, self.locations.index(block) + 1)
        if k >= x.shape[1] - num_prefix:  # the authors' min(K, T): nothing to join
            return Reduced(x, size, source)
        return atc_step(Reduced(x, size, source), feats.key_mean, k, num_prefix, self.linkage)
