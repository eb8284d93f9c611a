"""DiffRate: pruning and merging with searched per-block token counts (ICCV 2023).

In every block, after the attention residual (OpenGVLab/DiffRate @ 91ae3e37,
``DiffRate/patch/deit.py``, ``DiffRate/merge.py``, inference path):

1. Patch tokens are ranked by the class token's attention averaged over heads.
2. Pruning keeps the ``prune_kept`` most important tokens (prefix tokens included).
3. Merging compares the least important remaining tokens, past the first ``merge_kept``, with
   the kept ones by the cosine of ``x``; each merges into its most similar kept token (never a
   prefix token) by a plain mean of the destination and its sources, and the destination's
   size grows by ``cos * size`` of each source (not clamped, as in the authors' inference).

Output: the kept tokens in importance order. Proportional attention (``+ log(size)``) applies in
every block; sizes are 1 up to the first merge, so it starts there. A count above the tokens
left changes nothing, so the counts in effect are running minima.

The searched schedules of the authors' ``compression_rate.json`` ship with the package
(``data/diffrate_schedules.json``, which names its source) and are chosen by name: ``"2.9"``,
or ``"ViT-S-DeiT/2.9"`` where a number names schedules of two models.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

from ppt_bench.core.errors import MethodError
from ppt_bench.methods import ops
from ppt_bench.methods.base import Method, check_int, set_field
from ppt_bench.methods.contract import CLS_ATTN, Examples, Knob, Reduced, ViTInfo
from ppt_bench.methods.parts import step

if TYPE_CHECKING:
    pass

DEFAULT_SCHEDULE = "ViT-S-DeiT/2.9"
KEEP_ALL = 1 << 62  # a count no sequence reaches: the step removes nothing


@cache
def schedules() -> dict[str, dict[str, dict[str, list[int]]]]:
    """The authors' searched schedules: ``{model: {name: {"prune_kept": [...], ...}}}``."""
    text = resources.files("ppt_bench.methods").joinpath("data/diffrate_schedules.json")
    return json.loads(text.read_text(encoding="utf-8"))["schedules"]


def model_schedules(model: str) -> tuple[str, ...]:
    """The searched schedules (``"ViT-S-DeiT/2.9"``) of a timm model, by the model names of
    the authors' ``main.py`` (``vit_deit_small_patch16_224`` is timm's
    ``deit_small_patch16_224``); none for any other model."""
    text = resources.files("ppt_bench.methods").joinpath("data/diffrate_schedules.json")
    names = json.loads(text.read_text(encoding="utf-8"))["models"]
    base = model.split(".")[0]
    return tuple(
        f"{key}/{name}"
        for key, theirs in names.items()
        if base in (theirs, theirs.removeprefix("vit_"))
        for name in schedules().get(key, {})
    )


def schedule_names() -> str:
    """The valid names, one group per model, for error messages."""
    return "; ".join(f"{m}: {', '.join(s)}" for m, s in schedules().items())


def resolve_schedule(name: Any) -> str:
    """A schedule name as ``"model/name"``: a bare ``"2.9"`` names the one schedule called so.

    Raises:
        MethodError: not a string, unknown, or a bare name shared by two models.
    """
    if not isinstance(name, str):
        raise MethodError(f"schedule must be a name like '2.9', got {name!r}")
    model, _, key = name.rpartition("/")
    found = [m for m, s in schedules().items() if key in s and model in ("", m)]
    if not found:
        raise MethodError(f"unknown DiffRate schedule {name!r}; valid: {schedule_names()}")
    if len(found) > 1:
        options = " or ".join(f"'{m}/{key}'" for m in found)
        raise MethodError(
            f"schedule {name!r} names schedules of {len(found)} models: use {options}"
        )
    return f"{found[0]}/{key}"


def check_counts(name: str, value: Any) -> tuple[int, ...] | None:
    """A list of kept-token counts, one per block, as a tuple of ints >= 1, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise MethodError(f"{name} must be a list of token counts, one per block, got {value!r}")
    counts = tuple(value)
    if not counts:
        raise MethodError(f"{name} must list one token count per block, got an empty list")
    for count in counts:
        check_int(f"each count of {name}", count, minimum=1)
    return counts


@step("merge")
def diffrate_step(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    importance: torch.Tensor,
    num_pruned: int,
    num_merged: int,
    num_prefix: int,
) -> Reduced:
    """Keep ``num_pruned`` tokens by importance, then merge all past ``num_merged`` away.

    Args:
        x: tokens ``[B, N, C]``, prefix first; size ``[B, N, 1]``; source ``[B, N, N0]`` or None.
        importance: ``[B, N - P]`` class attention of the patch tokens, averaged over heads.
        num_pruned: tokens left after pruning, prefix included (``P < num_pruned <= N``).
        num_merged: tokens left after merging (``P < num_merged <= num_pruned``).
        num_prefix: ``P``.

    Returns:
        ``num_merged`` tokens: prefix, then patch tokens by decreasing importance; each merged
        token's ``origin`` is its destination, the kept token the others merged into.
    """
    P = num_prefix
    keep = ops.keep_top(importance, num_pruned - P, P)  # [B, num_pruned], importance order
    # New tensors: the destinations gain their sources in place below.
    x, size = ops.gather_tokens(x, keep), ops.gather_tokens(size, keep)
    source = None if source is None else ops.gather_tokens(source, keep)
    if num_merged == num_pruned:
        return Reduced(x, size, source, origin=keep)
    (B, _, C), K = x.shape, num_merged
    M = num_pruned - K  # tokens merged away
    metric = x / x.norm(dim=-1, keepdim=True)
    sim = torch.bmm(metric[:, K:], metric[:, :K].transpose(1, 2))  # [B, M, K]
    sim[..., :P].fill_(float("-inf"))  # prefix tokens never absorb a token
    # The values and first indices of max.
    cos, dst = sim.amax(dim=-1).view(B, M, 1), sim.argmax(dim=-1).view(B, M, 1)
    # Each destination, then its sources in their order: a plain mean of them.
    total = x[:, :K].scatter_add_(1, dst.expand(-1, -1, C), x[:, K:])
    count = x.new_ones(B, K, 1).scatter_add_(1, dst, x.new_ones(B, M, 1))
    # DiffRate's size rule: a source adds cos * size, so a dissimilar one counts for less.
    grown = size[:, :K].scatter_add_(1, dst, size[:, K:] * cos.to(size.dtype))
    if source is not None:
        source = source[:, :K].scatter_add_(1, dst.expand(-1, -1, source.shape[-1]), source[:, K:])
    # The first K kept tokens are the destinations: each keeps its own position.
    return Reduced(total / count, grown, source, origin=keep[:, :K])


@dataclass(frozen=True)
class DiffRate(Method):
    """DiffRate with a searched or explicit schedule of kept tokens per block.

    Args:
        schedule: a searched schedule of the authors (``"2.9"``, ``"ViT-B-MAE/8.7"``; see
            ``data/diffrate_schedules.json``). With neither this nor a list, DeiT-S's ``2.9``.
        prune_kept: tokens kept after pruning in each block, prefix tokens included; without
            it (and with ``merge_kept``) nothing is pruned.
        merge_kept: tokens kept after merging in each block, prefix tokens included; without it
            (and with ``prune_kept``) nothing is merged.
    """

    description = "DiffRate (ICCV 2023): per-block pruning and merging by searched token counts"
    prop_attn = True  # from its first merge on, as the authors' blocks
    family = "hybrid"
    examples = Examples(
        identity={"prune_kept": [1 << 20] * 12},
        reducing={"merge_kept": [36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14]},
        invalid={
            "schedule": ("2.8", "8.7", 2.9),
            "prune_kept": ("197",),
            "merge_kept": ([197, 0],),
        },
    )
    needs = frozenset({CLS_ATTN})
    gives_origin = True
    # The digits model has 65 tokens: DeiT-S's 3.1, 2.9 and 2.3 merge counts scaled to it.
    demo_grid = (
        "merge_kept",
        (
            (65, 65, 61, 54, 50, 47, 44, 40, 34, 26, 23, 2),
            (65, 64, 58, 52, 47, 44, 40, 36, 29, 22, 19, 2),
            (65, 59, 52, 42, 36, 33, 27, 22, 18, 13, 11, 2),
        ),
    )
    schedule: str | None = None
    prune_kept: tuple[int, ...] | None = None
    merge_kept: tuple[int, ...] | None = None

    def validate(self) -> None:
        prune = check_counts("prune_kept", self.prune_kept)
        merge = check_counts("merge_kept", self.merge_kept)
        explicit = prune is not None or merge is not None
        if explicit and self.schedule is not None:
            raise MethodError("give either schedule or prune_kept/merge_kept lists, not both")
        if prune is not None and merge is not None and len(prune) != len(merge):
            raise MethodError(
                f"prune_kept lists {len(prune)} blocks and merge_kept {len(merge)}: "
                "give one count per block in each"
            )
        set_field(self, "prune_kept", prune)
        set_field(self, "merge_kept", merge)
        if not explicit:
            set_field(self, "schedule", resolve_schedule(self.schedule or DEFAULT_SCHEDULE))
            model, _, key = self.schedule.rpartition("/")
            entry = schedules()[model][key]
            prune, merge = tuple(entry["prune_kept"]), tuple(entry["merge_kept"])
        # A missing list removes nothing: no pruning before merging, or no merging after it.
        prune = prune or (KEEP_ALL,) * len(merge)
        object.__setattr__(self, "_counts", (prune, merge or prune))

    def counts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Tokens kept after pruning and after merging in each block (prefix included;
        :data:`KEEP_ALL` where a list is missing)."""
        return self._counts

    def check_fits(self, info: ViTInfo) -> None:
        """Raise :class:`MethodError` unless the schedule fits the model ``info`` describes.

        ``info`` has ``depth``, ``prefix_tokens`` and ``patch_tokens``: a schedule has one
        count per block; a searched one is for the model's token count; every count keeps the
        prefix tokens and at least one patch token.
        """
        super().check_fits(info)
        prune, merge = self.counts()
        what = f"schedule {self.schedule!r}" if self.schedule else "prune_kept/merge_kept"
        tokens = info.prefix_tokens + info.patch_tokens
        if len(prune) != info.depth:
            raise MethodError(
                f"diffrate {what} has {len(prune)} blocks and the model {info.depth}: give "
                f"prune_kept and merge_kept with {info.depth} counts"
            )
        if self.schedule and prune[0] != tokens:
            raise MethodError(
                f"diffrate {what} was searched for {prune[0]} tokens and the model has {tokens}: "
                "give prune_kept and merge_kept for this model"
            )
        if min(prune + merge) <= info.prefix_tokens:  # a merge needs a patch destination
            raise MethodError(
                f"diffrate {what}: every count must exceed the model's {info.prefix_tokens} "
                f"prefix tokens, got {min(prune + merge)}"
            )

    def check_budget(self, info: ViTInfo, given: Collection[str] = ()) -> None:
        """Given lists that the blocks would clamp are refused: a block keeps at most the tokens
        it receives, and merges at most the tokens its pruning kept, so a count above either
        (an increasing ``prune_kept``, a ``merge_kept`` above its ``prune_kept``) names a
        reduction that never happens."""
        if not {"prune_kept", "merge_kept"} & set(given):
            return
        prune, merge = self.counts()
        tokens = info.prefix_tokens + info.patch_tokens
        for block, (p, m) in enumerate(zip(prune, merge, strict=True)):
            if p != KEEP_ALL and p > tokens:
                raise MethodError(
                    f"diffrate prune_kept[{block}]={p} is more than the {tokens} tokens block "
                    f"{block} receives: counts must not increase"
                )
            if m > min(p, tokens):
                raise MethodError(
                    f"diffrate merge_kept[{block}]={m} is more than the {min(p, tokens)} tokens "
                    f"block {block} keeps after pruning: give merge_kept <= prune_kept"
                )
            tokens = m

    def budget_knob(self, info: ViTInfo) -> Knob | str:
        """The searched ``schedule``: the model's own (DeiT-T, -S, -B, MAE ViTs); on a 12-block
        model of 65 tokens (the demo's) the ``merge_kept`` lists of :attr:`demo_grid`; else a
        reason."""
        found = model_schedules(info.name)
        if not found and (info.depth, info.prefix_tokens + info.patch_tokens) == (12, 65):
            # The demo's digits model: DeiT-S's 3.1, 2.9 and 2.3 merge counts scaled to it.
            return Knob("merge_kept", "choice", choices=self.demo_grid[1])
        if not found:
            return (
                f"diffrate has searched schedules for DeiT and MAE ViTs only, none for "
                f"{info.name}: give prune_kept and merge_kept instead of a budget"
            )
        return Knob("schedule", "choice", choices=found)

    def locations_for(self, depth: int) -> tuple[int, ...]:
        """Block 0 (its count may be below the model's tokens) and every block whose count
        falls below all earlier ones."""
        prune, merge = self.counts()
        kept = [min(p, m) for p, m in zip(prune, merge, strict=True)][:depth]
        return tuple(i for i, k in enumerate(kept) if i == 0 or k < min(kept[:i]))

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        prune, merge = self.counts()
        N = x.shape[1]
        num_pruned = min(N, prune[block])
        num_merged = min(num_pruned, merge[block])
        if num_merged == N:
            return Reduced(x, size, source)
        importance = ops.cls_attention_mean(feats.cls_attn, num_prefix)  # [B, N - P]
        return diffrate_step(x, size, source, importance, num_pruned, num_merged, num_prefix)
