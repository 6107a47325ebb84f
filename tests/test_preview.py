"""The latent preview's projection: shapes, the coefficients' colours, the noise scale."""

import numpy as np
import pytest
import torch

from backend.preview import LATENT_RGB_FACTORS, latents_to_rgb, preview_images


def test_zero_latents_are_mid_grey_and_each_channel_adds_its_row():
    latents = torch.zeros(5, 4, 2, 3)
    for channel in range(4):
        latents[channel + 1, channel] = 1.0
    pixels = latents_to_rgb(latents)
    assert pixels.shape == (5, 2, 3, 3) and pixels.dtype == np.uint8
    assert (pixels[0] == 128).all()  # (0 + 1) * 127.5, rounded
    for channel, row in enumerate(LATENT_RGB_FACTORS):
        expected = np.round((np.array(row) + 1.0) * 127.5)
        assert (pixels[channel + 1] == expected).all(), channel


def test_out_of_range_clamps_and_noise_scale_divides():
    big = torch.full((1, 4, 1, 1), 20.0)
    assert latents_to_rgb(big).min() in (0, 255)  # saturated, not wrapped around
    scaled = latents_to_rgb(big, noise_scale=20.0)
    assert (scaled == latents_to_rgb(torch.ones(1, 4, 1, 1))).all()


def test_bf16_latents_and_pil_images():
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    images = preview_images(latents)
    assert [im.size for im in images] == [(16, 8), (16, 8)] and images[0].mode == "RGB"
    assert np.asarray(images[1]).std() > 5  # random latents give a varied picture, not a flat one


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 3, 8, 8), (1, 9, 8, 8)])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"expected \(batch, 4, h, w\)"):
        latents_to_rgb(torch.zeros(shape))
