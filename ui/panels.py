"""What the banner and the latency panel say: HTML and Markdown from capabilities and timings."""

from __future__ import annotations

import html
from typing import Any

from backend import Backend, Capabilities
from backend.core.api import MODE_LABELS
from backend.core import walkthrough
from backend.models.sd21_random import SD21_RANDOM_ID
from backend.core.stats import LatencyStats

TITLE = "Stable Diffusion on AWS Inferentia2"


def banner_html(backend: Backend) -> str:
    """Backend, device, model, precisions, and the tiny-model warning where it applies."""
    caps = backend.capabilities()
    sizes = (", ".join(f"{w}x{h}" for w, h in caps.fixed_sizes) if caps.fixed_sizes
             else f"{caps.min_size}-{caps.max_size} px, multiples of {caps.size_multiple}")
    e = html.escape
    parts = [
        f"<div id='banner'><b>{e(TITLE)}</b> &middot; backend <code>{e(caps.backend)}</code> "
        f"&middot; device <code>{e(caps.device)}</code> &middot; model <code>{e(caps.model)}</code> "
        f"&middot; precisions <code>{e(', '.join(caps.precisions))}</code> &middot; sizes {e(sizes)}</div>"
    ]
    if caps.is_tiny:
        parts.append(f"<div id='tiny-warning'>&#9888; {e(' '.join(caps.notes))}</div>")
    elif caps.notes:
        parts.append(f"<div id='banner-notes'>{e(' '.join(caps.notes))}</div>")
    return "\n".join(parts)


def latency_markdown(details: dict[str, Any] | None, stats: LatencyStats | None,
                     caps: Capabilities | None = None) -> str:
    """The latency panel: this request's stages, the walk-through's figure for the same steps and
    precision, then the session's count, P50, P95 and images/s."""
    lines = []
    reference = None
    if details:
        t = details["timings"]
        steps = t.get("step_ms") or []
        per_step = sum(steps) / len(steps) if steps else 0.0
        lines.append(f"**This request: {t['total_ms']:.0f} ms** for {len(details['seeds'])} image(s)")
        lines.append("")
        lines.append("| stage | ms |\n|---|---:|")
        lines.append(f"| text encoder | {t['text_encoder_ms']:.1f} |")
        ran = f"{len(steps)} steps"
        if details.get("mode", "txt2img") != "txt2img":  # the input picture to latents; then steps x strength run
            lines.append(f"| VAE encode | {t.get('vae_encode_ms', 0.0):.1f} |")
            ran = f"{len(steps)} of {details.get('steps')} steps, strength {details.get('strength')}"
        lines.append(f"| denoising ({ran}, {per_step:.1f} ms/step) | {t['denoise_ms']:.1f} |")
        hires = details.get("hires")
        if hires:  # the second pass: the upscale (for Lanczos a VAE decode, resize and encode), then its steps
            hires_steps = t.get("hires_step_ms") or []
            hires_per_step = sum(hires_steps) / len(hires_steps) if hires_steps else 0.0
            lines.append(f"| hires upscale ({hires['upscaler']}, to {hires['size']}) | "
                         f"{t.get('hires_upscale_ms', 0.0):.1f} |")
            lines.append(f"| hires denoising ({len(hires_steps)} steps, strength {hires['denoising_strength']:g}, "
                         f"{hires_per_step:.1f} ms/step) | {t.get('hires_denoise_ms', 0.0):.1f} |")
        lines.append(f"| VAE decode{' (at the hires size)' if hires else ''} | {t['vae_ms']:.1f} |")
        if t.get("server_ms") is not None:
            lines.append(f"| endpoint (server time) | {t['server_ms']:.1f} |")
            lines.append(f"| network + queue | {t.get('network_ms', 0.0):.1f} |")
        if "app_ms" in details:
            lines.append(f"| app (PNG files) | {details['app_ms']:.1f} |")
        reference = walkthrough.reference_for(details.get("precision"), details.get("steps"))
        lines.append("")
        lines.append(reference_line(details, reference, caps))
    summary = stats.summary() if stats else None
    if summary and summary.count:
        against = f" (walk-through: {reference.qps:g} QPS)" if reference else ""
        lines.append("")
        lines.append(
            f"**This session:** {summary.count} request(s), P50 {summary.p50_ms:.0f} ms, "
            f"P95 {summary.p95_ms:.0f} ms, {summary.images_per_s:.2f} images/s{against}"
        )
    return "\n".join(lines) if lines else "Latency appears here after the first generation."


def reference_line(details: dict[str, Any], reference: walkthrough.ReferenceRow | None,
                   caps: Capabilities | None) -> str:
    """The AWS walk-through's P95 for this request's steps and precision, labelled as its figure."""
    where = f"{walkthrough.INSTANCE}, SD2.1 {walkthrough.SIZE[0]}x{walkthrough.SIZE[1]}"
    if details.get("hires"):  # the walk-through measured one pass at 512x512; nothing compares with two
        return (f"*AWS walk-through ({where}):* no figure for the hires fix; it measured one text-to-image pass, "
                f"and this request ran a second at {details['hires']['size']}.")
    if reference is None:
        measured = sorted({r.steps for r in walkthrough.ROWS})
        precisions = sorted({r.precision for r in walkthrough.ROWS})
        return (f"*AWS walk-through ({where}):* no figure for {details.get('precision')} at {details.get('steps')} "
                f"steps; it measured {', '.join(map(str, measured))} steps at {' and '.join(precisions)}.")
    text = (f"*AWS walk-through, same steps and precision ({where}, {reference.precision}, {reference.steps} "
            f"steps):* **P95 {reference.p95_s * 1000:.0f} ms**, {reference.qps:g} QPS, one image per request")
    caveats = []
    if caps is not None and caps.is_tiny and caps.model != SD21_RANDOM_ID:
        caveats.append("this model is the tiny random-weights one, so the comparison means nothing")
    size = f"{walkthrough.SIZE[0]}x{walkthrough.SIZE[1]}"
    if details.get("size") and details["size"] != size:
        caveats.append(f"this request is {details['size']}, the walk-through's {size}")
    if details.get("mode", "txt2img") != "txt2img":
        caveats.append(f"this request ran {details.get('denoising_steps')} of them from an image, plus a VAE encode")
    if len(details.get("seeds") or []) > 1:
        caveats.append(f"this request made {len(details['seeds'])} images")
    return text + (f" ({'; '.join(caveats)})." if caveats else ".")


def no_preview_note(caps: Capabilities) -> str:
    """Why the gallery stays empty while this backend denoises."""
    if caps.backend == "sagemaker":
        return ("*No live preview on this backend: the SageMaker endpoint answers once per request, so the "
                "images appear when it has finished.*")
    return "*Live preview is off (--preview-every 0): the images appear when they are finished.*"


def no_guidance_note(caps: Capabilities) -> str:
    """Why a few-step model's tab has no negative prompt and no guidance scale."""
    return (f"Few-step model ({caps.default_steps} step{'s' if caps.default_steps > 1 else ''} by default, at most "
            f"{caps.max_steps}): it runs without classifier-free guidance, so there is no negative prompt or guidance "
            f"scale to set.")


def steps_run_note(steps: Any, strength: Any) -> str:
    """What the Strength slider's neighbour says: how many of the steps run from an image (int(steps x strength),
    as diffusers' get_timesteps)."""
    try:
        steps, strength = int(steps), float(strength)
    except (TypeError, ValueError):
        return ""
    ran = min(int(steps * strength), steps)
    if ran < 1:
        return f"Runs **no** step of {steps}: raise Strength or Steps."
    return f"Runs **{ran} of {steps}** steps"


def mode_unavailable_note(caps: Capabilities, mode: str) -> str:
    """Why a mode's tab has no controls on this backend, and what would offer it."""
    label = MODE_LABELS[mode]
    offered = ", ".join(MODE_LABELS[m] for m in caps.modes)
    if caps.backend == "neuron":
        why = ("this compiled root has no VAE encoder part, which turns the input picture into latents; compile "
               "it into the root (compile_scripts/compile.py, docs/neuron.md) and restart")
    elif caps.backend == "sagemaker":
        why = "the endpoint does not offer it (its describe answer lists the modes it runs); deploy a newer package"
    elif mode != "inpaint" and caps.modes == ("inpaint",):
        why = "this model's UNet is an inpainting one (9 input channels), which runs Inpaint only"
    else:
        why = "this backend does not offer it"
    return f"*{label} is not available here: {why}. This backend offers: {offered}.*"
