"""Evaluation data: an ImageFolder tree, the built-in digits set, or synthetic inputs.

Every loader yields ``(images [B, 3, H, W], labels [B] long, unreadable int)``: images
that cannot be decoded are dropped from their batch and counted, never fatal. A batch whose
images are all unreadable has ``images is None``. Images are normalised float, except from the
preprocessed-image cache (:mod:`ppt_bench.data.imagecache`): there they are uint8 and
:func:`device_transform` gives what normalises them once they are on the device.

:func:`batch_loader` is the one DataLoader factory of evaluation and training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder

from ppt_bench.core.decode import Batch, load_sample
from ppt_bench.core.errors import UserError
from ppt_bench.core.folder import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    FolderListing,
    class_root,
    find_classes,
    is_image_name,
    list_image_folder,
    walk,
)
from ppt_bench.data.digits import digits_dataset
from ppt_bench.data.imagecache import CachedImages, cached_images, pass_batch

_logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
DIGITS = "digits"
# Images in a synthetic run when the spec does not say: enough for token and path statistics.
DEFAULT_SYNTHETIC_IMAGES = 64


class TolerantImageFolder(ImageFolder):
    """``ImageFolder`` over the files of :func:`~ppt_bench.core.folder.list_image_folder` (the files
    torchvision lists, less loops and what is not a regular file; empty classes allowed) that
    yields ``(None, label)`` for an image it cannot decode.

    ``listing`` keeps the stamps of the samples: what the fingerprint and the cache key hash.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.listing = list_image_folder(root)
        _warn_once(root, self.listing)
        super().__init__(os.fspath(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = list(self.listing.classes)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return list(self.listing.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return load_sample(path, self.transform), target


# The warnings already given in this process: one for each data folder, not one per run.
_WARNED: set[str] = set()


def _warn_once(root: str | os.PathLike, listing: FolderListing) -> None:
    """One warning line each for files reached through links that leave ``root`` and for
    image names that are not regular files (left out)."""
    notes = []
    if listing.outside:
        first = listing.outside[0]
        notes.append(
            f"{len(listing.outside)} images of {root} lie outside it through links "
            f"(first: {first} -> {os.path.realpath(first)})"
        )
    if listing.skipped:
        notes.append(
            f"skipping {len(listing.skipped)} entries of {root} that are not regular files "
            f"(first: {listing.skipped[0]})"
        )
    for note in notes:
        if note not in _WARNED:
            _WARNED.add(note)
            _logger.warning(note)


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
    return any(is_image_name(e.name) for _, entries in walk(str(folder)) for e in entries)


def image_folder_root(path: str | Path, *, single_class: bool = False) -> Path:
    """The class-folder root of an ImageFolder tree given as ``root/`` or ``root/val/``.

    Cheap enough to check a grid before it runs: it lists folders and file names and stops at
    the first image file; it decodes nothing. Its class folders are torchvision's, hidden ones
    included.

    Args:
        path: the tree.
        single_class: accept a root with a single class folder (every label the same), which
            is otherwise refused as a likely mistake.

    Raises:
        UserError: missing path, empty tree, images that are not in class folders, class
            folders without image files, links that loop, class folders that are all split
            names (``root/train`` alone: the user meant that folder), or a single class folder
            without ``single_class``.
    """
    root = class_root(path)
    if not root.is_dir():
        raise UserError(f"data path {str(root)!r} does not exist or is not a folder")
    classes = find_classes(root)
    loose = [p for p in root.iterdir() if p.is_file() and is_image_name(p.name)]
    if not classes:
        if loose:
            raise UserError(
                f"{root} holds images but no class folders: ImageFolder needs "
                "root/<class>/<image> (ImageNet val layout val/<synset>/<image>.JPEG)"
            )
        raise UserError(f"{root} is empty: expected class folders root/<class>/<image>")
    if not any(_holds_image(root / name) for name in classes):
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images found under {root} (looked for {exts})")
    visible = [name for name in classes if not name.startswith(".")]
    splits = [name for name in SPLIT_NAMES if name in visible]  # the likeliest meant first
    if splits and len(splits) == len(visible) and not (single_class and len(classes) == 1):
        named = f"folder {splits[0]}" if len(splits) == 1 else f"folders {', '.join(splits)}"
        raise UserError(
            f"{root} holds the split {named}, not class folders: pass {root / splits[0]} "
            "(a split is an ImageFolder of its own)"
        )
    if len(classes) == 1 and not single_class:
        inner = root / classes[0]
        meant = "the folder that holds all the class folders"
        if find_classes(inner):  # a folder of folders: likely the class root itself
            meant = f"{inner} if it holds the class folders"
        raise UserError(
            f"{root} holds a single class folder, {classes[0]}, which would give every image "
            f"the same label: pass {meant}, or --single-class if one class is meant"
        )
    return root


def check_cache_outside(data: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Refuse an image cache inside the data folder: ImageFolder would take a cache folder in
    its root for a class (hidden or not) and shift every label after it.

    Raises:
        UserError: ``cache_dir`` is ``data`` or lies inside it.
    """
    data_path = Path(data).expanduser().resolve()
    cache_path = Path(cache_dir).expanduser().resolve()
    if cache_path == data_path or data_path in cache_path.parents:
        raise UserError(
            f"the image cache {cache_dir} lies inside --data {data}, where it would be read as "
            "a class: pass a --cache-dir outside the data folder"
        )


def image_folder(
    path: str | Path, transform: Callable, *, single_class: bool = False
) -> TolerantImageFolder:
    """An ImageFolder dataset over ``path`` (``root/`` or ``root/val/``), empty classes allowed
    (a single class only with ``single_class``: see :func:`image_folder_root`)."""
    root = image_folder_root(path, single_class=single_class)
    return TolerantImageFolder(root, transform=transform)


def dataset_name(data: str | None) -> str:
    """A short name for the records: ``imagenet`` for ``/data/imagenet/val``."""
    if data in (None, SYNTHETIC, DIGITS):
        return data or SYNTHETIC
    path = Path(data).expanduser().resolve()
    return path.parent.name if path.name in SPLIT_NAMES else path.name


def _digits(transform: Callable) -> Dataset:
    return Transformed(digits_dataset(split="test"), transform)


def _subset_indices(n: int, n_images: int | None, seed: int) -> list[int] | None:
    """A seeded random subset of ``n_images`` of ``n`` indices, in order; None for all.

    A random subset, not the first images: an ImageFolder lists images class by class.
    """
    if n_images is None or n_images >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:n_images].sort().values.tolist()


def make_dataset(
    data: str | None,
    data_config: dict[str, Any],
    n_images: int | None = None,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    progress: bool = True,
    single_class: bool = False,
) -> Dataset:
    """The evaluation dataset, limited to a seeded random subset of ``n_images`` if given.

    With ``cache_dir``, an ImageFolder's images (the subset's, if one is taken) come from the
    preprocessed-image cache there, decoded into it on first use
    (:func:`ppt_bench.data.imagecache.cached_images`); when the cache cannot be used they are
    decoded directly. An ImageFolder of a single class is refused unless ``single_class``
    (:func:`image_folder_root`).
    """
    if data in (None, SYNTHETIC):
        n = n_images or DEFAULT_SYNTHETIC_IMAGES
        return SyntheticImages(n, data_config["input_size"], seed)
    if cache_dir is not None and data != DIGITS:
        check_cache_outside(data, cache_dir)
    transform = create_transform(**data_config, is_training=False)
    if data == DIGITS:
        dataset = _digits(transform)
    else:
        dataset = image_folder(data, transform, single_class=single_class)
    keep = _subset_indices(len(dataset), n_images, seed)
    if cache_dir is not None and isinstance(dataset, TolerantImageFolder):
        chosen = range(len(dataset)) if keep is None else keep
        cached = cached_images(
            [dataset.samples[i] for i in chosen],
            [dataset.listing.stamps[i] for i in chosen],
            dataset.classes,
            transform,
            data_config["input_size"],
            cache_dir,
            workers=workers,
            progress=progress,
        )
        if cached is not None:
            return cached
    return dataset if keep is None else Subset(dataset, keep)


def device_transform(
    loader: Any, *, reuse_output: bool = False
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What turns the loader's images into model input once they are on the device: the
    normalisation of cached uint8 images, None for a loader of ready float images.

    Args:
        loader: a loader from :func:`make_loader`.
        reuse_output: write every batch into the same buffer (each result is valid until the
            next call); a pass that is done with each batch before the next saves the
            allocation.
    """
    normalize = getattr(getattr(loader, "dataset", None), "normalize", None)
    if normalize is None or not reuse_output:
        return normalize
    return normalize.reusing()


def batch_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    workers: int = 0,
    device: str | torch.device = "cpu",
    train: bool = False,
    seed: int = 0,
    world_size: int = 1,
    persistent: bool = False,
) -> DataLoader:
    """The DataLoader of evaluation and training, yielding ``(images, labels, unreadable)``.

    Args:
        dataset: ``(image | None, label)`` samples, or :class:`~ppt_bench.data.imagecache.
            CachedImages` (whole batches).
        batch_size: images per batch (per process when training on several).
        workers: loader worker processes; none for the image cache, read in this process (a
            batch from the memory map is one copy; a worker would add one through shared
            memory, and reads ten times fewer images/s on a small machine).
        device: pinned host memory when this is a CUDA device.
        train: shuffled (seeded) with the last partial batch dropped; over several processes
            a ``DistributedSampler`` gives each its share of ``batch_size // world_size``.
        seed: seed of the order and of the workers' random state.
        world_size: processes of a torchrun job.
        persistent: keep the workers between passes (a loader read once per epoch).
    """
    cached = isinstance(dataset, CachedImages)
    workers = 0 if cached else workers
    sampler = None
    if world_size > 1 and train:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        dataset,
        batch_size=max(1, batch_size // world_size) if train else batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        collate_fn=pass_batch if cached else collate_readable,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=persistent and workers > 0,
    )


def make_loader(
    data: str | None,
    data_config: dict[str, Any],
    batch_size: int,
    n_images: int | None = None,
    workers: int = 4,
    seed: int = 0,
    device: str = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    single_class: bool = False,
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
        cache_dir: read an ImageFolder through the preprocessed-image cache in this folder
            (None: decode every image).
        progress: show a progress bar while the cache is built.
        single_class: accept an ImageFolder of a single class (refused otherwise, as a likely
            mistake: see :func:`image_folder_root`).

    Returns:
        ``(loader, dataset_name)``; the loader yields ``(images, labels, unreadable)``, with
        uint8 images from the cache (see :func:`device_transform`).
    """
    dataset = make_dataset(
        data,
        data_config,
        n_images,
        seed,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        single_class=single_class,
    )
    loader = batch_loader(dataset, batch_size, workers=workers, device=device, seed=seed)
    return loader, dataset_name(data)
