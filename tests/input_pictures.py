"""Input pictures for the image-to-image and inpainting tests of the endpoint: what a client sends."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """An RGB picture with detail everywhere (so a wrong crop, resize or paste changes pixels)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def centred_mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) in the middle half of each side, black (keep) around it."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """The picture as a PNG or JPEG file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    """The picture as base64 text of a PNG or JPEG file, as the wire carries it."""
    return base64.b64encode(encoded(image, fmt)).decode("ascii")
