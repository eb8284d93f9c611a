"""The one interface every token reduction method implements, and the bases methods share.

A method is a frozen dataclass of its parameters, validated on construction. At each of its
locations the generic patch (:mod:`ppt_bench.methods.patch`) hands it the tokens with only the
attention features it asks for, and takes back fewer tokens; what they exchange is in
:mod:`ppt_bench.methods.contract`. Everything else the harness needs to know about a method is
declared on its class here: its family and plot style, the settings the shared contract tests
run (:mod:`ppt_bench.testing`), its budget knob, what it needs of a model, and its one-line
description and parameter help (``ppt-bench list`` and the methods page come from them).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ppt_bench.core.errors import MethodError, PatchError
from ppt_bench.methods import ops
from ppt_bench.methods.contract import (
    AFTER_ATTN,
    CLS_ATTN,
    FAMILIES,
    KEY_MEAN,
    Examples,
    Features,
    Knob,
    PlotStyle,
    Reduced,
    ReductionInfo,
    ViTInfo,
)
from ppt_bench.methods.patch import patch

if TYPE_CHECKING:
    from torch import nn

# PPT's reduction blocks for a 12-block ViT, shared by the methods that reduce at fixed blocks.
DEFAULT_LOCATIONS = (3, 6, 9)


def r_knob(info: ViTInfo) -> Knob:
    """``r`` from 0 to the most one step can remove (:func:`check_r_budget`)."""
    return Knob("r", "int", 0, info.patch_tokens // 2)


@dataclass(frozen=True)
class Method:
    """Base class: subclasses are frozen dataclasses, listed in the registry's built-in table or
    registered with ``@register_method`` / the ``ppt_bench.methods`` entry-point group.

    Class attributes:
        name: registry name, set by the registry when the class is first loaded.
        description: one line for ``ppt-bench list`` and the methods page: what it does, and
            where it is published (``"PPT (arXiv 2310.01812): ..."``).
        family: one of :data:`~ppt_bench.methods.contract.FAMILIES`, what it does with the
            tokens it removes (``"pruning"``, ``"merging"``, ``"hybrid"``); its plot marker's
            shape follows it.
        style: its colour and marker in every plot (:class:`PlotStyle`); what it leaves unset
            comes from its place among the registered methods.
        examples: the settings the shared contract tests run (:class:`Examples`).
        needs: the :data:`~ppt_bench.methods.contract.FEATURES` this method reads at a location:
            ``"cls_attn"`` needs a model with a class token, ``"attn"`` computes the attention
            map explicitly in its blocks.
        prop_attn: whether blocks after the first reduction use proportional attention (a
            method with the switch as a parameter declares it as a field).
        batch_independent: whether an image's output is the same whatever else is in its
            batch (a control seeded by batch position is not).
        demo_grid: the main parameter and the values ``ppt-bench demo`` sweeps on its 12-block,
            65-token digits model; None runs the method once with its defaults.
        reduce_at: where in a block it reduces, one of :data:`REDUCE_POINTS`:
            ``"after_attn"`` (``reduce`` gets the tokens after the attention residual),
            ``"in_attn"`` (``reduce`` gets the block input and ``feats.attn``, the attention
            map of the block's tokens, and returns the reduced tokens with the attention map
            over them in ``Reduced.attn``; the block applies it to the reduced tokens' values,
            then runs its MLP) or ``"after_mlp"`` (``reduce`` gets the block output).
        gives_origin: ``reduce`` sets ``Reduced.origin`` (the input token each output token
            descends from) whenever it changes the tokens and ``feats.needs_origin`` is true,
            and returns them unchanged when it leaves it None. On a model with rotary
            embeddings the positions then follow ``origin``; a method without it reduces a
            one-hot map through its ``source`` path instead, which costs an ``[B, N, N]`` map
            per reduction (see :func:`ppt_bench.methods.patch.follow_positions`).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    family: ClassVar[str] = "other"
    style: ClassVar[PlotStyle] = PlotStyle()
    examples: ClassVar[Examples] = Examples()
    needs: ClassVar[frozenset[str]] = frozenset()
    # Not a ClassVar: a method with the switch as a parameter declares it as a field, which keeps
    # its place among that method's own fields.
    prop_attn = False
    batch_independent: ClassVar[bool] = True
    demo_grid: ClassVar[tuple[str, tuple[Any, ...]] | None] = None
    reduce_at: ClassVar[str] = AFTER_ATTN
    gives_origin: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a switch given as text ("false") is a mistake
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise MethodError(f"{f.name} must be true or false, got {value!r}")
        self.validate()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.family not in FAMILIES:
            raise MethodError(
                f"{cls.__name__}.family must be one of {FAMILIES}, got {cls.family!r}"
            )

    def validate(self) -> None:
        """Raise :class:`MethodError` for a parameter outside its valid range."""

    @classmethod
    def needs_class_token(cls) -> bool:
        """Whether the method ranks tokens by the class token's attention."""
        return CLS_ATTN in cls.needs

    @classmethod
    def parameter_help(cls) -> dict[str, str]:
        """Each parameter's one-paragraph help from the class docstring's ``Args:`` section
        (the first class up the hierarchy that documents it), for ``ppt-bench list`` and the
        methods page."""
        found: dict[str, str] = {}
        for klass in cls.__mro__:
            for name, text in _docstring_args(inspect.getdoc(klass) or "").items():
                found.setdefault(name, text)
        return {f.name: found.get(f.name, "") for f in dataclasses.fields(cls)}

    def locations_for(self, depth: int) -> tuple[int, ...]:
        """Blocks (0-indexed) where this method reduces tokens in a model of ``depth`` blocks."""
        return ()

    def check_fits(self, info: ViTInfo) -> None:
        """Raise :class:`MethodError` with one line if this method cannot reduce ``info``'s model.

        Used both by a sweep's early validation (on a model described without weights) and by
        the patch. The base rules: a method that reads the class token's attention needs a class
        token, and every location must name one of the model's blocks. Subclasses with rules of
        their own extend this.
        """
        if CLS_ATTN in self.needs and not info.class_token:
            raise PatchError(
                f"{self.name} ranks tokens by the class token's attention, and {info.name} has "
                "no class token; use a method that needs none (merge, tome, random)"
            )
        check_locations_fit(self.locations_for(info.depth), info.depth)

    def bind(self, info: ViTInfo) -> Method:
        """This method resolved for one model, which the patch runs (default: itself).

        For a method whose rule at a block depends on the model (a schedule given for any
        depth, margins that depend on where a block sits), ``reduce`` sees the resolved copy.
        """
        return self

    def check_budget(self, info: ViTInfo, given: Collection[str] = ()) -> None:
        """Raise :class:`MethodError` for a parameter the user gave (``given``) that the patch
        would quietly clamp at every location, such as an ``r`` larger than any reduction step
        can remove.

        A sweep refuses such settings before it runs, since its rows would name a reduction that
        never happened; a default (PPT's r=50 on a small model) and a method applied directly
        clamp as ToMe does.
        """

    def budget_knob(self, info: ViTInfo) -> Knob | str | None:
        """The parameter a budget resolves on ``info``'s model.

        Returns:
            A :class:`Knob`; a one-line reason where this method has a knob but none that
            applies to this model (such a run is recorded as skipped); or None (the default)
            where the method has no knob at all, which a sweep at budgets refuses.
        """
        return None

    @property
    def adaptive(self) -> bool:
        """Whether the path through the model depends on the image (then MACs are counted per
        path, see :meth:`paths` and :meth:`on_path`)."""
        return False

    def paths(self, info: ReductionInfo) -> list[Hashable]:
        """The path each image of the last forward took, one hashable key per image."""
        return []

    def on_path(self, path: Hashable) -> Method:
        """This method forced onto one path, so that the cost of that path can be counted."""
        return self

    def reduce(
        self,
        x: torch.Tensor,
        size: torch.Tensor,
        feats: Features,
        *,
        block: int,
        num_prefix: int,
        source: torch.Tensor | None = None,
    ) -> Reduced:
        """Reduce tokens ``x [B, N, C]`` (prefix first) at ``block``; see :class:`Reduced`."""
        return Reduced(x, size, source)

    def initial_state(self, x: torch.Tensor, *, num_prefix: int, grid: tuple[int, int]) -> Any:
        """State that this method carries through one forward along with the tokens, or None.

        Called once per forward, on the tokens entering the first block, when the method reduces
        somewhere. The state reaches each reduction as ``feats.state`` and the method returns
        the next one as ``Reduced.state`` (GTP-ViT carries its token graph this way).

        Args:
            x: tokens ``[B, N, C]`` after the position embedding (prefix first).
            num_prefix: ``P``.
            grid: ``(rows, cols)`` of the patch grid, ``rows * cols = N - P``.
        """
        return None

    def edit_attention(self, attn: torch.Tensor, *, block: int) -> torch.Tensor:
        """The attention map ``[B, H, N, N]`` that a reduction block applies to its values.

        Called in the reduction blocks of a method that reads ``attn``, on the post-softmax map;
        the edited map is also the one the method reads. Default: unchanged (GTP-ViT zeroes
        the smallest entries).
        """
        return attn

    def uncounted_macs(self, tokens: tuple[int, ...], num_prefix: int, dim: int) -> int:
        """Multiply-accumulates of one image that torchprofile and fvcore do not count.

        Args:
            tokens: tokens entering each block, then the tokens after the last block
                (``L + 1`` counts, prefix included).
            num_prefix: ``P``.
            dim: channels ``C``.

        Returns:
            0 unless the method runs operators the counters skip (an FFT, say); then their
            cost by formula, which :func:`ppt_bench.measure.macs.measure_macs` adds to its figures.
        """
        return 0

    def params(self) -> dict[str, Any]:
        """The parameters as plain values (tuples become lists), for records and reports."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def apply(
        self,
        model: nn.Module,
        *,
        trace_source: bool = False,
        attn_impl: str = "fast",
        replace: bool = False,
    ) -> nn.Module:
        """Patch a timm ``VisionTransformer`` in place and return it (same weights).

        Args:
            model: the model; its class is swapped for a reducing subclass.
            trace_source: also record which original patches each token stands for.
            attn_impl: ``"fast"`` (fused SDPA, class-token row only where needed, the
                proportional-attention bias as a mask), ``"fold"`` (the same with the bias in an
                extra query/key channel instead of a mask) or ``"explicit"`` (full softmax
                attention in every block, the reference).
            replace: reduce with this method a model that already reduces with another; without
                it, such a model is refused (:class:`PatchError`) rather than silently changed.
        """
        return patch(model, self, trace_source=trace_source, attn_impl=attn_impl, replace=replace)


@dataclass(frozen=True)
class FixedBudget(Method):
    """Shared parameters of methods that remove ``r`` tokens at fixed blocks.

    Args:
        r: tokens removed per reduction block (at most ``(N - P) // 2`` at each).
        locations: 0-indexed blocks where tokens are removed, after attention, before the MLP.
    """

    demo_grid = ("r", (8, 12, 16))
    r: int = 50
    locations: tuple[int, ...] = field(default=DEFAULT_LOCATIONS)

    def validate(self) -> None:
        check_int("r", self.r)
        set_field(self, "locations", check_locations(self.locations))

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return self.locations

    def check_budget(self, info: ViTInfo, given: Collection[str] = ()) -> None:
        if "r" in given:
            check_r_budget(self.r, info)

    def budget_knob(self, info: ViTInfo) -> Knob:
        return r_knob(info)


@dataclass(frozen=True)
class ScorePrune(FixedBudget):
    """Prune by a score: keep the patch tokens with the highest :meth:`scores` at each location.

    ``prune``, ``topk`` and ``random`` differ only in their score.
    """

    gives_origin = True

    def scores(
        self, x: torch.Tensor, feats: Features, *, block: int, num_prefix: int
    ) -> torch.Tensor:
        """Scores ``[B, N - P]`` of the patch tokens of ``x [B, N, C]``; the highest are kept."""
        raise NotImplementedError

    def reduce(self, x, size, feats, *, block, num_prefix, source=None) -> Reduced:
        r = ops.max_reduction(x.shape[1], num_prefix, self.r)
        scores = self.scores(x, feats, block=block, num_prefix=num_prefix)
        return ops.prune_step(x, size, source, scores, r, num_prefix)


@dataclass(frozen=True)
class KeepAtLocations(Method):
    """Shared by the methods that keep a share of the patch tokens at fixed blocks (evit, atc).

    Args:
        keep_rate: the share kept at each location, in (0, 1]; 1 is no change.
        locations: 0-indexed blocks where tokens are removed, after attention, before the MLP.
    """

    gives_origin = True
    keep_rate: float = 0.7
    locations: tuple[int, ...] = field(default=DEFAULT_LOCATIONS)

    def validate(self) -> None:
        keep_rate = check_float("keep_rate", self.keep_rate, allow_inf=False)
        if not 0.0 < keep_rate <= 1.0:
            raise MethodError(f"keep_rate must be in (0, 1], got {self.keep_rate!r}")
        set_field(self, "keep_rate", keep_rate)
        set_field(self, "locations", check_locations(self.locations))

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return self.locations

    def budget_knob(self, info: ViTInfo) -> Knob:
        """``keep_rate`` from keeping one patch token to keeping all."""
        return Knob("keep_rate", "float", 1.0 / info.patch_tokens, 1.0, more_at_high=False)


@dataclass(frozen=True)
class BipartiteMerging(Method):
    """Shared by the methods that merge tokens by ToMe's bipartite soft matching on the keys
    (:func:`~ppt_bench.methods.ops.merge_step`; merge and tome): they read the head-averaged
    keys, say where each output token comes from, and use proportional attention by default.

    Args:
        prop_attn: proportional attention (``+ log(size)``) after the first merge.
    """

    needs = frozenset({KEY_MEAN})
    gives_origin = True
    prop_attn: bool = True

    def merge(self, x, size, source, feats: Features, r: int, num_prefix: int) -> Reduced:
        """``r`` tokens merged away by bipartite soft matching."""
        return ops.merge_step(
            x, size, source, feats.key_mean, r, num_prefix, origin=feats.needs_origin
        )


@dataclass(frozen=True)
class KeepRatio(Method):
    """Methods that reduce every block to a keep ``ratio`` of its tokens, by a rule that
    depends on where the block sits among the model's ``depth`` blocks (PiToMe, ToFu).

    Args:
        ratio: keep ratio of each block, in (0, 1]; 1 is no change.
    """

    demo_grid = ("ratio", (0.95, 0.925, 0.9))
    ratio: float = 0.925

    def validate(self) -> None:
        set_field(self, "ratio", check_ratio(self.ratio))

    def locations_for(self, depth: int) -> tuple[int, ...]:
        return tuple(range(depth)) if self.ratio < 1.0 else ()

    def budget_knob(self, info: ViTInfo) -> Knob:
        """``ratio`` from 0.5 (a block removes at most half its tokens) to 1."""
        return Knob("ratio", "float", 0.5, 1.0, more_at_high=False)

    def bind(self, info: ViTInfo) -> Method:
        bound = copy.copy(self)
        object.__setattr__(bound, "_depth", info.depth)
        return bound

    @property
    def depth(self) -> int:
        """The depth of the model this method was bound to by the patch."""
        depth = getattr(self, "_depth", None)
        if depth is None:
            raise MethodError(f"{self.name} needs the model depth: patch with .apply(model)")
        return depth


# -- parameter checks shared by the methods ---------------------------------------------------


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_locations(value: Any, default: Iterable[int] | None = None) -> tuple[int, ...]:
    """Block indices as a sorted tuple of distinct non-negative ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        locs = tuple(value)
    except TypeError:
        raise MethodError(
            f"locations must be a list of block indices like [3, 6, 9], got {value!r}"
        ) from None
    for loc in locs:
        check_int("each of the locations", loc)
    if len(set(locs)) != len(locs):
        raise MethodError(f"locations must be distinct, got {list(locs)}")
    return tuple(sorted(locs))


def check_r_budget(r: int, info: ViTInfo) -> None:
    """A step removes at most half the patch tokens: refuse an ``r`` beyond the first step's."""
    most = info.patch_tokens // 2
    if r > most:
        raise MethodError(
            f"r={r} is more than one step can remove from the {info.patch_tokens} patch tokens "
            f"of {info.name}: use r <= {most}"
        )


def check_locations_fit(locations: tuple[int, ...], depth: int) -> None:
    """A location must name one of the model's blocks, 0 to depth - 1."""
    bad = [loc for loc in locations if loc >= depth]
    if bad:
        raise MethodError(
            f"locations {bad} are outside the model's blocks: valid locations are 0 to {depth - 1}"
        )


def check_ratio(value: Any) -> float:
    """A keep ratio in ``(0, 1]``, as a float."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0.0 < value <= 1.0:  # NaN fails the comparison too
        raise MethodError(f"ratio must be a number in (0, 1] (1 keeps every token), got {value!r}")
    return float(value)


def check_float(name: str, value: Any, minimum: float = 0.0, allow_inf: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{name} must be a number >= {minimum}, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < minimum or (math.isinf(value) and not allow_inf):
        bound = f">= {minimum}" + (" (inf allowed)" if allow_inf else " and finite")
        raise MethodError(f"{name} must be {bound}, got {value!r}")
    return value


def _docstring_args(doc: str) -> dict[str, str]:
    """``name -> help`` of a Google-style ``Args:`` section, each help on one line."""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
    if section is None:
        return {}
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=    \w+(?: \([^)]*\))?:)", section.group(1)):
        head = re.match(r"\s*(\w+)(?: \([^)]*\))?:\s*(.*)", entry, re.S)
        if head:
            found[head.group(1)] = " ".join(head.group(2).split())
    return found


def set_field(obj: Method, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in ``validate``."""
    object.__setattr__(obj, name, value)
