"""Accuracy against labels and against the unreduced model, with token statistics on the way.

One pass over the data keeps, image by image (:class:`~ppt_bench.measure.outcomes.Outcomes`), the
top-1 prediction, whether the label is in the top 5 (as timm's ``accuracy``), the loss, and the
label-free agreement and KL divergence against the unreduced model's outputs on the same images
(a :class:`~ppt_bench.measure.outcomes.Reference`, computed once per sweep); and the tokens left
after each block, ppt's pooled fraction at each location, and how many images took each
pruning/pooling path (for the MACs mean). The figures and their 95% intervals follow from the
per-image outcomes (:mod:`ppt_bench.core.stats`). The pass checks the cancellation flag
(:mod:`ppt_bench.core.cancel`) between batches, and fails on outputs that are not finite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ppt_bench.core import cancel, stats
from ppt_bench.core.dtypes import amp_autocast
from ppt_bench.core.errors import UserError
from ppt_bench.data.loader import device_transform
from ppt_bench.measure.outcomes import Outcomes, Reference
from ppt_bench.methods import is_patched


def unreduced_tokens(model: nn.Module) -> tuple[int, ...] | None:
    """Tokens after each block of an unpatched timm ViT (all equal), or None for other models."""
    embed, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if embed is None or blocks is None or not hasattr(embed, "num_patches"):
        return None
    return (embed.num_patches + getattr(model, "num_prefix_tokens", 0),) * len(blocks)


@dataclass
class TokenStats:
    """Token counts and the methods' per-image choices accumulated over batches.

    Attributes:
        n_images: images seen.
        tokens_sum: per block, tokens after that block summed over images.
        locations: the reduction blocks (a method's choices are reported per location).
        chosen_sum: per boolean figure a method reports (``ReductionInfo.stats``, such as ppt's
            ``pooled``), per location, the images for which it was true.
        paths: how many images took each path of an adaptive method (``Method.paths``).
    """

    n_images: int = 0
    tokens_sum: list[float] = field(default_factory=list)
    locations: tuple[int, ...] = ()
    chosen_sum: dict[str, list[float]] = field(default_factory=dict)
    paths: Counter[Hashable] = field(default_factory=Counter)

    def update(self, model: nn.Module, batch_size: int) -> None:
        """Add the ``reduction_info`` of the model's last forward on ``batch_size`` images."""
        info = model.reduction_info if is_patched(model) else None
        tokens = info.tokens if info is not None else unreduced_tokens(model)
        if tokens is None:
            return
        if not self.tokens_sum:
            self.tokens_sum = [0.0] * len(tokens)
        self.tokens_sum = [s + t * batch_size for s, t in zip(self.tokens_sum, tokens, strict=True)]
        self.n_images += batch_size
        if info is None:
            return
        self.paths.update(model.reduction_plan.method.paths(info))
        for name, values in info.stats.items():
            if values.dtype != torch.bool:
                continue
            self.locations = info.locations
            counts = values.sum(0).tolist()  # [n_loc], images for which it was true
            total = self.chosen_sum.setdefault(name, [0.0] * len(counts))
            self.chosen_sum[name] = [s + c for s, c in zip(total, counts, strict=True)]

    def metrics(self) -> dict[str, float]:
        """``tokens_block_<i>`` (mean tokens after block i) and, for each boolean figure a
        method reports, ``<name>_frac_block_<i>``: the fraction of images for which it was true
        at reduction block i (ppt's ``pooled_frac_block_<i>``)."""
        if not self.n_images:
            return {}
        out = {f"tokens_block_{i}": s / self.n_images for i, s in enumerate(self.tokens_sum)}
        for name, sums in self.chosen_sum.items():
            for loc, s in zip(self.locations, sums, strict=True):
                out[f"{name}_frac_block_{loc}"] = s / self.n_images
        return out


@dataclass
class AccuracyResult:
    """What one pass over the data measured; percentages in %, loss and KL in nats.

    Attributes:
        outcomes: the run image by image; its :meth:`~Outcomes.estimates` give the figures
            with their 95% intervals.
        log_probs: ``[N, K]`` the model's own log-probabilities, kept when asked for (the
            unreduced model's pass, which is the reference of every other run).
        reference: the unreduced model's outputs, when the pass computed them (it was given
            the unreduced model rather than its stored outputs).
    """

    outcomes: Outcomes
    unreadable_images: int
    tokens: TokenStats
    log_probs: torch.Tensor | None = None
    reference: Reference | None = None

    @property
    def n_images(self) -> int:
        return self.outcomes.n_images

    def figure(self, name: str) -> float:
        """One figure without its interval: ``top1``, ``top5``, ``loss``, ``agreement_top1`` or
        ``kl``."""
        return self.outcomes.estimates()[name].value

    def metrics(
        self, labeled: bool = True, reduced: bool = True
    ) -> dict[str, stats.Estimate | float]:
        """The accuracy metrics with their intervals; without real labels only the label-free
        ones. With labels, a reduced model's run also gets its paired comparison with the
        unreduced model on the same images: ``delta_top1`` (pp, with its interval) and
        ``p_value`` (exact McNemar)."""
        out: dict[str, stats.Estimate | float] = dict(self.outcomes.estimates(labeled))
        if not reduced:  # its own reference: agreement 100 % and KL 0 by definition
            out.update(agreement_top1=100.0, kl=0.0)
        if labeled:
            out["unreadable_images"] = self.unreadable_images
        if labeled and reduced:
            versus = self.outcomes.against_reference()
            out["delta_top1"], out["p_value"] = versus.delta, versus.p_value
        return out


def kl_per_image(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(ref || p)`` of each image ``[B]`` from log-probabilities ``[B, K]``."""
    return F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="none").sum(-1)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`UserError` when the data has more classes than the model predicts."""
    if int(labels.max()) >= num_classes:
        raise UserError(
            f"the data has labels up to {int(labels.max())} but the model predicts "
            f"{num_classes} classes: pass data with the model's classes (ImageNet val for "
            "ImageNet models, 'digits' for vit_digits)"
        )


def check_finite_outputs(logits: torch.Tensor, whose: str, dtype: str) -> None:
    """Raise :class:`UserError` when the outputs ``logits [B, K]`` of a batch hold a NaN or an
    infinity: every figure of the run would be meaningless (a NaN loss, the top-1 of whichever
    class a NaN picks).

    One host synchronisation per batch, in the data pass only (which copies each batch's
    outcomes to the host anyway), never in a timed loop.
    """
    finite = torch.isfinite(logits).all(-1)  # [B]
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    hint = " or use --dtype fp32" if dtype != "fp32" else ""
    raise UserError(
        f"{whose} gave non-finite outputs (NaN or inf) for {bad} of the {len(finite)} images of "
        f"a batch, so its accuracy means nothing: check its weights{hint}"
    )


def _batches(
    loader: DataLoader, device: str | torch.device, desc: str, progress: bool
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
    """``(images on device, labels on device, unreadable)`` of each batch (None when a batch
    held no readable image).

    Raises:
        Cancelled: a cancellation was requested (checked as each batch arrives).
    """
    normalize = device_transform(loader, reuse_output=True)  # each batch is done with below
    for images, labels, skipped in tqdm(
        loader, desc=desc, leave=False, disable=not progress, unit="batch"
    ):
        cancel.check()
        if images is None:
            yield None, None, skipped
            continue
        images = images.to(device, non_blocking=True)
        if normalize is not None:
            images = normalize(images)
        yield images, labels.to(device, non_blocking=True), skipped


def evaluate_accuracy(
    model: nn.Module,
    loader: DataLoader,
    reference: nn.Module | Reference | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    desc: str = "accuracy",
    progress: bool = True,
    keep_log_probs: bool = False,
) -> AccuracyResult:
    """Run ``model`` over ``loader`` and measure accuracy, image by image, and token stats.

    Args:
        model: the (reduced) model, in eval mode on ``device``.
        loader: yields ``(images [B, 3, H, W], labels [B], unreadable)`` (see
            :func:`ppt_bench.data.loader.make_loader`; training validates with the same batches);
            cached uint8 images are normalised on ``device``
            (:func:`ppt_bench.data.loader.device_transform`).
        reference: the unreduced model's outputs on the same images (:class:`Reference`,
            computed once per sweep), or the unreduced model itself (run on each batch beside
            ``model``; its outputs are returned as ``result.reference``); None means ``model``
            is itself unreduced (agreement 100 %, KL 0).
        device: where the batches go.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (autocast).
        desc: progress bar label.
        progress: show the progress bar.
        keep_log_probs: keep the model's log-probabilities (``[N, K]`` on the CPU).
    """
    columns: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(Outcomes)}
    own: list[torch.Tensor] = []
    computed: list[torch.Tensor] = []  # the unreduced model's, when it runs here
    stats_, unreadable, seen = TokenStats(), 0, 0
    with torch.inference_mode():
        for images, labels, skipped in _batches(loader, device, desc, progress):
            unreadable += skipped
            if images is None:
                continue
            with amp_autocast(device, dtype):
                logits = model(images).float()
                if isinstance(reference, nn.Module):
                    computed.append(reference(images).float().log_softmax(-1))
            check_finite_outputs(logits, "the model", dtype)
            if isinstance(reference, nn.Module):
                check_finite_outputs(computed[-1], "the unreduced model", dtype)
            check_labels(labels, logits.shape[-1])
            n = images.shape[0]
            stats_.update(model, n)
            log_probs = logits.log_softmax(-1)
            if reference is None:
                ref = log_probs
            elif isinstance(reference, nn.Module):
                ref = computed[-1]
                computed[-1] = ref.cpu()
            elif reference.log_probs.shape[0] < seen + n or (
                reference.log_probs.shape[1] != logits.shape[-1]
            ):
                raise reference.mismatch()
            else:
                ref = reference.log_probs[seen : seen + n].to(log_probs.device)
            seen += n
            k = min(5, logits.shape[-1])
            batch = {
                "label": labels,
                "pred": logits.argmax(-1),
                "top5": (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1),
                "loss": F.cross_entropy(logits, labels, reduction="none"),
                "ref_pred": ref.argmax(-1),
                "kl": kl_per_image(log_probs, ref),
            }
            for name, values in batch.items():
                columns[name].append(values.cpu())
            if keep_log_probs:
                own.append(log_probs.cpu())
    outcomes = Outcomes(
        **{
            name: torch.cat(parts).numpy() if parts else np.empty(0)
            for name, parts in columns.items()
        }
    )
    labels = torch.from_numpy(outcomes.label)
    if isinstance(reference, Reference) and not reference.covers(labels):
        raise reference.mismatch()
    return AccuracyResult(
        outcomes=outcomes,
        unreadable_images=unreadable,
        tokens=stats_,
        log_probs=torch.cat(own) if own else None,
        reference=Reference(torch.cat(computed), labels) if computed else None,
    )
