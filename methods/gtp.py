"""GTP-ViT: graph-based token propagation (WACV 2024; Ackesnal/GTP-ViT @ 97a11781,
``models_v3.py``, as the official code runs it at inference).

A graph over the patch tokens is built once per forward, from the tokens after the position
embedding (:meth:`GTP.initial_state`), and carried along with the tokens:

- spatial: 1 between the 8 grid neighbours of a patch (not itself);
- semantic: row ``i`` marks its ``K`` most cosine-similar tokens, itself excluded (the
  threshold is the ``(K+1)``-th largest cosine of the row, ties at it kept; directed);
- mixed: their union.

It is normalised once, ``Â_ij = A_ij / sqrt(d_i d_j)`` with ``d`` the row sums, by elementwise
scaling (:func:`normalise`): the official code materialises ``D^-1/2 A D^-1/2`` as two ``[T, T]``
matrix products, which give the same values (every other term of their sums is an exact 0) at
``2 T^3`` multiply-accumulates per image that this module does not spend.

Every block, after the attention residual (:func:`gtp_step`): the block's explicit attention,
with ``log s_j`` of the token scales added to its logits when ``token_scale`` (the patch's
proportional attention, the scales riding in ``size``) and, when ``sparsity < 1``, every entry
below the ``k``-th smallest of its image and head set to 0 (:func:`sparsify`, ``k = int(N^2 (1 -
sparsity))``, rows not renormalised; the sparse map is the one applied to the values), scores
each patch token ``max_h A[h, i, i] * max_h sum_q A[h, q, i]``; the ``num_prop`` lowest leave,
each kept token gaining ``alpha`` times its graph-weighted share of them,
``x_kept += alpha Â[kept, prop] @ x_prop`` (and the same for the scales); the graph keeps the rows
and columns of the kept tokens, unrenormalised. Output: the prefix tokens, then the kept tokens
in descending score, ordered as the official code orders them, by ``torch.argsort`` (not a
stable sort). Ties occur with sparse attention: a token whose self-attention is zeroed in every
head scores 0. How often they fall across the cut depends on the model's head count: on nearly
every image of DeiT-Ti (3 heads), on some of DeiT-S (6). Which of the tied tokens leave is then
the sort kernel's choice, the official code's on the same device (another device's kernel may
choose otherwise); a stable sort, keeping token order, moves the logits of a random-weight
DeiT-Ti by some 1e-2.

Unlike the official code, every prefix token (distillation, registers) is carried as the class
token is, models with rotary embeddings are reduced as well (kept tokens keep their positions),
the spatial graph takes each input's patch grid (theirs, the square grid of the model's image
size), and no file ``missing`` is written. Their semantic threshold is the ``(N - 1 - K)``-th
smallest cosine, ``N`` counting one class token: on a model without one it marks ``K + 1``
neighbours, where ``num_neighbours=K`` marks ``K`` on every model (``K + 1`` gives theirs).

With source tracking, a kept token's source row gains ``alpha Â`` times those of the tokens it
receives, so that ``visualize`` tints each propagated patch with the token that received most of
it (real weights, as for DCT; a token that received a share is tinted even where it received no
patch most); a patch no kept token received is blank.

Costs: both counters count every multiply-accumulate that runs (the semantic graph's cosines,
the explicit attention, the propagation products); the thresholds (``topk``, ``kthvalue``) and
the sort are comparisons, not MACs. The official figures are ``2 T^3 - 2 T^2`` higher: their
normalisation products in place of the elementwise scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import Method, check_float, check_int, check_locations_fit
from ppt_bench.methods.contract import ATTN, Examples, Knob, Reduced, ViTInfo
from ppt_bench.methods.parts import step

GRAPHS = ("mixed", "spatial", "semantic")


@step("graph")
def spatial_graph(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The 8-neighbourhood of a ``rows x cols`` patch grid in raster order, bool ``[T, T]``."""
    idx = torch.arange(rows * cols, device=device)
    r, c = idx // cols, idx % cols
    near = ((r[:, None] - r[None]).abs() <= 1) & ((c[:, None] - c[None]).abs() <= 1)
    return near & ~torch.eye(rows * cols, dtype=torch.bool, device=device)


@step("graph")
def semantic_graph(tokens: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """Each token's ``K`` most similar tokens by cosine, itself excluded, bool ``[B, T, T]``.

    Args:
        tokens: patch tokens ``[B, T, C]``.
        num_neighbours: ``K < T``.

    Returns:
        Row ``i`` marks the tokens whose cosine with ``i`` reaches the ``(K+1)``-th largest of the
        row (ties at it kept, as the official code keeps them), then not ``i`` itself.
    """
    m = tokens / tokens.norm(dim=-1, keepdim=True)
    cos = m @ m.transpose(-1, -2)  # [B, T, T]
    threshold = cos.topk(num_neighbours + 1, dim=-1).values[..., -1:]  # [B, T, 1]
    eye = torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device)
    return (cos >= threshold) & ~eye


@step("graph")
def normalise(adj: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` by elementwise scaling: ``[B, T, T]`` (bool) -> ``[B, T, T]`` (dtype).

    ``d`` are the row sums; ``(A_ij d_i^-1/2) d_j^-1/2`` is what the two matrix products of the
    official code compute, bit for bit, without them.
    """
    a = adj.to(dtype)
    r = a.sum(dim=-1) ** -0.5  # [B, T]
    return a * r[..., :, None] * r[..., None, :]


@step("score")
def sparsify(attn: torch.Tensor, keep: float) -> torch.Tensor:
    """Zero every entry of each image's and head's map below its ``k``-th smallest value.

    Args:
        attn: post-softmax attention ``[B, H, N, N]``.
        keep: the share of entries kept, ``sparsity``; ``k = int(N^2 (1 - keep))`` (0: unchanged).

    Returns:
        ``[B, H, N, N]``; entries equal to the threshold are kept, rows are not renormalised.
    """
    B, H, N, _ = attn.shape
    k = int(N * N * (1 - keep))
    if k == 0:
        return attn
    threshold = attn.reshape(B, H, N * N).kthvalue(k, dim=-1, keepdim=True).values
    return attn.masked_fill(attn < threshold[..., None], 0.0)


@step("score")
def gtp_scores(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``max_h A[h, i, i] * max_h sum_q A[h, q, i]`` of each patch token: ``[B, H, N, N] ->
    [B, N - P]`` (the column sums run over every query, prefix rows included)."""
    P = num_prefix
    diag = attn.diagonal(dim1=-2, dim2=-1)[..., P:].amax(dim=1)  # [B, N - P]
    received = attn[..., P:].sum(dim=-2).amax(dim=1)  # [B, N - P]
    return diag * received


@step("merge")
def gtp_step(
    tokens: Reduced,
    graph: torch.Tensor,
    scores: torch.Tensor,
    num_prop: int,
    alpha: float,
    num_prefix: int,
    *,
    scale_sizes: bool,
) -> Reduced:
    """Propagate the ``num_prop`` lowest-scoring patch tokens into their graph neighbours.

    Args:
        tokens: ``x [B, N, C]`` (prefix first), ``size [B, N, 1]`` (the token scales),
            ``source [B, N, N0]`` or None.
        graph: the normalised graph of the patch tokens ``[B, T, T]``, ``T = N - P``.
        scores: ``[B, T]`` (:func:`gtp_scores`); the highest are kept.
        num_prop: tokens propagated, ``< T``.
        alpha: weight of the propagated features.
        num_prefix: ``P``.
        scale_sizes: propagate the sizes as the features (token scales); otherwise the kept
            tokens keep theirs.

    Returns:
        Prefix tokens, then the kept tokens in descending score, with ``state`` the graph of the
        kept tokens ``[B, T - num_prop, T - num_prop]`` and ``origin`` the kept tokens.
    """
    x, size, source = tokens[:3]
    P, (B, N, _) = num_prefix, x.shape
    T = N - P
    K = T - num_prop
    # The official argsort (the default, unstable sort), descending.
    order = scores.sort(dim=-1, descending=True).indices  # [B, T]: kept, then propagated
    kept, prop = order[:, :K], order[:, K:]
    rows = graph.gather(1, kept.view(B, K, 1).expand(-1, -1, T))  # [B, K, T]
    cols = rows.gather(2, order.view(B, 1, T).expand(-1, K, -1))  # [B, K, T]: kept, then prop
    graph, w_prop = cols[..., :K], cols[..., K:]  # [B, K, K], [B, K, num_prop]
    keep = kept + P
    if P:
        keep = torch.cat([torch.arange(P, device=x.device).expand(B, P), keep], dim=1)
    prop = prop + P

    def spread(t: torch.Tensor) -> torch.Tensor:  # [B, N, *] -> [B, P + K, *]
        w = w_prop if w_prop.dtype == t.dtype else w_prop.to(t.dtype)
        received = torch.bmm(w, ops.gather_tokens(t, prop))  # what w @ t[prop] runs
        out = ops.gather_tokens(t, keep)  # a new tensor: the kept patches gain in place
        out[:, P:] += alpha * received
        return out

    return Reduced(
        spread(x),
        spread(size) if scale_sizes else ops.gather_tokens(size, keep),
        None if source is None else spread(source),
        origin=keep,
        state=graph,
    )


@dataclass(frozen=True)
class GTP(Method):
    """GTP-ViT in every block (see the module docstring).

    Args:
        num_prop: patch tokens propagated away in every block; 0 is no change.
        graph: ``"mixed"`` (spatial or semantic), ``"spatial"`` or ``"semantic"``.
        num_neighbours: ``K`` of the semantic graph.
        sparsity: share of each head's attention entries kept, in (0, 1]; 1 is off.
        alpha: weight of the propagated features, >= 0.
        token_scale: carry token scales and add ``log s_j`` to the attention logits.

    The official settings: DeiT-S (the older README) ``num_prop=4, graph="spatial", alpha=0.1,
    token_scale=False``; DeiT-B (mixed graph, token scales) ``(num_prop: sparsity, alpha) = 4:
    1.0, 0.4; 8: 0.6, 0.1; 14: 0.8, 0.3``.
    """

    description = "GTP-ViT (WACV 2024): propagate the least attended tokens to graph neighbours"
    family = "hybrid"
    examples = Examples(
        reducing={"num_prop": 2, "sparsity": 0.8},
        invalid={
            "graph": ("knn",),
            "num_neighbours": (0,),
            "sparsity": (1.5,),
            "alpha": (math.inf,),
        },
    )
    needs = frozenset({ATTN})
    demo_grid = ("num_prop", (2, 3, 4))
    gives_origin = True
    num_prop: int = 4
    graph: str = "mixed"
    num_neighbours: int = 8
    sparsity: float = 1.0
    alpha: float = 0.4
    token_scale: bool = True

    def validate(self) -> None:
        check_int("num_prop", self.num_prop)
        check_int("num_neighbours", self.num_neighbours, minimum=1)
        check_float("alpha", self.alpha, allow_inf=False)
        if self.graph not in GRAPHS:
            raise MethodError(f"graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        number = isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
        if not number or not 0.0 < self.sparsity <= 1.0:
            raise MethodError(
                f"sparsity must be a number in (0, 1] (1 keeps every attention entry), got "
                f"{self.sparsity!r}"
            )

    @property
    def prop_attn(self) -> bool:
        return self.token_scale

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return tuple(range(depth)) if self.num_prop > 0 else ()

    def budget_knob(self, info: ViTInfo) -> Knob:
        """``num_prop`` from 0 to the most that leaves a patch token after every block."""
        return Knob("num_prop", "int", 0, (info.patch_tokens - 1) // info.depth)

    def check_fits(self, info: ViTInfo) -> None:
        check_locations_fit(self.locations_for(info.depth), info.depth)
        left = info.patch_tokens - self.num_prop * info.depth
        if self.num_prop and left < 1:
            most = (info.patch_tokens - 1) // info.depth
            raise MethodError(
                f"num_prop={self.num_prop} in each of {info.depth} blocks removes all "
                f"{info.patch_tokens} patch tokens of {info.name}: use num_prop <= {most}"
            )
        if self.num_prop and self.graph != "spatial" and self.num_neighbours >= info.patch_tokens:
            raise MethodError(
                f"num_neighbours={self.num_neighbours} needs more than the {info.patch_tokens} "
                f"patch tokens of {info.name}: use num_neighbours < {info.patch_tokens}"
            )

    def initial_state(self, x, *, num_prefix, grid) -> torch.Tensor:
        """The normalised graph ``[B, T, T]`` (x's dtype) of the patch tokens of ``x``."""
        patches = x[:, num_prefix:]  # [B, T, C]
        B, T, _ = patches.shape
        if self.graph == "semantic":
            adj = semantic_graph(patches, self.num_neighbours)
        else:
            adj = spatial_graph(*grid, x.device).expand(B, T, T)
            if self.graph == "mixed":
                adj = adj | semantic_graph(patches, self.num_neighbours)
        return normalise(adj, x.dtype)

    def edit_attention(self, attn: torch.Tensor, *, block: int) -> torch.Tensor:
        return sparsify(attn, self.sparsity)

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        scores = gtp_scores(feats.attn, num_prefix)
        tokens = Reduced(x, size, source)
        return gtp_step(
            tokens,
            feats.state,
            scores,
            self.num_prop,
            self.alpha,
            num_prefix,
            scale_sizes=self.token_scale,
        )
