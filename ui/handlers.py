"""The app's event handlers: a request from the UI or the API -> the backend -> PNG files, and each
error -> one message for the person and one line in the server log."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import html
import itertools
import logging
import time
from typing import Any, Callable

import anyio
import gradio as gr

from backend import (
    Backend,
    BackendUnavailable,
    GenerationCancelled,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
)
from backend.core.api import PREVIEW_INTERVAL_S, new_request_id
from backend.core.stats import LatencyStats
from ui.cancel import CancelRegistry
from ui.live import LIVE_SEED, LiveGate, LiveTyping, settings_key
from ui.outputs import OutputStore
from ui.pictures import editor_image_and_mask, file_bytes

log = logging.getLogger("app")

# The request's own defaults (steps, guidance_scale, seed, scheduler, num_images, ...): the API's
# parameter defaults and the controls' initial values, so the UI and the contract cannot drift apart.
REQUEST_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(GenerationRequest) if f.default is not dataclasses.MISSING
}
D = REQUEST_DEFAULTS


def as_text(message: str) -> str:
    """A message for gr.Error / gr.Warning, whose toasts render (sanitized) HTML: what it repeats of a
    prompt or of a remote endpoint's answer must show as the text it is, not become markup."""
    return html.escape(message, quote=False)


def user_error(exc: BaseException, request_id: str) -> gr.Error:
    """The message a person sees for an error, after logging it for the operator.

    print_exception=False: Gradio would otherwise print a traceback for every gr.Error, a person's typo
    included (gradio/queueing.py: `if not isinstance(e, Error) or e.print_exception`); the log line
    written here is the one an operator reads.
    """
    def error(message: str, title: str) -> gr.Error:
        return gr.Error(message, title=title, print_exception=False)

    if isinstance(exc, InvalidRequest):
        log.info("request %s refused: invalid %s: %r", request_id, exc.field or "request", str(exc))
        return error(as_text(str(exc)), "Check the request")
    if isinstance(exc, GenerationCancelled):
        log.info("request %s stopped by the user", request_id)
        return error("Stopped before the images were finished.", "Stopped")
    if isinstance(exc, BackendUnavailable):
        log.warning("request %s: backend unavailable: %r", request_id, str(exc))
        return error(as_text(f"The backend is unavailable: {exc}"), "Backend unavailable")
    if isinstance(exc, GenerationFailed):
        log.error("request %s: generation failed: %r", request_id, str(exc))
        return error(as_text(f"Generation failed: {exc}"), "Generation failed")
    # Nothing unexpected reaches a person as a traceback: the log keeps it, the message names it.
    log.error("request %s: unexpected error", request_id, exc_info=exc)
    return error(f"Something unexpected went wrong; it is in the server log as request {request_id}. Try again.",
                 "Error")


class LatestPreview:
    """The one pacer of a generation's previews: tells the backend when it wants the next one (wanted(), asked on the
    torch thread before a preview is made, api.preview_wanted) and hands each from the torch thread to the handler.
    A preview the handler has not shown yet is replaced by a newer one (a backend that paces its own, such as
    ZeroGPU's worker or --preview-every N, may make more than are shown; a slow browser sees fewer, never an old one
    late).

    Paced by what showing one costs: between a yield and the handler's next turn, Gradio writes the picture to its
    cache and sends it, and then the browser fetches it, on the cores the generation runs on. Each preview is
    counted at that measured time, or at least `min_cost_s`: the handler sees only part of the cost, and on 2 cores
    a shown preview cost the denoising 7-15 ms (benchmarks.preview with the pacing loosened: 3 previews in a 1.5 s
    generation +1.3%, 5 previews +5.2%), so 25 ms keeps a machine twice as slow within the budget too. The next
    preview is wanted once the previews so far plus one more are within `budget` of the time since the start, and
    at least `min_interval_s` after the last (each one sent briefly hides Gradio's progress bar); the backend makes
    it at the first step that ends after that, so it is as fresh as the steps allow and none is made to be dropped.
    `made` counts the previews the backend handed over, `shown` those the handler sent.
    """

    def __init__(self, budget: float = 0.05, min_cost_s: float = 0.025, min_interval_s: float = PREVIEW_INTERVAL_S):
        self.budget = budget
        self.min_cost_s = min_cost_s
        self.min_interval_s = min_interval_s
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._last_shown = -float("inf")
        self._yielded_at: float | None = None
        self.spent_s = 0.0  # Gradio's time on the previews sent so far
        self._last_cost_s = min_cost_s  # what the next preview is expected to cost
        self._latest: tuple[int, int, list[Any]] | None = None
        self._ready = asyncio.Event()
        # When the next preview is wanted, on time.monotonic()'s clock (read on the torch thread, where the loop's
        # own clock is not to be asked); +inf while one is on its way to the handler.
        self._wanted_from = time.monotonic() + self._wait_s()
        self.made = 0
        self.shown = 0

    def wanted(self) -> bool:
        """Called on the torch thread before a preview is made: whether the handler would show one made now."""
        return time.monotonic() >= self._wanted_from

    def __call__(self, step: int, total: int, images: list[Any]) -> None:
        """The backend's on_preview, called on the torch thread with a preview it made."""
        self._wanted_from = float("inf")  # none more until the handler has taken this one
        self.made += 1
        self._loop.call_soon_threadsafe(self._set, (step, total, images))

    def _set(self, item: tuple[int, int, list[Any]]) -> None:
        self._latest = item
        self._ready.set()

    def _wait_s(self) -> float:
        """How long to wait before the next preview may go."""
        now = self._loop.time()
        by_interval = self._last_shown + self.min_interval_s - now
        by_budget = (self.spent_s + self._last_cost_s) / self.budget - (now - self._started)
        return max(by_interval, by_budget, 0.0)

    async def next_or(self, generation: asyncio.Future) -> tuple[int, int, list[Any]] | None:
        """The newest preview not shown yet, or None once the generation has finished."""
        back_from_yield = self._yielded_at is not None
        if back_from_yield:  # Gradio has handled the last preview: what it cost
            self._last_cost_s = max(self._loop.time() - self._yielded_at, self.min_cost_s)
            self.spent_s += self._last_cost_s
            self._yielded_at = None
        wait_s = self._wait_s()
        if back_from_yield:  # the backend may make the next one from then (until now: none, one was on its way)
            self._wanted_from = time.monotonic() + wait_s
        if wait_s > 0:  # a backend that paces its own may hand one over early: it waits its turn
            await asyncio.wait({generation}, timeout=wait_s)
        waiter = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({waiter, generation}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if generation.done():
            return None
        self._ready.clear()
        item, self._latest = self._latest, None
        self.shown += 1
        self._last_shown = self._yielded_at = self._loop.time()
        return item


class Handlers:
    """generate and stop for one app: the backend, the output files and the Stop events they share."""

    def __init__(self, backend: Backend, store: OutputStore, cancels: CancelRegistry | None = None,
                 live_gate: LiveGate | None = None):
        self.backend = backend
        self.store = store
        self.cancels = cancels or CancelRegistry()
        self.live_gate = live_gate or LiveGate(max_ms=1000.0)
        self.typing = LiveTyping()
        self.live_generations = 0  # live generations started (the browser test reads the log line beside it)
        self._fallback_session = itertools.count()

    # The parameter names and defaults are the API's (/generate, /img2img, /inpaint, called by keyword); None
    # for precision, width and height is GenerationRequest's own "the backend's default". preview=False: no
    # pictures while denoising (API clients and load tests that want only the result).
    async def generate(self, prompt, negative_prompt=None, steps=D["steps"], precision=D["precision"],
                       guidance_scale=D["guidance_scale"], seed=D["seed"], scheduler=D["scheduler"],
                       width=D["width"], height=D["height"], num_images=D["num_images"], preview=True,
                       stats=None, enable_hr=False, hr_scale=D["hr_scale"], hr_upscaler=D["hr_upscaler"],
                       hr_steps=D["hr_steps"], denoising_strength=D["denoising_strength"],
                       request: gr.Request = None, progress=gr.Progress()):
        """Generate images for a prompt: yields the gallery with pictures of the latents while denoising
        (where the backend makes them), then the PNG gallery and a JSON details object. The hires fix runs where
        enable_hr (the page's "Hires fix" checkbox; A1111's API name) is true, with hr_scale and the rest."""
        def fields():
            if not enable_hr:
                return {}
            return dict(hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_steps=hr_steps,
                        denoising_strength=denoising_strength)

        async for value in self._run(fields, prompt, negative_prompt, steps, precision, guidance_scale, seed,
                                     scheduler, width, height, num_images, preview, stats, request, progress):
            yield value

    async def img2img(self, prompt, image=None, strength=D["strength"], resize_mode=D["resize_mode"],
                      negative_prompt=None, steps=D["steps"], precision=D["precision"],
                      guidance_scale=D["guidance_scale"], seed=D["seed"], scheduler=D["scheduler"], width=D["width"],
                      height=D["height"], num_images=D["num_images"], preview=True, stats=None,
                      request: gr.Request = None, progress=gr.Progress()):
        """Image to image: the input image (fitted to the size by resize_mode) repainted by the prompt, as much
        as strength says; yields what generate yields."""
        def fields():
            return dict(mode="img2img", image=file_bytes("image", image), strength=strength, resize_mode=resize_mode)

        async for value in self._run(fields, prompt, negative_prompt, steps, precision, guidance_scale, seed,
                                     scheduler, width, height, num_images, preview, stats, request, progress):
            yield value

    async def inpaint(self, prompt, image=None, mask=None, strength=D["strength"], mask_blur=D["mask_blur"],
                      resize_mode=D["resize_mode"], negative_prompt=None, steps=D["steps"], precision=D["precision"],
                      guidance_scale=D["guidance_scale"], seed=D["seed"], scheduler=D["scheduler"], width=D["width"],
                      height=D["height"], num_images=D["num_images"], preview=True, stats=None,
                      request: gr.Request = None, progress=gr.Progress()):
        """Inpaint (the API's): the mask's white part of the image repainted, the rest kept exactly."""
        def fields():
            return dict(mode="inpaint", image=file_bytes("image", image), mask=file_bytes("mask", mask),
                        strength=strength, mask_blur=mask_blur, resize_mode=resize_mode)

        async for value in self._run(fields, prompt, negative_prompt, steps, precision, guidance_scale, seed,
                                     scheduler, width, height, num_images, preview, stats, request, progress):
            yield value

    async def inpaint_editor(self, prompt, editor=None, mask=None, strength=D["strength"], mask_blur=D["mask_blur"],
                             resize_mode=D["resize_mode"], negative_prompt=None, steps=D["steps"],
                             precision=D["precision"], guidance_scale=D["guidance_scale"], seed=D["seed"],
                             scheduler=D["scheduler"], width=D["width"], height=D["height"],
                             num_images=D["num_images"], preview=True, stats=None, request: gr.Request = None,
                             progress=gr.Progress()):
        """Inpaint from the page: the editor's picture, and its painted strokes (or the uploaded mask) as the mask."""
        def fields():
            picture, painted = editor_image_and_mask(editor, mask)
            return dict(mode="inpaint", image=picture, mask=painted, strength=strength, mask_blur=mask_blur,
                        resize_mode=resize_mode)

        async for value in self._run(fields, prompt, negative_prompt, steps, precision, guidance_scale, seed,
                                     scheduler, width, height, num_images, preview, stats, request, progress):
            yield value

    async def _run(self, mode_fields: Callable[[], dict[str, Any]], prompt, negative_prompt, steps, precision,
                   guidance_scale, seed, scheduler, width, height, num_images, preview, stats, request, progress,
                   cancel_key: str | None = None):
        """One generation of any mode; mode_fields() gives the mode's own request fields (reading the pictures,
        inside the error handling, so a bad file is a message naming its field). cancel_key: the CancelRegistry
        key (default: the session; live generations use their own, so typing never stops a Generate)."""
        request_id = new_request_id()
        session = getattr(request, "session_hash", None) or f"anon-{next(self._fallback_session)}"
        event = self.cancels.start(cancel_key or session)

        def on_step(step: int, total: int) -> None:
            if event.is_set():
                raise GenerationCancelled("stopped")
            progress((step, total), desc="Denoising", unit="steps")

        previews = LatestPreview()
        started = time.perf_counter()
        try:
            req = GenerationRequest(
                prompt=prompt, negative_prompt=negative_prompt or "", steps=steps, guidance_scale=guidance_scale,
                seed=seed if seed not in (None, "") else D["seed"], scheduler=scheduler, precision=precision,
                width=width, height=height, num_images=num_images, **mode_fields(),
            )
            want_previews = preview is not False and self.backend.capabilities().previews
            # In a worker thread that Gradio abandons when it cancels this task (Stop, an API client's
            # job.cancel()): the event below then stops the backend at its next step, where a plain
            # sync function would hold the device until a generation nobody waits for was done.
            generation = asyncio.ensure_future(anyio.to_thread.run_sync(
                functools.partial(self._generate_and_save, req, on_step,
                                  previews if want_previews else None),
                abandon_on_cancel=True))
            try:
                while (shown := await previews.next_or(generation)) is not None:
                    step, total, images = shown
                    # Captioned, not relabelled: the last value is the API's result, the same plain gallery as
                    # without previews (a gr.update would reach gradio_client as an update dict).
                    caption = f"Preview: step {step} of {total}"
                    yield [(image, caption) for image in images], gr.skip(), gr.skip()
                result, files, files_s = generation.result()
            finally:
                generation.cancel()  # a no-op once it is done; else (cancelled here) let the thread go
        except (asyncio.CancelledError, anyio.get_cancelled_exc_class()):
            event.set()
            log.info("request %s cancelled by its client", request_id)
            raise
        except Exception as exc:  # noqa: BLE001 - each kind becomes its own message (user_error)
            raise user_error(exc, request_id) from None
        finally:
            self.cancels.finish(cancel_key or session, event)
        if req.mode == "txt2img" and not result.request.hires and result.images:  # Live: the latency per image
            width, height = result.images[0].size  # the size run (the request's may be None: the default)
            precision = req.precision or self.backend.capabilities().default_precision
            self.live_gate.record(settings_key(req.steps, width, height, precision, req.guidance_scale),
                                  result.timings.total_ms / len(result.images))
        t_details = time.perf_counter()
        details = result.details()
        details["app_ms"] = round((files_s + time.perf_counter() - t_details) * 1000.0, 1)
        for warning in result.warnings:
            gr.Warning(as_text(warning))
        stats = stats if isinstance(stats, LatencyStats) else LatencyStats()
        stats.add(result.timings.total_ms, len(files))
        log.info("request %s: generated %d image(s) (%s) in %.0f ms (backend %.0f ms, %d preview(s) shown, %d made)",
                 request_id, len(files), req.mode, (time.perf_counter() - started) * 1000.0,
                 result.timings.total_ms, previews.shown, previews.made)
        yield files, details, stats

    def _generate_and_save(self, req: GenerationRequest, on_step, on_preview) -> tuple[Any, list[str], float]:
        """On the worker thread: the generation, then its PNG files, and the files' seconds (one trip from the event
        loop and back for both, not two: a trip costs about 1 ms on 2 cores, docs/benchmarks.md, benchmarks.floor)."""
        result = self.backend.generate(req, on_step=on_step, on_preview=on_preview)
        started = time.perf_counter()
        files = [self.store.save(image, seed) for image, seed in zip(result.images, result.seeds)]
        return result, files, time.perf_counter() - started

    def stop(self, request: gr.Request = None):
        """Stop this session's running generation (and its live one)."""
        if request is not None and request.session_hash:
            self.cancels.stop(request.session_hash)
            self.cancels.stop(live_key(request.session_hash))

    def live_typing(self, prompt, request: gr.Request = None):
        """Every keystroke in the prompt (unqueued): note it, and stop the session's running live generation,
        now stale, after its current step (the live event's next run brings the new prompt). The same text again
        is no keystroke (ui/live.py): nothing to note or stop."""
        if request is not None and request.session_hash and self.typing.typed(request.session_hash, prompt or ""):
            self.cancels.stop(live_key(request.session_hash))

    async def live(self, prompt, live_on, negative_prompt=None, steps=D["steps"], precision=D["precision"],
                   guidance_scale=D["guidance_scale"], seed=D["seed"], scheduler=D["scheduler"], width=D["width"],
                   height=D["height"], stats=None, request: gr.Request = None):
        """Live: after a pause in typing (ui/live.py's PAUSE_S), one image for the prompt if it is still the
        latest and Live is on and offered for these settings; gr.skip() for the outputs otherwise."""
        skip = (gr.skip(), gr.skip(), gr.skip())
        session = getattr(request, "session_hash", None)
        if not live_on or not session or not (prompt or "").strip():
            return skip
        if not await self.typing.wait_for_pause(session, prompt):
            return skip  # typed on: done now, so the browser sends its deferred run, with the newer prompt, at once
        key = settings_key(steps, width, height, precision, guidance_scale)
        if not self.live_gate.decide(key).offered:
            return skip
        if not self.typing.claim_pause(session, prompt):
            return skip  # this pause has had its generation (the browser sent the same text's run again)
        live_seed = seed if seed not in (None, "", -1) else LIVE_SEED
        self.live_generations += 1
        log.info("live generation %d for %r", self.live_generations, prompt)
        last = skip
        try:
            async for value in self._run(lambda: {}, prompt, negative_prompt, steps, precision, guidance_scale,
                                         live_seed, scheduler, width, height, 1, False, stats, request,
                                         lambda *a, **k: None, cancel_key=live_key(session)):
                last = value  # no previews: the one value is the result
        except gr.Error:
            if not self.typing.is_latest(session, prompt):
                log.info("live generation %d stopped: the prompt changed", self.live_generations)
                return skip
            raise
        return last


def live_key(session: str) -> str:
    """The CancelRegistry key of a session's live generation."""
    return f"{session}/live"


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
