"""Stable Diffusion demo: a Gradio app over a pluggable backend (neuron, sagemaker, local).

    python app.py                      # the default model, or the tiny model when it cannot load
    python app.py --model DIR          # a diffusers folder (python -m backend.tiny DIR makes one)
    python app.py --backend neuron --artifacts ROOT
    python app.py --backend sagemaker --endpoint-name NAME

`demo` is importable (Hugging Face Spaces): it is built on first access from SD_* variables.
This file is the UI only: flags/env -> Settings -> create_backend -> gr.Blocks.
"""

from __future__ import annotations

import functools
import html
import itertools
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import anyio
import gradio as gr

from backend import (
    SCHEDULERS,
    Backend,
    BackendUnavailable,
    GenerationCancelled,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Settings,
    create_backend,
)
from backend.metadata import png_bytes
from backend.stats import LatencyStats

log = logging.getLogger("app")

TITLE = "Stable Diffusion on AWS Inferentia2"
EXAMPLES = [
    "a lovely cat",
    "Mountains Landscape",
    "an astronaut riding a horse on the moon, highly detailed, cinematic lighting",
    "a watercolor painting of a fox in a snowy forest",
]
MAX_UPLOAD = "1mb"
# In-process accelerators run one generation at a time; a remote endpoint can take several.
DEFAULT_CONCURRENCY = {"local": 1, "neuron": 1, "sagemaker": 4}
CSS = """
#banner {border-radius: 8px; padding: 10px 14px; background: var(--block-background-fill);}
#tiny-warning {border: 2px solid #d97706; background: #fef3c7; color: #78350f; border-radius: 8px;
               padding: 10px 14px; font-weight: 600;}
#latency {font-variant-numeric: tabular-nums;}
"""


class OutputStore:
    """PNG files the gallery serves, kept in Gradio's cache folder and bounded in number.

    Writing the PNG ourselves (fast zlib level, infotext chunk) and handing Gradio a path already
    inside its cache skips Gradio's own encode-at-level-6 + hash + copy of each image.
    """

    def __init__(self, root: str | Path | None = None, max_files: int = 256, png_level: int = 0):
        base = Path(root or os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
        self.root = (base / f"sd-outputs-{os.getpid()}").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self.png_level = png_level
        self._files: deque[Path] = deque()
        self._lock = threading.Lock()

    def save(self, image: Any, seed: int) -> str:
        """Write one image; the oldest files go once there are more than max_files."""
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        path = folder / f"{seed}.png"
        path.write_bytes(png_bytes(image, self.png_level))
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.max_files:
                old = self._files.popleft()
                shutil.rmtree(old.parent, ignore_errors=True)
        return str(path)

    def close(self) -> None:
        """Remove every file this store wrote."""
        shutil.rmtree(self.root, ignore_errors=True)


class CancelRegistry:
    """Stop support: one event per browser/API session, checked after every denoising step."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        """A fresh event for the session's new generation."""
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop."""
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()
        return event is not None

    def finish(self, session: str, event: threading.Event) -> None:
        """Forget the session's event if it is still this one."""
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


def as_text(message: str) -> str:
    """A message for gr.Error / gr.Warning, whose toasts render (sanitized) HTML: what it repeats of a
    prompt or of a remote endpoint's answer must show as the text it is, not become markup."""
    return html.escape(message, quote=False)


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


def build_demo(backend: Backend, settings: Settings, outputs: OutputStore | None = None) -> gr.Blocks:
    """The Gradio Blocks app around one backend."""
    caps = backend.capabilities()
    store = outputs or OutputStore(png_level=settings.png_level)
    cancels = CancelRegistry()
    fallback_session = itertools.count()
    default_w, default_h = caps.default_size

    async def generate(prompt, negative_prompt=None, steps=20, precision=caps.default_precision,
                       guidance_scale=7.5, seed=-1, scheduler="dpm++2m", width=default_w, height=default_h,
                       num_images=1, stats=None, request: gr.Request = None, progress=gr.Progress()):
        """Generate images for a prompt; returns the PNG gallery and a JSON details object."""
        session = getattr(request, "session_hash", None) or f"anon-{next(fallback_session)}"
        event = cancels.start(session)

        def on_step(step: int, total: int) -> None:
            if event.is_set():
                raise GenerationCancelled("stopped")
            progress((step, total), desc="Denoising", unit="steps")

        started = time.perf_counter()
        try:
            req = GenerationRequest(
                prompt=prompt, negative_prompt=negative_prompt or "", steps=steps, guidance_scale=guidance_scale,
                seed=seed if seed not in (None, "") else -1, scheduler=scheduler, precision=precision,
                width=width, height=height, num_images=num_images,
            )
            # In a worker thread that Gradio abandons when it cancels this task (Stop, an API client's
            # job.cancel()): the event below then stops the backend at its next step, where a plain
            # sync function would hold the device until a generation nobody waits for was done.
            result = await anyio.to_thread.run_sync(functools.partial(backend.generate, req, on_step=on_step),
                                                    abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            event.set()
            raise
        except InvalidRequest as exc:
            raise gr.Error(as_text(str(exc)), title="Check the request") from None
        except GenerationCancelled:
            raise gr.Error("Stopped before the images were finished.", title="Stopped") from None
        except BackendUnavailable as exc:
            raise gr.Error(as_text(f"The backend is unavailable: {exc}"), title="Backend unavailable") from None
        except GenerationFailed as exc:
            raise gr.Error(as_text(f"Generation failed: {exc}"), title="Generation failed") from None
        except Exception:  # noqa: BLE001 - nothing unexpected reaches a user as a traceback
            log.exception("unexpected error in generate")
            raise gr.Error("Something unexpected went wrong; it is in the server log. Try again.",
                           title="Error") from None
        finally:
            cancels.finish(session, event)
        t_files = time.perf_counter()
        files = await anyio.to_thread.run_sync(
            lambda: [store.save(img, s) for img, s in zip(result.images, result.seeds)])
        details = result.details()
        details["app_ms"] = round((time.perf_counter() - t_files) * 1000.0, 1)
        for warning in result.warnings:
            gr.Warning(as_text(warning))
        stats = stats if isinstance(stats, LatencyStats) else LatencyStats()
        stats.add(result.timings.total_ms, len(files))
        log.info("generated %d image(s) in %.0f ms (backend %.0f ms)", len(files),
                 (time.perf_counter() - started) * 1000.0, result.timings.total_ms)
        return files, details, stats

    def stop(request: gr.Request = None):
        """Stop this session's running generation."""
        if request is not None and request.session_hash:
            cancels.stop(request.session_hash)

    def reuse_seed(details, evt: gr.SelectData):
        """The seed of the selected gallery image."""
        if details and evt is not None and evt.index is not None:
            seeds = details.get("seeds") or []
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            if 0 <= index < len(seeds):
                return seeds[index]
        return gr.skip()

    def reuse_first_seed(details):
        """The seed of the first image when none is selected."""
        seeds = (details or {}).get("seeds") or []
        return seeds[0] if seeds else gr.skip()

    # delete_cache: files Gradio itself keeps (uploads) go after an hour, and all of them at exit.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.HTML(banner_html(backend))
        stats_state = gr.State(None)
        selected_seed = gr.State(None)
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", placeholder="a lovely cat (press Enter to generate)",
                                    lines=1, max_lines=4, autofocus=True)
                negative = gr.Textbox(label="Negative prompt", placeholder="what the image should not show",
                                      lines=1, max_lines=4)
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps = gr.Slider(caps.min_steps, caps.max_steps, value=20, step=1, label="Steps")
                        precision = gr.Dropdown(list(caps.precisions), value=caps.default_precision,
                                                label="Precision")
                    with gr.Row():
                        guidance = gr.Slider(0.0, caps.max_guidance, value=7.5, step=0.5, label="Guidance scale")
                        scheduler = gr.Dropdown([(SCHEDULERS.get(k, k), k) for k in caps.schedulers],
                                                value="dpm++2m", label="Scheduler")
                    with gr.Row():
                        if caps.fixed_sizes:
                            ws = sorted({w for w, _ in caps.fixed_sizes})
                            hs = sorted({h for _, h in caps.fixed_sizes})
                            width = gr.Dropdown(ws, value=default_w, label="Width")
                            height = gr.Dropdown(hs, value=default_h, label="Height")
                        else:
                            width = gr.Slider(caps.min_size, caps.max_size, value=default_w,
                                              step=caps.size_multiple, label="Width")
                            height = gr.Slider(caps.min_size, caps.max_size, value=default_h,
                                               step=caps.size_multiple, label="Height")
                    # Two controls a row: three sliders side by side clip their "1024" range labels.
                    with gr.Row():
                        num_images = gr.Slider(1, caps.max_images, value=1, step=1, label="Number of images")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", minimum=-1,
                                         maximum=2**32 - 1)
                    with gr.Row():
                        randomize_btn = gr.Button("\U0001f3b2 Random seed", size="sm")
                        reuse_btn = gr.Button("\u267b\ufe0f Reuse seed of selected image", size="sm")
                gr.Examples(EXAMPLES, inputs=[prompt], label="Example prompts")
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Images", format="png", columns=2, height="auto",
                                     object_fit="contain", interactive=False)
                latency = gr.Markdown(latency_markdown(None, None), elem_id="latency")
                # Folded: the latency panel says what most people want; step_ms alone is `steps` lines.
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Details", open=False)

        inputs = [prompt, negative, steps, precision, guidance, seed, scheduler, width, height, num_images,
                  stats_state]
        # preprocess=False: raw values reach generate(), which validates them in one place
        # (backend.api) and answers a bad type with a message naming the field.
        common = dict(fn=generate, inputs=inputs, outputs=[gallery, details, stats_state], preprocess=False,
                      concurrency_id="generate")
        gen_click = generate_btn.click(**common, api_name="generate")
        gen_submit = prompt.submit(**common, api_visibility="private")
        for event in (gen_click, gen_submit):
            event.success(latency_markdown, inputs=[details, stats_state], outputs=[latency], queue=False,
                          api_visibility="private")
        stop_btn.click(stop, None, None, cancels=[gen_click, gen_submit], queue=False, api_name="stop")
        randomize_btn.click(lambda: -1, None, seed, queue=False, api_visibility="private")
        gallery.select(reuse_seed, inputs=[details], outputs=[selected_seed], queue=False,
                       api_visibility="private")
        reuse_btn.click(lambda s, d: s if s is not None else reuse_first_seed(d), inputs=[selected_seed, details],
                        outputs=[seed], queue=False, api_visibility="private")
        gallery.change(lambda: None, None, selected_seed, queue=False, api_visibility="private")

    concurrency = settings.concurrency or DEFAULT_CONCURRENCY.get(caps.backend, 1)
    demo.queue(max_size=settings.max_queue, default_concurrency_limit=concurrency)
    demo.sd_backend = backend  # type: ignore[attr-defined]
    demo.sd_outputs = store  # type: ignore[attr-defined]
    return demo


def launch(demo: gr.Blocks, settings: Settings, **kwargs: Any):
    """Launch with the settings' host, port, auth and share."""
    # The app takes no files, but Gradio's /gradio_api/upload route is open to every visitor and
    # keeps what it gets: refuse anything big (and delete_cache in build_demo drops the rest).
    kwargs.setdefault("max_file_size", MAX_UPLOAD)
    return demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth_pair,
        share=settings.share,
        css=CSS,
        theme=gr.themes.Soft(),
        footer_links=["api", "gradio"],
        **kwargs,
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Parse flags, start the backend, launch the app."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_args(argv, prog="python app.py")
    try:
        backend = create_backend(settings)
    except BackendUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    demo = build_demo(backend, settings)
    # docker stop, systemd and Spaces end the app with SIGTERM, whose default action skips every
    # `finally`: unwind as Ctrl+C does, so Gradio closes its server and the outputs folder goes.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(demo, settings)
    finally:
        demo.sd_outputs.close()
        backend.close()


_demo: gr.Blocks | None = None


def __getattr__(name: str):
    """`from app import demo` (Hugging Face Spaces, `gradio app.py`) builds the app from SD_* variables."""
    global _demo
    if name == "demo":
        if _demo is None:
            settings = Settings.from_args([])
            _demo = build_demo(create_backend(settings), settings)
        return _demo
    raise AttributeError(name)


if __name__ == "__main__":
    main()
