"""NeuronBackend: a compiled root -> one diffusers pipeline per compiled dtype, on Inferentia2 (or a CPU for testing).

Starting is three steps: plan (root_plan.open_root: what the root holds and what this machine serves of it),
check (root_plan.check_device_memory: the parts fit a NeuronCore), assemble (assemble.py: the parts loaded and
swapped into diffusers pipelines, one per dtype and lane). On inf2 the UNet runs through torch_neuronx.DataParallel
over the chip's NeuronCores (--neuron-parallel unet, one request at a time), or each core holds a whole pipeline
of its own and runs its own request (--neuron-parallel pipeline, roots compiled with --no-cfg); parts traced with
--target cpu run the same code on a CPU, through a stand-in for DataParallel (or separate module instances per
simulated core) and a guard that enforces the compiled shapes as the Neuron runtime does.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time

from ..core.api import (
    HR_LATENT_UPSCALERS,
    HR_UPSCALERS,
    MAX_HR_SCALE,
    MODE_LABELS,
    MODES,
    Capabilities,
    GenerationRequest,
    hires_scales_between,
    hires_size,
)
from ..core.errors import BackendUnavailable, InvalidRequest
from ..core.fewstep import capability_fields, few_step_kind
from ..core.settings import DEFAULT_MODEL, NeuronSettings
from ..inprocess import pipeline
from ..inprocess.base import InProcessBackend
from ..models.catalog import random_weights_of
from . import assemble
from .host import seconds_since_process_start
from .parts import NEURON_DTYPES, Size, default_size, size_key
from .root_format import compile_hint
from .root_plan import check_device_memory, open_root

log = logging.getLogger(__name__)

REAL_MODEL_ADVICE = (f"To serve the real model, compile it: python -m compile_scripts.compile --model {DEFAULT_MODEL} "
                     f"--out ROOT (on inf2; see docs/neuron.md).")


class NeuronBackend(InProcessBackend):
    """Stable Diffusion from compiled parts: one pipeline per compiled dtype, serving every loaded size, run one
    request at a time (--neuron-parallel unet) or one per NeuronCore at once (pipeline: a lane per core)."""

    name = "neuron"

    def __init__(self, settings: NeuronSettings):
        started = time.perf_counter()
        super().__init__(settings)
        plan = open_root(settings)  # 1. what the root holds, and what of it this machine serves
        check_device_memory(plan, settings.device_memory_gib)  # 2. before anything is loaded
        self.plan = plan
        self._neuronx = assemble.import_torch_neuronx(plan.root) if plan.target == "neuron" else None
        self.use_lanes(plan.lanes)  # --neuron-parallel pipeline: one lane (pipelines, torch thread) per NeuronCore
        self.model = plan.model
        self.note_random_weights(random_weights_of(plan.model, str(plan.root)), "Compiled from", REAL_MODEL_ADVICE)
        for note in plan.notes:
            log.warning("%s", note)
        self.notes += plan.notes
        for lane in self._lanes:  # 3. the parts, loaded and swapped into diffusers pipelines
            assemble.load_lane(plan, lane, self._neuronx)
        first = next(iter(self._pipelines.values()))
        self.use_schedulers_of(first)
        # A few-step root: its scheduler config says so (compile.py --few-step writes it), or --few-step. Guidance is
        # off for a few-step model whatever its manifest says, and for a root compiled with --no-cfg.
        self.few_step = few_step_kind(settings.few_step, first.scheduler.config)
        self.guidance = plan.guidance and self.few_step is None
        cores = len(plan.cores)
        placement = "the UNet across them" if plan.parallel == "unet" else "a pipeline on each"
        device = (f"neuron ({cores} NeuronCore{'s' if cores > 1 else ''}, {placement})" if plan.target == "neuron"
                  else f"cpu (Neuron stand-in, {cores} simulated cores, {placement})")
        self._caps = Capabilities(
            backend=self.name,
            model=self.model,
            device=device,
            precisions=tuple(self._pipelines),
            fixed_sizes=tuple(plan.sizes),
            default_size=default_size(plan.sizes),
            max_images=settings.max_images,
            is_tiny=self.is_tiny,  # the app's warning banner
            previews=self.previews,
            modes=self.offered_modes(),
            # The hires fix: its second pass runs on the parts compiled for the larger size, so only the scales that
            # take a compiled size to another; Lanczos encodes the upscaled picture, which needs the VAE encoder.
            hr_upscalers=self.offered_upscalers(),
            hr_scales=hires_scales_between(tuple(plan.sizes)),
            concurrency=len(self._lanes),
            notes=tuple(self.notes),
            **{"guidance": self.guidance, **capability_fields(self.few_step)},  # a few-step kind's fields win
        )
        for lane in self._lanes:
            for dtype in self._pipelines:
                for size in plan.sizes:
                    lane.device.run(self._warm_up, dtype, size, lane)
        self._first_image_lock = threading.Lock()
        self._first_image_logged = False
        since_start = seconds_since_process_start()
        log.info("ready in %.1f s (loading and warm-up)%s: %s, sizes %s, modes %s, --neuron-parallel %s (%d at once)",
                 time.perf_counter() - started,
                 "" if since_start is None else f", {since_start:.1f} s after the process started",
                 " and ".join(self._pipelines), ", ".join(map(size_key, plan.sizes)), ", ".join(self._caps.modes),
                 plan.parallel, self._caps.concurrency)

    # Shorthands for what the plan decided (tests and the doctor read them) ----------------------

    @property
    def root(self):
        """The local folder of the compiled root."""
        return self.plan.root

    @property
    def target(self) -> str:
        """'neuron', or 'cpu' for the stand-in."""
        return self.plan.target

    @property
    def sizes(self) -> list[Size]:
        """The sizes served."""
        return self.plan.sizes

    @property
    def sets(self):
        """The compiled dtypes (root_format.CompiledDtype), bf16 first."""
        return self.plan.sets

    @property
    def device_ids(self) -> list[int]:
        """The NeuronCores used."""
        return self.plan.cores

    @property
    def parallel(self) -> str:
        """--neuron-parallel: unet or pipeline."""
        return self.plan.parallel

    @property
    def lora(self) -> dict | None:
        """The LoRA fused at compile time, or None."""
        return self.plan.lora

    @property
    def image_modes_note(self) -> str:
        """'' when image to image and inpaint are offered; else why not and the command that adds them."""
        return self.plan.image_modes_note

    # What the root offers ----------------------------------------------------------------------

    def offered_modes(self) -> tuple[str, ...]:
        """What the UNet runs (InProcessBackend.offered_modes), less image to image and inpainting where a served
        size lacks the VAE encoder."""
        offered = super().offered_modes()
        if self.image_modes_note:
            offered = tuple(m for m in offered if m not in ("img2img", "inpaint"))
        if not offered:  # a 9-channel inpainting UNet runs only inpaint, which needs the encoder
            raise BackendUnavailable(f"--artifacts {self.root}: its UNet is an inpainting one, which runs only "
                                     f"Inpaint; {self.image_modes_note}")
        return offered

    def offered_upscalers(self) -> tuple[str, ...]:
        """The hires upscalers this root runs: the latent ones wherever it runs text to image, Lanczos (a VAE encode
        at the larger size) where image to image is offered too."""
        modes = self.offered_modes()
        if "txt2img" not in modes:
            return ()
        return tuple(u for u in HR_UPSCALERS if u in HR_LATENT_UPSCALERS or "img2img" in modes)

    def _warm_up(self, precision: str, size: Size, lane) -> None:
        """One 1-step generation per precision and size, so the first person does not wait for lazy loading (on
        Neuron, a part reaches the NeuronCores at its first run) and broken parts fail now. From an image where
        the VAE encoder is loaded (a 1-step image to image runs every part), else from text."""
        from PIL import Image

        started = time.perf_counter()
        modes = self._caps.modes
        mode = "img2img" if "img2img" in modes else "inpaint" if "txt2img" not in modes else "txt2img"
        pictures = {} if mode == "txt2img" else {"image": Image.new("RGB", size, "gray"), "strength": 1.0}
        if mode == "inpaint":
            pictures.update(mask=Image.new("L", size, 255), mask_blur=0)
        request = GenerationRequest(prompt="warm-up", steps=1, seed=0, precision=precision, width=size[0],
                                    height=size[1], mode=mode,
                                    **pictures).validated(self._caps)
        if not self.guidance:
            request = dataclasses.replace(request, guidance_scale=1.0)  # what a --no-cfg root runs
        pipe = self.pipeline_to_run(precision, mode, lane)
        try:
            pipeline.run(pipe, request, [0], scheduler=lane.schedulers.get(request.scheduler))
        except Exception as exc:  # noqa: BLE001
            log.exception("warm-up failed")
            raise BackendUnavailable(f"--artifacts {self.root}: the {precision} {size_key(size)} parts failed their "
                                     f"first run ({exc.__class__.__name__}: {str(exc)[:300]}); recompile them with "
                                     f"--force.") from None
        log.info("warmed up %s %s (%s)%s in %.2f s", precision, size_key(size), mode,
                 f" on lane {lane.index}" if len(self._lanes) > 1 else "", time.perf_counter() - started)

    # The contract ------------------------------------------------------------------------------

    def precision_pipeline(self, precision: str):
        """The pipeline of a compiled precision (all are loaded at start)."""
        return self._pipelines[precision]

    def check_request(self, request: GenerationRequest) -> None:
        """A precision Neuron runs but this root did not compile, or an image mode without the VAE encoder: say how
        to compile it."""
        if request.mode in MODES and request.mode not in self._caps.modes:
            raise InvalidRequest(f"mode: {MODE_LABELS[request.mode]} ({request.mode}) is not available: "
                                 f"{self.image_modes_note}", "mode")
        # Before validation, for the message naming --no-cfg; None (the default: off here) and non-numbers are
        # left to validated(). diffusers runs CFG when guidance_scale > 1.
        scale = request.guidance_scale
        if not self.guidance and isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 1:
            raise InvalidRequest(f"guidance_scale: {request.guidance_scale:g} asks for classifier-free guidance, and "
                                 f"{self.model} was compiled without it (--no-cfg: one UNet sample per step); use a "
                                 f"guidance_scale of 1 or less (guidance off).", "guidance_scale")
        self._check_hires(request)
        wanted = request.precision
        if wanted in NEURON_DTYPES and wanted not in self._caps.precisions:  # compilable, just not compiled
            raise InvalidRequest(
                f"precision: {wanted} was not compiled in {self.root}; compiled: {', '.join(self._caps.precisions)}. "
                f"Compile it with: {compile_hint(self.root, self.model, wanted, target=self.target)}",
                "precision",
            )

    def _check_hires(self, request: GenerationRequest) -> None:
        """A hires scale whose larger size this root lacks, or Lanczos without the VAE encoder: the command that
        compiles it. Values that are no numbers or out of range are left to validated(), which names them too."""
        scale, upscaler = request.hr_scale, request.hr_upscaler
        if request.mode != "txt2img" or isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return
        if not 1.0 < scale <= MAX_HR_SCALE:
            return
        width = self._caps.default_size[0] if request.width in (None, "") else request.width
        height = self._caps.default_size[1] if request.height in (None, "") else request.height
        if (width, height) not in self.sizes:
            return  # validated() refuses the size itself
        big = hires_size(width, height, float(scale))
        dtype = request.precision if request.precision in self._caps.precisions else self._caps.default_precision
        if big not in self.sizes:
            raise InvalidRequest(
                f"hr_scale: {scale:g} takes {size_key((width, height))} to {size_key(big)}, and {self.root} was not "
                f"compiled for {size_key(big)} (compiled: {', '.join(map(size_key, self.sizes))}); the hires pass runs "
                f"the UNet and VAE compiled for the larger size. Compile it with: "
                f"{compile_hint(self.root, self.model, dtype, sizes=[big], target=self.target)}"
                + (f" (and start with --sizes including {size_key(big)})" if self.settings.sizes else ""), "hr_scale")
        lanczos = isinstance(upscaler, str) and upscaler.strip().lower() == "lanczos"  # the key and A1111's label
        if lanczos and "lanczos" not in self._caps.hr_upscalers:
            raise InvalidRequest(f"hr_upscaler: Lanczos encodes the upscaled picture, and {self.image_modes_note} "
                                 f"The latent upscalers (latent, latent-nearest) need no encoder.", "hr_upscaler")

    def generate(self, request, on_step=None, on_preview=None):
        """As InProcessBackend.generate; the first image is logged with the time since the process started."""
        result = super().generate(request, on_step, on_preview)
        with self._first_image_lock:
            first, self._first_image_logged = not self._first_image_logged, True
        if first:
            since_start = seconds_since_process_start()
            log.info("first image in %s (%.0f ms for this request)",
                     "?" if since_start is None else f"{since_start:.1f} s from the process start",
                     result.timings.total_ms)
        return result

    def close(self) -> None:
        """Drop the pipelines (and with them the parts loaded on the NeuronCores)."""
        super().close()
        gc.collect()
