"""InProcessBackend: what the local and the Neuron backends share, diffusers pipelines run in this process.

One generation at a time (a lock), all torch work on the process's torch thread, one pipeline per
precision, one scheduler cache, and the random-weights note. A subclass loads its pipelines, then
sets `_caps` (with `modes=self.modes()`); it supplies `pipeline_for(precision)`, the `where` that error
messages name, and any validation of its own (`check_request`). Image to image and inpaint run diffusers'
own pipelines over the same modules (`pipeline.mode_pipeline`), so a subclass whose pipeline can
`vae.encode` gets them by offering them in `modes()`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from . import pipeline
from .api import (
    RANDOM_SEED,
    BackendError,
    Capabilities,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
    StepCallback,
    random_seed,
    short_error,
)
from .metadata import label_images
from .models import random_weights_note
from .preview import PreviewPacer
from .prompts import truncation_warnings
from .schedulers import SchedulerCache
from .settings import Settings
from .torch_thread import device_thread

log = logging.getLogger(__name__)


class InProcessBackend:
    """Base of the backends that run diffusers pipelines in this process (local, neuron)."""

    name: str

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()  # one generation at a time on an in-process device
        self._device = device_thread()  # all torch work on one thread
        self._pipelines: dict[str, Any] = {}  # precision -> pipeline
        self._mode_pipelines: dict[tuple[str, str], Any] = {}  # (precision, mode) -> img2img / inpaint pipeline
        self._schedulers: SchedulerCache | None = None  # made from the first pipeline's scheduler config
        self._caps: Capabilities | None = None
        self.model = ""  # the name shown and written in infotext
        self.notes: list[str] = []  # shown in the app's banner
        self.is_tiny = False  # random weights: the app shows its warning banner
        # --preview-every: 0 = none, N = after every N steps, None = auto (PreviewPacer).
        self.previews = settings.preview_every != 0
        self.preview_every = settings.preview_every or None

    # What a subclass supplies ------------------------------------------------------------------

    @property
    def where(self) -> str:
        """What error messages name as the place a generation failed ("cpu", "neuron (2 NeuronCores)")."""
        return self._caps.device

    def pipeline_for(self, precision: str):
        """The pipeline of a precision (called on the torch thread, under the lock)."""
        raise NotImplementedError

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse, before validation, what this backend can say more about than Capabilities can."""

    def modes(self) -> tuple[str, ...]:
        """The modes to put in Capabilities: what the loaded UNet runs (pipeline.modes_of). A subclass
        narrows it where a part is missing (a compiled root without the VAE encoder: txt2img only)."""
        return pipeline.modes_of(next(iter(self._pipelines.values())))

    # Shared ------------------------------------------------------------------------------------

    def note_random_weights(self, kind: str | None, verb: str, real_model_advice: str) -> None:
        """Flag random weights (models.RANDOM_WEIGHTS' `kind`; None: real ones) and add their note."""
        if kind is None:
            return
        note = random_weights_note(kind, verb, real_model_advice)
        log.warning(note)
        self.notes.append(note)
        self.is_tiny = True

    def use_schedulers_of(self, pipe) -> None:
        """Make the scheduler cache from a pipeline's scheduler config (every precision shares it)."""
        self._schedulers = SchedulerCache(pipe.scheduler.config)

    def pipeline_for_mode(self, precision: str, mode: str):
        """The pipeline that runs `mode` at `precision`: the precision's own for txt2img, else diffusers'
        img2img / inpaint pipeline made once over its modules (called on the torch thread, under the lock)."""
        base = self.pipeline_for(precision)
        if mode == "txt2img":
            return base
        key = (precision, mode)
        if key not in self._mode_pipelines:
            self._mode_pipelines[key] = pipeline.mode_pipeline(base, mode)
        return self._mode_pipelines[key]

    def capabilities(self) -> Capabilities:
        """What this backend runs."""
        return self._caps

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Validate and run one request on the pipeline of its precision, one request at a time."""
        self.check_request(request)
        request = request.validated(self._caps)
        base_seed = random_seed() if request.seed == RANDOM_SEED else request.seed
        request = dataclasses.replace(request, seed=base_seed)
        seeds = request.image_seeds(base_seed)
        with self._lock:
            pipe = self._device.run(self.pipeline_for_mode, request.precision, request.mode)
            warnings = truncation_warnings(pipe.tokenizer, request)
            scheduler = self._schedulers.get(request.scheduler)
            try:
                images, timings = self._device.run(
                    pipeline.run, pipe, request, seeds, on_step, scheduler=scheduler,
                    on_preview=on_preview if self._caps.previews else None,
                    pacer=PreviewPacer(self.preview_every))
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else is this generation failing
                log.exception("generation failed")
                raise GenerationFailed(f"generation failed on {self.where}: {short_error(exc)}") from exc
        images = label_images(images, request, seeds, self.model, self.name, timings.total_ms)
        return GenerationResult(images=images, seeds=seeds, timings=timings, request=request,
                                backend=self.name, model=self.model, warnings=warnings)

    def close(self) -> None:
        """Drop the pipelines and the schedulers."""
        self._pipelines.clear()
        self._mode_pipelines.clear()
        self._schedulers = None
