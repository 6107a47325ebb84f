"""Part names, precisions and image sizes of a compiled root: the vocabulary compile.py, the root format and the
backend share. Light (no torch): compile.py's command line takes its choices from here.
"""

from __future__ import annotations

import re
from typing import Any

# Traced apart, one .pt file each, in the order they are compiled.
PARTS = ("text_encoder", "unet", "vae_decoder", "vae_post_quant_conv", "vae_encoder")
TXT2IMG_PARTS = ("text_encoder", "unet", "vae_decoder", "vae_post_quant_conv")  # what every root must have
IMAGE_PARTS = ("vae_encoder",)  # what image to image and inpainting need on top: the input image to latents
SHARED_PARTS = ("text_encoder",)  # compiled once per dtype, for every size
SIZE_PARTS = ("unet", "vae_decoder", "vae_post_quant_conv", "vae_encoder")  # compiled once per size
VAE_PARTS = ("vae_decoder", "vae_post_quant_conv", "vae_encoder")  # fp32 in a bf16 root by default
NEURON_DTYPES = ("bf16", "fp32")  # the precisions a root can hold, preferred first: bf16 is the faster on Inferentia2
# Sizes a root may be compiled for: a multiple of the VAE's 8, from 64 up to twice the model's native
# size (the UNet's sample_size x 8: 1024 for SD2.1-base, 1536 for SD2.1-768); beyond that SD2.1
# repeats its subject and a 768x768 UNet already needs about 1.5x the device memory of 512x512.
MIN_SIZE = 64
SIZE_MULTIPLE = 8
DEFAULT_SIZE = (512, 512)  # the default size of a root that has it (SD2.1-base's native size)

Size = tuple[int, int]  # (width, height), as the infotext writes sizes: "Size: 512x768" is 512 wide


def size_key(size: Size) -> str:
    """'512x768' for (512, 768): width x height, the folder and manifest key of a size."""
    return f"{size[0]}x{size[1]}"


def parse_size(text: str) -> Size:
    """(width, height) from 'WxH'; ValueError saying how to write one."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"{text.strip()!r} is not a size; write width x height, such as 512x512 or 768x512")
    return int(match.group(1)), int(match.group(2))


def parse_sizes(text: str) -> list[Size]:
    """'512x512,768x512' -> [(512, 512), (768, 512)], in order, without repeats; ValueError naming a bad one."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no size given; write width x height, such as 512x512, several separated by commas")
    sizes = [parse_size(item) for item in items]
    for size in sizes:
        for name, value in zip(("width", "height"), size):
            if value <= 0 or value % SIZE_MULTIPLE:
                raise ValueError(f"{size_key(size)}: the {name} {value} is not a multiple of {SIZE_MULTIPLE} (the "
                                 f"VAE's downsampling factor); use, for example, {_nearest(value)}")
    return list(dict.fromkeys(sizes))


def _nearest(value: int) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def size_range(architecture: dict[str, Any]) -> tuple[int, int]:
    """The smallest and largest width or height a root of this model may be compiled for."""
    native = int(architecture.get("unet_sample_size") or 64) * int(architecture.get("vae_scale_factor") or 8)
    return MIN_SIZE, 2 * native


def check_sizes(sizes: list[Size], architecture: dict[str, Any]) -> None:
    """ValueError naming a size outside the model's range (see size_range)."""
    low, high = size_range(architecture)
    for size in sizes:
        for name, value in zip(("width", "height"), size):
            if not low <= value <= high:
                raise ValueError(f"{size_key(size)}: the {name} {value} is outside this model's range, {low} to "
                                 f"{high} (twice its native size); use a size within it")


def default_size(sizes: list[Size]) -> Size:
    """The size a request without one gets: 512x512 where compiled, else the first."""
    return DEFAULT_SIZE if DEFAULT_SIZE in sizes else sizes[0]
