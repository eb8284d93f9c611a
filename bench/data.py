"""Evaluation data: an ImageFolder tree, the built-in digits set, or synthetic inputs.

Every loader yields ``(images [B, 3, H, W] float, labels [B] long, unreadable int)``: images
that cannot be decoded are dropped from their batch and counted, never fatal. A batch whose
images are all unreadable has ``images is None``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ppt_bench.errors import UserError

_logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
DIGITS = "digits"
# Images in a synthetic run when the spec does not say: enough for token and path statistics.
DEFAULT_SYNTHETIC_IMAGES = 64
_SPLIT_NAMES = ("val", "validation", "test", "train")
# What PIL raises for a file it cannot decode (truncated, not an image, absurdly large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor | None, torch.Tensor | None, int]


class TolerantImageFolder(ImageFolder):
    """``ImageFolder`` that yields ``(None, label)`` for an image it cannot decode."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except DECODE_ERRORS as err:
            _logger.warning("skipping unreadable image %s (%s)", path, err)
            return None, target
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, target


class SyntheticImages(Dataset):
    """Seeded random images (already normalised) with label 0; image ``i`` is the same on
    every run and in every worker.

    Args:
        n: number of images.
        input_size: ``(3, H, W)``.
        seed: base seed.
    """

    def __init__(self, n: int, input_size: tuple[int, ...], seed: int = 0) -> None:
        self.n, self.input_size, self.seed = n, tuple(input_size), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.input_size, generator=g), 0


class Transformed(Dataset):
    """Apply ``transform`` to the images of a dataset of ``(PIL image, label)``; an unreadable
    image (None, from :class:`TolerantImageFolder`) stays None."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return (None if image is None else self.transform(image)), label


def collate_readable(batch: list[tuple[Any, int]]) -> Batch:
    """Collate the readable samples of a batch and count the others."""
    good = [s for s in batch if s[0] is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images, labels = default_collate(good)
    return images, labels, skipped


def _holds_image(folder: Path) -> bool:
    """Whether a file with an image extension lies anywhere under ``folder`` (none is opened)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def image_folder_root(path: str | Path) -> Path:
    """The class-folder root of an ImageFolder tree given as ``root/`` or ``root/val/``.

    Cheap enough to check a grid before it runs: it lists folders and file names and stops at
    the first image file; it decodes nothing.

    Raises:
        UserError: missing path, empty tree, images that are not in class folders, or class
            folders without image files.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data path {str(root)!r} does not exist or is not a folder")
    if (root / "val").is_dir():
        root = root / "val"
    class_dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if not class_dirs:
        if loose:
            raise UserError(
                f"{root} holds images but no class folders: ImageFolder needs "
                "root/<class>/<image> (ImageNet val layout val/<synset>/<image>.JPEG)"
            )
        raise UserError(f"{root} is empty: expected class folders root/<class>/<image>")
    if not any(_holds_image(d) for d in class_dirs):
        exts = ", ".join(sorted(IMG_EXTENSIONS))
        raise UserError(f"no images found under {root} (looked for {exts})")
    return root


def image_folder(path: str | Path, transform: Callable) -> TolerantImageFolder:
    """An ImageFolder dataset over ``path`` (``root/`` or ``root/val/``), empty classes allowed."""
    root = image_folder_root(path)
    return TolerantImageFolder(str(root), transform=transform, allow_empty=True)


def dataset_name(data: str | None) -> str:
    """A short name for the records: ``imagenet`` for ``/data/imagenet/val``."""
    if data in (None, SYNTHETIC, DIGITS):
        return data or SYNTHETIC
    path = Path(data).expanduser().resolve()
    return path.parent.name if path.name in _SPLIT_NAMES else path.name


def _digits(transform: Callable) -> Dataset:
    from ppt_bench.digits import digits_dataset

    return Transformed(digits_dataset(split="test"), transform)


def make_dataset(
    data: str | None, data_config: dict[str, Any], n_images: int | None = None, seed: int = 0
) -> Dataset:
    """The evaluation dataset, limited to a seeded random subset of ``n_images`` if given.

    A random subset, not the first images: an ImageFolder lists images class by class.
    """
    if data in (None, SYNTHETIC):
        n = n_images or DEFAULT_SYNTHETIC_IMAGES
        return SyntheticImages(n, data_config["input_size"], seed)
    transform = create_transform(**data_config, is_training=False)
    dataset = _digits(transform) if data == DIGITS else image_folder(data, transform)
    if n_images is not None and n_images < len(dataset):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(dataset), generator=g)[:n_images].sort().values
        dataset = Subset(dataset, keep.tolist())
    return dataset


def make_loader(
    data: str | None,
    data_config: dict[str, Any],
    batch_size: int,
    n_images: int | None = None,
    workers: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[DataLoader, str]:
    """A DataLoader over the evaluation data and the dataset's name for the records.

    Args:
        data: ImageFolder root (``root/<class>/<image>`` or ``root/val/<class>/<image>``),
            ``"digits"``, or None / ``"synthetic"``.
        data_config: the model's timm data config (resize, crop, interpolation, mean, std).
        batch_size: images per batch.
        n_images: at most this many images (a seeded random subset); synthetic default
            :data:`DEFAULT_SYNTHETIC_IMAGES`.
        workers: loader worker processes.
        seed: seed of the subset and of synthetic images.
        device: pinned host memory when this is a CUDA device.

    Returns:
        ``(loader, dataset_name)``; the loader yields ``(images, labels, unreadable)``.
    """
    dataset = make_dataset(data, data_config, n_images, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_readable,
        pin_memory=device.startswith("cuda"),
        drop_last=False,
    )
    return loader, dataset_name(data)
