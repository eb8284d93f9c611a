"""Images/s of the accuracy loader from JPEGs and from the preprocessed-image cache (``tox -e
bench``), side by side in one benchmark group.

An ImageFolder of generated 500x375 JPEGs (ImageNet's typical size; ``PPT_BENCH_LOADER_IMAGES``
of them, default 1,000) is read once per round with DeiT-S's eval transform (resize 248
bicubic, crop 224, normalise), as ``ppt-bench run`` reads it: decoding with every core, and
from the cache (built before the timed rounds), which the main process reads.
A loader of JPEGs delivers normalised float batches; the cache delivers uint8 batches that a
run normalises on its device (a GPU on the machines this is for), and ``cache+normalize``
also normalises them on this CPU, as a CPU run does. Images/s is printed and stored in the
benchmark's ``extra_info``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm import get_pretrained_cfg
from timm.data import resolve_data_config

from ppt_bench.data.loader import device_transform, make_loader

N_IMAGES = int(os.environ.get("PPT_BENCH_LOADER_IMAGES", "1000"))
CLASSES = 10
BATCH = 64
WORKERS = os.cpu_count() or 1
# DeiT-S (deit_small_patch16_224) eval data config: bicubic, crop_pct 0.9, ImageNet mean and std.
DEIT_S = resolve_data_config(pretrained_cfg=get_pretrained_cfg("deit_small_patch16_224").to_dict())


def photo_like(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    """Smooth colour fields with fine noise: JPEG sizes near a photo's (~50-100 KB at q90)."""
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 10, size=(h, w, 3))
    return Image.fromarray((field + noise).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / f"class{i % CLASSES}"
        d.mkdir(exist_ok=True)
        photo_like(rng).save(d / f"{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def cache_dir(folder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    make_loader(str(folder), DEIT_S, BATCH, workers=WORKERS, cache_dir=path, progress=False)
    return path


def read_all(loader, normalize: bool) -> int:
    """Images in the loader; cached uint8 batches are normalised if ``normalize``."""
    to_float, n = device_transform(loader, reuse_output=True), 0  # as evaluate_accuracy
    for images, _, _ in loader:
        if normalize and to_float is not None:
            images = to_float(images)
        n += images.shape[0]
    return n


@pytest.mark.parametrize(
    ("source", "workers"),
    [("jpeg", WORKERS), ("cache", WORKERS), ("cache+normalize", WORKERS)],
)
def test_loader_images_per_second(benchmark, folder, cache_dir, source, workers):
    benchmark.group = f"accuracy loader, {N_IMAGES} 500x375 JPEGs, DeiT-S transform"
    kwargs = {"cache_dir": cache_dir} if source.startswith("cache") else {}
    loader, _ = make_loader(str(folder), DEIT_S, BATCH, workers=workers, progress=False, **kwargs)
    assert (device_transform(loader) is not None) == source.startswith("cache")
    normalize = source == "cache+normalize"
    n = benchmark.pedantic(read_all, args=(loader, normalize), rounds=2, iterations=1)
    assert n == N_IMAGES
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["images_per_s"] = N_IMAGES / seconds
    print(f"\n{source} ({loader.num_workers} workers): {N_IMAGES / seconds:.0f} images/s")
