"""A1111-style infotext in PNG text chunks: the `parameters` chunk that SD tools read.

Layout (as AUTOMATIC1111 writes it, and as its readers, Civitai and most metadata viewers parse it):

    a lovely cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: tiny, ...

Image to image and inpaint add A1111's own keys, `Denoising strength: 0.75` and (inpaint)
`Mask blur: 4`, and one of this app's: `Mode: img2img` (A1111 has no key for the mode; it tells its
tabs apart by what else is there). Text to image writes no Mode key, so its infotext is A1111's; with the
hires fix it adds A1111's `Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent`
(Size stays the first pass's, as A1111 writes it).

A value holding a comma, a colon, a quote or a newline is written as a JSON string, as A1111 does.
Like A1111, a prompt one of whose lines itself starts with "Negative prompt:" cannot be told apart
from a negative prompt; `write_infotext` is exact for every other prompt.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from typing import Any

from PIL import Image, PngImagePlugin

from .api import HR_UPSCALER_LABELS, GenerationRequest
from .schedulers import SCHEDULERS

KEY = "parameters"
NEGATIVE = "Negative prompt:"
# A1111's own pattern for "Key: value" pairs on the last line.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n\r') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def write_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Format prompt, negative prompt and the ordered `params` as an A1111 infotext."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


# A1111's spelling of the keys other savers write in another case ("CFG Scale", "steps"): matched
# case-insensitively, so that no setting is dropped for its case.
CANONICAL_KEYS = {key.lower(): key for key in (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Model hash", "Denoising strength",
    "Mask blur", "Clip skip", "VAE", "Hires upscale", "Hires steps", "Hires upscaler", "Variation seed",
    "Variation seed strength", "Version")}


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse an infotext into {"prompt", "negative_prompt", "params": {key: str}}."""
    lines = text.split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    found = _PARAM.findall(last)
    # The last line is the parameters only if it holds at least three "Key: value" pairs: A1111's own rule
    # (modules/infotext_utils.py, parse_generation_parameters), which also reads an infotext that is only that
    # line (A1111 writes no prompt line for an empty prompt).
    if found and len(found) >= 3:
        params = {CANONICAL_KEYS.get(k.strip().lower(), k.strip()): _unquote(v.strip()) for k, v in found}
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):]
            line = line[1:] if line.startswith(" ") else line
        (negative_lines if in_negative else prompt_lines).append(line)
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines), "params": params}


def infotext_for(request: GenerationRequest, seed: int, model: str, backend: str,
                 latency_ms: float | None) -> str:
    """The A1111-style infotext of one image."""
    params = {
        "Steps": request.steps,
        "Sampler": SCHEDULERS.get(request.scheduler, request.scheduler),
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
        "Mode": None if request.mode == "txt2img" else request.mode,
        # str() of the float, as A1111 writes it (0.75, 1.0).
        "Denoising strength": None if request.mode == "txt2img" else str(round(float(request.strength), 4)),
        "Mask blur": request.mask_blur if request.mode == "inpaint" else None,
        # The hires fix as A1111 writes it (modules/processing.py): Size stays the first pass's, "Hires upscale" is
        # the scale, "Hires steps" only when set, "Hires upscaler" the upscaler's label, and "Denoising strength"
        # the hires pass's.
        **(_hires_params(request) if request.hires else {}),
        "Precision": request.precision,
        "Backend": backend,
        "Latency": None if latency_ms is None else f"{latency_ms:.0f} ms",
    }
    return write_infotext(request.prompt, request.negative_prompt, params)


def _hires_params(request: GenerationRequest) -> dict[str, Any]:
    return {"Denoising strength": str(round(float(request.denoising_strength), 4)),
            "Hires upscale": str(round(float(request.hr_scale), 4)),  # str() of the float, as A1111 writes hr_scale
            "Hires steps": request.hr_steps or None,
            "Hires upscaler": HR_UPSCALER_LABELS.get(request.hr_upscaler, request.hr_upscaler)}


def label_images(images: list[Any], request: GenerationRequest, seeds: list[int], model: str,
                 backend: str, latency_ms: float | None) -> list[Any]:
    """Attach each image's infotext."""
    return [attach(img, infotext_for(request, s, model, backend, latency_ms)) for img, s in zip(images, seeds)]


def attach(image: Image.Image, infotext: str) -> Image.Image:
    """Keep the infotext on the PIL image, where `png_bytes` and gradio's PNG writer find it."""
    image.info[KEY] = infotext
    return image


def pnginfo(infotext: str) -> PngImagePlugin.PngInfo:
    """A PngInfo with the `parameters` chunk (iTXt when the text is not Latin-1)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, infotext)
    return info


def png_bytes(image: Image.Image, compress_level: int = 0) -> bytes:
    """Encode as PNG carrying the image's infotext in its `parameters` chunk.

    Level 0 (the default) writes 8-bit RGB/RGBA scanlines unfiltered and stored, several times
    faster than Pillow at level 0 (which still runs its adaptive row filters). The file is larger,
    which costs nothing on loopback or a LAN; pass 1-9 to trade time for size on slow links.
    Figures: docs/benchmarks.md.
    """
    infotext = image.info.get(KEY, "")
    if compress_level == 0 and image.mode in ("RGB", "RGBA"):
        return _stored_png(image, infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo(infotext), compress_level=compress_level)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _stored_png(image: Image.Image, infotext: str) -> bytes:
    import numpy as np

    pixels = np.asarray(image)
    height, width, channels = pixels.shape
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None on every scanline
    rows[:, 1:] = pixels.reshape(height, -1)
    colour_type = 2 if channels == 3 else 6
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    try:  # Latin-1 fits tEXt; anything else goes in iTXt as UTF-8, as Pillow and A1111 do.
        text = _chunk(b"tEXt", KEY.encode() + b"\0" + infotext.encode("latin-1"))
    except UnicodeEncodeError:
        text = _chunk(b"iTXt", KEY.encode() + b"\0\0\0\0\0" + infotext.encode("utf-8"))
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", header),
        text if infotext else b"",
        _chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)),
        _chunk(b"IEND", b""),
    ))


def read_infotext(png: bytes | str | Any) -> str:
    """The `parameters` text of a PNG (bytes, a path, or an open PIL image); '' if none."""
    if isinstance(png, (bytes, bytearray)):
        png = Image.open(io.BytesIO(png))
    elif isinstance(png, str):
        with Image.open(png) as img:
            img.load()
            return img.info.get(KEY, "") or getattr(img, "text", {}).get(KEY, "")
    png.load()
    return png.info.get(KEY, "") or getattr(png, "text", {}).get(KEY, "")
