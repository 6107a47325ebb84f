"""Live preview: the latents of a running generation as a small picture, without the VAE.

Stable Diffusion's 4 latent channels are close to a linear function of the colour they decode to,
so one 4-by-3 matrix turns a latent pixel into an RGB one. That costs a few microseconds per image
on any device (the VAE decoder costs as much as several UNet steps), which is why SD UIs use it for
their step-by-step previews. The picture is at latent resolution (1/8 of the image's side); the
browser scales it up.

The coefficients are ComfyUI's `latent_rgb_factors` of its SD15 latent format (comfy/latent_formats.py),
which ComfyUI also uses for SD2.x models (comfy/supported_models.py, class SD20: latent_format =
latent_formats.SD15): SD2.x kept SD1's KL-f8 autoencoder and its latent space (scaling factor 0.18215).
They apply to latents in the UNet's space (scaled by that factor), which is what a diffusers pipeline
holds between steps; the result maps [-1, 1] to [0, 255] as the decoder's output does.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..core.api import PREVIEW_INTERVAL_S

LATENT_CHANNELS = 4
# Rows: latent channels 0-3; columns: R, G, B.
LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latents_to_rgb(latents: Any, noise_scale: float = 1.0) -> Any:
    """(batch, 4, h, w) latents -> (batch, h, w, 3) uint8 pixels, as a numpy array.

    noise_scale: what the scheduler multiplied its latents by (its current sqrt(sigma^2 + 1) for
    Euler-style schedulers, whose latents start at ~14.6 times the unit scale; 1 for the others):
    dividing by it brings them back to the range the coefficients are for.
    """
    import torch

    if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"latent preview: expected (batch, {LATENT_CHANNELS}, h, w) latents, got "
                         f"{tuple(latents.shape)}")
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    with torch.inference_mode():
        x = latents.detach().to("cpu", torch.float32) / noise_scale
        rgb = torch.einsum("bchw,cr->bhwr", x, factors)
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.numpy()


def preview_images(latents: Any, noise_scale: float = 1.0) -> list[Any]:
    """One small PIL image per latent in the batch."""
    from PIL import Image

    return [Image.fromarray(array, "RGB") for array in latents_to_rgb(latents, noise_scale)]


def noise_scale(scheduler: Any) -> float:
    """What the scheduler's current latents are scaled by: sqrt(sigma^2 + 1) for the schedulers that
    work in sigma space (Euler, Euler a: init_noise_sigma > 1, latents start at ~14.6), else 1."""
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) <= 1.0:
        return 1.0
    index = getattr(scheduler, "step_index", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if index is None or sigmas is None or index >= len(sigmas):
        return 1.0
    return float((float(sigmas[index]) ** 2 + 1.0) ** 0.5)


class PreviewPacer:
    """After which denoising steps a preview is made.

    wanted: the caller's own pacing (api.preview_wanted: the app's handler, which knows when it will show the next
    preview): where given, a preview is made only when it says one is wanted, so none is made to be dropped.
    every=N: after steps N, 2N, ... (never after the last, whose image the decoder makes anyway), and, with
    `wanted`, only those of them it wants.
    every=None (auto): as `wanted` says; without it, whenever the previews so far plus one more (at the last one's
    cost) stay within `budget` of the denoising time so far, so they cost at most ~5% on whatever backend runs
    them; the first is made after step 1 and measured. The cost counted is this process's: projecting, making
    the picture and handing it to the callback.
    """

    def __init__(self, every: int | None = None, budget: float = 0.05, wanted: Callable[[], bool] | None = None):
        if every is not None and every < 1:
            raise ValueError(f"preview every {every} steps: use 1 or more, or None for auto")
        self.every = every
        self.budget = budget
        self.wanted = wanted
        self.spent_ms = 0.0
        self.last_ms = 0.0
        self.count = 0

    def due(self, step: int, total: int, elapsed_ms: float) -> bool:
        """Whether to make a preview after `step` of `total`, `elapsed_ms` into the denoising."""
        if step >= total:
            return False
        if self.every is not None:
            return step % self.every == 0 and (self.wanted is None or self.wanted())
        if self.wanted is not None:
            return self.wanted()
        return self.count == 0 or self.spent_ms + self.last_ms <= self.budget * elapsed_ms

    def record(self, cost_ms: float) -> None:
        """Count a preview that was made and what it cost."""
        self.count += 1
        self.last_ms = cost_ms
        self.spent_ms += cost_ms


class IntervalPaced:
    """A preview callback paced by time alone, for where the one that shows previews cannot be asked (ZeroGPU's
    forked worker, across the fork from the app's handler): wanted() after one interval, and one interval after
    each preview handed on; `sink` gets the previews made."""

    def __init__(self, sink: Callable[[int, int, list[Any]], None], interval_s: float = PREVIEW_INTERVAL_S):
        self.sink = sink
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s

    def wanted(self) -> bool:
        """Whether a preview made now would be on time."""
        return time.monotonic() >= self._next

    def __call__(self, step: int, total: int, images: list[Any]) -> None:
        self._next = time.monotonic() + self.interval_s
        self.sink(step, total, images)
