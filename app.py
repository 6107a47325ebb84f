"""Stable Diffusion demo: a Gradio app over a pluggable backend (neuron, sagemaker, local).

    python app.py                      # the default model, or the tiny model when it cannot load
    python app.py --model DIR          # a diffusers folder (python -m backend.tiny DIR makes one)
    python app.py --backend neuron --artifacts ROOT
    python app.py --backend sagemaker --endpoint-name NAME

`demo` is importable (Hugging Face Spaces): it is built on first access from SD_* variables, and
its own launch() brings the CSS, theme, upload limit and login (ui/blocks.py).
This file is the layout: flags/env -> Settings -> create_backend -> the controls, wired to ui/handlers.py.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend import SCHEDULERS, Backend, BackendUnavailable, Capabilities, Settings, create_backend
from ui.blocks import DemoBlocks
from ui.handlers import REQUEST_DEFAULTS, Handlers, reuse_first_seed, reuse_seed
from ui.outputs import OutputStore
from ui.panels import TITLE, banner_html, latency_markdown, no_preview_note

log = logging.getLogger("app")

EXAMPLES = [
    "a lovely cat",
    "Mountains Landscape",
    "an astronaut riding a horse on the moon, highly detailed, cinematic lighting",
    "a watercolor painting of a fox in a snowy forest",
]
# In-process accelerators run one generation at a time; a remote endpoint can take several.
DEFAULT_CONCURRENCY = {"local": 1, "neuron": 1, "sagemaker": 4}


@dataclass
class Controls:
    """The components the events read and write."""

    prompt: gr.Textbox
    negative: gr.Textbox
    generate_btn: gr.Button
    stop_btn: gr.Button
    steps: gr.Slider
    precision: gr.Dropdown
    guidance: gr.Slider
    scheduler: gr.Dropdown
    width: gr.Component
    height: gr.Component
    num_images: gr.Slider
    seed: gr.Number
    preview: gr.Checkbox
    randomize_btn: gr.Button
    reuse_btn: gr.Button
    gallery: gr.Gallery
    latency: gr.Markdown
    details: gr.JSON
    stats: gr.State
    selected_seed: gr.State

    def request_inputs(self) -> list[gr.Component]:
        """The generate handler's inputs, in its parameters' (and the API's) order."""
        return [self.prompt, self.negative, self.steps, self.precision, self.guidance, self.seed, self.scheduler,
                self.width, self.height, self.num_images, self.preview, self.stats]


def prompt_controls() -> tuple[gr.Textbox, gr.Textbox]:
    """Prompt and negative prompt."""
    prompt = gr.Textbox(label="Prompt", placeholder="a lovely cat (press Enter to generate)",
                        lines=1, max_lines=4, autofocus=True)
    negative = gr.Textbox(label="Negative prompt", placeholder="what the image should not show", lines=1, max_lines=4)
    return prompt, negative


def action_buttons() -> tuple[gr.Button, gr.Button]:
    """Generate and Stop."""
    with gr.Row():
        generate_btn = gr.Button("Generate", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop")
    return generate_btn, stop_btn


def size_controls(caps: Capabilities) -> tuple[gr.Component, gr.Component]:
    """Width and height: dropdowns of the compiled sizes, or sliders over the allowed range."""
    default_w, default_h = caps.default_size
    if caps.fixed_sizes:
        width = gr.Dropdown(sorted({w for w, _ in caps.fixed_sizes}), value=default_w, label="Width")
        height = gr.Dropdown(sorted({h for _, h in caps.fixed_sizes}), value=default_h, label="Height")
    else:
        width = gr.Slider(caps.min_size, caps.max_size, value=default_w, step=caps.size_multiple, label="Width")
        height = gr.Slider(caps.min_size, caps.max_size, value=default_h, step=caps.size_multiple, label="Height")
    return width, height


def headline_controls(caps: Capabilities) -> dict[str, gr.Component]:
    """Steps, precision and the number of images: in sight, not folded (the walk-through's table is
    steps x precision, the two things this demo exists to show)."""
    d = REQUEST_DEFAULTS
    with gr.Row(elem_id="headline-controls"):
        steps = gr.Slider(caps.min_steps, caps.max_steps, value=d["steps"], step=1, label="Steps", min_width=200)
        precision = gr.Dropdown(list(caps.precisions), value=caps.default_precision, label="Precision",
                                min_width=120)
        num_images = gr.Slider(1, caps.max_images, value=d["num_images"], step=1, label="Number of images",
                               min_width=160)
    return dict(steps=steps, precision=precision, num_images=num_images)


def advanced_controls(caps: Capabilities) -> dict[str, gr.Component]:
    """The Advanced accordion: guidance, scheduler, size and seed, starting at GenerationRequest's defaults."""
    d = REQUEST_DEFAULTS
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            guidance = gr.Slider(0.0, caps.max_guidance, value=d["guidance_scale"], step=0.5, label="Guidance scale")
            scheduler = gr.Dropdown([(SCHEDULERS.get(k, k), k) for k in caps.schedulers], value=d["scheduler"],
                                    label="Scheduler")
        # Two controls a row: three sliders side by side clip their "1024" range labels.
        with gr.Row():
            width, height = size_controls(caps)
        with gr.Row():
            seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1: random)", minimum=-1, maximum=2**32 - 1)
            # Shown only where the backend makes previews; the API's `preview` keyword either way.
            preview = gr.Checkbox(value=True, label="Live preview while denoising", visible=caps.previews)
        with gr.Row():
            randomize_btn = gr.Button("\U0001f3b2 Random seed", size="sm")
            reuse_btn = gr.Button("\u267b\ufe0f Reuse seed of selected image", size="sm")
    return dict(guidance=guidance, scheduler=scheduler, width=width, height=height, seed=seed, preview=preview,
                randomize_btn=randomize_btn, reuse_btn=reuse_btn)


def result_panels(caps: Capabilities) -> tuple[gr.Gallery, gr.Markdown, gr.JSON]:
    """The gallery (previews while denoising, then the images), the latency panel and the details JSON."""
    gallery = gr.Gallery(label="Images", format="png", columns=2, height="auto", object_fit="contain",
                         interactive=False)
    if not caps.previews:
        gr.Markdown(no_preview_note(caps), elem_id="no-preview")
    latency = gr.Markdown(latency_markdown(None, None), elem_id="latency")
    # Folded: the latency panel says what most people want; step_ms alone is `steps` lines.
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Details", open=False)
    return gallery, latency, details


def layout(backend: Backend) -> Controls:
    """The page: banner, then the controls on the left and the results on the right."""
    gr.HTML(banner_html(backend))
    stats = gr.State(None)
    selected_seed = gr.State(None)
    with gr.Row():
        with gr.Column(scale=5):
            prompt, negative = prompt_controls()
            headline = headline_controls(backend.capabilities())
            generate_btn, stop_btn = action_buttons()
            advanced = advanced_controls(backend.capabilities())
            gr.Examples(EXAMPLES, inputs=[prompt], label="Example prompts")
        with gr.Column(scale=6):
            gallery, latency, details = result_panels(backend.capabilities())
    return Controls(prompt=prompt, negative=negative, generate_btn=generate_btn, stop_btn=stop_btn, **headline,
                    **advanced, gallery=gallery, latency=latency, details=details, stats=stats,
                    selected_seed=selected_seed)


def wire_generate(c: Controls, handlers: Handlers) -> None:
    """Generate and Enter run one event (the API's /generate); the latency panel follows; Stop cancels it."""
    # One gr.on for both triggers: one endpoint, named by api_name (gradio/events.py, `on`).
    # preprocess=False: raw values reach the handler, which validates them in one place (backend.api)
    # and answers a bad type with a message naming the field. show_progress_on: the progress bar goes
    # over the latency panel, so that it does not cover the previews forming in the gallery.
    generation = gr.on(triggers=[c.generate_btn.click, c.prompt.submit], fn=handlers.generate,
                       inputs=c.request_inputs(), outputs=[c.gallery, c.details, c.stats], preprocess=False,
                       api_name="generate", concurrency_id="generate", show_progress_on=[c.latency])
    caps = handlers.backend.capabilities()

    def latency_panel(details, stats):
        """The latency panel after a generation, with the walk-through's figure for its settings."""
        return latency_markdown(details, stats, caps)

    generation.success(latency_panel, inputs=[c.details, c.stats], outputs=[c.latency], queue=False,
                       api_visibility="private")
    # cancels=: Gradio cancels the queued or running task (the handler's worker thread is abandoned),
    # and the handler's stop event ends the backend's work at its next step.
    c.stop_btn.click(handlers.stop, None, None, cancels=[generation], queue=False, api_name="stop")


def wire_seed_buttons(c: Controls) -> None:
    """Random seed, and reuse the seed of the selected (or else the first) image."""
    c.randomize_btn.click(lambda: REQUEST_DEFAULTS["seed"], None, c.seed, queue=False, api_visibility="private")
    c.gallery.select(reuse_seed, inputs=[c.details], outputs=[c.selected_seed], queue=False,
                     api_visibility="private")
    c.reuse_btn.click(lambda s, d: s if s is not None else reuse_first_seed(d), inputs=[c.selected_seed, c.details],
                      outputs=[c.seed], queue=False, api_visibility="private")
    c.gallery.change(lambda: None, None, c.selected_seed, queue=False, api_visibility="private")


def build_demo(backend: Backend, settings: Settings) -> DemoBlocks:
    """The Gradio app around one backend; demo.launch() needs no arguments (ui/blocks.py)."""
    store = OutputStore(png_level=settings.png_level)
    handlers = Handlers(backend, store)
    # delete_cache: files Gradio itself keeps (uploads) go after an hour, and all of them at exit.
    with DemoBlocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600),
                    auth=settings.auth_pair) as demo:
        controls = layout(backend)
        wire_generate(controls, handlers)
        wire_seed_buttons(controls)
    concurrency = settings.concurrency or DEFAULT_CONCURRENCY.get(backend.capabilities().backend, 1)
    demo.queue(max_size=settings.max_queue, default_concurrency_limit=concurrency)
    demo.sd_outputs = store  # type: ignore[attr-defined]
    return demo


def launch(demo: gr.Blocks, settings: Settings, **kwargs: Any):
    """Launch on the settings' host and port, shared if asked (the rest: DemoBlocks.launch's defaults)."""
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share, **kwargs)


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
