"""The demo's model, trained here: ``vit_digits_patch4_32`` trained on the digits with a fixed
recipe (about 50 s on a 2-core CPU), cached under the user cache folder, keyed by everything the
weights depend on. A second process that wants it while one trains waits for it and reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ppt_bench.core.atomic import locked
from ppt_bench.core.defaults import cache_root
from ppt_bench.data.digits import MEAN, SPLIT_SEED, STD, TEST_SIZE, UPSCALE, digits_dataset
from ppt_bench.engine.train import AFFINE, TrainConfig, save_checkpoint, train
from ppt_bench.models.digits import ARCH, MODEL_NAME, POS_EMBED_STD

_logger = logging.getLogger(__name__)

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


def train_config() -> TrainConfig:
    """The recipe that trains ``vit_digits_patch4_32`` on the digits (CPU, seeded)."""
    return TrainConfig(**RECIPE)


def config_hash(config: TrainConfig | None = None) -> str:
    """12 hex digits identifying what the cached weights depend on.

    The recipe, the architecture, the data (upscaling, split) and the torch, timm and
    scikit-learn versions: a change to any of them trains a new checkpoint.
    """
    import sklearn  # imported here: seconds to import, and only this hash needs its version

    blob = {
        "recipe": asdict(config or train_config()),
        "affine": AFFINE,
        "recipe_version": RECIPE_VERSION,
        "arch": ARCH,
        "pos_embed_std": POS_EMBED_STD,
        "data": {"upscale": UPSCALE.name, "test_size": TEST_SIZE, "split_seed": SPLIT_SEED},
        "mean": MEAN,
        "std": STD,
        "versions": [torch.__version__, timm.__version__, sklearn.__version__],
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def default_checkpoint_path() -> Path:
    """Where the digits model trained with the current recipe is cached."""
    return cache_root() / f"{MODEL_NAME}-{config_hash()}.pth"


def create_model() -> nn.Module:
    """An untrained ``vit_digits_patch4_32`` (seeded, so every fresh model starts the same)."""
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
    path = default_checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A second process that wants the model while one trains it waits, then reads it.
    with locked(path.with_name(path.name + ".lock")):
        loaded = None if retrain else _load(path)
        if loaded is not None:
            model, top1 = loaded
            return model, path, top1
        model, top1, meta = _train_fresh(progress)
        save_checkpoint({"model": model.state_dict(), "test_top1": top1, **meta}, path)
    return model, path, top1
