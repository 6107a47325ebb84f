"""The inputs each compiled part is traced with (InputSpec: shape and dtype), as the manifest records them.

compile_scripts/compile.py traces each part with part_input_specs' inputs and writes them in the manifest;
root_format.py reads them back, and the run-time adapters (adapters.py) hold a part to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .parts import PARTS, VAE_PARTS

# The timestep goes into the UNet as float32 whatever the model's dtype: bf16 holds integers above
# 256 only to a multiple of 2..8 (999 -> 1000), while eager diffusers embeds the exact timestep.
TIMESTEP_DTYPE = torch.float32


@dataclass(frozen=True)
class InputSpec:
    """The shape and dtype one input of a compiled part was traced with."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        """{"shape": [...], "dtype": "bfloat16"} for the manifest."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InputSpec":
        """Inverse of to_json."""
        return cls(tuple(int(v) for v in data["shape"]), getattr(torch, data["dtype"]))


def part_input_specs(part: str, dtype: torch.dtype, batch: int, latent_height: int, latent_width: int,
                     tokens: int, text_hidden: int, latent_channels: int = 4,
                     timestep_dtype: torch.dtype = TIMESTEP_DTYPE, unet_in_channels: int | None = None,
                     image_channels: int = 3, vae_scale_factor: int = 8) -> list[InputSpec]:
    """The inputs a part is traced with: `batch` is per NeuronCore for the UNet, else per call.

    unet_in_channels: the UNet's sample channels when they are not the latent's (9 for a dedicated
    inpainting UNet, which takes the latents, the mask and the masked image's latents)."""
    latent = (batch, latent_channels, latent_height, latent_width)
    if part == "text_encoder":
        return [InputSpec((batch, tokens), torch.int64)]
    if part == "unet":
        sample = (batch, unet_in_channels or latent_channels, latent_height, latent_width)
        return [InputSpec(sample, dtype), InputSpec((batch,), timestep_dtype),
                InputSpec((batch, tokens, text_hidden), dtype)]
    if part == "vae_encoder":
        return [InputSpec((batch, image_channels, latent_height * vae_scale_factor,
                           latent_width * vae_scale_factor), dtype)]
    if part in VAE_PARTS:
        return [InputSpec(latent, dtype)]
    raise KeyError(f"unknown part {part!r}; parts are {', '.join(PARTS)}")
