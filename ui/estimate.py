"""What a generation will take, said beside Generate before anyone waits for it.

From the backend's own measurement: the local backend's warm-up at start-up (two steps at 512x512, the first request's
shapes), then each text-to-image generation's stages on this page. On a ZeroGPU Space, the GPU time a request reserves
from the visitor's daily quota instead (inprocess/zerogpu.py). A backend with neither (neuron, sagemaker) gets no line:
its latency panel and the walk-through's table say it.
"""

from __future__ import annotations

import statistics
from typing import Any

from backend import Backend, GenerationRequest
from backend.core.api import BASE_PIXELS


def duration_text(seconds: float) -> str:
    """A duration as people say it: 0.4 s, 12 s, 2 min 10 s."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def measured_figures(timings: dict[str, Any] | None, width: int, height: int,
                     images: int) -> tuple[float, float, float] | None:
    """(ms a step for one image at 512x512, ms of the rest per image at 512x512, ms of the text encoder) from one
    generation's timings (Timings.to_dict()) at a size and number of images; None without steps."""
    steps = (timings or {}).get("step_ms") or []
    if not steps:
        return None
    # The first step after a start can include tracing a new shape (--optimize trace): the median of the others (the
    # warm-up's two steps: the second).
    step_ms = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
    scale = (width * height / BASE_PIXELS) * images
    return (step_ms / scale, max(0.0, float(timings.get("vae_ms", 0.0))) / scale,
            float(timings.get("text_encoder_ms", 0.0)))


def figures_of(backend: Backend, details: dict[str, Any] | None) -> tuple[tuple[float, float, float] | None, bool]:
    """The latest measurement: this page's last text-to-image generation (one pass), else the start-up warm-up; and
    whether it is the warm-up's."""
    if details and details.get("mode") == "txt2img" and not details.get("hires") and details.get("size"):
        width, height = (int(v) for v in str(details["size"]).split("x"))
        figures = measured_figures(details.get("timings"), width, height, len(details.get("seeds") or [1]))
        if figures is not None:
            return figures, False
    warm_up = getattr(backend, "warm_up_timings", None)
    return (measured_figures(warm_up.to_dict(), 512, 512, 1) if warm_up is not None else None), True


def estimate_note(backend: Backend, steps: Any, width: Any, height: Any, num_images: Any,
                  details: dict[str, Any] | None = None, hires: Any = False, hr_scale: Any = 1.0,
                  hr_steps: Any = 0) -> str:
    """The line beside Generate for these controls (and text to image's Hires fix, when on): the measured estimate,
    ZeroGPU's reservation, or nothing."""
    try:
        steps, width, height, num_images = int(steps), int(width), int(height), int(num_images)
        scale = float(hr_scale) if hires and hr_scale not in (None, "") else 1.0
        request = GenerationRequest("estimate", steps=steps, width=width, height=height, num_images=num_images,
                                    hr_scale=scale, hr_steps=int(hr_steps or 0))
        out_w, out_h = request.output_size
    except (TypeError, ValueError):
        return ""
    what = f"{num_images} image(s) at {steps} steps, {width}x{height}" + (
        f", then {request.hires_steps_run} at {out_w}x{out_h}" if request.hires else "")
    gpu_seconds = getattr(backend, "gpu_seconds", None)
    if gpu_seconds is not None:
        return (f"Reserves up to **{duration_text(gpu_seconds(request))}** of GPU time from your daily ZeroGPU quota "
                f"({what}): that much must be left; the time the images take is what is charged.")
    figures, at_start = figures_of(backend, details)
    if figures is None:
        return ""
    step_ms, rest_ms, text_ms = figures
    pixel_steps = steps * width * height + request.hires_steps_run * out_w * out_h
    total = duration_text((text_ms + (step_ms * pixel_steps + rest_ms * out_w * out_h) / BASE_PIXELS * num_images)
                          / 1000.0)
    device = backend.capabilities().device
    step = duration_text(step_ms / 1000.0)
    if at_start:  # the warm-up's steps still include compiling (TorchScript optimises over the first runs)
        return (f"Up to about **{total}** here for {what} ({step} a step at 512x512 on this {device}, measured at "
                f"start-up; the first generation here tells better, and this line follows it).")
    return (f"About **{total}** here for {what} ({step} a step at 512x512 on this {device}, measured by the last "
            f"generation).")
