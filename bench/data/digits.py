"""The embedded default's data: scikit-learn's handwritten digits as a small image data set.

With no ImageNet and no internet the harness still measures accuracy on real images: the 1,797
8x8 digits that ship with scikit-learn, upscaled to 32x32 RGB and split once (stratified, fixed
seed) into 1,437 training and 360 test images. :func:`digits_dataset` returns them like a
torchvision ``ImageFolder`` (PIL images, ``.classes``, ``.targets``), so the accuracy code path
is the one used for ImageNet. The model trained on them is in :mod:`ppt_bench.models.digits`, its
training recipe in :mod:`ppt_bench.engine.demo_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from ppt_bench.core.errors import UserError

IMG_SIZE = 32
CLASSES = [str(i) for i in range(10)]
TEST_SIZE = 360  # of 1,797 images (20%): 35 to 37 per class, stratified
SPLIT_SEED = 0
# Bicubic upscaling gives each 4x4 patch a view of its pixel's neighbourhood (with nearest a
# token is one grey level); it trains several times faster.
UPSCALE = Image.Resampling.BICUBIC
# Per-channel statistics of the training images in [0, 1] (grey, so equal on R, G and B).
MEAN = (0.3094,) * 3
STD = (0.3488,) * 3


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For ``train`` and ``test``: upscaled uint8 images ``[n, 32, 32]``, labels ``[n]`` and
    the indices ``[n]`` of the images in ``sklearn.datasets.load_digits()``."""
    # Imported here: scikit-learn takes seconds to import, and only the digits need it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((IMG_SIZE, IMG_SIZE), UPSCALE)) for im in small]
    )
    train, test = train_test_split(
        np.arange(len(small)),
        test_size=TEST_SIZE,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    return {
        name: (big[idx], digits.target[idx], idx)
        for name, idx in (("train", train), ("test", test))
    }


class DigitsDataset(torch.utils.data.Dataset):
    """One split of the digits as ``(PIL RGB 32x32 image, int label)``, like ``ImageFolder``.

    Attributes:
        classes: ``["0", ..., "9"]``.
        targets: the label of each image, in order.
        indices: where each image is in ``sklearn.datasets.load_digits()``.
        transform: applied to each image, as in torchvision datasets.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        indices: np.ndarray,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.images = images
        self.indices = indices
        self.targets = [int(t) for t in targets]
        self.classes = list(CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(CLASSES)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def digits_dataset(
    split: str = "test", transform: Callable[[Image.Image], Any] | None = None
) -> DigitsDataset:
    """The ``"train"`` (1,437 images) or ``"test"`` (360 images) split of the digits.

    Args:
        split: ``"train"`` or ``"test"``.
        transform: applied to each PIL image (e.g. the model's timm eval transform).
    """
    splits = _split()
    if split not in splits:
        raise UserError(f"digits split must be 'train' or 'test', got {split!r}")
    return DigitsDataset(*splits[split], transform=transform)
