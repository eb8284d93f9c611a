"""ATC: Agglomerative Token Clustering (ECCV 2024; JoakimHaurum/ATC @ 227c94b5).

At the ``k``-th location, after the attention residual, the patch tokens are clustered into
``K_k = int(T_0 * keep_rate**k)`` clusters (``T_0`` the model's initial patch tokens) by
agglomerative clustering of the distances ``1 - cos`` between their keys averaged over heads
(``ATC_setup/models/atc.py``). Each cluster becomes one token, the size-weighted mean of its
members; sizes add up. Output: prefix, then the clusters in scikit-learn's label order.

The authors run scikit-learn's ``AgglomerativeClustering(metric="precomputed")`` per image on
the host. Two paths give its partition and labels, each one custom operator (so that
``torch.compile`` traces the model without a graph break):

- :func:`cluster_labels_loop` (``cluster_path="loop"``) does on the host, image by image, what
  scikit-learn does: SciPy's ``linkage`` on the condensed distances (nearest-neighbour chain for
  complete and average linkage, a minimum spanning tree for single linkage, in C), then
  scikit-learn's cut (:func:`cut_labels`). The same code, so the same labels, ties included;
  about a millisecond an image at 196 tokens, a dozen operators whatever the batch.
- :func:`cluster_labels` (``cluster_path="batched"``) builds them on the tokens' device for the
  whole batch at once, in ``~T`` steps of ``[B, T]`` tensor operations (tens of thousands of
  operators a forward, whatever the batch), with no copy to the host.

``cluster_path="auto"`` (:func:`choose_path`) takes the loop on the CPU and the batched path on
a GPU. On a shared 2-core CPU at DeiT-S size (196 tokens into 176) the loop was the faster at
every batch size measured, 1 to 512, with every linkage: 1.3 to 1.8 ms against 17 to 31 ms at
batch 1, 0.40 s against 0.96 s (complete) and 0.32 s against 0.43 s (single) at 512; so on the
CPU the rule does not depend on the batch. On a GPU the batched path stays on the device,
without the host synchronisation that the loop's copy needs and that a CUDA graph cannot
capture.

The batched path, :func:`cluster_labels`:

- The dendrogram. Every step joins the two closest clusters; the distance of the joined cluster
  to each other one follows the Lance-Williams rule of the linkage (complete: the larger of the
  two distances, single: the smaller, average: their mean weighted by the clusters' sizes), in
  float64 as SciPy computes it (complete and single linkage only compare and pick distances, so
  they run on the float32 cosines themselves, the same values). Each cluster's distance to its
  nearest is cached, so a step rescans only the clusters whose nearest was as near as one of
  the two it joined (the joined cluster's row always), and the gone clusters are dropped from
  the matrix as they add up. For these linkages the distances of successive joins never
  decrease, so the steps come in the order of SciPy's sorted linkage matrix, and nodes are
  numbered as SciPy numbers them (leaves ``0 .. T-1``, the ``s``-th join ``T + s``, children
  smaller id first).
- The cut and the labels. scikit-learn undoes the last ``K - 1`` joins with a heap of node ids
  (``sklearn.cluster._agglomerative._hc_cut``) and labels each cluster by its position in that
  heap; :func:`heap_labels` replays the same heap operations for the whole batch, each one
  sort of a path of the heap.

Costs: torchprofile and fvcore see the model's layers and the pooling; the clustering is one
custom operator that neither sees. Its multiply-accumulates are the cosine matrix,
``T^2 d`` per location (``d`` the head dim; 6.1 M on DeiT-S at keep 0.9, 0.15% of the model),
which the authors' figures count and these leave out; the joins themselves are comparisons.

Ties: among pairs at the same distance the batched path joins the one with the lowest cluster
index, then the lowest partner (a cluster's index is the lowest index among its leaves).
SciPy's nearest-neighbour chain may take tied pairs in another order, so with complete or
average linkage only untied distances (any real image; random metrics) are guaranteed the same
partition and labels from both paths; the loop's are scikit-learn's in every case, and with
single linkage both paths give them, ties included.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.core.settings import SCHEDULE
from ppt_bench.methods import ops
from ppt_bench.methods.base import (
    KeepAtLocations,
    Method,
)
from ppt_bench.methods.contract import KEY_MEAN, Examples, Knob, Reduced, ViTInfo
from ppt_bench.methods.parts import part, step

LINKAGES = ("complete", "average", "single")
LOOP, BATCHED = "loop", "batched"
CLUSTER_PATHS = ("auto", LOOP, BATCHED)


def num_clusters(patch_tokens: int, keep_rate: float, k: int) -> int:
    """Clusters at the ``k``-th location (1-based): ``int(T_0 * keep_rate**k)``, as the authors."""
    return int(patch_tokens * keep_rate**k)


def cosine_distance(metric: torch.Tensor, widen: bool = True) -> torch.Tensor:
    """``1 - cos`` between every pair of tokens: ``[B, T, d] -> [B, T, T]``, in float64.

    The cosine is computed in the metric's dtype (float32 for bf16/fp16 metrics) as the
    authors do, then widened, since SciPy builds the tree in float64. ``widen=False`` keeps
    the cosine's dtype: the same values, enough for complete and single linkage, which only
    compare and pick them.
    """
    m = metric if metric.dtype == torch.float64 else metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    dist = 1 - m @ m.transpose(-1, -2)
    return dist.double() if widen else dist


def agglomerative_tree(
    dist: torch.Tensor, linkage: str, cut: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full dendrogram of every image, and the node each leaf belongs to after ``cut`` joins.

    Args:
        dist: ``[B, T, T]`` symmetric distances (float64 for average linkage; the diagonal is
            ignored).
        linkage: ``"complete"`` or ``"average"`` (single linkage: :func:`single_linkage_tree`).
        cut: joins after which the leaves' nodes are recorded (``T - K`` for ``K`` clusters).

    Returns:
        ``children [B, T - 1, 2]`` (int64, SciPy's numbering: join ``s`` makes node ``T + s``
        from its two children, smaller id first) and ``leaf_node [B, T]`` (the node holding each
        leaf after ``cut`` joins).
    """
    B, T, _ = dist.shape
    dev = dist.device
    D = dist.clone(memory_format=torch.contiguous_format)  # a cluster lives at its lowest leaf
    D.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    rowmin = D.amin(dim=-1)  # [B, T] each cluster's distance to its nearest
    node = torch.arange(T, device=dev).expand(B, T).clone()  # node id of the cluster at each index
    count = D.new_ones(B, T)  # leaves per cluster (average linkage)
    where = node.clone()  # the index holding each leaf's cluster (until the cut)
    children = torch.empty(max(T - 1, 0), B, 2, dtype=torch.long, device=dev)
    leaf_node = node.clone()
    joined = torch.arange(T, 2 * T - 1, device=dev).expand(B, -1)  # node id of each join
    # rowmin of a cluster that is gone: above every distance, and unlike inf never equal to
    # a row's entry, so that it is never stale (a tensor: scatters from one are faster)
    gone_min = D.new_full((B, 1), torch.finfo(D.dtype).max)
    kept = torch.zeros(B, 1, dtype=torch.bool, device=dev)
    sparse = not dist.is_cuda  # rescan only the stale rows; on a GPU a full rescan is cheaper
    batch = torch.arange(B, device=dev)
    rows, first_row, gone_col = _rows(D)
    for s in range(T - 1):
        if s == cut:
            leaf_node = node.gather(1, where)
        left = T - s  # clusters left
        if left <= D.shape[1] * SHRINK and left >= SHRINK_ABOVE:
            D, keep, renumbered = _drop_gone(D, rowmin, left)
            rowmin, node, count = (
                rowmin.gather(1, keep),
                node.gather(1, keep),
                count.gather(1, keep),
            )
            if s < cut:
                where = renumbered.gather(1, where)
            rows, first_row, gone_col = _rows(D)
        # The closest pair: i the lowest index at the smallest distance, j its nearest (the
        # lowest index among equals), so i < j; the joined cluster lives at i.
        i = rowmin.argmin(dim=1, keepdim=True)  # [B, 1]
        ri = (first_row + i).view(-1)
        di = rows.index_select(0, ri)  # [B, W]
        j = di.argmin(dim=1, keepdim=True)
        dj = rows.index_select(0, (first_row + j).view(-1))
        ij = torch.cat([i, j], dim=1)  # [B, 2]
        torch.gather(node, 1, ij, out=children[s])  # put in order once, after the loop
        node.scatter_(1, i, joined[:, s : s + 1])
        if linkage == "complete":
            new = torch.maximum(di, dj)  # [B, W]
        else:
            cij = count.gather(1, ij)  # [B, 2]
            ci, cj = cij[:, :1], cij[:, 1:]
            new = (ci * di + cj * dj) / (ci + cj)
            count.scatter_(1, i, ci + cj)
        # Rows whose nearest was i or j (or as near as them) are rescanned, the others can only
        # have come nearer to i.
        stale = (rowmin == di) | (rowmin == dj)
        stale.scatter_(1, j, kept)  # j is gone
        # new is inf at i and j (each row's own diagonal) and at every cluster already gone.
        # Row i and column i take it, column j becomes inf; row j is never read again.
        rows.index_copy_(0, ri, new)
        D[batch, :, i[:, 0]] = new
        D[batch, :, j[:, 0]] = gone_col
        if s < cut:
            where = torch.where(where == j, i, where)
        rowmin = torch.minimum(rowmin, new)
        if sparse:
            at = stale.view(-1).nonzero().view(-1)
            rowmin.view(-1).index_copy_(0, at, rows.index_select(0, at).amin(dim=1))
        else:
            rowmin = torch.where(stale, D.amin(dim=-1), rowmin)
        rowmin.scatter_(1, j, gone_min)
    if cut >= T - 1:
        leaf_node = node.gather(1, where)
    return children.transpose(0, 1).sort(dim=-1).values, leaf_node


# The gone clusters are dropped from D once the clusters left are at most SHRINK of its width,
# and at least SHRINK_ABOVE (below, the joins cost about the same on any width).
SHRINK, SHRINK_ABOVE = 0.6, 16


def _rows(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``D [B, W, W]`` as ``[B * W, W]`` rows, each image's first row there ``[B, 1]``, and an
    inf column ``[B, W]``."""
    B, W, _ = D.shape
    first_row = torch.arange(B, device=D.device)[:, None] * W
    return D.view(B * W, W), first_row, D.new_full((B, W), float("inf"))


def _drop_gone(
    D: torch.Tensor, rowmin: torch.Tensor, left: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``left`` clusters that are not gone, in index order (so ties still go to the lowest).

    Returns:
        their distances ``[B, left, left]``, their old indices ``keep [B, left]`` and each old
        index's new one ``[B, W]`` (meaningless at the gone).
    """
    B, W, _ = D.shape
    live = rowmin < torch.finfo(D.dtype).max  # gone clusters hold the dtype's largest
    keep = live.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :left]
    first_row = torch.arange(B, device=D.device)[:, None] * W
    kept_rows = D.view(B * W, W).index_select(0, (first_row + keep).view(-1)).view(B, left, W)
    D = kept_rows.gather(2, keep[:, None].expand(B, left, left))
    return D, keep, live.cumsum(dim=1) - 1


def single_linkage_tree(dist: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single linkage as SciPy builds it: Prim's minimum spanning tree from leaf 0, its edges
    sorted by length (stable), then numbered as joins (``scipy.cluster.hierarchy.linkage``,
    ``mst_single_linkage`` and ``label``), so that tied edges come in SciPy's order.

    Args and returns as :func:`agglomerative_tree`.
    """
    B, T, _ = dist.shape
    dev = dist.device
    inf = float("inf")
    rows = dist.contiguous().view(B * T, T)
    first_row = torch.arange(B, device=dev)[:, None] * T  # [B, 1]: image b's rows in ``rows``
    reach = dist.new_full((B, T), inf)  # distance of each leaf to the tree
    merged = torch.zeros(B, T, dtype=torch.bool, device=dev)
    ends = torch.zeros(B, T, dtype=torch.long, device=dev)  # leaf 0, then each edge's new leaf
    length = dist.new_empty(B, max(T - 1, 0))
    for s in range(T - 1):
        x = ends[:, s : s + 1]
        merged.scatter_(1, x, True)
        reach = torch.minimum(reach, rows.index_select(0, (first_row + x).view(-1)))
        y = reach.masked_fill(merged, inf).argmin(dim=1, keepdim=True)  # first of the closest
        ends[:, s + 1 : s + 2] = y
        torch.gather(reach, 1, y, out=length[:, s : s + 1])
    edges = torch.stack([ends[:, :-1], ends[:, 1:]], dim=-1)  # [B, T - 1, 2]: x_s, y_s
    order = length.sort(dim=-1, stable=True).indices  # [B, T - 1]
    edges = edges.gather(1, order[..., None].expand(-1, -1, 2)).transpose(0, 1).contiguous()
    node = torch.arange(T, device=dev).expand(B, T).clone()  # each leaf's cluster node
    children = torch.empty_like(edges)  # [T - 1, B, 2]
    leaf_node = node.clone()
    for s in range(T - 1):
        if s == cut:
            leaf_node = node.clone()
        nxy = torch.gather(node, 1, edges[s], out=children[s])
        node.masked_fill_((node == nxy[:, :1]) | (node == nxy[:, 1:]), T + s)
    if cut >= T - 1:
        leaf_node = node
    return children.transpose(0, 1).sort(dim=-1).values, leaf_node


def heap_labels(children: torch.Tensor, leaf_node: torch.Tensor, k: int) -> torch.Tensor:
    """scikit-learn's cluster labels: the position of each leaf's cluster in ``_hc_cut``'s heap.

    ``_hc_cut`` starts from the root, and ``k - 1`` times takes the largest node in the heap
    (node ``2T - 1 - n`` at the ``n``-th time: every larger node was taken before, its parent
    among them) and puts its two children in: ``heappush`` the first, then ``heappushpop`` the
    second, which replaces the largest node at the root. The labels are the final heap
    positions. Both operations move values only along one path of the heap, whose values are
    in order, and leave the path's values plus the new one sorted along it: ``heappush`` the
    path from the new slot up to the root, ``heappushpop`` the path from the root down through
    the smaller child of each slot (``_siftup``). So each is one sort of a ``[B, log k]`` path,
    the second after finding the path one level at a time.

    Args:
        children: ``[B, T - 1, 2]`` from :func:`agglomerative_tree`.
        leaf_node: ``[B, T]`` each leaf's node after ``T - k`` joins.
        k: clusters.

    Returns:
        ``[B, T]`` int64 labels in ``0 .. k - 1``.
    """
    B, T = leaf_node.shape
    dev = leaf_node.device
    # Negated node ids (the heap of _hc_cut, all <= 0); 1 fills the slots past its end, so
    # that a path may run past a leaf and sort its 1s back in place. Slot q's children are
    # 2q + 1 and 2q + 2, below 2k + 1 for every path of a heap of at most k.
    heap = torch.ones(B, 2 * k + 1, dtype=torch.long, device=dev)
    heap[:, 0] = -(2 * T - 2)
    items = -children.flip(-1)  # [B, T - 1, 2]: the second child, then the first
    slots = torch.arange(k, device=dev)
    item_slots = torch.stack([torch.zeros_like(slots), slots], dim=1)  # [k, 2]: 0 and n
    up_paths = (slots[:, None] + 1 >> torch.arange(k.bit_length(), device=dev)) - 1  # [k, L]
    left_child = 2 * slots + 1
    root = heap.new_zeros(B, 1)
    for n in range(1, k):  # heap size before the push
        # The children of the largest node 2T - 1 - n, at the root: heappushpop's second
        # child replaces it there, heappush's first goes to the new slot n.
        heap.scatter_(1, item_slots[n].expand(B, 2), items[:, T - 1 - n])
        depth = (n + 1).bit_length() - 1
        if depth > 1:  # heappush: the path from slot n up to the root's child, sorted
            up = up_paths[n, :depth].expand(B, -1)
            heap.scatter_(1, up, heap.gather(1, up).sort(dim=1, descending=True).values)
        # heappushpop: the path from the root down through the smaller child of each slot
        # (the right one among equals, as _siftup), sorted
        child = left_child[: n + 1] + (heap[:, 2 : 2 * n + 3 : 2] <= heap[:, 1 : 2 * n + 2 : 2])
        path = [root]
        for _ in range(depth):
            path.append(child.gather(1, path[-1]))
        down = torch.cat(path, dim=1)
        heap.scatter_(1, down, heap.gather(1, down).sort(dim=1).values)
    label_of = torch.zeros(B, 2 * T - 1, dtype=torch.long, device=dev)
    label_of.scatter_(1, -heap[:, :k], torch.arange(k, device=dev).expand(B, k))
    return label_of.gather(1, leaf_node)


@torch.library.custom_op("ppt_bench::atc_labels", mutates_args=())
def cluster_labels(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """scikit-learn's ``AgglomerativeClustering(k, metric="precomputed", linkage=linkage)``
    labels of ``1 - cos`` of ``metric [B, T, d]``, for every image at once: ``[B, T]`` int64.

    A custom operator, so that ``torch.compile`` takes the ``T - 1`` joins as one opaque step
    (its output shape depends only on the input's) instead of unrolling them.
    """
    T = metric.shape[1]
    # Inference mode: the thousands of small operations below skip autograd's bookkeeping.
    with _one_cpu_thread(not metric.is_cuda), torch.inference_mode():
        dist = cosine_distance(metric, widen=linkage == "average")
        if linkage == "single":
            children, leaf_node = single_linkage_tree(dist, T - k)
        else:
            children, leaf_node = agglomerative_tree(dist, linkage, T - k)
        labels = heap_labels(children, leaf_node, k)
    return labels.clone()  # a normal tensor, which autograd may save (as an index) outside


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


def cut_labels(children: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's labels of ``k`` clusters of a tree (``sklearn.cluster._agglomerative.
    _hc_cut``), for :func:`cluster_labels_loop`.

    ``_hc_cut`` starts a heap of negated node ids from the root and ``k - 1`` times takes its
    largest node out, putting its children in (``heappush`` the first, ``heappushpop`` the
    second); a leaf's label is the final heap position of the node above it. The same heap
    operations here; then each label goes down the tree from its node, parents first.

    Args:
        children: ``[T - 1, 2]`` ints, the first two columns of SciPy's linkage (join ``s``
            makes node ``T + s``), which scikit-learn keeps as its ``children_``.
        k: clusters, 1 to ``T``.

    Returns:
        ``[T]`` int64 labels in ``0 .. k - 1``.
    """
    pairs = children.tolist()
    T = len(pairs) + 1
    heap = [-(max(pairs[-1]) + 1)] if pairs else [0]  # the root
    for _ in range(k - 1):
        first, second = pairs[-heap[0] - T]
        heapq.heappush(heap, -first)
        heapq.heappushpop(heap, -second)
    label = [-1] * (2 * T - 1)
    for i, node in enumerate(heap):
        label[-node] = i
    # The nodes above the heap's were taken out (-1); below, a node takes its parent's label.
    for node in range(2 * T - 2, T - 1, -1):
        if label[node] >= 0:
            first, second = pairs[node - T]
            label[first] = label[second] = label[node]
    return np.array(label[:T], dtype=np.int64)


def _scipy() -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    """SciPy's ``linkage`` and ``squareform``, imported on first use: ``scipy.cluster`` takes
    half a second, which listing the methods or clustering on the batched path should not wait
    for."""
    from scipy.cluster.hierarchy import linkage  # imported here (see above)
    from scipy.spatial.distance import squareform  # imported here (see above)

    return linkage, squareform


@torch.library.custom_op("ppt_bench::atc_labels_loop", mutates_args=())
def cluster_labels_loop(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """:func:`cluster_labels` computed as scikit-learn computes them, image by image on the
    host: SciPy's ``linkage`` of the condensed ``1 - cos`` (the pairs ``i < j`` in row order, as
    scikit-learn passes a precomputed matrix; SciPy builds the tree in float64), then
    :func:`cut_labels`.

    A custom operator, as :func:`cluster_labels`: ``torch.compile`` takes it as one opaque step.
    Returns ``[B, T]`` int64 on the metric's device.
    """
    with _one_cpu_thread(not metric.is_cuda), torch.inference_mode():
        # in the cosine's dtype, which SciPy widens to float64 itself
        dist = cosine_distance(metric, widen=False).cpu().numpy()
    linkage_of, squareform = _scipy()
    labels = np.empty(dist.shape[:2], dtype=np.int64)
    for b, square in enumerate(dist):
        condensed = squareform(square, checks=False)  # the pairs i < j, in row order
        labels[b] = cut_labels(linkage_of(condensed, method=linkage)[:, :2].astype(np.int64), k)
    return torch.from_numpy(labels).to(metric.device)


@cluster_labels_loop.register_fake
def _(metric: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    return metric.new_empty(metric.shape[:2], dtype=torch.long)


def choose_path(cluster_path: str, device: torch.device) -> str:
    """The clustering path of a batch on ``device``: ``cluster_path`` itself unless it is
    ``"auto"``, which takes the loop on the CPU (faster at every batch size measured) and the
    batched path on a GPU (no copy to the host); the figures are in the module's docstring."""
    if cluster_path != "auto":
        return cluster_path
    return LOOP if device.type == "cpu" else BATCHED


@step("merge")
def atc_step(
    tokens: Reduced,
    key_mean: torch.Tensor,
    k: int,
    num_prefix: int,
    linkage: str,
    path: str = BATCHED,
) -> Reduced:
    """Cluster the patch tokens of ``x [B, N, C]`` into ``k`` tokens.

    Args:
        tokens: ``x [B, N, C]`` (prefix first), ``size [B, N, 1]``, ``source [B, N, N0]`` or None.
        key_mean: ``[B, N, d]`` keys averaged over heads.
        k: clusters, fewer than ``N - P``.
        num_prefix: ``P``; prefix tokens keep slots ``0 .. P - 1``.
        linkage: ``"complete"``, ``"average"`` or ``"single"``.
        path: ``"loop"`` (:func:`cluster_labels_loop`) or ``"batched"`` (:func:`cluster_labels`).

    Returns:
        Prefix tokens, then cluster ``0 .. k - 1`` (scikit-learn's labels), each the size-weighted
        mean of its members with their total size. A cluster's ``origin`` is its member standing
        for the most patches, the first in token order among equals.
    """
    x, size, source = tokens[:3]
    B, N, _ = x.shape
    P = num_prefix
    labels_of = cluster_labels_loop if path == LOOP else cluster_labels
    with part("method.cluster"):
        labels = labels_of(key_mean[:, P:], k, linkage)  # [B, T]
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
        cluster_path: how the clusters are computed, not which: ``"loop"`` (image by image on
            the host, as scikit-learn), ``"batched"`` (the whole batch on the tokens' device) or
            ``"auto"`` (default: the loop on the CPU, batched on a GPU). The same clusters
            either way (tied distances aside: see the module), so it is left out of a run's
            id; each location reports the path taken as ``cluster_loop`` (the
            ``cluster_loop_frac_block_<i>`` rows of the tokens metric).
    """

    description = "ATC (ECCV 2024): agglomerative clustering of the tokens, keep_rate^k of them"
    family = "merging"
    examples = Examples(
        reducing={"keep_rate": 0.8},
        invalid={"keep_rate": (1.5,), "linkage": ("ward",), "cluster_path": ("gpu",)},
    )
    needs = frozenset({KEY_MEAN})
    demo_grid = ("keep_rate", (0.9, 0.8, 0.7))
    keep_rate: float = 0.9
    linkage: str = "complete"
    prop_attn: bool = True
    # How, not what: a setting of the schedule, left out of the run id like a spec's own.
    cluster_path: str = field(default="auto", metadata={"identity": SCHEDULE})

    def validate(self) -> None:
        super().validate()
        if self.linkage not in LINKAGES:
            raise MethodError(f"linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        if self.cluster_path not in CLUSTER_PATHS:
            raise MethodError(
                f"cluster_path must be one of {', '.join(CLUSTER_PATHS)}, got {self.cluster_path!r}"
            )

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
        path = choose_path(self.cluster_path, x.device)
        # at every location (the patch stacks them), so that a run's rows say which path it took
        taken = torch.ones if path == LOOP else torch.zeros  # torch.jit (MACs) has no bool fill
        stats = {"cluster_loop": taken(x.shape[:1], dtype=torch.bool, device=x.device)}
        if k >= x.shape[1] - num_prefix:  # the authors' min(K, T): nothing to join
            return Reduced(x, size, source, stats)
        red = atc_step(Reduced(x, size, source), feats.key_mean, k, num_prefix, self.linkage, path)
        return red._replace(stats=stats)
