"""Decode once: a cache of preprocessed images that accuracy runs read instead of JPEGs.

An accuracy run is almost all image decoding. The first run that needs a set of images under
a given eval transform decodes them once with the transform's PIL steps (resize, crop) and
writes the uint8 pixels ``[N, 3, H, W]`` to a raw file; later runs memory-map it and do the
rest of the transform (ToTensor's ``/ 255``, Normalize) on the device, with the same float32
operations, so they see the same tensors and make the same predictions.

An entry ``<cache dir>/<key>/`` holds ``images.u8`` (raw uint8 ``[N, 3, H, W]``),
``labels.npy`` (int64 ``[N]``), ``readable.npy`` (bool ``[N]``: False for an image that could
not be decoded) and ``meta.json`` (its key, shape, transform, file list). The key hashes the
transform and every file's label and stamp (resolved path, size, mtime, ctime, inode), so a
changed dataset or transform gets a new entry and never reads stale images. Every read checks
the entry's files against the key and the labels they were made for; a damaged or mismatched
entry (a shortened ``labels.npy``, a truncated ``images.u8``) is replaced, never read.

An entry is built in a temporary folder and renamed into place, so a reader sees a complete
entry or none; a lock file (``flock``) makes a second process that wants the same entry wait
for the first and read its result instead of decoding too. Without a working lock both build
and the first rename wins. Any ``OSError`` (disk full, folder not writable) is one warning and
the run decodes directly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from ppt_bench.core import cancel
from ppt_bench.core.atomic import locked
from ppt_bench.core.decode import Batch, load_sample
from ppt_bench.core.defaults import cache_root
from ppt_bench.core.folder import sample_bytes

_logger = logging.getLogger(__name__)

# Bump when the layout of an entry or the decoding of an image changes: old entries are then
# never read (3: 16-bit images scaled to 8 bits, no longer clipped).
FORMAT = 3
IMAGES, LABELS, READABLE, META = "images.u8", "labels.npy", "readable.npy", "meta.json"
# Space left free on the disk beyond the entry itself (for the system and other writers).
FREE_MARGIN = 64 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ppt-bench/images`` (``~/.cache/ppt-bench/images`` when unset)."""
    return cache_root() / "images"


class DeviceNormalize:
    """The tail of timm's eval transform, ``ToTensor`` then ``Normalize``, on a uint8 batch.

    The same float32 operations in the same order as torchvision's (``x / 255``, then
    ``(x - mean) / std``), so the result equals the decoded path's to the last bit on the CPU.

    Args:
        mean: per-channel mean (3,).
        std: per-channel standard deviation (3,).
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # [1, 3, 1, 1]
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``images [B, 3, H, W]`` uint8 -> normalised float32 ``[B, 3, H, W]``, same device.

        Args:
            images: a uint8 batch.
            out: a float32 tensor of the same shape and device to write the result into.
        """
        x = images.to(dtype=torch.float32) if out is None else out.copy_(images)
        x = x.div_(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def reusing(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This normalisation writing every batch into one buffer, valid until the next call.

        On the CPU a fresh 40 MB float batch costs more in page faults than the arithmetic
        (measured: 1.5 ms of 2 ms per 224 px image); a loop that is done with a batch before it
        asks for the next one can reuse the memory.
        """
        buffer: list[torch.Tensor] = []

        def normalize(images: torch.Tensor) -> torch.Tensor:
            if not buffer or buffer[0].shape != images.shape or buffer[0].device != images.device:
                buffer[:] = [torch.empty(images.shape, dtype=torch.float32, device=images.device)]
            return self(images, out=buffer[0])

        return normalize


def split_transform(transform: Callable) -> tuple[Callable, DeviceNormalize] | None:
    """Split timm's eval transform into its PIL steps and the ToTensor + Normalize tail.

    Returns:
        ``(pil_steps, normalize)``, or None for a transform that does not end that way (it is
        then not cached).
    """
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, norm = steps[-2], steps[-1]
    if not isinstance(to_tensor, T.ToTensor) or not isinstance(norm, T.Normalize):
        return None
    return T.Compose(list(steps[:-2])), DeviceNormalize(norm.mean, norm.std)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image ``(W, H)`` -> uint8 ``[3, H, W]``, the pixels ToTensor divides by 255.

    Raises:
        TypeError: another mode (ToTensor would give another tensor: the run decodes directly).
    """
    if image.mode != "RGB":
        raise TypeError(f"the eval transform gave a {image.mode} image, not RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def cache_key(
    samples: Sequence[tuple[str, int]], stamps: Sequence[str], pil_steps: Callable
) -> str:
    """A hash of the format, the transform and each file's label and stamp (resolved path,
    size, mtime, ctime, inode: :func:`ppt_bench.core.folder.stamp`, what the data's fingerprint
    hashes too)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "transform": repr(pil_steps)}).encode())
    for (_, label), stamp in zip(samples, stamps, strict=True):
        h.update(sample_bytes(label, stamp))
    return h.hexdigest()[:32]


class CachedImages(Dataset):
    """The images of a cache entry, read in batches from a memory map.

    ``__getitems__`` (what a ``DataLoader`` calls for a batch) returns the whole batch
    ``(uint8 images [b, 3, H, W] | None, labels [b] | None, unreadable)`` in the loader's
    format: unreadable images are left out and counted, as when decoding.

    Args:
        entry: the entry folder.
        samples: ``(path, label)`` of each image, in cache order.
        classes: class names of the ImageFolder.
        normalize: what turns a uint8 batch into the model's input on the device.
    """

    def __init__(
        self,
        entry: Path,
        samples: Sequence[tuple[str, int]],
        classes: list[str],
        normalize: DeviceNormalize,
    ) -> None:
        meta = json.loads((entry / META).read_text())
        self.entry, self.samples, self.classes = entry, list(samples), classes
        self.shape = tuple(meta["shape"])  # (3, H, W)
        self.normalize = normalize
        self.labels = np.load(entry / LABELS)
        self.readable = np.load(entry / READABLE)
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The uint8 ``[N, 3, H, W]`` memory map, opened on first use (in each worker)."""
        if self._images is None:
            self._images = np.memmap(
                self.entry / IMAGES, np.uint8, "r", shape=(len(self), *self.shape)
            )
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}  # workers map the file themselves

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        ok = self.readable[idx]
        for i in idx[~ok]:
            _logger.warning("skipping unreadable image %s (as cached)", self.samples[i][0])
        keep = idx[ok]
        if len(keep) == 0:
            return None, None, len(idx)
        if keep[-1] - keep[0] + 1 == len(keep):  # a contiguous run: one slice of the map
            pixels = np.array(self.images[keep[0] : keep[-1] + 1])
        else:
            pixels = self.images[keep]
        labels = torch.from_numpy(self.labels[keep].astype(np.int64))
        return torch.from_numpy(pixels), labels, len(idx) - len(keep)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        images, _, _ = self.__getitems__([index])
        return (None if images is None else images[0]), int(self.labels[index])


def pass_batch(batch: Batch) -> Batch:
    """The collate function of a loader over :class:`CachedImages`: batches come whole."""
    return batch


class _Decode(Dataset):
    """``(uint8 [3, H, W] | None, label)`` per sample: decoded, PIL steps applied."""

    def __init__(self, samples: Sequence[tuple[str, int]], pil_steps: Callable) -> None:
        self.samples, self.pil_steps = samples, pil_steps

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        path, label = self.samples[index]
        image = load_sample(path, self.pil_steps)
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"the eval transform's steps before ToTensor gave {type(image)}")
        return (None if image is None else to_uint8(image)), label


class _Stack:
    """Collate decoded samples into ``(uint8 [b, 3, H, W], labels [b], readable [b])``, with
    zeros where an image could not be decoded."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, ...]:
        images = torch.zeros(len(batch), *self.shape, dtype=torch.uint8)
        readable = torch.zeros(len(batch), dtype=torch.bool)
        for i, (image, _) in enumerate(batch):
            if image is not None:
                if tuple(image.shape) != self.shape:
                    raise ValueError(f"transform gave {tuple(image.shape)}, not {self.shape}")
                images[i], readable[i] = image, True
        labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
        return images, labels, readable


def _valid(entry: Path, key: str, labels: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether ``entry`` is a complete entry of ``key``: every file made for these images and
    labels (``meta.json`` names the key, the labels and readable flags are one per image, the
    image file has all their bytes)."""
    n = len(labels)
    try:
        meta = json.loads((entry / META).read_text())
        size = (entry / IMAGES).stat().st_size
        stored = np.load(entry / LABELS)
        readable = np.load(entry / READABLE)
    except (OSError, ValueError, EOFError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and meta.get("key") == key
        and meta.get("n") == n
        and tuple(meta.get("shape", ())) == shape
        and size == n * math.prod(shape)
        and stored.shape == (n,)
        and np.array_equal(stored, labels)
        and readable.shape == (n,)
        and readable.dtype == bool
    )


def _discard(entry: Path) -> None:
    """Move a damaged or mismatched entry out of the way and delete it (under the lock): it is
    replaced, never read."""
    stale = entry.with_name(f"{entry.name}.tmp-stale-{secrets.token_hex(4)}")
    try:
        os.rename(entry, stale)
    except FileNotFoundError:
        return
    shutil.rmtree(stale, ignore_errors=True)


def _write(f: Any, data: bytes) -> None:
    """Append ``data`` to the entry's image file (an ``OSError`` here means a full disk)."""
    f.write(data)


def _build(
    entry: Path,
    key: str,
    samples: Sequence[tuple[str, int]],
    pil_steps: Callable,
    shape: tuple[int, ...],
    workers: int,
    progress: bool,
) -> None:
    """Decode ``samples`` into a temporary folder and rename it to ``entry``.

    Raises:
        OSError: not enough space, or any write that fails; nothing is left behind.
    """
    n, per_image = len(samples), math.prod(shape)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        free = shutil.disk_usage(tmp).free
        if free < n * per_image + FREE_MARGIN:
            raise OSError(errno.ENOSPC, _no_space(n, n * per_image, free))
        loader = DataLoader(
            _Decode(samples, pil_steps),
            batch_size=32,
            num_workers=workers,
            collate_fn=_Stack(shape),
        )
        labels = np.empty(n, dtype=np.int64)
        readable = np.empty(n, dtype=bool)
        done = 0
        bar = tqdm(total=n, desc="caching images", unit="img", leave=False, disable=not progress)
        with (tmp / IMAGES).open("wb") as f, bar:
            for images, batch_labels, batch_readable in loader:
                cancel.check()  # a cancelled build leaves nothing (the finally below)
                _write(f, images.numpy().tobytes())
                b = len(batch_labels)
                labels[done : done + b] = batch_labels.numpy()
                readable[done : done + b] = batch_readable.numpy()
                done += b
                bar.update(b)
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / LABELS, labels)
        np.save(tmp / READABLE, readable)
        meta = {
            "format": FORMAT,
            "key": key,
            "n": n,
            "shape": list(shape),
            "transform": repr(pil_steps),
            "unreadable": int((~readable).sum()),
            "files": [os.path.abspath(p) for p, _ in samples],
        }
        (tmp / META).write_text(json.dumps(meta))  # last: an entry with meta is complete
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _valid(entry, key, labels, shape):  # ours failed, not another's entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n_bytes / 1e3:.1f} kB"


def _no_space(n: int, needed: int, free: int) -> str:
    """Why an entry is not built on a disk that lacks the space: the figures and what to do."""
    return (
        f"{n} images need {_size(needed)} plus {_size(FREE_MARGIN)} kept free on the disk, and "
        f"{_size(free)} is free: free some space, or put the cache on another disk with "
        "--cache-dir (or XDG_CACHE_HOME), or pass --no-cache"
    )


def cached_images(
    samples: Sequence[tuple[str, int]],
    stamps: Sequence[str],
    classes: list[str],
    transform: Callable,
    input_size: Sequence[int],
    cache_dir: str | os.PathLike,
    *,
    workers: int = 0,
    progress: bool = True,
) -> CachedImages | None:
    """The images of ``samples`` under ``transform`` from the cache, decoded into it first if
    no entry matches.

    Args:
        samples: ``(path, label)`` of each image, in loader order.
        stamps: each image's stamp (:func:`ppt_bench.core.folder.stamp`), aligned with ``samples``.
        classes: class names (for the records and tests).
        transform: the model's timm eval transform.
        input_size: ``(3, H, W)``: the shape of each cached image.
        cache_dir: the cache folder.
        workers: processes that decode while building.
        progress: show a progress bar while building and report the entry's size.

    Returns:
        The cached dataset, or None when the transform cannot be split or the cache cannot be
        used (one warning says why): the caller then decodes directly.
    """
    split = split_transform(transform)
    if split is None:
        return None
    pil_steps, normalize = split
    shape = tuple(int(s) for s in input_size)
    root = Path(cache_dir).expanduser()
    try:
        key = cache_key(samples, stamps, pil_steps)
        entry = root / key
        labels = np.array([label for _, label in samples], dtype=np.int64)
        if not _valid(entry, key, labels, shape):
            root.mkdir(parents=True, exist_ok=True)
            with locked(root / f"{key}.lock"):
                if not _valid(entry, key, labels, shape):  # not built while we waited
                    _remove_leftovers(root, key)
                    _discard(entry)
                    _build(entry, key, samples, pil_steps, shape, workers, progress)
                    _report(entry, len(samples), shape, progress)
        return CachedImages(entry, samples, classes, normalize)
    except (OSError, ValueError, TypeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        _logger.warning("image cache in %s not usable, decoding directly: %s", root, reason)
        return None


def _remove_leftovers(root: Path, key: str) -> None:
    """Delete half-built folders of ``key`` left by a killed process (called under the lock,
    so no live process of this node is building them)."""
    for tmp in root.glob(f"{key}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _report(entry: Path, n: int, shape: tuple[int, ...], progress: bool) -> None:
    size = n * math.prod(shape)
    line = f"image cache: {n} images, {size / 1e6:.1f} MB ({math.prod(shape)} B each) in {entry}"
    _logger.info(line)
    if progress:
        print(line, file=sys.stderr, flush=True)
