"""What the banner and the latency panel say: HTML and Markdown from capabilities and timings."""

from __future__ import annotations

import html
from typing import Any

from backend import Backend
from backend.stats import LatencyStats

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


def latency_markdown(details: dict[str, Any] | None, stats: LatencyStats | None) -> str:
    """The latency panel: this request's stages, then the session's count, P50, P95, images/s."""
    lines = []
    if details:
        t = details["timings"]
        steps = t.get("step_ms") or []
        per_step = sum(steps) / len(steps) if steps else 0.0
        lines.append(f"**This request: {t['total_ms']:.0f} ms** for {len(details['seeds'])} image(s)")
        lines.append("")
        lines.append("| stage | ms |\n|---|---:|")
        lines.append(f"| text encoder | {t['text_encoder_ms']:.1f} |")
        lines.append(f"| denoising ({len(steps)} steps, {per_step:.1f} ms/step) | {t['denoise_ms']:.1f} |")
        lines.append(f"| VAE decode | {t['vae_ms']:.1f} |")
        if t.get("server_ms") is not None:
            lines.append(f"| endpoint (server time) | {t['server_ms']:.1f} |")
            lines.append(f"| network + queue | {t.get('network_ms', 0.0):.1f} |")
        if "app_ms" in details:
            lines.append(f"| app (PNG files) | {details['app_ms']:.1f} |")
    summary = stats.summary() if stats else None
    if summary and summary.count:
        lines.append("")
        lines.append(
            f"**This session:** {summary.count} request(s), P50 {summary.p50_ms:.0f} ms, "
            f"P95 {summary.p95_ms:.0f} ms, {summary.images_per_s:.2f} images/s"
        )
    return "\n".join(lines) if lines else "Latency appears here after the first generation."
