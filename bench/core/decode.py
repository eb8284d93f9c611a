"""Image decoding: the one place every image the project reads is opened.

A loader's batch is a :data:`Batch`: ``(images [B, 3, H, W] | None, labels [B] | None,
unreadable int)``, the readable images of the batch and how many could not be decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

# What PIL raises for a file it cannot decode (truncated, not an image, absurdly large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Batch = tuple[torch.Tensor | None, torch.Tensor | None, int]


def decode_image(path: str) -> Image.Image:
    """Decode one image file as RGB (:func:`to_rgb`)."""
    with open(path, "rb") as f:
        return to_rgb(Image.open(f))


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of the same colours as ``image``, whatever its mode.

    PIL's own conversion clips a 16-bit grey image (``I;16``, ``I;16B``; ``I`` as PIL reads one
    too) at 255, which makes it almost white: its values are scaled to 8 bits instead
    (``value / 257``, rounded). Palette, grey with alpha, CMYK and 1-bit images convert as PIL
    converts them (alpha dropped, as from RGBA).

    Raises:
        ValueError: a floating-point image (mode ``F``, no fixed range of values), or an integer
            one with values outside 0 to 65535: unreadable.
    """
    if image.mode == "F":
        raise ValueError(
            "a floating-point image (mode F) has no fixed range of values: save it with 8 or 16 "
            "bits per channel"
        )
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)  # [H, W]
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(
                f"a {image.mode} image with values from {low} to {high}, outside the 16-bit "
                "range 0 to 65535"
            )
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    return image.convert("RGB")


def load_sample(path: str, transform: Callable | None = None) -> Any:
    """The decoded, transformed image at ``path``, or None (with a warning) if it cannot be
    decoded."""
    try:
        image = decode_image(path)
    except DECODE_ERRORS as err:
        _logger.warning("skipping unreadable image %s (%s)", path, err)
        return None
    return image if transform is None else transform(image)
