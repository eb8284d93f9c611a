"""Accuracy against labels and against the unreduced model, with token statistics on the way.

One pass over the data gives top-1 / top-5 / loss (timm's ``accuracy`` and ``AverageMeter``, as
in timm's ``validate.py``), the label-free top-1 agreement and KL divergence against the
unreduced model on the same images, the tokens left after each block, ppt's pooled fraction at
each location, and how many images took each pruning/pooling path (for the MACs mean).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter, accuracy
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ppt_bench.data import device_transform
from ppt_bench.dtypes import amp_autocast
from ppt_bench.errors import UserError
from ppt_bench.methods import is_patched

ACCURACY_METRICS = ("top1", "top5", "loss", "agreement_top1", "kl")
LABEL_FREE_METRICS = ("agreement_top1", "kl")


def unreduced_tokens(model: nn.Module) -> tuple[int, ...] | None:
    """Tokens after each block of an unpatched timm ViT (all equal), or None for other models."""
    embed, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if embed is None or blocks is None or not hasattr(embed, "num_patches"):
        return None
    return (embed.num_patches + getattr(model, "num_prefix_tokens", 0),) * len(blocks)


@dataclass
class TokenStats:
    """Token counts and ppt branch choices accumulated over batches.

    Attributes:
        n_images: images seen.
        tokens_sum: per block, tokens after that block summed over images.
        locations: the reduction blocks (ppt's pooled decisions are per location).
        pooled_sum: per location, images that took the pooling branch.
        paths: how many images took each path of an adaptive method (``Method.paths``).
    """

    n_images: int = 0
    tokens_sum: list[float] = field(default_factory=list)
    locations: tuple[int, ...] = ()
    pooled_sum: list[float] = field(default_factory=list)
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
        if info.pooled is None:
            return
        pooled = info.pooled.cpu()  # [B, n_loc] bool
        self.locations = info.locations
        if not self.pooled_sum:
            self.pooled_sum = [0.0] * pooled.shape[1]
        self.pooled_sum = [
            s + p for s, p in zip(self.pooled_sum, pooled.sum(0).tolist(), strict=True)
        ]

    def metrics(self) -> dict[str, float]:
        """``tokens_block_<i>`` (mean tokens after block i) and ``pooled_frac_block_<i>`` (the
        fraction of images pooled at reduction block i)."""
        if not self.n_images:
            return {}
        out = {f"tokens_block_{i}": s / self.n_images for i, s in enumerate(self.tokens_sum)}
        for loc, s in zip(self.locations, self.pooled_sum, strict=True):
            out[f"pooled_frac_block_{loc}"] = s / self.n_images
        return out


@dataclass
class AccuracyResult:
    """What one pass over the data measured; percentages in %, loss and KL in nats."""

    top1: float
    top5: float
    loss: float
    agreement_top1: float
    kl: float
    n_images: int
    unreadable_images: int
    tokens: TokenStats

    def metrics(self, labeled: bool = True) -> dict[str, float]:
        """The accuracy metrics; without real labels only the label-free ones."""
        names = ACCURACY_METRICS if labeled else LABEL_FREE_METRICS
        out = {name: getattr(self, name) for name in names}
        if labeled:
            out["unreadable_images"] = self.unreadable_images
        return out


def agreement_and_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement (%) and mean ``KL(softmax(ref) || softmax(logits))`` (nats) of a batch.

    Args:
        logits: reduced model outputs ``[B, K]``.
        ref_logits: unreduced model outputs ``[B, K]`` on the same images.
    """
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() * 100.0
    kl = F.kl_div(
        logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return agree.item(), kl.item()


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`UserError` when the data has more classes than the model predicts."""
    if int(labels.max()) >= num_classes:
        raise UserError(
            f"the data has labels up to {int(labels.max())} but the model predicts "
            f"{num_classes} classes: pass data with the model's classes (ImageNet val for "
            "ImageNet models, 'digits' for vit_digits)"
        )


def evaluate_accuracy(
    model: nn.Module,
    loader: DataLoader,
    reference: nn.Module | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    desc: str = "accuracy",
    progress: bool = True,
) -> AccuracyResult:
    """Run ``model`` (and ``reference``) over ``loader`` and measure accuracy and token stats.

    Args:
        model: the (reduced) model, in eval mode on ``device``.
        loader: yields ``(images [B, 3, H, W], labels [B], unreadable)`` (see
            :func:`ppt_bench.data.make_loader`; training validates with the same batches);
            cached uint8 images are normalised on ``device``
            (:func:`ppt_bench.data.device_transform`).
        reference: the unreduced model on the same device; None means ``model`` is itself
            unreduced (agreement 100 %, KL 0).
        device: where the batches go.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (autocast).
        desc: progress bar label.
        progress: show the progress bar.
    """
    meters = {name: AverageMeter() for name in ACCURACY_METRICS}
    stats, unreadable = TokenStats(), 0
    normalize = device_transform(loader, reuse_output=True)  # each batch is done with below
    with torch.inference_mode():
        for images, labels, skipped in tqdm(
            loader, desc=desc, leave=False, disable=not progress, unit="batch"
        ):
            unreadable += skipped
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if normalize is not None:
                images = normalize(images)
            labels = labels.to(device, non_blocking=True)
            with amp_autocast(device, dtype):
                logits = model(images).float()
                ref = logits if reference is None else reference(images).float()
            check_labels(labels, logits.shape[-1])
            n = images.shape[0]
            stats.update(model, n)
            top1, top5 = accuracy(logits, labels, topk=(1, 5))
            agree, kl = agreement_and_kl(logits, ref)
            values = (top1.item(), top5.item(), F.cross_entropy(logits, labels).item(), agree, kl)
            for name, value in zip(ACCURACY_METRICS, values, strict=True):
                meters[name].update(value, n)
    return AccuracyResult(
        **{name: meters[name].avg for name in ACCURACY_METRICS},
        n_images=meters["top1"].count,
        unreadable_images=unreadable,
        tokens=stats,
    )
