"""InProcessBackend: what the local and the Neuron backends share, diffusers pipelines run in this process.

One generation at a time per lane (a lane: its pipelines, one per precision, its scheduler cache and the torch
thread that runs them; by default one lane on the process's torch thread), and the random-weights note. The neuron
backend's --neuron-parallel pipeline makes one lane per NeuronCore (use_lanes), so as many requests run at once.
A subclass loads its pipelines, then sets `_caps` (with `modes=self.offered_modes()`); it supplies
`precision_pipeline(precision)`, the `where` that error messages name, and any validation of its own (`check_request`).
Image to image and inpaint run diffusers' own pipelines over the same modules (`pipeline.mode_pipeline`), so a
subclass whose pipeline can `vae.encode` gets them by offering them in `offered_modes()`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from dataclasses import dataclass, field
from typing import Any

from . import pipeline
from ..core.api import (
    RANDOM_SEED,
    Capabilities,
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
    StepCallback,
    preview_wanted,
    random_seed,
)
from ..core.errors import BackendError, GenerationFailed, short_error
from ..core.metadata import label_images
from ..models.catalog import random_weights_note
from .preview import PreviewPacer
from .prompts import parsed_prompts, truncation_warnings
from ..core.schedulers import SchedulerCache
from ..core.settings import InProcessSettings
from .torch_thread import DeviceThread, device_thread

log = logging.getLogger(__name__)


@dataclass
class Lane:
    """What one generation holds from start to end: its pipelines and scheduler cache, and the thread that runs them.

    Schedulers keep per-run state (timesteps, step index) and a pipeline holds the scheduler it runs with, so two
    generations at once need two of each; the modules inside may differ too (one NeuronCore's parts per lane)."""

    index: int
    device: DeviceThread
    pipelines: dict[str, Any] = field(default_factory=dict)  # precision -> pipeline
    mode_pipelines: dict[tuple[str, str], Any] = field(default_factory=dict)  # (precision, mode) -> pipeline
    schedulers: SchedulerCache | None = None


class InProcessBackend:
    """Base of the backends that run diffusers pipelines in this process (local, neuron)."""

    name: str

    def __init__(self, settings: InProcessSettings):
        self.settings = settings
        self._lanes: list[Lane] = []
        self._free_lanes: queue.Queue[Lane] = queue.Queue()  # a generation takes one, and gives it back at its end
        self.use_lanes(1)
        self._caps: Capabilities | None = None
        self.model = ""  # the name shown and written in infotext
        self.notes: list[str] = []  # shown in the app's banner
        self.is_tiny = False  # random weights: the app shows its warning banner
        # --preview-every: 0 = none, N = after every N steps, None = auto (PreviewPacer).
        self.previews = settings.preview_every != 0
        self.preview_every = settings.preview_every or None

    def use_lanes(self, count: int) -> None:
        """Run `count` generations at once, each lane on its own torch thread (before anything is loaded).

        One lane (the default) works on the process's torch thread, as every in-process backend did. Several lanes
        get threads of their own, each with an equal share of torch's CPU threads: PyTorch's OpenMP team is per
        calling thread, so two threads with the full count each would put twice as many threads as cores to work
        and slow both (docs/architecture.md)."""
        import torch

        if len(self._lanes) > 1:  # threads of its own; one lane uses the process's, which stays
            for lane in self._lanes:
                lane.device.close()
        if count == 1:
            self._lanes = [Lane(0, device_thread())]
        else:
            share = max(1, torch.get_num_threads() // count)
            self._lanes = [Lane(i, DeviceThread(f"torch-lane{i}", torch_threads=share)) for i in range(count)]
        self._free_lanes = queue.Queue()
        for lane in self._lanes:
            self._free_lanes.put(lane)

    # The first lane's, which a backend with one lane has alone (its loading and warm-up run on its thread).
    @property
    def _device(self) -> DeviceThread:
        return self._lanes[0].device

    @property
    def _pipelines(self) -> dict[str, Any]:
        return self._lanes[0].pipelines

    @property
    def _mode_pipelines(self) -> dict[tuple[str, str], Any]:
        return self._lanes[0].mode_pipelines

    @property
    def _schedulers(self) -> SchedulerCache | None:
        return self._lanes[0].schedulers

    # What a subclass supplies ------------------------------------------------------------------

    @property
    def where(self) -> str:
        """What error messages name as the place a generation failed ("cpu", "neuron (2 NeuronCores)")."""
        return self._caps.device

    def precision_pipeline(self, precision: str):
        """The first lane's pipeline of a precision (called on its torch thread, holding the lane)."""
        raise NotImplementedError

    def lane_pipeline(self, precision: str, lane: Lane):
        """A lane's pipeline of a precision: the first lane's is precision_pipeline's, the others' were put in
        lane.pipelines by the subclass."""
        return self.precision_pipeline(precision) if lane.index == 0 else lane.pipelines[precision]

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse, before validation, what this backend can say more about than Capabilities can."""

    def offered_modes(self) -> tuple[str, ...]:
        """The modes to put in Capabilities: what the loaded UNet runs (pipeline.unet_modes). A subclass
        narrows it where a part is missing (a compiled root without the VAE encoder: txt2img only)."""
        return pipeline.unet_modes(next(iter(self._pipelines.values())))

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
        """Make each lane's scheduler cache from a pipeline's scheduler config (every precision shares it)."""
        for lane in self._lanes:
            lane.schedulers = SchedulerCache(pipe.scheduler.config)

    def pipeline_to_run(self, precision: str, mode: str, lane: Lane | None = None):
        """The pipeline that runs `mode` at `precision` in a lane (the first by default): the precision's own for
        txt2img, else diffusers' img2img / inpaint pipeline made once over its modules (called on the lane's torch
        thread, holding the lane)."""
        lane = lane or self._lanes[0]
        base = self.lane_pipeline(precision, lane)
        if mode == "txt2img":
            return base
        key = (precision, mode)
        if key not in lane.mode_pipelines:
            lane.mode_pipelines[key] = pipeline.mode_pipeline(base, mode)
        return lane.mode_pipelines[key]

    def capabilities(self) -> Capabilities:
        """What this backend runs."""
        return self._caps

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Validate and run one request on the pipeline of its precision, in the first free lane (one request per
        lane at a time; with one lane, one request at a time)."""
        self.check_request(request)
        request = request.validated(self._caps)
        emphasis = self.settings.emphasis
        if emphasis:
            parsed_prompts(request)  # a weight that is no number is refused before a lane is taken
        base_seed = random_seed() if request.seed == RANDOM_SEED else request.seed
        request = dataclasses.replace(request, seed=base_seed)
        seeds = request.image_seeds(base_seed)
        lane = self._free_lanes.get()
        try:
            pipe = lane.device.run(self.pipeline_to_run, request.precision, request.mode, lane)
            # The hires fix's second pass: diffusers' img2img over the same modules (made once per lane).
            hires_pipe = lane.device.run(self.pipeline_to_run, request.precision, "img2img", lane) \
                if request.hires else None
            warnings = truncation_warnings(pipe.tokenizer, request, emphasis)
            scheduler = lane.schedulers.get(request.scheduler)
            try:
                images, timings = lane.device.run(
                    pipeline.run, pipe, request, seeds, on_step, scheduler=scheduler,
                    on_preview=on_preview if self._caps.previews else None,
                    pacer=PreviewPacer(self.preview_every, wanted=preview_wanted(on_preview)), emphasis=emphasis,
                    hires_pipe=hires_pipe)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - anything else is this generation failing
                log.exception("generation failed")
                raise GenerationFailed(f"generation failed on {self.where}: {short_error(exc)}") from exc
        finally:
            self._free_lanes.put(lane)
        images = label_images(images, request, seeds, self.model, self.name, timings.total_ms)
        return GenerationResult(images=images, seeds=seeds, timings=timings, request=request,
                                backend=self.name, model=self.model, warnings=warnings)

    def close(self) -> None:
        """Drop the pipelines and the schedulers (and end the lanes' own threads)."""
        for lane in self._lanes:
            lane.pipelines.clear()
            lane.mode_pipelines.clear()
            lane.schedulers = None
            if len(self._lanes) > 1:
                lane.device.close()
