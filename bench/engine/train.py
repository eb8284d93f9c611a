"""The project's training loop: train or fine-tune a timm ViT, with or without token reduction.

timm's AdamW and cosine-with-warmup factories, label smoothing, light augmentation, seeded and
deterministic. A model with a method applied (``create_method(...).apply(model)``) trains like
any other: the patch computes attention itself and honours ``model.training`` for dropout and
drop path, and the token selections are differentiable with respect to the tokens.

Under ``torchrun`` (``WORLD_SIZE > 1``) the loop runs data-parallel: one process per GPU (NCCL)
or per CPU process (Gloo), ``DistributedDataParallel``, a ``DistributedSampler``; only rank 0
evaluates, logs and saves. The loop checks the cancellation flag (:mod:`ppt_bench.core.cancel`)
between batches; a cancelled training saves nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from timm.data import create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from ppt_bench.core import cancel
from ppt_bench.core.atomic import atomic_write
from ppt_bench.core.defaults import DTYPES, cache_root
from ppt_bench.core.dtypes import amp_autocast
from ppt_bench.core.errors import UserError
from ppt_bench.data.digits import digits_dataset
from ppt_bench.data.loader import TolerantImageFolder, Transformed, batch_loader
from ppt_bench.measure.accuracy import evaluate_accuracy
from ppt_bench.models.build import build_model

if TYPE_CHECKING:
    from ppt_bench.methods import Method

AUGMENTS = ("affine", "imagenet", "none")
# The "affine" augmentation: a small rotation [deg], shift [fraction of the side] and zoom.
AFFINE: dict[str, Any] = dict(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05))


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Args:
        epochs: passes over the training set.
        lr: peak learning rate of AdamW, reached after the warm-up.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        batch_size: images per optimiser step, summed over all processes.
        warmup_epochs: linear warm-up from ``lr / 100``, then cosine decay to ``lr / 100``.
        smoothing: label smoothing of the cross-entropy.
        seed: seeds the model's random layers, augmentation and data order.
        workers: DataLoader worker processes (0: load in the training process).
        amp_dtype: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` under autocast.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun each process takes its
            ``LOCAL_RANK`` GPU).
        augment: ``"affine"`` (small rotation, shift and scale; no flips, so digits and text
            stay readable), ``"imagenet"`` (timm's training transform: random resized crop, flip,
            colour jitter) or ``"none"``.
        clip_grad: clip the gradient norm to this value (None: no clipping).
        eval_every: evaluate on the validation set every this many epochs (the last epoch is
            always evaluated).
    """

    epochs: int = 15
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup_epochs: float = 1.0
    smoothing: float = 0.1
    seed: int = 0
    workers: int = 0
    amp_dtype: str = "fp32"
    device: str = "cpu"
    augment: str = "affine"
    clip_grad: float | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.amp_dtype not in DTYPES:
            raise UserError(f"amp dtype must be one of {', '.join(DTYPES)}, got {self.amp_dtype!r}")
        if self.augment not in AUGMENTS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise UserError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_epochs", "smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.workers < 0:
            raise UserError("lr must be > 0; weight decay, warm-up epochs and workers >= 0")
        if not 0.0 <= self.smoothing < 1.0:
            raise UserError(f"label smoothing must be in [0, 1), got {self.smoothing}")


@dataclass
class EpochStats:
    """One epoch: mean training loss, learning rate at its end, validation top-1 [%] and loss,
    and the images skipped because they could not be decoded."""

    epoch: int
    lr: float
    train_loss: float
    seconds: float
    val_top1: float | None = None
    val_loss: float | None = None
    train_unreadable: int = 0
    val_unreadable: int = 0


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (unwrapped from DistributedDataParallel), in eval mode.
        val_top1: top-1 [%] on the validation set after the last epoch (None without one).
        train_time_s: wall-clock seconds of the whole loop, evaluation included.
        history: one :class:`EpochStats` per epoch.
        world_size: processes that trained.
    """

    model: nn.Module
    val_top1: float | None
    train_time_s: float
    history: list[EpochStats] = field(default_factory=list)
    world_size: int = 1


# -- processes and determinism ---------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True unless this is a torchrun process with ``RANK`` other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun job if ``WORLD_SIZE > 1`` (NCCL on CUDA, Gloo on CPU).

    Args:
        device: the requested device; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    if world_size <= 1:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and ask for deterministic kernels, restoring the global setting afterwards.

    Kernels that have no deterministic version warn instead of failing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


# -- data ------------------------------------------------------------------------------------


def build_transforms(model: nn.Module, augment: str = "affine") -> tuple[Any, Any]:
    """Training and evaluation transforms from the model's timm data config.

    Returns:
        ``(train_transform, eval_transform)``; the eval transform is timm's, as in evaluation.
    """

    cfg = resolve_data_config(model=model)
    eval_tf = create_transform(**cfg, is_training=False)
    if augment == "none":
        return eval_tf, eval_tf
    if augment == "imagenet":
        return create_transform(**cfg, is_training=True), eval_tf
    size = cfg["input_size"][-1]
    interp = T.InterpolationMode(cfg["interpolation"])
    train_tf = T.Compose(
        [
            T.Resize(math.floor(size / cfg["crop_pct"]), interpolation=interp),
            T.CenterCrop(size),
            T.RandomAffine(**AFFINE),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    return train_tf, eval_tf


# -- the loop --------------------------------------------------------------------------------


@dataclass
class _Loop:
    """The moving parts of one training run."""

    model: nn.Module  # possibly DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    config: TrainConfig
    dist: Dist
    updates: int = 0


def _make_loop(model: nn.Module, steps_per_epoch: int, config: TrainConfig, dist: Dist) -> _Loop:

    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr / 100,
        min_lr=config.lr / 100,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    criterion = (
        LabelSmoothingCrossEntropy(config.smoothing) if config.smoothing else nn.CrossEntropyLoss()
    )
    scaler = torch.amp.GradScaler(
        dist.device.type, enabled=config.amp_dtype == "fp16" and dist.device.type == "cuda"
    )
    return _Loop(model, optimizer, scheduler, criterion, scaler, config, dist)


def _train_step(loop: _Loop, x: torch.Tensor, y: torch.Tensor) -> float:
    device = loop.dist.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with amp_autocast(device, loop.config.amp_dtype):
        loss = loop.criterion(loop.model(x), y)
    if not torch.isfinite(loss):  # diverged: stop before the weights are saved
        raise UserError(
            f"training diverged: the loss became {loss.item()} at step {loop.updates + 1}; "
            "lower --lr (no checkpoint was written, an existing one is kept)"
        )
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(loss).backward()
    if loop.config.clip_grad is not None:
        loop.scaler.unscale_(loop.optimizer)
        nn.utils.clip_grad_norm_(loop.model.parameters(), loop.config.clip_grad)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.updates += 1
    loop.scheduler.step_update(num_updates=loop.updates)
    return loss.item()


def _train_epoch(loop: _Loop, loader: DataLoader, epoch: int, bar: Any) -> tuple[float, int]:
    """Mean loss of one epoch and the images skipped as unreadable."""
    loop.model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    total, n, unreadable = 0.0, 0, 0
    for x, y, skipped in loader:
        cancel.check()
        unreadable += skipped
        bar.update(1)
        if x is None:
            continue
        total += _train_step(loop, x, y) * len(y)
        n += len(y)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.3f}", refresh=False)
    if n == 0:
        raise UserError(
            f"no training image could be decoded ({unreadable} tried, named in the warnings): "
            "pass readable images"
        )
    return total / n, unreadable


def train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    method: Method | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``train_set`` and report top-1 on ``val_set``.

    Args:
        model: a timm model (its data config sets the transforms), patched or not.
        train_set: ``(PIL image, label)`` pairs, like an ``ImageFolder`` without a transform.
        val_set: the same for validation, or None.
        config: the recipe.
        method: a token reduction method to apply before training (a
            :class:`~ppt_bench.methods.Method`), or None to train the model as it is.
        progress: show a progress bar (rank 0 only).

    Returns:
        The trained model and its history; the model is in eval mode, on ``config.device``.
        The same seed, device and thread count give the same weights.
    """
    if method is not None:
        model = method.apply(model)
    dist = setup_distributed(config.device)
    start = time.perf_counter()
    with deterministic(config.seed + dist.rank):
        train_tf, eval_tf = build_transforms(model, config.augment)
        loader = _loader(Transformed(train_set, train_tf), config.batch_size, config, dist, True)
        val_loader = None
        if val_set is not None and dist.main:
            val_set = Transformed(val_set, eval_tf)
            val_loader = _loader(val_set, 2 * config.batch_size, config, dist, False)
        if len(loader) == 0:
            raise UserError(
                f"the training set ({len(train_set)} images) is smaller than one batch of "
                f"{config.batch_size}: lower --batch-size"
            )
        model = model.to(dist.device)
        loop = _make_loop(model, len(loader), config, dist)
        history = _run_epochs(loop, loader, val_loader, progress and dist.main)
    if dist.world_size > 1:
        torch.distributed.barrier()
    val_top1 = history[-1].val_top1 if history else None
    model.eval()
    return TrainResult(model, val_top1, time.perf_counter() - start, history, dist.world_size)


def _loader(
    dataset: Dataset, batch_size: int, config: TrainConfig, dist: Dist, train: bool
) -> DataLoader:
    """The project's loader (:func:`ppt_bench.data.loader.batch_loader`), seeded, with workers kept
    across epochs; a ``DistributedSampler`` shares the training set over torchrun processes."""
    return batch_loader(
        dataset,
        batch_size,
        workers=config.workers,
        device=dist.device,
        train=train,
        seed=config.seed,
        world_size=dist.world_size,
        persistent=True,
    )


def _run_epochs(
    loop: _Loop, loader: DataLoader, val_loader: DataLoader | None, progress: bool
) -> list[EpochStats]:

    config = loop.config
    history = []
    with tqdm(total=config.epochs * len(loader), desc="train", disable=not progress) as bar:
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            loss, unreadable = _train_epoch(loop, loader, epoch, bar)
            lr = loop.optimizer.param_groups[0]["lr"]
            stats = EpochStats(epoch + 1, lr, loss, 0.0, train_unreadable=unreadable)
            last = epoch + 1 == config.epochs
            if val_loader is not None and (last or (epoch + 1) % config.eval_every == 0):
                val = _validate(loop, val_loader, progress)
                stats.val_top1, stats.val_loss, stats.val_unreadable = val
                bar.set_postfix(
                    epoch=epoch + 1, loss=f"{loss:.3f}", val_top1=f"{stats.val_top1:.1f}"
                )
            stats.seconds = time.perf_counter() - t0
            history.append(stats)
    return history


def _validate(loop: _Loop, val_loader: DataLoader, progress: bool) -> tuple[float, float, int]:
    """Top-1 accuracy [%], mean cross-entropy and unreadable images of the validation set, in
    eval mode."""
    model = _unwrap(loop.model).eval()
    device, dtype = loop.dist.device, loop.config.amp_dtype
    val = evaluate_accuracy(
        model, val_loader, device=device, dtype=dtype, desc="val", progress=progress
    )
    return val.figure("top1"), val.figure("loss"), val.unreadable_images


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# -- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically (:func:`~ppt_bench.core.atomic.atomic_write`):
    a reader never sees a half-written file, and an interrupted save leaves the old one."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def checkpoint_size(model: nn.Module) -> int:
    """About the bytes a checkpoint of ``model``'s weights takes (its tensors' bytes)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def keep_checkpoint(state: dict[str, Any], path: str | Path) -> Path | None:
    """Write ``state`` where it can be kept when ``path`` cannot be written (a full disk, a
    folder gone read-only): in ``unsaved/`` of the cache root
    (:func:`~ppt_bench.core.defaults.cache_root`), else in the temporary folder, under
    ``path``'s name with the time it was kept. Returns where, or None when neither can be
    written."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{path.stem[:100]}-{stamp}{path.suffix[:20]}"
    for folder in (cache_root() / "unsaved", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return save_checkpoint(state, folder / name)
        except OSError:
            continue
    return None


def load_datasets(data: str) -> tuple[Dataset, Dataset]:
    """Training and validation sets of ``(PIL image, label)``: the digits (their 360 test
    images validate) or ``root/train`` and ``root/val`` of an ImageFolder tree, where an image
    that cannot be decoded is ``(None, label)`` (training and validation skip and count it).

    Raises:
        UserError: a root without ``train/`` and ``val/`` class folders, or different classes.
    """
    if data == "digits":
        return digits_dataset("train"), digits_dataset("test")
    root = Path(data).expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise UserError(
            f"--data {data!r} has no {' or '.join(m + '/' for m in missing)} folder: training "
            "needs root/train/<class>/<image> and root/val/<class>/<image>, or --data digits"
        )
    try:
        train_set = TolerantImageFolder(str(root / "train"))
        val_set = TolerantImageFolder(str(root / "val"))
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--data {data!r}: {err}") from None
    if train_set.classes != val_set.classes:
        raise UserError(f"{root}/train and {root}/val have different class folders")
    return train_set, val_set


def build_for_training(name: str, checkpoint: str | None, num_classes: int) -> nn.Module:
    """The timm model with its initial weights and a head of ``num_classes`` outputs.

    A checkpoint's head is kept when it has ``num_classes`` outputs (training goes on) and
    replaced by a new one otherwise (fine-tuning on other classes).
    """
    model, _ = build_model(
        name, checkpoint=checkpoint, num_classes=None if checkpoint else num_classes
    )
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    return model
