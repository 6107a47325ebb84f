"""LocalBackend: plain diffusers in this process, on CUDA, MPS or CPU."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from ..core import fewstep

from . import pipeline
from ..core.api import HR_UPSCALERS, Capabilities, GenerationRequest
from ..core.errors import BackendUnavailable, short_error
from .frozen import eager_module, freeze_pipeline
from .base import InProcessBackend
from ..models.catalog import COMMIT_SHA, model_display_name, pinned_revision, random_weights_of, resolve_model
from .lora import fuse_lora
from ..core.schedulers import make_scheduler
from ..core.settings import DEFAULT_MODEL, LocalSettings
from ..models.tiny import TINY_MODEL_ID

log = logging.getLogger(__name__)

REAL_MODEL_ADVICE = (f"To load real weights, start with --model PATH_OR_HUB_ID (for example --model {DEFAULT_MODEL} "
                     f"with network access or a Hub cache).")


def resolve_device(device: str) -> str:
    """auto -> cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA device is available here; use --device cpu or auto.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BackendUnavailable("--device mps: MPS is not available here; use --device cpu or auto.")
    return device


def precisions_for(device: str) -> tuple[str, ...]:
    """Precisions worth offering on a device, preferred first."""
    if device == "cuda":
        return ("fp16", "bf16", "fp32")
    if device == "mps":
        return ("fp32", "fp16")
    return ("fp32", "bf16")  # CPUs: fp16 matmuls are slow or missing


# A real model's default steps on a CPU: a 512x512 SD2.1 step takes about 6 s on two cores (docs/spaces.md, CPU
# basic), so 20 steps keep a first visitor over two minutes; DPM++ 2M's 10 take about half. The slider goes as high.
CPU_DEFAULT_STEPS = 10


def auto_optimize(device: str) -> str:
    """What --optimize auto means on a device.

    CPU: trace (sdpa, plus the UNet and VAE decoder as frozen TorchScript graphs per shape: the
    same pixels, faster; docs/benchmarks.md has the figures). Elsewhere: sdpa (fused QKV + SDPA +
    channels_last). torch.compile is opt-in, as it costs minutes at start-up.
    """
    return "trace" if device == "cpu" else "sdpa"


class LocalBackend(InProcessBackend):
    """diffusers StableDiffusionPipeline, one per precision, loaded lazily, run one at a time."""

    name = "local"

    def __init__(self, settings: LocalSettings):
        super().__init__(settings)
        self.device = resolve_device(settings.device)
        self.optimize = auto_optimize(self.device) if settings.optimize == "auto" else settings.optimize
        self._precisions = precisions_for(self.device)
        self.model_source = settings.model_or_default
        self.few_step: str | None = None  # the few-step kind (fewstep.py), set by _load from --few-step / the model
        self.warm_up_timings = None  # the warm-up's Timings (none with --optimize none)
        first = self._precisions[0]
        try:
            self._pipelines[first] = self._device.run(self._load, self.model_source, first)
        except BackendUnavailable:  # --lora's own errors: about the LoRA, not the model
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure of the *default* model falls back
            if settings.model:  # the user named a model: failing to load it is an error, not a fallback
                raise BackendUnavailable(f"--model {settings.model}: could not be loaded "
                                         f"({short_error(exc)}).") from exc
            log.warning("the default model %s could not be loaded (%s); using the tiny model", self.model_source,
                        short_error(exc))
            pin = pinned_revision(DEFAULT_MODEL)
            self.notes.append(f"The default model {DEFAULT_MODEL}" + (f" (commit {pin[:12]})" if pin else "")
                              + " could not be loaded here (offline, or not in the Hub cache at that commit).")
            self.model_source = TINY_MODEL_ID
            self._pipelines[first] = self._device.run(self._load, self.model_source, first)
        # Shown in the banner and written in infotext: a folder's name, never a path of this server.
        self.model = model_display_name(self.model_source)
        self.note_random_weights(random_weights_of(self.model, self.model_source), "Running", REAL_MODEL_ADVICE)
        self.use_schedulers_of(self._pipelines[first])
        self._caps = Capabilities(
            backend=self.name,
            model=self.model,
            device=self.device,
            precisions=self._precisions,
            max_images=settings.max_images,
            is_tiny=self.is_tiny,
            previews=self.previews,
            modes=self.offered_modes(),
            hr_upscalers=HR_UPSCALERS if "txt2img" in self.offered_modes() else (),
            notes=tuple(self.notes),
            **fewstep.capability_fields(self.few_step),
        )
        if self.device == "cpu" and not self.is_tiny and self.few_step is None:
            self._caps = dataclasses.replace(self._caps, default_steps=CPU_DEFAULT_STEPS)

    def _load(self, model: str, precision: str):
        started = time.perf_counter()
        local_only = model == DEFAULT_MODEL and not self.settings.model and self.settings.offline
        pipe = None
        if not local_only and COMMIT_SHA.fullmatch(resolve_model(model)[1] or ""):
            # A commit never changes, so a copy in the Hub cache (a Space's preload_from_hub, README.md) is the one
            # to load, with no call to the Hub (diffusers asks the Hub for the file list first when allowed to).
            try:
                pipe = pipeline.load_pipeline(model, pipeline.DTYPES[precision], self.device, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - not (all) in the cache: download it as before
                log.info("%s is not in the Hub cache at its commit (%s); downloading it", model, short_error(exc))
        if pipe is None:
            pipe = pipeline.load_pipeline(model, pipeline.DTYPES[precision], self.device, local_files_only=local_only)
        if self.settings.lora:  # before --optimize: the trace and the fused QKV see the fused weights
            fuse_lora(pipe, self.settings.lora)
        self.few_step = fewstep.few_step_kind(self.settings.few_step, pipe.scheduler.config)
        if self.optimize != "none":
            pipeline.optimize_pipeline(pipe, self.optimize)
            self._warm_up(pipe)
        _, revision = resolve_model(model)  # which commit, in the log; the banner and infotext name the plain id
        log.info("loaded %s%s (%s) on %s in %.1f s", model, f" at {revision}" if revision and "@" not in model else "",
                 precision, self.device, time.perf_counter() - started)
        return pipe

    def _warm_up(self, pipe) -> None:
        """One small run so compilation and autotuning happen at load, not in a user's request."""
        from PIL import Image

        started = time.perf_counter()
        # The request a person's first one will be: a few-step model runs without guidance (one UNet batch).
        caps = Capabilities(backend=self.name, model="", device=self.device, precisions=("fp32",),
                            modes=pipeline.unet_modes(pipe), **fewstep.capability_fields(self.few_step))
        request = GenerationRequest("warm-up", steps=min(2, caps.max_steps), width=512, height=512, seed=0,
                                    precision="fp32", guidance_scale=caps.default_guidance,
                                    scheduler=caps.schedulers[0])
        if "txt2img" not in pipeline.unet_modes(pipe):  # an inpainting UNet: warm up as what it runs
            request = dataclasses.replace(request, mode="inpaint", strength=1.0, mask_blur=0,
                                          image=Image.new("RGB", (512, 512), "gray"),
                                          mask=Image.new("L", (512, 512), 255))
        # Its timings are the first estimate of what a generation takes here (ui/estimate.py).
        _, self.warm_up_timings = pipeline.run(pipeline.mode_pipeline(pipe, request.mode), request, [0],
                                               scheduler=make_scheduler(request.scheduler, pipe.scheduler.config))
        log.info("warmed up (%s) in %.1f s", self.optimize, time.perf_counter() - started)

    def precision_pipeline(self, precision: str):
        """The pipeline for a precision; a new one reuses the loaded modules, cast, not a reload."""
        if precision not in self._pipelines and self.optimize in ("compile", "cuda-graphs"):
            # Compiled modules are not copied: the other precision is loaded and compiled itself.
            self._pipelines[precision] = self._load(self.model_source, precision)
        if precision not in self._pipelines:
            base = next(iter(self._pipelines.values()))
            dtype = pipeline.DTYPES[precision]
            # The eager modules (already fused and channels_last), not their traced stand-ins.
            parts = {name: copy.deepcopy(eager_module(getattr(base, name))).to(dtype=dtype)
                     for name in ("unet", "vae", "text_encoder")}
            pipe = type(base)(**parts, tokenizer=base.tokenizer, scheduler=copy.deepcopy(base.scheduler),
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            if self.optimize == "trace":
                freeze_pipeline(pipe)
            self._pipelines[precision] = pipe
        return self._pipelines[precision]

    def close(self) -> None:
        """Drop the pipelines."""
        super().close()
        if self.device == "cuda":
            torch.cuda.empty_cache()
