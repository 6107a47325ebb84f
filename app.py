"""Stable Diffusion demo: a Gradio app over a pluggable backend (neuron, sagemaker, local).

    python app.py                      # the default model, or the tiny model when it cannot load
    python app.py --model DIR          # a diffusers folder (python -m backend.models.tiny DIR makes one)
    python app.py --backend neuron --artifacts ROOT
    python app.py --backend sagemaker --endpoint-name NAME

`demo` is importable (Hugging Face Spaces): it is built on first access from SD_* variables, and
its own launch() brings the CSS, theme, upload limit and login (ui/blocks.py).
This file is the layout: flags/env -> Settings -> create_backend -> the controls, wired to ui/handlers.py.
"""

from __future__ import annotations

import functools
import logging
import signal
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend import SCHEDULERS, Backend, BackendUnavailable, Capabilities, Settings, create_backend
from backend.core.api import DEFAULT_HR_STRENGTH, HR_UPSCALER_LABELS, MAX_HR_SCALE, MAX_MASK_BLUR, MODE_LABELS, MODES
from ui import panels
from ui.blocks import DemoBlocks
from ui.handlers import REQUEST_DEFAULTS, Handlers, reuse_first_seed, reuse_seed
from ui.followers import Followers
from ui.live import LiveGate, settings_key
from ui.estimate import estimate_note
from ui.outputs import OutputStore
from ui.panels import TITLE, banner_html, latency_markdown, mode_unavailable_note, no_preview_note
from ui.pnginfo import PngInfoError, infotext_fields, png_info, send_note, show_png_info, values_for_controls

log = logging.getLogger("app")

EXAMPLES = [
    "a lovely cat",
    "Mountains Landscape",
    "an astronaut riding a horse on the moon, highly detailed, cinematic lighting",
    "a watercolor painting of a fox in a snowy forest",
]
# A remote endpoint can take several generations at once; an in-process backend as many as its
# Capabilities.concurrency (1, or the NeuronCores with --neuron-parallel pipeline).
DEFAULT_CONCURRENCY = {"sagemaker": 4}


@dataclass
class Controls:
    """The components of one generating tab that its events read and write."""

    mode: str
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
    size: gr.Dropdown | None = None  # compiled sizes: the "WxH" menu that sets width and height
    image: gr.Component | None = None  # img2img: gr.Image; inpaint: gr.ImageEditor
    mask: gr.Image | None = None  # inpaint: an uploaded mask, instead of the painted one
    strength: gr.Slider | None = None
    strength_note: gr.Markdown | None = None
    mask_blur: gr.Slider | None = None
    resize_mode: gr.Radio | None = None
    live: gr.Checkbox | None = None  # txt2img: Live (an image on every pause in typing, ui/live.py)
    hires: gr.Checkbox | None = None  # txt2img: the "Hires fix" group (hires_controls), off by default
    hr_scale: gr.Component | None = None
    hr_upscaler: gr.Dropdown | None = None
    hr_steps: gr.Slider | None = None
    denoising_strength: gr.Slider | None = None
    live_note: gr.Markdown | None = None  # why Live is (not) offered for the current settings
    estimate: gr.Markdown | None = None  # beside Generate: what a generation will take (ui/estimate.py)

    def common_inputs(self) -> list[gr.Component]:
        """The inputs every mode shares, after the prompt and the mode's own (the API's order)."""
        return [self.negative, self.steps, self.precision, self.guidance, self.seed, self.scheduler, self.width,
                self.height, self.num_images, self.preview, self.stats]

    def request_inputs(self) -> list[gr.Component]:
        """The handler's inputs, in its parameters' (and the API's) order."""
        if self.mode == "img2img":
            return [self.prompt, self.image, self.strength, self.resize_mode, *self.common_inputs()]
        if self.mode == "inpaint":
            return [self.prompt, self.image, self.mask, self.strength, self.mask_blur, self.resize_mode,
                    *self.common_inputs()]
        hires = [self.hires, self.hr_scale, self.hr_upscaler, self.hr_steps, self.denoising_strength]
        return [self.prompt, *self.common_inputs(), *(hires if self.hires is not None else [])]


def prompt_controls(caps: Capabilities, mode: str) -> tuple[gr.Textbox, gr.Textbox]:
    """Prompt and negative prompt (hidden, with a line saying why, for a few-step model: no guidance)."""
    prompt = gr.Textbox(label="Prompt", placeholder="a lovely cat (press Enter to generate)",
                        lines=1, max_lines=4, autofocus=mode == "txt2img")
    negative = gr.Textbox(label="Negative prompt", placeholder="what the image should not show", lines=1, max_lines=4,
                          visible=caps.guidance)
    if not caps.guidance:
        gr.Markdown(panels.no_guidance_note(caps), elem_id=element_id("no-guidance", mode))
    return prompt, negative


def live_controls() -> dict[str, gr.Component]:
    """The Live toggle and its note; both are set from the measured latency when the page loads (wire_live)."""
    with gr.Row():
        live = gr.Checkbox(value=False, label="Live: an image on every pause in typing", interactive=False,
                           elem_id="live", scale=1, min_width=160)
        live_note = gr.Markdown(elem_id="live-note")
    return dict(live=live, live_note=live_note)


def action_buttons() -> tuple[gr.Button, gr.Button]:
    """Generate and Stop."""
    with gr.Row():
        generate_btn = gr.Button("Generate", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop")
    return generate_btn, stop_btn


def size_label(width: int, height: int) -> str:
    """A size as the size menu shows it."""
    return f"{width}x{height}"


def size_controls(caps: Capabilities) -> dict[str, gr.Component]:
    """Width and height: sliders over the allowed range, or, for compiled sizes, one "WxH" menu of those
    sizes (width and height then stay hidden numbers, which the menu sets, and the API takes as before)."""
    default_w, default_h = caps.default_size
    if caps.fixed_sizes:
        size = gr.Dropdown([size_label(w, h) for w, h in caps.fixed_sizes], value=size_label(default_w, default_h),
                           label="Size", info="the sizes this backend was compiled for")
        width = gr.Number(default_w, precision=0, label="Width", visible=False)
        height = gr.Number(default_h, precision=0, label="Height", visible=False)
        size.change(lambda value: tuple(int(v) for v in value.split("x")), inputs=size, outputs=[width, height],
                    queue=False, api_visibility="private")
        return dict(size=size, width=width, height=height)
    width = gr.Slider(caps.min_size, caps.max_size, value=default_w, step=caps.size_multiple, label="Width")
    height = gr.Slider(caps.min_size, caps.max_size, value=default_h, step=caps.size_multiple, label="Height")
    return dict(width=width, height=height)


def headline_controls(caps: Capabilities, mode: str) -> dict[str, gr.Component]:
    """Steps, precision and the number of images: in sight, not folded (the walk-through's table is
    steps x precision, the two things this demo exists to show)."""
    d = REQUEST_DEFAULTS
    with gr.Row(elem_id=element_id("headline-controls", mode)):
        steps = gr.Slider(caps.min_steps, caps.max_steps, value=caps.default_steps, step=1, label="Steps",
                          min_width=200)
        precision = gr.Dropdown(list(caps.precisions), value=caps.default_precision, label="Precision",
                                min_width=120)
        num_images = gr.Slider(1, caps.max_images, value=d["num_images"], step=1, label="Number of images",
                               min_width=160)
    return dict(steps=steps, precision=precision, num_images=num_images)


def hires_controls(caps: Capabilities) -> dict[str, gr.Component]:
    """Text to image's "Hires fix" group (A1111's "Hires. fix"), off by default: the scale (a slider, or the scales
    between compiled sizes), the upscaler, the hires steps and the denoising strength; or a line saying why not."""
    d = REQUEST_DEFAULTS
    if not caps.hr_upscalers or (caps.fixed_sizes and not caps.hr_scales):
        why = ("this backend runs no hires fix" if not caps.hr_upscalers else
               "this compiled root has no size that is another's upscale (compile one, such as 768x768 beside "
               "512x512, with compile_scripts/compile.py --sizes; docs/neuron.md)")
        gr.Markdown(f"*Hires fix is not available here: {why}.*", elem_id="hires-unavailable")
        return {}
    with gr.Group(elem_id="hires-group"):
        hires = gr.Checkbox(value=False, label="Hires fix: upscale, then a second pass at the larger size",
                            elem_id="hires")
        with gr.Row():
            if caps.fixed_sizes:
                scale = gr.Dropdown(list(caps.hr_scales), value=caps.hr_scales[0], label="Upscale by",
                                    info="the scales between this root's compiled sizes", elem_id="hr-scale")
            else:
                scale = gr.Slider(1.0, MAX_HR_SCALE, value=1.5, step=0.05, label="Upscale by", elem_id="hr-scale")
            upscaler = gr.Dropdown([(HR_UPSCALER_LABELS[u], u) for u in caps.hr_upscalers], value=caps.hr_upscalers[0],
                                   label="Upscaler", elem_id="hr-upscaler")
        with gr.Row():
            steps = gr.Slider(0, caps.max_steps, value=d["hr_steps"], step=1, label="Hires steps (0: as Steps)",
                              elem_id="hr-steps")
            strength = gr.Slider(0.0, 1.0, value=DEFAULT_HR_STRENGTH, step=0.01, label="Denoising strength",
                                 elem_id="hr-denoising-strength")
    return dict(hires=hires, hr_scale=scale, hr_upscaler=upscaler, hr_steps=steps, denoising_strength=strength)


def advanced_controls(caps: Capabilities, mode: str = "txt2img") -> dict[str, gr.Component]:
    """The Advanced accordion: guidance (hidden for a few-step model), scheduler, size and seed, starting at
    the backend's defaults; text to image adds the Hires fix group."""
    d = REQUEST_DEFAULTS
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            guidance = gr.Slider(0.0, caps.max_guidance, value=caps.default_guidance, step=0.5, label="Guidance scale",
                                 visible=caps.guidance)
            scheduler = gr.Dropdown([(SCHEDULERS.get(k, k), k) for k in caps.schedulers], value=caps.schedulers[0],
                                    label="Scheduler")
        # Two controls a row: three sliders side by side clip their "1024" range labels.
        with gr.Row():
            sizes = size_controls(caps)
        with gr.Row():
            seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1: random)", minimum=-1, maximum=2**32 - 1)
            # Shown only where the backend makes previews; the API's `preview` keyword either way.
            preview = gr.Checkbox(value=True, label="Live preview while denoising", visible=caps.previews)
        with gr.Row():
            randomize_btn = gr.Button("\U0001f3b2 Random seed", size="sm")
            reuse_btn = gr.Button("\u267b\ufe0f Reuse seed of selected image", size="sm")
        hires = hires_controls(caps) if mode == "txt2img" else {}
    return dict(guidance=guidance, scheduler=scheduler, **sizes, seed=seed, preview=preview,
                randomize_btn=randomize_btn, reuse_btn=reuse_btn, **hires)


def image_inputs(caps: Capabilities, mode: str) -> dict[str, gr.Component]:
    """The picture a mode starts from, Strength (with the steps it runs) and how the picture is fitted."""
    d = REQUEST_DEFAULTS
    inputs: dict[str, gr.Component] = {}
    if mode == "img2img":
        inputs["image"] = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                   height=360, elem_id="img2img-image")
    else:
        # The picture is the background; the painted strokes (any colour) are the part to repaint.
        inputs["image"] = gr.ImageEditor(label="Input image: paint over the part to repaint", type="filepath",
                                         sources=["upload", "clipboard"], format="png", height=420,
                                         transforms=(), layers=False, elem_id="inpaint-editor",
                                         brush=gr.Brush(default_size=24, colors=["#ffffff", "#ff3366", "#000000"],
                                                        default_color="#ffffff", color_mode="fixed"))
        with gr.Accordion("Upload a mask instead of painting", open=False):
            inputs["mask"] = gr.Image(label="Mask (white: repaint, black: keep; used instead of the strokes)",
                                      type="filepath", sources=["upload", "clipboard"], image_mode="L", height=240,
                                      elem_id="inpaint-mask")
    with gr.Row():
        inputs["strength"] = gr.Slider(0.0, 1.0, value=d["strength"], step=0.01, label="Strength",
                                       info="how much of the picture to repaint: 0 keeps it, 1 ignores it",
                                       scale=3, elem_id=element_id("strength", mode))
        inputs["strength_note"] = gr.Markdown(panels.steps_run_note(caps.default_steps, d["strength"]),
                                              elem_id=element_id("steps-run", mode))
    with gr.Row():
        inputs["resize_mode"] = gr.Radio(
            [("Crop to fill", "crop"), ("Pad (stretch the edges)", "pad"), ("Stretch", "stretch")],
            value=d["resize_mode"], label="Fit the picture to the size by")
        if mode == "inpaint":
            inputs["mask_blur"] = gr.Slider(0, MAX_MASK_BLUR, value=d["mask_blur"], step=1, label="Mask blur",
                                            info="pixels of soft edge between kept and repainted")
    return inputs


def element_id(name: str, mode: str) -> str:
    """The elem_id of a tab's element: the text-to-image tab keeps the plain names the page always had."""
    return name if mode == "txt2img" else f"{name}-{mode}"


def result_panels(caps: Capabilities, mode: str) -> tuple[gr.Gallery, gr.Markdown, gr.JSON]:
    """The gallery (previews while denoising, then the images), the latency panel and the details JSON."""
    gallery = gr.Gallery(label="Images", format="png", columns=2, height="auto", object_fit="contain",
                         interactive=False, elem_id=element_id("gallery", mode))
    if not caps.previews:
        gr.Markdown(no_preview_note(caps), elem_id=element_id("no-preview", mode))
    latency = gr.Markdown(latency_markdown(None, None), elem_id=element_id("latency", mode),
                          elem_classes=["latency-panel"])
    # Folded: the latency panel says what most people want; step_ms alone is `steps` lines.
    with gr.Accordion("Details (JSON)", open=False):
        details = gr.JSON(label="Details", open=False)
    return gallery, latency, details


def generating_tab(caps: Capabilities, mode: str, stats: gr.State) -> Controls:
    """One mode's tab: controls on the left, results on the right. A mode the backend does not offer gets a
    note saying why instead (its controls stay unrendered, so its API endpoint still answers, with that reason)."""
    available = mode in caps.modes
    if not available:
        gr.Markdown(mode_unavailable_note(caps, mode), elem_id=f"unavailable-{mode}")
    with gr.Row(visible=available):
        with gr.Column(scale=5):
            prompt, negative = prompt_controls(caps, mode)
            inputs = image_inputs(caps, mode) if mode != "txt2img" else live_controls()
            headline = headline_controls(caps, mode)
            generate_btn, stop_btn = action_buttons()
            estimate = gr.Markdown(elem_id=element_id("estimate", mode))
            advanced = advanced_controls(caps, mode)
            gr.Examples(EXAMPLES, inputs=[prompt], label="Example prompts")
        with gr.Column(scale=6):
            gallery, latency, details = result_panels(caps, mode)
    return Controls(mode=mode, prompt=prompt, negative=negative, generate_btn=generate_btn, stop_btn=stop_btn,
                    **headline, **advanced, **inputs, gallery=gallery, latency=latency, details=details, stats=stats,
                    selected_seed=gr.State(None), estimate=estimate)


@dataclass
class PngInfo:
    """The PNG Info tab's components."""

    image: gr.Image
    infotext: gr.Textbox
    fields: gr.JSON
    send_txt2img: gr.Button
    send_img2img: gr.Button
    note: gr.Markdown
    reading_note: gr.State  # the note reading the image gave, kept under Send's own


def png_info_tab(caps: Capabilities) -> PngInfo:
    """Drop a PNG: its infotext as text and as fields, and buttons that send it to a generating tab."""
    with gr.Row():
        with gr.Column():
            # type="filepath" and preprocess=False (wire_png_info): the file as uploaded, text chunks and all.
            image = gr.Image(label="Image (PNG, JPEG, WebP) from this app or another SD tool", type="filepath",
                             sources=["upload"], height=420, elem_id="pnginfo-image")
        with gr.Column():
            infotext = gr.Textbox(label="Infotext (parameters)", lines=6, max_lines=20, elem_id="pnginfo-text",
                                  info="or paste one here")
            with gr.Row():
                send_txt2img = gr.Button("Send to text to image", visible="txt2img" in caps.modes)
                send_img2img = gr.Button("Send to image to image", visible="img2img" in caps.modes)
            note = gr.Markdown(elem_id="pnginfo-note")
            fields = gr.JSON(label="Fields", elem_id="pnginfo-fields")
    return PngInfo(image=image, infotext=infotext, fields=fields, send_txt2img=send_txt2img,
                   send_img2img=send_img2img, note=note, reading_note=gr.State(""))


@dataclass
class Page:
    """Every tab of the page."""

    tabs: gr.Tabs
    modes: dict[str, Controls]
    png_info: PngInfo


def layout(backend: Backend) -> Page:
    """The page: banner, then a tab per mode (controls on the left, results on the right) and PNG Info."""
    caps = backend.capabilities()
    gr.HTML(banner_html(backend))
    stats = gr.State(None)  # the session's latency figures, across the tabs
    modes: dict[str, Controls] = {}
    first = next((m for m in MODES if m in caps.modes), "txt2img")
    with gr.Tabs(selected=first) as tabs:
        for mode in MODES:
            with gr.Tab(MODE_LABELS[mode], id=mode, elem_id=f"tab-{mode}"):
                modes[mode] = generating_tab(caps, mode, stats)
        with gr.Tab("PNG Info", id="pnginfo", elem_id="tab-pnginfo"):
            png_info = png_info_tab(caps)
    return Page(tabs=tabs, modes=modes, png_info=png_info)


def wire_generate(c: Controls, handlers: Handlers, after: Followers) -> gr.events.Dependency:
    """Generate and Enter run one event (the API's /generate, /img2img); the latency panel follows (one of `after`,
    the updates the caller sends as one request once it succeeds); Stop cancels it.

    Inpaint's page event reads the editor (private); the API's /inpaint takes plain image and mask files, on a
    button never shown, over the same controls."""
    # One gr.on for both triggers: one endpoint, named by api_name (gradio/events.py, `on`).
    # preprocess=False: raw values reach the handler, which validates them in one place (backend.core.api)
    # and answers a bad type with a message naming the field. show_progress_on: the progress bar goes
    # over the latency panel, so that it does not cover the previews forming in the gallery.
    outputs = [c.gallery, c.details, c.stats]
    if c.mode == "inpaint":
        fn, api = handlers.inpaint_editor, dict(api_visibility="private")
    else:
        fn, api = getattr(handlers, "generate" if c.mode == "txt2img" else c.mode), dict(
            api_name="generate" if c.mode == "txt2img" else c.mode)
    generation = gr.on(triggers=[c.generate_btn.click, c.prompt.submit], fn=fn, inputs=c.request_inputs(),
                       outputs=outputs, preprocess=False, concurrency_id="generate", show_progress_on=[c.latency],
                       **api)
    if c.mode == "inpaint":
        api_image = gr.Image(type="filepath", visible=False, label="image")
        api_mask = gr.Image(type="filepath", visible=False, label="mask")
        api_inputs = [c.prompt, api_image, api_mask, *c.request_inputs()[3:]]
        gr.Button(visible=False).click(handlers.inpaint, inputs=api_inputs, outputs=outputs, preprocess=False,
                                       concurrency_id="generate", api_name="inpaint")
    caps = handlers.backend.capabilities()

    def latency_panel(details, stats):
        """The latency panel after a generation, with the walk-through's figure for its settings."""
        return latency_markdown(details, stats, caps)

    after.add(latency_panel, [c.details, c.stats], [c.latency])
    # cancels=: Gradio cancels the queued or running task (the handler's worker thread is abandoned),
    # and the handler's stop event ends the backend's work at its next step.
    c.stop_btn.click(handlers.stop, None, None, cancels=[generation], queue=False,
                     **(dict(api_name="stop") if c.mode == "txt2img" else dict(api_visibility="private")))
    if c.strength is not None:
        for control in (c.steps, c.strength):
            control.change(panels.steps_run_note, inputs=[c.steps, c.strength], outputs=[c.strength_note],
                           queue=False, api_visibility="private")
    return generation


def wire_live(c: Controls, handlers: Handlers, after: Followers, demo: gr.Blocks) -> None:
    """Live (text to image): every keystroke -> live_typing (unqueued: notes it, stops a stale live generation);
    then the live event, always_last: at most one in flight per browser, one deferred; it waits for a pause
    (ui/live.py) and generates for the prompt if it is still the latest. The toggle follows the measured latency
    (on load, when its settings change, and among `after`, the generation's followers, and the live event's)."""
    assert c.live is not None and c.live_note is not None
    gate_inputs = [c.steps, c.width, c.height, c.precision, c.guidance, c.live]

    def live_state(steps, width, height, precision, guidance, live_on):
        """The toggle (usable only when offered; switched off when not) and the note saying why."""
        decision = handlers.live_gate.decide(settings_key(steps, width, height, precision, guidance))
        return gr.Checkbox(interactive=decision.offered, value=bool(live_on) and decision.offered), decision.note

    state = dict(fn=live_state, inputs=gate_inputs, outputs=[c.live, c.live_note], api_visibility="private")
    demo.load(**state, queue=False)
    after.add(live_state, gate_inputs, [c.live, c.live_note])
    for control in (c.steps, c.width, c.height, c.precision, c.guidance):
        control.change(**state, queue=False)
    # Registered before the live event, so the browser sends it first for the same keystroke.
    c.prompt.input(handlers.live_typing, inputs=[c.prompt], outputs=None, queue=False, trigger_mode="multiple",
                   show_progress="hidden", api_visibility="private")
    # Its own concurrency group, unlimited: a live run that only waits for the pause must not hold the
    # generate slot; the backend itself runs one generation at a time (in-process backends' lock).
    live = c.prompt.input(handlers.live, inputs=[c.prompt, c.live, c.negative, c.steps, c.precision, c.guidance, c.seed,
                                                    c.scheduler, c.width, c.height, c.stats],
                          outputs=[c.gallery, c.details, c.stats], trigger_mode="always_last", preprocess=False,
                          concurrency_id="live", concurrency_limit=None, show_progress="hidden",
                          api_visibility="private")
    caps = handlers.backend.capabilities()
    live_after = Followers()
    live_after.add(lambda details, stats: latency_markdown(details, stats, caps), [c.details, c.stats], [c.latency])
    live_after.add(live_state, gate_inputs, [c.live, c.live_note])  # live runs are measured too: the note follows
    live_after.attach(live)


def wire_estimate(c: Controls, handlers: Handlers, after: Followers, demo: gr.Blocks) -> None:
    """The line beside Generate: what a generation with these controls will take (measured here), or what it reserves
    on ZeroGPU; set on load, when steps, size or the number of images change, and after each generation (one of
    `after`, the generation's followers)."""
    assert c.estimate is not None
    hires = [c.hires, c.hr_scale, c.hr_steps] if c.hires is not None else []
    controls = [c.steps, c.width, c.height, c.num_images, *hires]

    def estimate(steps, width, height, num_images, *more):
        """The estimate for these controls (then the Hires fix's, where the tab has it; after a generation, its
        details, whose stages the estimate then follows)."""
        fix = dict(zip(("hires", "hr_scale", "hr_steps"), more[:len(hires)]))
        details = more[len(hires)] if len(more) > len(hires) else None
        return estimate_note(handlers.backend, steps, width, height, num_images, details, **fix)

    state = dict(fn=estimate, inputs=controls, outputs=[c.estimate], queue=False, api_visibility="private")
    demo.load(**state)
    for control in controls:
        control.change(**state)
    after.add(estimate, [*controls, c.details], [c.estimate])


def wire_seed_buttons(c: Controls) -> None:
    """Random seed, and reuse the seed of the selected (or else the first) image."""
    c.randomize_btn.click(lambda: REQUEST_DEFAULTS["seed"], None, c.seed, queue=False, api_visibility="private")
    c.gallery.select(reuse_seed, inputs=[c.details], outputs=[c.selected_seed], queue=False,
                     api_visibility="private")
    c.reuse_btn.click(lambda s, d: s if s is not None else reuse_first_seed(d), inputs=[c.selected_seed, c.details],
                      outputs=[c.seed], queue=False, api_visibility="private")
    c.gallery.change(lambda: None, None, c.selected_seed, queue=False, api_visibility="private")


def wire_png_info(page: Page, caps: Capabilities) -> None:
    """PNG Info: reading a dropped PNG, and the two send buttons (which fill a tab and switch to it)."""
    info = page.png_info
    info.image.change(read_dropped_image, inputs=[info.image],
                      outputs=[info.infotext, info.fields, info.note, info.reading_note],
                      preprocess=False, queue=False, api_visibility="private")
    # The API's /png_info (A1111's /sdapi/v1/png-info, plus tool and notes), on a button never shown, as /inpaint:
    # a plain file in (any file: one that is not an image gets png_info's message, not Gradio's), a dict out.
    api_file, api_result = gr.File(visible=False, label="image"), gr.JSON(visible=False, label="png_info")
    gr.Button(visible=False).click(api_png_info, inputs=[api_file], outputs=[api_result], preprocess=False,
                                   queue=False, api_name="png_info")
    info.infotext.input(lambda text: infotext_fields(text) if text.strip() else {}, inputs=[info.infotext],
                        outputs=[info.fields], queue=False, api_visibility="private")
    for target, button in (("txt2img", info.send_txt2img), ("img2img", info.send_img2img)):
        c = page.modes[target]
        controls = {"prompt": c.prompt, "negative_prompt": c.negative, "steps": c.steps, "scheduler": c.scheduler,
                    "guidance_scale": c.guidance, "seed": c.seed, "width": c.width, "height": c.height}
        if c.strength is not None:
            controls["strength"] = c.strength
        if c.hires is not None:  # A1111's Hires keys (ui/pnginfo.py maps them)
            controls.update(hires=c.hires, hr_scale=c.hr_scale, hr_upscaler=c.hr_upscaler, hr_steps=c.hr_steps,
                            denoising_strength=c.denoising_strength)
        outputs = [*controls.values(), *([c.size] if c.size is not None else []), info.note, page.tabs]
        inputs = [info.infotext, info.image, info.reading_note]
        if c.image is not None:
            outputs.insert(0, c.image)
        button.click(functools.partial(send_settings, caps, list(controls), c.size is not None, c.image is not None,
                                       target),
                     inputs=inputs, outputs=outputs, preprocess=False, queue=False, api_visibility="private")


def read_dropped_image(image: Any) -> tuple[str, dict[str, Any], str, str]:
    """PNG Info's infotext, fields and note for a dropped image, and the note again, kept for Send's note."""
    infotext, fields, note = show_png_info(image)
    return infotext, fields, note, note


def api_png_info(image: Any) -> dict[str, Any]:
    """/png_info: the image's settings, or its reason as gr.Error (gradio_client raises it as AppError)."""
    try:
        return png_info(image)
    except PngInfoError as exc:
        # One log line, no traceback: a file without settings is the person's to fix (ui/handlers.py, user_error).
        log.info("png_info refused: %s", exc)
        raise gr.Error(str(exc), title="PNG Info", print_exception=False) from None


def send_settings(caps: Capabilities, names: list[str], has_size_menu: bool, takes_image: bool, target: str,
                  infotext: str, png: Any = None, reading_note: str = "") -> list[Any]:
    """The values "Send to ..." puts in the target tab's controls (gr.skip() where the infotext has nothing
    this backend takes), the note (reading's, kept, then what Send left as it was), and the tab to switch to."""
    sent = values_for_controls(infotext or "", caps)
    values = [sent.values.get(name, gr.skip()) for name in names]
    if has_size_menu:
        has_size = "width" in sent.values
        values.append(size_label(sent.values["width"], sent.values["height"]) if has_size else gr.skip())
    note = send_note(reading_note or "", MODE_LABELS[target], infotext or "", sent.notes)
    if takes_image:
        values.insert(0, png.get("path") if isinstance(png, dict) and png.get("path") else gr.skip())
    return [*values, note, gr.Tabs(selected=target) if infotext and infotext.strip() else gr.skip()]


def build_demo(backend: Backend, settings: Settings) -> DemoBlocks:
    """The Gradio app around one backend; demo.launch() needs no arguments (ui/blocks.py)."""
    store = OutputStore(png_level=settings.png_level)
    # On ZeroGPU every pause in typing would reserve GPU time from the visitor's quota: no Live (its note says so).
    live_max_ms = 0.0 if getattr(backend, "zero_gpu", False) else settings.live_max_ms
    handlers = Handlers(backend, store, live_gate=LiveGate(max_ms=live_max_ms))
    # delete_cache: files Gradio itself keeps (uploads) go after an hour, and all of them at exit.
    with DemoBlocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600),
                    auth=settings.auth_pair) as demo:
        page = layout(backend)
        for controls in page.modes.values():
            after = Followers()  # the page's updates after a generation, sent as one request (ui/followers.py)
            generation = wire_generate(controls, handlers, after)
            wire_seed_buttons(controls)
            if controls.live is not None:
                wire_live(controls, handlers, after, demo)
            wire_estimate(controls, handlers, after, demo)
            after.attach(generation)
        wire_png_info(page, backend.capabilities())
    caps = backend.capabilities()
    concurrency = settings.concurrency or DEFAULT_CONCURRENCY.get(caps.backend, caps.concurrency)
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
