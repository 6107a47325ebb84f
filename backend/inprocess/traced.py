"""The plain-torch modules that are traced: text encoder, UNet and VAE encoder as tensor-in, tensor-out graphs.

compile_scripts/compile.py traces them (for Neuron, or for the CPU with --target cpu) and frozen.py traces the
UNet the same way for --optimize trace, so a traced graph and the code that calls it cannot drift apart. The VAE
decoder and post_quant_conv are traced as diffusers' own modules, which already return a tensor.
"""

from __future__ import annotations

import torch
from torch import nn


class UNetWrap(nn.Module):
    """The traced UNet: (sample, timestep[batch], encoder_hidden_states) -> the predicted sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """A plain tensor out: traced graphs cannot return UNet2DConditionOutput."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoderWrap(nn.Module):
    """The traced VAE encoder: an image (batch, 3, H, W) in [-1, 1] -> the moments (batch, 2 x latent channels,
    H/8, W/8), the encoder followed by quant_conv, as AutoencoderKL._encode computes them (diffusers 0.42)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The mean and log-variance, stacked on dim 1, which DiagonalGaussianDistribution splits."""
        moments = self.encoder(image)
        return moments if self.quant_conv is None else self.quant_conv(moments)


class TextEncoderWrap(nn.Module):
    """The traced text encoder: input_ids (1, 77) -> last_hidden_state (1, 77, hidden)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Only last_hidden_state: the pipeline uses nothing else and a tensor traces most simply."""
        return self.text_encoder(input_ids, return_dict=False)[0]
