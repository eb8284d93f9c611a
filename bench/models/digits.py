"""The embedded default's model: ``vit_digits_patch4_32``, a timm ``VisionTransformer`` for the
32x32 digits of :mod:`ppt_bench.data.digits`, registered with timm on import (then
``timm.create_model("vit_digits_patch4_32")``): 4x4 patches (64 patch tokens and a class token),
12 blocks so that reductions at blocks 3, 6 and 9 and in every block all make sense. There are no
hosted weights: :func:`ppt_bench.engine.demo_model.load_or_train` trains them and caches them.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ppt_bench.core.errors import UserError
from ppt_bench.data.digits import CLASSES, IMG_SIZE, MEAN, STD

MODEL_NAME = "vit_digits_patch4_32"

ARCH = dict(
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
            f"{MODEL_NAME} has no downloadable weights: "
            "ppt_bench.engine.demo_model.load_or_train() trains and caches them "
            "(`ppt-bench demo`), then pass that file with --checkpoint"
        )
    model = build_model_with_cfg(VisionTransformer, MODEL_NAME, pretrained, **{**ARCH, **kwargs})
    # timm draws position embeddings with std 0.02, which the patch content drowns out: on 1,437
    # images attention then learns to use positions only after many epochs. Unit scale makes
    # positions distinct from the first step (about 3x faster training here).
    with torch.no_grad():
        model.pos_embed.normal_(std=POS_EMBED_STD)
    return model
