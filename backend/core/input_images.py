"""Input pictures of image to image and inpainting: decoded safely, then fitted to the generation size.

One job: turn what a person or a client sent (PNG/JPEG bytes, base64 text or a PIL image) into an
RGB image of exactly width x height, and a mask into a single-channel picture of the same size, or
raise InvalidRequest naming the field. api.GenerationRequest.validated calls it, so every backend
receives the same prepared pictures (and the pixels kept outside an inpaint mask are these).

Resize modes, after AUTOMATIC1111's ("Crop and resize" is its default for img2img and ours):
  crop: scale to cover the size, then cut the overflow evenly (no distortion, edges may be lost);
  pad:  scale to fit inside the size, then fill the bands by stretching the edge pixels outward
        (A1111's "Resize and fill" does this too), so no black bars leak into the generation;
  stretch: scale to the size exactly (A1111's "Just resize"; distorts a different aspect ratio).
A mask is fitted the same way as its image, so the two stay aligned.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from .errors import InvalidRequest

RESIZE_MODES = ("crop", "pad", "stretch")
DEFAULT_RESIZE_MODE = "crop"
# Decompression bombs: a small PNG can declare a huge canvas. PIL only warns below 2x its own limit
# (about 89 MP), so this limit is checked on the header before any pixel is decoded. 4096x4096 is
# well beyond what a person would send to make a 512x512 picture.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_INPUT_BYTES = 20 * 1024 * 1024  # the app's own upload path; the endpoint has SageMaker's 6 MB cap
FORMATS = ("PNG", "JPEG", "WEBP")


def load_picture(name: str, value: Any) -> Any:
    """A PIL image from bytes, base64 text or a PIL image within the pixel limit; else InvalidRequest on `name`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        _check_pixels(name, value.width, value.height)
        return value
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{name}: is not base64 text of a PNG or JPEG file; send the file's bytes "
                                 f"base64-encoded.", name) from None
    if not isinstance(value, (bytes, bytearray)):
        raise InvalidRequest(f"{name}: must be a PNG or JPEG image, not {type(value).__name__}.", name)
    if not value:
        raise InvalidRequest(f"{name}: is empty; send a PNG or JPEG image.", name)
    if len(value) > MAX_INPUT_BYTES:
        raise InvalidRequest(f"{name}: {len(value) / 1e6:.1f} MB is too large; send at most "
                             f"{MAX_INPUT_BYTES / 1e6:.0f} MB.", name)
    try:
        image = Image.open(io.BytesIO(value), formats=FORMATS)
        _check_pixels(name, image.width, image.height)
        image.load()  # decodes now: a truncated or corrupt file fails here, not inside a pipeline
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise InvalidRequest(f"{name}: is not a PNG, JPEG or WebP image (the file cannot be read as one).",
                             name) from None
    except (OSError, SyntaxError, ValueError, EOFError):  # PIL's errors for truncated and corrupt data
        raise InvalidRequest(f"{name}: the image file is corrupt or truncated; send the whole file again.",
                             name) from None
    return image


def _check_pixels(name: str, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise InvalidRequest(f"{name}: the image has no pixels ({width}x{height}).", name)
    if width * height > MAX_INPUT_PIXELS:
        raise InvalidRequest(f"{name}: {width}x{height} is too large; send at most {MAX_INPUT_PIXELS // 10**6} "
                             f"megapixels (for example 4096x4096), ideally the generation size.", name)


def fit_image(image: Any, width: int, height: int, resize_mode: str) -> Any:
    """`image` as RGB of exactly width x height, fitted by resize_mode (see the module docstring)."""
    from PIL import Image

    image = _flatten(image)
    if image.size == (width, height):
        return image
    return _fit(image, width, height, resize_mode, Image.Resampling.LANCZOS)


def fit_mask(mask: Any, image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> Any:
    """A mask as 'L' (white: repaint) of width x height; it must be the input image's size or its aspect ratio."""
    from PIL import Image

    if mask.size != image_size:
        mw, mh = mask.size
        iw, ih = image_size
        if abs(mw * ih - mh * iw) > max(mw, iw):  # the same aspect ratio to within a pixel
            raise InvalidRequest(f"mask: {mw}x{mh} does not match the image's {iw}x{ih}; send a mask of the "
                                 f"image's size (or the same aspect ratio).", "mask")
    mask = _mask_channel(mask)
    if mask.getextrema()[1] == 0:
        raise InvalidRequest("mask: is empty (all black); paint the area to repaint in white.", "mask")
    if mask.size != (width, height):
        mask = _fit(mask.resize(image_size, Image.Resampling.NEAREST) if mask.size != image_size else mask,
                    width, height, resize_mode, Image.Resampling.NEAREST, pad_fill=0)
    return mask


def _mask_channel(mask: Any) -> Any:
    # An editor's layer is transparent where nothing was painted: its alpha is the mask. An uploaded
    # black-and-white picture has no alpha (or an opaque one): its brightness is the mask.
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
        return rgba.convert("L")
    return mask.convert("L")


def _flatten(image: Any) -> Any:
    # Transparent pixels become white, as in a browser's view of the file, not black (RGBA -> RGB drops alpha).
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Any, width: int, height: int, resize_mode: str, resample: Any, pad_fill: int | None = None) -> Any:
    from PIL import Image

    if resize_mode == "stretch":
        return image.resize((width, height), resample)
    iw, ih = image.size
    if resize_mode == "crop":
        scale = max(width / iw, height / ih)
        sw, sh = max(width, round(iw * scale)), max(height, round(ih * scale))
        scaled = image.resize((sw, sh), resample)
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    if resize_mode == "pad":
        scale = min(width / iw, height / ih)
        sw, sh = min(width, max(1, round(iw * scale))), min(height, max(1, round(ih * scale)))
        scaled = image.resize((sw, sh), resample)
        left, top = (width - sw) // 2, (height - sh) // 2
        if pad_fill is not None:  # a mask: nothing to repaint in the bands
            canvas = Image.new(scaled.mode, (width, height), pad_fill)
            canvas.paste(scaled, (left, top))
            return canvas
        # Image bands: stretch the outermost row/column of pixels outward.
        canvas = Image.new(scaled.mode, (width, height))
        canvas.paste(scaled, (left, top))
        right, bottom = width - left - sw, height - top - sh
        if left:
            canvas.paste(scaled.crop((0, 0, 1, sh)).resize((left, sh)), (0, top))
        if right:
            canvas.paste(scaled.crop((sw - 1, 0, sw, sh)).resize((right, sh)), (left + sw, top))
        if top:
            canvas.paste(scaled.crop((0, 0, sw, 1)).resize((sw, top)), (left, 0))
        if bottom:
            canvas.paste(scaled.crop((0, sh - 1, sw, sh)).resize((sw, bottom)), (left, top + sh))
        return canvas
    raise InvalidRequest(f"resize_mode: {resize_mode!r} is not known; choose one of {', '.join(RESIZE_MODES)}.",
                         "resize_mode")
