"""ZeroGPU (Hugging Face Spaces): the local backend's generation inside a `@spaces.GPU` call.

A ZeroGPU Space (the Space sets SPACES_ZERO_GPU=true) has no GPU in the app's process. The `spaces` package (0.51,
spaces/zero/) patches torch when imported there, so that `.to("cuda")` only records the tensors (packed to disk at
launch); each call of a `@spaces.GPU` function asks its device API for a GPU (`/schedule`, with the call's duration,
charged to the visitor's daily quota), forks a worker process that is let onto it (`/allow`), moves the recorded
tensors there and runs the function; `/release` when it ends. The worker is kept for the next call. What that asks of
this app, and how it is met here:

- The function must be a plain one: ZeroGPU refuses coroutine functions, and the app's handler is an async generator.
  `run_generation` is a generator run in the worker; `ZeroGPUBackend.generate` (called like any backend's generate,
  in a worker thread of the handler) iterates it here, so ui/ needs no change.
- Arguments and results cross the fork by pickle: the request goes in; each step, each preview and the result (or the
  error's kind and message) come out as events. The handler's callbacks stay here and are called per event, so the
  progress bar, the previews and Stop work as on any in-process backend.
- Stop: on_step raises here; closing the generator makes `spaces` set the worker's stop event, which closes the
  generator there, whose generation then stops at its next step; the GPU is released once it has.
- The worker is a fork, so this process's torch thread is not in it: torch_thread.DeviceThread starts a new one there
  on first use. The model loads here on the torch thread, as for a GPU (device cuda, which `spaces` fakes outside the
  worker: weights stay in host memory until a worker moves them), and without the warm-up, as there is no GPU to
  warm up: `spaces` enters its torch mode on the thread that imports it, so it is entered on the torch thread too.
- `--optimize auto` is plain diffusers there (its attention is torch's SDPA already): `sdpa` rebuilds weights (fused
  QKV, channels-last) while `spaces` only records them, untried on ZeroGPU; `compile` is refused, as ZeroGPU refuses
  torch.compile.
- `duration=` is `gpu_seconds(request)`: steps x size x images from a per-step figure, with a start-up allowance and
  a floor. A request the backend would refuse is refused here first, so it reserves no GPU time.

Off ZeroGPU, `spaces.GPU` returns the function unchanged and the same events run in this process (`--zero-gpu` on a
machine without SPACES_ZERO_GPU does that). `spaces` is imported only here, and only then: it is not in
requirements.txt (a ZeroGPU Space brings its own, matched to its device API; docs/spaces.md), and the tests pin it in
requirements-dev.txt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from typing import Any, Iterator

from ..core.api import (
    BASE_PIXELS,
    Capabilities,
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
    StepCallback,
    preview_wanted,
)
from ..core.errors import (
    BackendError,
    BackendUnavailable,
    GenerationCancelled,
    GenerationFailed,
    InvalidRequest,
    short_error,
)
from ..core.settings import LocalSettings
from .local import LocalBackend
from .preview import IntervalPaced
from .torch_thread import device_thread

log = logging.getLogger(__name__)

# GPU seconds a step costs at 512x512 for one image with classifier-free guidance (two UNet batches). Not measured on
# ZeroGPU's GPU (no GPU was lent to this project; docs/benchmarks.md): the published figure for the same UNet size
# (SD 1.5's 860M, SD2.1-base's 866M) with diffusers + torch SDPA, fp16, on an A100 80G is 31.19 it/s, 0.032 s a step
# (fal-ai/stable-diffusion-benchmarks, README, "Diffusers (torch 2.1, SDPA)"). ZeroGPU's default "large" GPU is half
# an RTX Pro 6000 Blackwell (hub-docs spaces-zerogpu.md), so the figure is taken with a margin.
GPU_STEP_S = 0.032
GPU_STEP_MARGIN = 3.0
# A worker's start: the fork, CUDA's initialisation and the weights moved to the GPU (SD2.1-base in fp16 is ~2.6 GB),
# then the text encoder and the VAE decode: counted once per call, as a kept worker cannot be told from a new one.
GPU_START_S = 10.0
GPU_FLOOR_S = 15  # no call reserves less: a shorter reservation risks an abort mid-image for a few seconds saved

_BACKEND: LocalBackend | None = None  # the process's; a ZeroGPU worker has it by the fork


class ZeroGPULocalBackend(LocalBackend):
    """The local backend as loaded in a ZeroGPU Space's own process: no warm-up (the GPU exists only in a call)."""

    def _warm_up(self, pipe) -> None:
        log.info("no warm-up: on ZeroGPU the GPU exists only inside a @spaces.GPU call")


def gpu_seconds(request: GenerationRequest, previews: bool = True, paced: bool = False) -> int:
    """The GPU time a request reserves (`@spaces.GPU`'s duration): the start-up allowance plus each pass's steps x
    pixels x images at GPU_STEP_S (half that without guidance: one UNet batch), with a margin, and at least the
    floor. `previews` and `paced` are the generation function's own arguments, which a duration function is given
    too."""
    request = _validated_or_none(request, _BACKEND.capabilities()) if _BACKEND is not None else None
    if request is None:
        return GPU_FLOOR_S
    batches = 1.0 if request.guidance_scale > 1.0 else 0.5
    hires_steps = getattr(request, "hires_steps_run", 0)  # the hires fix's second pass, at the output size
    pixel_steps = (request.denoising_steps - hires_steps) * request.width * request.height
    if hires_steps:
        out_w, out_h = request.output_size
        pixel_steps += hires_steps * out_w * out_h
    seconds = GPU_START_S + GPU_STEP_MARGIN * GPU_STEP_S * batches * int(request.num_images) * pixel_steps / BASE_PIXELS
    return max(GPU_FLOOR_S, math.ceil(seconds))


def _validated_or_none(request: GenerationRequest, caps: Capabilities) -> GenerationRequest | None:
    try:
        return request.validated(caps)
    except Exception:  # noqa: BLE001 - a request the backend will refuse reserves only the floor
        return None


def run_generation(request: GenerationRequest, previews: bool, paced: bool = False) -> Iterator[tuple]:
    """Where the GPU is (ZeroGPU's worker; in this process off ZeroGPU): the backend's generate, as events:
    ("step", step, total), ("preview", step, total, images), then ("result", GenerationResult) or ("error", kind,
    message, field). Closing the generator stops the generation at its next step, and waits for it.
    paced: the caller paces the previews it shows (its on_preview has wanted(), api.preview_wanted), which cannot be
    asked from here: previews are made at its interval (IntervalPaced), not after every step (each would cross the
    fork by pickle, most of them to be dropped)."""
    backend = _BACKEND
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def on_step(step: int, total: int) -> None:
        if stop.is_set():
            raise GenerationCancelled("stopped")
        events.put(("step", step, total))

    def send_preview(step: int, total: int, images: list[Any]) -> None:
        events.put(("preview", step, total, images))

    on_preview = IntervalPaced(send_preview) if paced else send_preview

    def work() -> None:
        try:
            result = backend.generate(request, on_step=on_step, on_preview=on_preview if previews else None)
        except BackendError as exc:
            events.put(("error", type(exc).__name__, str(exc), getattr(exc, "field", None)))
        except Exception as exc:  # noqa: BLE001 - anything else is this generation failing, in the worker's log
            log.exception("generation failed on the ZeroGPU worker")
            events.put(("error", "GenerationFailed", f"generation failed on the GPU: {short_error(exc)}", None))
        else:
            events.put(("result", result))

    # Its own thread: the generate call blocks until the images are done, and the events must flow meanwhile.
    thread = threading.Thread(target=work, name="zerogpu-generation", daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            yield event
            if event[0] in ("result", "error"):
                return
    finally:
        stop.set()
        thread.join()


_ERRORS = {cls.__name__: cls for cls in (BackendUnavailable, GenerationFailed, GenerationCancelled)}


def _error(kind: str, message: str, field: str | None) -> BackendError:
    """The worker's error as raised here (they cross the fork as text)."""
    if kind == "InvalidRequest":
        return InvalidRequest(message, field)
    return _ERRORS.get(kind, GenerationFailed)(message)


class ZeroGPUBackend:
    """The local backend on a ZeroGPU Space: loaded here, each generation run in a `@spaces.GPU` call."""

    name = "local"
    zero_gpu = True

    def __init__(self, settings: LocalSettings):
        global _BACKEND
        if settings.optimize in ("compile", "cuda-graphs"):
            raise BackendUnavailable(f"--optimize {settings.optimize}: ZeroGPU does not support torch.compile "
                                     f"(hub-docs spaces-zerogpu.md); use sdpa or auto.")
        if settings.optimize == "auto":
            # Plain diffusers (whose attention is torch's SDPA already): --optimize sdpa fuses the QKV weights and
            # reorders memory, rebuilding weights while spaces only records them, which no ZeroGPU run here has tried.
            settings = dataclasses.replace(settings, optimize="none")
        try:
            import spaces  # patches torch on a ZeroGPU Space (before the model is loaded); a no-op elsewhere
        except ImportError as exc:
            raise BackendUnavailable("--zero-gpu (SPACES_ZERO_GPU=true) needs the `spaces` package, which ZeroGPU "
                                     "Spaces provide; elsewhere: pip install spaces (requirements-dev.txt pins "
                                     "it).") from exc
        from spaces.config import Config

        self.on_zero_gpu = Config.zero_gpu  # False: spaces.GPU is a no-op and the calls run in this process
        if self.on_zero_gpu:
            from spaces.zero import torch as zero_torch

            # The mode that makes .to("cuda") a record is per thread; spaces entered it on the importing thread.
            device_thread().run(zero_torch.enter_mode)
        _BACKEND = self.inner = ZeroGPULocalBackend(settings)
        self._run = spaces.GPU(duration=gpu_seconds)(run_generation)
        inner = self.inner.capabilities()
        note = (f"ZeroGPU: each generation borrows a GPU for the time it reserves from your daily ZeroGPU quota "
                f"(shown beside Generate; at least {GPU_FLOOR_S} s), so fewer steps, a smaller size or fewer images "
                f"reserve less. Live is off here: every pause in typing would reserve GPU time.")
        # One generation at a time from this app: the Space's ZeroGPU slots are shared by all its visitors, and a
        # call beyond them waits inside ZeroGPU holding a worker with only a toast to show; in the app's queue a
        # visitor sees their place. SD_CONCURRENCY raises it.
        self._caps = dataclasses.replace(inner, notes=(*inner.notes, note), concurrency=1)
        self.model = self.inner.model
        self.notes = list(self._caps.notes)
        self.is_tiny = self.inner.is_tiny
        log.info("ZeroGPU: generations run in @spaces.GPU calls (%s)",
                 "forked GPU workers" if self.on_zero_gpu else "in this process: SPACES_ZERO_GPU is not set")

    def capabilities(self) -> Capabilities:
        """The local backend's, with ZeroGPU's note."""
        return self._caps

    def gpu_seconds(self, request: GenerationRequest) -> int:
        """The GPU time this request would reserve."""
        return gpu_seconds(request)

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Run one request in a @spaces.GPU call; its steps and previews reach the callbacks here as they happen."""
        self.inner.check_request(request)
        request.validated(self._caps)  # refused here, before any GPU time is reserved
        events = self._run(request, on_preview is not None, preview_wanted(on_preview) is not None)
        result = None
        try:
            for event in events:
                kind = event[0]
                if kind == "step" and on_step is not None:
                    on_step(event[1], event[2])  # raises GenerationCancelled on Stop: the finally closes the call
                elif kind == "preview" and on_preview is not None:
                    on_preview(event[1], event[2], event[3])
                elif kind == "result":
                    result = event[1]
                elif kind == "error":
                    raise _error(*event[1:])
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - spaces' own (quota, no GPU, the worker died) as gr.Error
            message = getattr(exc, "message", None) or short_error(exc)
            log.warning("ZeroGPU call failed: %s", message)
            raise BackendUnavailable(f"ZeroGPU: {message}") from exc
        finally:
            events.close()
        if result is None:
            raise GenerationFailed("the ZeroGPU call ended without a result")
        return result

    def close(self) -> None:
        """Drop the pipelines."""
        self.inner.close()
