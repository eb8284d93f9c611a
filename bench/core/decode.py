"""Image decoding: the one place every image the project reads is opened.

A loader's batch is a :data:`Batch`: ``(images [B, 3, H, W] | None, labels [B] | None,
unreadable int)``, the readable images of the batch and how many could not be decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

_logger = logging.getLogger(__name__)

# What PIL raises for a file it cannot decode (truncated, not an image, absurdly large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor | None, torch.Tensor | None, int]


def decode_image(path: str) -> Image.Image:
    """Decode one image file as RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def load_sample(path: str, transform: Callable | None = None) -> Any:
    """The decoded, transformed image at ``path``, or None (with a warning) if it cannot be
    decoded."""
    try:
        image = decode_image(path)
    except DECODE_ERRORS as err:
        _logger.warning("skipping unreadable image %s (%s)", path, err)
        return None
    return image if transform is None else transform(image)
