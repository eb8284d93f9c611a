"""The embedded default: scikit-learn's handwritten digits and a small ViT trained on them.

With no ImageNet and no internet the harness still measures accuracy on real images: the 1,797
8x8 digits that ship with scikit-learn, upscaled to 32x32 RGB and split once (stratified, fixed
seed) into 1,437 training and 360 test images. :func:`digits_dataset` returns them like a
torchvision ``ImageFolder`` (PIL images, ``.classes``, ``.targets``), so the accuracy code path
is the one used for ImageNet.

The model, ``vit_digits_patch4_32``, is a timm ``VisionTransformer`` registered with timm (import
this module, then ``timm.create_model("vit_digits_patch4_32")``): 32x32 input, 4x4 patches
(64 patch tokens and a class token), 12 blocks so that reductions at blocks 3, 6 and 9 and
in every block all make sense. :func:`load_or_train` trains it with :mod:`ppt_bench.train` on
first use and caches the weights under the user cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ppt_bench.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from ppt_bench.train import TrainConfig

_logger = logging.getLogger(__name__)

MODEL_NAME = "vit_digits_patch4_32"
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
# Bump when the data or the training recipe changes in a way the config hash cannot see.
RECIPE_VERSION = 1
# The training recipe (TrainConfig fields): about 50 s on a 2-core CPU, 97.8% test top-1.
RECIPE: dict[str, Any] = dict(
    epochs=15,
    lr=1.5e-3,
    weight_decay=0.05,
    batch_size=32,
    warmup_epochs=1.0,
    smoothing=0.1,
    seed=0,
    workers=0,
    amp_dtype="fp32",
    device="cpu",
    augment="affine",
    clip_grad=None,
    eval_every=5,
)

_ARCH = dict(
    img_size=IMG_SIZE,
    patch_size=4,
    embed_dim=64,
    depth=12,
    num_heads=4,
    mlp_ratio=2.0,
    num_classes=len(CLASSES),
)
POS_EMBED_STD = 1.0  # see vit_digits_patch4_32

default_cfgs = generate_default_cfgs(
    {
        MODEL_NAME: {
            "url": "",
            "num_classes": len(CLASSES),
            "input_size": (3, IMG_SIZE, IMG_SIZE),
            "pool_size": None,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "interpolation": "bicubic",
            "mean": MEAN,
            "std": STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
    }
)


@register_model
def vit_digits_patch4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 32x32 digits: patch 4 (65 tokens), depth 12, dim 64, 4 heads, MLP ratio 2.

    There are no hosted weights: :func:`load_or_train` trains them locally and caches them.
    """
    if pretrained:
        raise UserError(
            f"{MODEL_NAME} has no downloadable weights: ppt_bench.digits.load_or_train() trains "
            "and caches them (`ppt-bench demo`), then pass that file with --checkpoint"
        )
    model = build_model_with_cfg(VisionTransformer, MODEL_NAME, pretrained, **{**_ARCH, **kwargs})
    # timm draws position embeddings with std 0.02, which the patch content drowns out: on 1,437
    # images attention then learns to use positions only after many epochs. Unit scale makes
    # positions distinct from the first step (about 3x faster training here).
    with torch.no_grad():
        model.pos_embed.normal_(std=POS_EMBED_STD)
    return model


# -- data ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For ``train`` and ``test``: upscaled uint8 images ``[n, 32, 32]``, labels ``[n]`` and
    the indices ``[n]`` of the images in ``sklearn.datasets.load_digits()``."""
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


# -- the trained model -----------------------------------------------------------------------


def train_config() -> TrainConfig:
    """The recipe that trains ``vit_digits_patch4_32`` on the digits (CPU, seeded)."""
    from ppt_bench.train import TrainConfig

    return TrainConfig(**RECIPE)


def config_hash(config: TrainConfig | None = None) -> str:
    """12 hex digits identifying what the cached weights depend on.

    The recipe, the architecture, the data (upscaling, split) and the torch, timm and
    scikit-learn versions: a change to any of them trains a new checkpoint.
    """
    import sklearn
    import timm

    from ppt_bench.train import AFFINE

    blob = {
        "recipe": asdict(config or train_config()),
        "affine": AFFINE,
        "recipe_version": RECIPE_VERSION,
        "arch": _ARCH,
        "pos_embed_std": POS_EMBED_STD,
        "data": {"upscale": UPSCALE.name, "test_size": TEST_SIZE, "split_seed": SPLIT_SEED},
        "mean": MEAN,
        "std": STD,
        "versions": [torch.__version__, timm.__version__, sklearn.__version__],
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ppt-bench`` (``~/.cache/ppt-bench`` when the variable is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ppt-bench"


def default_checkpoint_path() -> Path:
    """Where the digits model trained with the current recipe is cached."""
    return cache_dir() / f"{MODEL_NAME}-{config_hash()}.pth"


def create_model() -> nn.Module:
    """An untrained ``vit_digits_patch4_32`` (seeded, so every fresh model starts the same)."""
    import timm

    torch.manual_seed(RECIPE["seed"])
    return timm.create_model(MODEL_NAME, pretrained=False)


def _load(path: Path) -> tuple[nn.Module, float] | None:
    """The cached model and its test top-1, or None if the file is missing or unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = create_model()
        model.load_state_dict(ckpt["model"])
        return model.eval(), float(ckpt["test_top1"])
    except FileNotFoundError:
        return None
    except Exception as err:  # a truncated or foreign file: train again rather than fail
        _logger.warning("ignoring unreadable cached checkpoint %s (%s)", path, err)
        return None


def _train_fresh(progress: bool) -> tuple[nn.Module, float, dict[str, Any]]:
    from ppt_bench.train import train

    config = train_config()
    result = train(
        create_model(), digits_dataset("train"), digits_dataset("test"), config, progress=progress
    )
    meta = {
        "config": asdict(config),
        "config_hash": config_hash(config),
        "train_time_s": result.train_time_s,
        "n_train": len(digits_dataset("train")),
        "n_test": len(digits_dataset("test")),
    }
    return result.model, float(result.val_top1 or 0.0), meta


def load_or_train(retrain: bool = False, progress: bool = True) -> tuple[nn.Module, Path, float]:
    """The trained digits model: loaded from the cache, or trained and cached on first use.

    Args:
        retrain: train again even if a cached checkpoint exists (and replace it).
        progress: show the training progress bar.

    Returns:
        ``(model, checkpoint_path, test_top1)``: the model in eval mode on the CPU, the cached
        file (also loadable with ``--checkpoint``), and its top-1 [%] on the 360 test images.
    """
    from ppt_bench.train import save_checkpoint

    path = default_checkpoint_path()
    loaded = None if retrain else _load(path)
    if loaded is not None:
        model, top1 = loaded
        return model, path, top1
    model, top1, meta = _train_fresh(progress)
    save_checkpoint({"model": model.state_dict(), "test_top1": top1, **meta}, path)
    return model, path, top1
