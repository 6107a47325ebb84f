"""The app's parts in this process, no server and no model: output files, Stop events, the latency
panel, what a request's errors write to the log. Milliseconds each."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time

import gradio as gr
import pytest
from PIL import Image

from backend import Capabilities, GenerationRequest, GenerationResult, InvalidRequest, Timings
from backend.core.api import preview_wanted
from backend.core.metadata import attach, parse_infotext, read_infotext, write_infotext
from backend.core.stats import LatencyStats
from ui.cancel import CancelRegistry
from ui.handlers import REQUEST_DEFAULTS, Handlers
from ui.login_limit import LoginLimiter
from ui.outputs import OutputStore
from ui.panels import latency_markdown, mode_unavailable_note, no_preview_note, steps_run_note

# --- OutputStore ------------------------------------------------------------------------------------


def an_image(seed: int) -> Image.Image:
    image = Image.new("RGB", (8, 8), (seed % 256, 0, 0))
    return attach(image, write_infotext(f"prompt {seed}", "", {"Steps": 3, "Seed": seed, "Size": "8x8"}))


def test_output_store_keeps_the_newest_files_only(tmp_path):
    store = OutputStore(tmp_path, max_files=3)
    paths = [store.save(an_image(seed), seed) for seed in range(5)]
    on_disk = sorted(str(p) for p in store.root.rglob("*.png"))
    assert on_disk == sorted(paths[2:])  # the two oldest went, with their folders
    assert len(list(store.root.iterdir())) == 3


def test_output_store_pngs_keep_their_infotext(tmp_path):
    store = OutputStore(tmp_path, png_level=6)
    path = store.save(an_image(42), 42)
    assert path.endswith("/42.png") and path.startswith(str(tmp_path.resolve()))
    info = parse_infotext(read_infotext(path))
    assert info["prompt"] == "prompt 42" and info["params"]["Seed"] == "42"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (8, 8) and img.getpixel((0, 0)) == (42, 0, 0)


def test_output_store_close_removes_everything(tmp_path):
    store = OutputStore(tmp_path)
    for seed in range(3):
        store.save(an_image(seed), seed)
    store.close()
    assert not store.root.exists() and tmp_path.exists()


# --- CancelRegistry ---------------------------------------------------------------------------------


def test_stop_sets_the_running_generations_event():
    cancels = CancelRegistry()
    event = cancels.start("s1")
    other = cancels.start("s2")
    assert cancels.stop("s1") is True
    assert event.is_set() and not other.is_set()
    cancels.finish("s1", event)
    assert cancels.stop("s1") is False  # nothing runs for s1 any more


def test_finish_of_an_older_generation_keeps_the_newer_event():
    cancels = CancelRegistry()
    old = cancels.start("s")
    new = cancels.start("s")  # the same session started again before the old one finished
    cancels.finish("s", old)
    assert cancels.stop("s") is True
    assert new.is_set() and not old.is_set()


# --- latency panel ----------------------------------------------------------------------------------

DETAILS = {"seeds": [1, 2], "app_ms": 3.25, "timings": {
    "total_ms": 1234.4, "text_encoder_ms": 10.04, "denoise_ms": 1200.0, "step_ms": [400.0, 400.0, 400.0],
    "vae_ms": 24.36}}


def test_latency_panel_before_the_first_generation():
    assert latency_markdown(None, None) == "Latency appears here after the first generation."
    assert latency_markdown({}, LatencyStats()) == "Latency appears here after the first generation."


def test_latency_panel_lists_the_stages_of_a_local_request():
    text = latency_markdown(DETAILS, None)
    assert text.startswith("**This request: 1234 ms** for 2 image(s)")
    for row in ("| text encoder | 10.0 |", "| denoising (3 steps, 400.0 ms/step) | 1200.0 |", "| VAE decode | 24.4 |",
                "| app (PNG files) | 3.2 |"):
        assert row in text.splitlines(), text
    assert "endpoint" not in text and "network" not in text and "This session" not in text


def test_latency_panel_of_a_remote_request_splits_server_and_network():
    details = {**DETAILS, "timings": {**DETAILS["timings"], "server_ms": 1000.0, "network_ms": 234.4}}
    lines = latency_markdown(details, None).splitlines()
    assert "| endpoint (server time) | 1000.0 |" in lines and "| network + queue | 234.4 |" in lines


def test_latency_panel_adds_the_session_line():
    stats = LatencyStats()
    for ms in (1000.0, 2000.0, 3000.0):
        stats.add(ms, 2)
    text = latency_markdown(DETAILS, stats)
    assert text.splitlines()[-1].startswith("**This session:** 3 request(s), P50 2000 ms, P95 2900 ms, ")
    assert latency_markdown(None, stats).lstrip().startswith("**This session:** 3 request(s)")


def test_latency_panel_sets_the_walkthrough_figure_beside_the_same_steps_and_precision():
    details = {**DETAILS, "seeds": [1], "precision": "bf16", "steps": 20, "size": "512x512"}
    stats = LatencyStats()
    stats.add(900.0, 1)
    text = latency_markdown(details, stats)
    assert ("*AWS walk-through, same steps and precision (inf2.xlarge, SD2.1 512x512, bf16, 20 steps):* "
            "**P95 908 ms**, 1.116 QPS, one image per request.") in text.splitlines()
    assert text.splitlines()[-1].endswith("images/s (walk-through: 1.116 QPS)")


def test_reference_line_says_what_differs_and_when_it_means_nothing():
    tiny = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",), is_tiny=True)
    details = {**DETAILS, "precision": "fp32", "steps": 30, "size": "256x256"}
    line = latency_markdown(details, None, tiny).splitlines()[-1]
    assert "fp32, 30 steps):* **P95 1517 ms**, 0.676 QPS" in line
    assert "tiny random-weights one, so the comparison means nothing" in line
    assert "this request is 256x256" in line and "made 2 images" in line
    random = Capabilities(backend="local", model="sd21-random", device="cpu", precisions=("fp32",), is_tiny=True)
    assert "means nothing" not in latency_markdown(details, None, random)  # the real architecture: it compares
    other = latency_markdown({**DETAILS, "precision": "fp32", "steps": 25}, None).splitlines()[-1]
    assert other == ("*AWS walk-through (inf2.xlarge, SD2.1 512x512):* no figure for fp32 at 25 steps; it measured "
                     "20, 30, 50 steps at bf16 and fp32.")


def test_no_preview_note_names_the_reason():
    remote = Capabilities(backend="sagemaker", model="m", device="d", precisions=("bf16",))
    assert "answers once per request" in no_preview_note(remote)
    off = Capabilities(backend="local", model="m", device="cpu", precisions=("fp32",))
    assert "--preview-every 0" in no_preview_note(off)


# --- the generate handler: messages and log lines ---------------------------------------------------


def test_controls_and_api_defaults_are_the_requests_own():
    # steps, guidance_scale, scheduler: None, the backend's defaults (Capabilities.default_steps, ...).
    assert REQUEST_DEFAULTS == {"negative_prompt": "", "steps": None, "guidance_scale": None, "seed": -1,
                                "scheduler": GenerationRequest.scheduler, "precision": None, "width": None,
                                "height": None, "num_images": 1, "mode": "txt2img", "image": None, "mask": None,
                                "strength": 0.75, "mask_blur": 4, "resize_mode": "crop", "hr_scale": 1.0,
                                "hr_upscaler": None, "hr_steps": 0, "denoising_strength": None}
    import inspect

    # Each endpoint's keywords: its own first, then /generate's (less text to image's hires fix), all with the
    # request's defaults.
    hires = ("enable_hr", "hr_scale", "hr_upscaler", "hr_steps", "denoising_strength")
    generate = [name for name in inspect.signature(Handlers.generate).parameters if name not in hires]
    for name, own in (("img2img", ["image", "strength", "resize_mode"]),
                      ("inpaint", ["image", "mask", "strength", "mask_blur", "resize_mode"])):
        params = inspect.signature(getattr(Handlers, name)).parameters
        assert list(params) == ["self", "prompt", *own, *list(generate)[2:]]
        for key in own:
            assert params[key].default == REQUEST_DEFAULTS[key]


class Broken:
    """A stand-in for a backend with a bug (nothing real breaks on demand): generate raises what it is given."""

    name = "broken"

    def __init__(self, error: Exception):
        self.error = error

    def capabilities(self):
        return Capabilities(backend=self.name, model="none", device="cpu", precisions=("fp32",))

    def generate(self, request, on_step=None, on_preview=None):
        raise self.error


def in_own_loop(coroutine):
    """asyncio.run on a thread of its own: in the full suite, Playwright's sync API keeps an event loop
    running on the main thread, where asyncio.run refuses to start another."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def run_generate(backend, tmp_path, **kwargs):
    """Call the handler as Gradio would, without a server, to its end; the gr.Error it raises, or None."""
    handlers = Handlers(backend, OutputStore(tmp_path))

    async def consume():
        async for _ in handlers.generate(**kwargs):
            pass

    try:
        in_own_loop(consume())
    except gr.Error as exc:
        return exc
    return None


def app_records(caplog):
    return [r for r in caplog.records if r.name == "app"]


def test_bad_input_is_one_log_line_naming_the_field(tmp_path, caplog):
    """(test_app checks the same in a real app's log, with the real backend's InvalidRequest.)"""
    caplog.set_level(logging.INFO, logger="app")
    error = run_generate(Broken(InvalidRequest("steps: 0 is out of range; 1-100 are allowed.", "steps")), tmp_path,
                         prompt="cat", steps=0)
    assert error is not None and error.title == "Check the request" and error.message.startswith("steps: 0 is out")
    assert error.print_exception is False  # Gradio prints no traceback of its own for it
    [record] = app_records(caplog)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert re.fullmatch(r"request [0-9a-f]{8} refused: invalid steps: 'steps: 0 is out of range.*'",
                        record.getMessage()), record.getMessage()


def test_unexpected_error_keeps_its_traceback_under_the_id_the_user_sees(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="app")
    error = run_generate(Broken(KeyError("a bug")), tmp_path, prompt="cat")
    found = re.search(r"it is in the server log as request ([0-9a-f]{8})\. Try again\.", error.message)
    assert found and error.title == "Error" and "a bug" not in error.message, error.message
    [record] = app_records(caplog)
    assert record.levelno == logging.ERROR and record.getMessage() == f"request {found[1]}: unexpected error"
    assert "Traceback" in caplog.text and "KeyError: 'a bug'" in caplog.text


def test_settings_have_no_literal_defaults_in_the_app():
    """The controls start at the backend's defaults (Capabilities): the default scheduler's key is written
    nowhere in app.py."""
    from helpers import ROOT

    from backend.core.schedulers import DEFAULT_SCHEDULER

    assert DEFAULT_SCHEDULER not in (ROOT / "app.py").read_text()


# --- failed logins per address ----------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_limiter_refuses_an_address_after_its_failures_until_the_window_passes():
    clock = Clock()
    limiter = LoginLimiter(max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert limiter.try_login("a") is None  # each try counts until it succeeds
        clock.now += 1
    assert limiter.try_login("a") == 57  # the first failure leaves the window at 1060
    assert limiter.try_login("b") is None  # another address is not affected
    clock.now = 1060
    assert limiter.try_login("a") is None  # one failure has left the window: one more try


def test_login_limiter_forgets_an_address_that_logs_in():
    clock = Clock()
    limiter = LoginLimiter(max_failures=2, window_s=60, clock=clock)
    assert limiter.try_login("a") is None
    assert limiter.try_login("a") is None
    limiter.succeeded("a")
    assert limiter.try_login("a") is None and limiter.try_login("a") is None
    assert limiter.try_login("a") is not None


def test_login_limiter_remembers_a_bounded_number_of_addresses():
    clock = Clock()
    limiter = LoginLimiter(max_failures=1, window_s=60, clock=clock, max_addresses=2)
    for address in ("a", "b", "c"):
        assert limiter.try_login(address) is None
    assert limiter.try_login("a") is None  # forgotten: the quietest went first
    assert limiter.try_login("c") is not None


class Previewing:
    """A backend that makes one preview, waits until the handler has yielded it, then finishes."""

    name = "previewing"

    def __init__(self, previews: bool = True):
        self.previews = previews
        self.shown = threading.Event()
        self.asked_for_previews = None

    def capabilities(self):
        return Capabilities(backend=self.name, model="m", device="cpu", precisions=("fp32",), previews=self.previews)

    def generate(self, request, on_step=None, on_preview=None):
        self.asked_for_previews = on_preview is not None
        if on_preview is not None:
            on_preview(2, 4, [Image.new("RGB", (8, 8), "red")])
            assert self.shown.wait(10), "the handler never yielded the preview"
        image = attach(Image.new("RGB", (64, 64), "blue"), "a picture\nSteps: 4")
        return GenerationResult(images=[image], seeds=[7], timings=Timings(total_ms=5.0), request=request,
                                backend=self.name, model="m")


def collect(handlers, backend, **kwargs):
    """Every value the handler yields, as Gradio would receive them."""
    async def run():
        out = []
        async for value in handlers.generate(**kwargs):
            out.append(value)
            backend.shown.set()
        return out

    return in_own_loop(run())


def test_the_handler_yields_previews_then_the_images(tmp_path):
    backend = Previewing()
    handlers = Handlers(backend, OutputStore(tmp_path))
    first, last = collect(handlers, backend, prompt="cat", steps=4)
    gallery, details, stats = first
    [(picture, caption)] = gallery
    assert caption == "Preview: step 2 of 4" and picture.size == (8, 8)
    assert details == gr.skip() and stats == gr.skip()
    gallery, details, stats = last
    assert len(gallery) == 1 and gallery[0].endswith("7.png")  # plain paths: the API's result as before
    assert details["seeds"] == [7] and stats.summary().count == 1


class Stepping:
    """A backend that asks the caller before each preview (api.preview_wanted), as the in-process ones do."""

    name = "stepping"

    def __init__(self, steps: int = 30, step_s: float = 0.04):
        self.steps, self.step_s = steps, step_s
        self.shown = threading.Event()  # what collect() sets; unused here
        self.made: list[int] = []

    def capabilities(self):
        return Capabilities(backend=self.name, model="m", device="cpu", precisions=("fp32",), previews=True)

    def generate(self, request, on_step=None, on_preview=None):
        wanted = preview_wanted(on_preview)
        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            on_step(step, self.steps)
            if wanted is not None and step < self.steps and wanted():
                self.made.append(step)
                on_preview(step, self.steps, [Image.new("RGB", (8, 8), "red")])
        image = attach(Image.new("RGB", (64, 64), "blue"), "a picture\nSteps: 30")
        return GenerationResult(images=[image], seeds=[7], timings=Timings(total_ms=5.0), request=request,
                                backend=self.name, model="m")


def test_the_handler_paces_the_backend_so_every_preview_made_is_shown(tmp_path):
    """One pacer: the backend makes a preview only when the handler will show it, so none is made to be dropped,
    and each shown is the newest (its step is the one just made). 30 steps of 40 ms outlast the first preview's
    pacing (0.5 s) however loaded the machine: sleeps only get longer."""
    backend = Stepping()
    values = collect(Handlers(backend, OutputStore(tmp_path)), backend, prompt="cat", steps=30)
    *previews, last = values
    shown = [int(gallery[0][1].split()[2]) for gallery, _, _ in previews]  # "Preview: step N of 30"
    assert shown and shown == backend.made
    assert len(last[0]) == 1 and last[1]["seeds"] == [7]


def test_no_previews_asked_when_the_client_or_the_backend_says_no(tmp_path):
    for backend, kwargs in ((Previewing(), {"preview": False}), (Previewing(previews=False), {})):
        handlers = Handlers(backend, OutputStore(tmp_path))
        values = collect(handlers, backend, prompt="cat", steps=4, **kwargs)
        assert len(values) == 1 and backend.asked_for_previews is False


# --- image modes: the page's pieces -----------------------------------------------------------------


def test_latency_panel_of_an_image_mode_shows_the_encode_and_the_steps_run():
    details = {**DETAILS, "mode": "img2img", "steps": 20, "strength": 0.75, "denoising_steps": 15, "precision": "fp32",
               "timings": {**DETAILS["timings"], "vae_encode_ms": 12.34}}
    lines = latency_markdown(details, None).splitlines()
    assert "| VAE encode | 12.3 |" in lines
    assert "| denoising (3 of 20 steps, strength 0.75, 400.0 ms/step) | 1200.0 |" in lines
    assert "ran 15 of them from an image, plus a VAE encode" in lines[-1]
    assert "VAE encode" not in latency_markdown(DETAILS, None)  # text to image: no such stage


def test_steps_run_note_follows_steps_and_strength():
    assert steps_run_note(20, 0.75) == "Runs **15 of 20** steps"
    assert steps_run_note(7, 1.0) == "Runs **7 of 7** steps"
    assert steps_run_note(20, 0.04) == "Runs **no** step of 20: raise Strength or Steps."
    assert steps_run_note(None, 0.5) == ""


def test_a_tab_the_backend_cannot_run_says_why():
    neuron = Capabilities(backend="neuron", model="m", device="d", precisions=("bf16",))
    assert "no VAE encoder part" in mode_unavailable_note(neuron, "img2img")
    assert mode_unavailable_note(neuron, "img2img").endswith("This backend offers: Text to image.*")
    inpainting = Capabilities(backend="local", model="m", device="cpu", precisions=("fp32",), modes=("inpaint",))
    assert "inpainting one (9 input channels)" in mode_unavailable_note(inpainting, "txt2img")


def rgba_layer(size, box):
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 51, 102, 255), box)
    return layer


def test_the_painted_strokes_alpha_is_the_mask(tmp_path):
    from ui.pictures import editor_image_and_mask, strokes_mask

    mask = strokes_mask([rgba_layer((8, 6), (0, 0, 2, 2)), rgba_layer((8, 6), (4, 4, 8, 6))])
    assert mask.mode == "L" and mask.size == (8, 6)
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((5, 5)) == 255 and mask.getpixel((3, 3)) == 0
    background, layer, upload = tmp_path / "bg.png", tmp_path / "layer.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 6), "blue").save(background)
    Image.new("RGBA", (8, 6), (0, 0, 0, 0)).save(layer)
    editor = {"background": {"path": str(background)}, "layers": [{"path": str(layer)}], "composite": None}
    with pytest.raises(InvalidRequest, match="mask: nothing is painted; paint over the part to repaint, or upload"):
        editor_image_and_mask(editor, None)
    Image.new("L", (8, 6), 255).save(upload)
    image, mask = editor_image_and_mask(editor, {"path": str(upload)})  # an uploaded mask is used instead
    assert image == background.read_bytes() and mask == upload.read_bytes()
    assert editor_image_and_mask({"background": None, "layers": []}, None) == (None, None)  # the request says why


def a1111_png(path, text: str) -> None:
    """A PNG as AUTOMATIC1111 writes one: its infotext in a tEXt chunk named parameters, through PngInfo.add_text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (16, 16), "green").save(path, pnginfo=info)


A1111_TEXT = ("masterpiece, a castle on a hill, (golden hour:1.2)\nNegative prompt: blurry, lowres\n"
              "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, "
              "Size: 512x768, Model hash: 6ce0161689, Model: v2-1_512-ema-pruned, Denoising strength: 0.55, "
              "Version: v1.10.1")


def test_png_info_reads_an_automatic1111_png_and_sends_what_this_backend_takes(tmp_path):
    from ui.pnginfo import read_png_info, values_for_controls

    a1111_png(tmp_path / "a1111.png", A1111_TEXT)
    text, fields = read_png_info({"path": str(tmp_path / "a1111.png")})
    assert text == A1111_TEXT
    assert fields["Prompt"] == "masterpiece, a castle on a hill, (golden hour:1.2)"
    assert fields["Negative prompt"] == "blurry, lowres" and fields["Schedule type"] == "Karras"
    caps = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",))
    sent = values_for_controls(text, caps)
    assert sent.values == {"prompt": "masterpiece, a castle on a hill, (golden hour:1.2)",
                           "negative_prompt": "blurry, lowres", "steps": 28, "guidance_scale": 6.5,
                           "seed": 1234567890, "strength": 0.55, "scheduler": "dpm++2m-karras", "width": 512,
                           "height": 768}
    assert sent.notes == []
    compiled = Capabilities(backend="neuron", model="m", device="d", precisions=("bf16",), fixed_sizes=((512, 512),),
                            max_steps=20)
    sent = values_for_controls(text.replace("DPM++ 2M", "DPM++ SDE"), compiled)
    assert {"width", "height", "steps", "scheduler"}.isdisjoint(sent.values)
    assert [n.split(":")[0] for n in sent.notes] == ["Steps", "Sampler", "Size"]


def test_png_info_round_trips_this_apps_png_and_says_when_there_is_none(tmp_path):
    from backend.core.metadata import png_bytes
    from ui.pnginfo import NO_PNG, NO_TEXT, read_png_info, values_for_controls

    text = write_infotext("a fox", "dog", {"Steps": 9, "Sampler": "Euler a", "CFG scale": "5", "Seed": 77,
                                           "Size": "128x64", "Mode": "img2img", "Denoising strength": "0.4"})
    (tmp_path / "ours.png").write_bytes(png_bytes(attach(Image.new("RGB", (8, 8)), text)))
    got, fields = read_png_info({"path": str(tmp_path / "ours.png")})
    assert got == text and fields["Mode"] == "img2img"
    caps = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",))
    assert values_for_controls(got, caps).values == {"prompt": "a fox", "negative_prompt": "dog", "steps": 9,
                                                     "guidance_scale": 5.0, "seed": 77, "strength": 0.4,
                                                     "scheduler": "euler-a", "width": 128, "height": 64}
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_png_info({"path": str(tmp_path / "plain.png")}) == ("", {"note": NO_TEXT})
    assert read_png_info(None) == ("", {"note": NO_PNG})
    (tmp_path / "text.png").write_text("not a picture")
    assert "cannot be read as an image" in read_png_info({"path": str(tmp_path / "text.png")})[1]["note"]


def test_send_to_fills_the_controls_switches_tab_and_skips_what_it_cannot():
    import app

    caps = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",))
    names = ["prompt", "negative_prompt", "steps", "scheduler", "guidance_scale", "seed", "width", "height",
             "strength"]
    values = app.send_settings(caps, names, False, True, "img2img", A1111_TEXT.replace("DPM++ 2M", "Heun"),
                               {"path": "/uploads/a1111.png"})
    image, *controls, note, tabs = values
    assert image == "/uploads/a1111.png" and tabs.selected == "img2img"
    assert controls[:3] == ["masterpiece, a castle on a hill, (golden hour:1.2)", "blurry, lowres", 28]
    assert controls[3] == gr.skip() and note == "Sampler: Heun Karras is not offered here; left as it was."
    assert controls[4:] == [6.5, 1234567890, 512, 768, 0.55]
    *_, note, tabs = app.send_settings(caps, names[:-1], False, False, "txt2img", "", None)
    assert "no settings to send" in note and tabs == gr.skip()


def test_compiled_sizes_are_one_size_menu():
    import app

    caps = Capabilities(backend="neuron", model="m", device="d", precisions=("bf16",),
                        fixed_sizes=((512, 512), (768, 512)), default_size=(768, 512))
    with gr.Blocks():
        sizes = app.size_controls(caps)
    assert isinstance(sizes["size"], gr.Dropdown) and sizes["size"].value == "768x512"
    assert [choice[1] for choice in sizes["size"].choices] == ["512x512", "768x512"]
    assert sizes["width"].visible is False and sizes["height"].visible is False  # the API's width/height stay
    with gr.Blocks():
        sliders = app.size_controls(Capabilities(backend="local", model="m", device="cpu", precisions=("fp32",)))
    assert set(sliders) == {"width", "height"} and isinstance(sliders["width"], gr.Slider)


# --- the updates after a generation -------------------------------------------------------------------------------


def test_followers_run_each_update_on_its_own_values_in_order():
    from ui.followers import Followers

    with gr.Blocks():
        a, b, c, out1, out2, out3 = (gr.Textbox() for _ in range(6))
    after = Followers()
    after.add(lambda x, y: f"{x}+{y}", [a, b], [out1])
    after.add(lambda y, z: (y.upper(), z * 2), [b, c], [out2, out3])
    assert after.run("1", "b", "b", "c") == ["1+b", "B", "cc"]  # a component in two inputs comes twice
    with pytest.raises(ValueError, match="already another follower's"):
        after.add(lambda: "again", [], [out2])


def test_a_generation_is_followed_by_one_request_for_the_page():
    """The latency panel, Live's toggle and note and the estimate after a text-to-image generation: one unqueued
    event (ui/followers.py), where each was one request of its own; and one after a live run."""
    from app import build_demo
    from backend import Settings
    from benchmarks.floor import InstantBackend

    demo = build_demo(InstantBackend(), Settings(backend="local"))
    deps = demo.config["dependencies"]
    generate = next(d for d in deps if d.get("api_name") == "generate")
    followers = [d for d in deps if d.get("trigger_after") == generate["id"] and d.get("trigger_only_on_success")]
    assert len(followers) == 1 and not followers[0]["queue"]
    ids = {block._id: block for block in demo.blocks.values()}
    outputs = {getattr(ids[o], "elem_id", None) for o in followers[0]["outputs"]}
    assert {"latency", "live", "live-note", "estimate"} <= outputs, outputs
    demo.sd_outputs.close()
