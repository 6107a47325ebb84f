"""Diffusers glue shared by the local and the Neuron backends: load, schedulers, run with timings."""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
import types
from pathlib import Path
from typing import Any

import torch

from .api import (
    RANDOM_SEED,
    SCHEDULERS,
    BackendError,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    StepCallback,
    Timings,
)
from .metadata import attach, write_infotext
from .settings import OPTIMIZE_MODES
from .sd21_random import SD21_RANDOM_ID
from .tiny import TINY_MODEL_ID

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def scheduler_class_and_overrides(key: str) -> tuple[Any, dict[str, Any]]:
    """The diffusers scheduler class and config overrides behind a scheduler key."""
    import diffusers

    table = {
        "dpm++2m": (diffusers.DPMSolverMultistepScheduler,
                    dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
        "dpm++2m-karras": (diffusers.DPMSolverMultistepScheduler,
                           dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler-a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
    }
    if key not in table:
        raise KeyError(f"unknown scheduler {key!r}; known: {', '.join(SCHEDULERS)}")
    return table[key]


def make_scheduler(key: str, base_config: Any):
    """A fresh scheduler of kind `key` from the model's own scheduler config (no weights reloaded)."""
    cls, overrides = scheduler_class_and_overrides(key)
    config = dict(base_config)
    # SD2's config has steps_offset=1; a config without it makes diffusers warn and shift timesteps.
    config["steps_offset"] = max(1, int(config.get("steps_offset") or 0))
    return _starting_at_the_first_timestep(cls.from_config(config, **overrides))


def _starting_at_the_first_timestep(scheduler):
    """Tell the scheduler, each time the pipeline sets its timesteps, that denoising starts at the first.

    Otherwise the first step() looks its position up with `(timesteps == t).nonzero().item()`,
    which on a GPU makes the CPU wait for the first UNet call to finish before it can queue the
    rest of the loop. Text-to-image always starts at index 0, so the answer is the same.
    """
    if hasattr(scheduler, "set_begin_index"):  # DDIM has no step index to look up
        # A bound method, so that a copy of the scheduler (copy.deepcopy) sets its own index.
        scheduler.set_timesteps = types.MethodType(_set_timesteps_from_the_first, scheduler)
    return scheduler


def _set_timesteps_from_the_first(self, *args, **kwargs):
    type(self).set_timesteps(self, *args, **kwargs)  # resets the begin index
    self.set_begin_index(0)


class SchedulerCache:
    """One scheduler per kind, reused across requests (callers run one generation at a time)."""

    def __init__(self, base_config: Any):
        self.base_config = dict(base_config)
        self._by_key: dict[str, Any] = {}

    def get(self, key: str):
        """The scheduler for key, made on first use."""
        if key not in self._by_key:
            self._by_key[key] = make_scheduler(key, self.base_config)
        return self._by_key[key]


class DeviceThread:
    """One long-lived thread on which an in-process backend does all its torch work.

    PyTorch's CPU kernels use an OpenMP thread team per calling thread. When a second thread
    (Gradio's workers, the endpoint's per-request threads) runs torch after the first, the two
    teams contend for the cores and a 512x512 tiny-model generation on 2 cores went from ~0.82 s
    to ~1.2-1.4 s, on every thread. Loading, warm-up and every generation therefore go through
    this one thread (`device_thread()`, one per process), whichever thread asks.
    """

    def __init__(self, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn, *args, **kwargs):
        """Call fn on the device thread and return its result (or raise its exception)."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        # The caller's context variables go along (as asyncio.to_thread does): Gradio finds the
        # request's progress bar through them when on_step reports a step from this thread.
        context = contextvars.copy_context()
        return self._pool.submit(context.run, fn, *args, **kwargs).result()



_DEVICE_THREAD: DeviceThread | None = None
_DEVICE_THREAD_LOCK = threading.Lock()


def device_thread() -> DeviceThread:
    """The process's one torch thread, shared by every in-process backend (and the benchmarks)."""
    global _DEVICE_THREAD
    with _DEVICE_THREAD_LOCK:
        if _DEVICE_THREAD is None:
            _DEVICE_THREAD = DeviceThread("torch")
        return _DEVICE_THREAD


def load_pipeline(model: str, dtype: torch.dtype, device: str = "cpu", local_files_only: bool = False):
    """Load a StableDiffusionPipeline from 'tiny', a diffusers folder or a Hub id, on device."""
    from diffusers import StableDiffusionPipeline

    if model == TINY_MODEL_ID:
        from .tiny import build_pipeline

        pipe = build_pipeline(dtype=dtype)
    elif model == SD21_RANDOM_ID:
        from .sd21_random import build_pipeline as build_sd21_random

        return build_sd21_random(dtype=dtype, device=device)
    else:
        source = str(Path(model).expanduser()) if os.path.isdir(os.path.expanduser(model)) else model
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,  # diffusers 0.42: dtype= replaces torch_dtype=
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )
        # from_pretrained leaves every weight requiring grad, and torch.matmul chooses its kernel by
        # that flag: a non-contiguous 3-D input (the UNet's proj_in) is folded into one mm when no
        # operand needs grad, else run as a bmm over an expanded weight. On CPUs without native bf16
        # (AVX2) those two round differently, so the same folder gave other bf16 pixels than the
        # built-in tiny model or the traced parts (frozen constants need no grad). Inference never
        # needs gradients: drop them, as tiny.py and the compile script already do.
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def optimize_pipeline(pipe, mode: str):
    """Make the UNet and VAE faster in place (the local backend's --optimize).

    sdpa: fused QKV projections with torch's scaled_dot_product_attention and channels_last
    convolutions. trace: that, with the UNet and the VAE decoder run as frozen TorchScript graphs,
    one per input shape, traced on first use (backend/frozen.py; for CPUs). compile: that, plus torch.compile of the UNet and the VAE decoder (inductor).
    cuda-graphs: that, with inductor's CUDA graphs ("reduce-overhead"), which removes the
    per-kernel launch cost that dominates a 20-step UNet loop on a fast GPU. The first request
    after start compiles (tens of seconds); the backend warms up once so users never pay it.
    """
    if mode not in OPTIMIZE_MODES:
        raise ValueError(f"--optimize: {mode!r} is not one of {', '.join(OPTIMIZE_MODES)}")
    if mode == "none":
        return pipe
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if mode == "trace":
        from .frozen import freeze_pipeline

        freeze_pipeline(pipe)
    if mode in ("compile", "cuda-graphs"):
        compile_mode = "reduce-overhead" if mode == "cuda-graphs" else "max-autotune-no-cudagraphs"
        if pipe.device.type != "cuda":
            compile_mode = "default"  # CUDA graphs and autotuning are GPU-only; CPU gets plain inductor
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return pipe


def model_display_name(model: str) -> str:
    """A folder's own name (not its path on this machine); a Hub id or 'tiny' as given."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path.resolve().name or model
    return model


def is_tiny_folder(model: str) -> bool:
    """True for a folder saved by `python -m backend.tiny` (random weights, not SD2.1)."""
    readme = Path(os.path.expanduser(model)) / "README.md"
    try:
        return readme.is_file() and readme.read_text(errors="replace").startswith("# tiny (random weights)")
    except OSError:
        return False


def tokens_dropped(tokenizer, text: str) -> str:
    """The part of `text` past the text encoder's window (77 tokens with BOS/EOS), or ''."""
    if not text:
        return ""
    limit = tokenizer.model_max_length
    try:
        enc = tokenizer(text, truncation=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        ids = tokenizer(text, truncation=False).input_ids
        return "" if len(ids) <= limit else tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True).strip()
    if len(enc.input_ids) <= limit:
        return ""
    # Token limit-1 is the first one that does not fit (BOS takes one place, EOS the last);
    # its offset points into the text as typed, so the message quotes the user's own words.
    return text[enc.offset_mapping[limit - 1][0]:].strip()


def truncation_warnings(tokenizer, request: GenerationRequest) -> list[str]:
    """A message for each prompt that the text encoder will cut, naming what is dropped."""
    warnings = []
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        dropped = tokens_dropped(tokenizer, text)
        if dropped:
            shown = dropped if len(dropped) <= 160 else f"{dropped[:70]} ... {dropped[-70:]}"
            warnings.append(
                f"{name}: longer than the text encoder's {tokenizer.model_max_length} tokens; "
                f"this end was dropped: \"{shown}\""
            )
    return warnings


def infotext_for(request: GenerationRequest, seed: int, model: str, backend: str,
                 latency_ms: float | None) -> str:
    """The A1111-style infotext of one image."""
    params = {
        "Steps": request.steps,
        "Sampler": SCHEDULERS.get(request.scheduler, request.scheduler),
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
        "Precision": request.precision,
        "Backend": backend,
        "Latency": None if latency_ms is None else f"{latency_ms:.0f} ms",
    }
    return write_infotext(request.prompt, request.negative_prompt, params)


class StageClock:
    """Stage boundaries of one generation: wall time on a CPU, CUDA events on a GPU.

    A GPU runs kernels after the CPU has queued them, so a wall clock read between two steps
    times their launch, not their run, and synchronizing to read it would drain the queue at
    every step. The events are recorded in the stream instead and read once, after the images
    have reached the host. `event` makes one (torch.cuda.Event with timing on CUDA, None: wall time).
    """

    def __init__(self, event: Any = None):
        self._event = event
        self._marks: list[Any] = []

    @classmethod
    def for_device(cls, device: torch.device) -> "StageClock":
        """The clock that tells the truth on `device`."""
        if device.type == "cuda":
            return cls(lambda: torch.cuda.Event(enable_timing=True))
        return cls()

    def mark(self) -> None:
        """A boundary now (on a GPU: once the work queued so far has run)."""
        if self._event is None:
            self._marks.append(time.perf_counter())
        else:
            event = self._event()
            event.record()
            self._marks.append(event)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (on a GPU, waits for the last one)."""
        pairs = list(zip(self._marks, self._marks[1:]))
        if self._event is None:
            return [(b - a) * 1000.0 for a, b in pairs]
        if self._marks:
            self._marks[-1].synchronize()
        return [a.elapsed_time(b) for a, b in pairs]


def run(pipe, request: GenerationRequest, seeds: list[int], on_step: StepCallback | None = None,
        scheduler=None) -> tuple[list[Any], Timings]:
    """Run a validated request on a pipeline: encode, denoise, decode, each timed.

    The stages are called one by one (rather than one `pipe(...)` call) so that text encoding,
    each denoising step and the VAE decode are timed apart; the arithmetic is the pipeline's own,
    so images equal those of `pipe(prompt, ..., generator=[torch.Generator().manual_seed(s)...])`.
    Nothing in the denoising loop waits for the device: on_step is called when a step has been
    queued (on a CPU, when it has run), and the timings are read after the images are on the host.
    """
    if scheduler is not None:
        pipe.scheduler = scheduler
    n = len(seeds)
    cfg = request.guidance_scale > 1.0
    device = pipe._execution_device
    clock = StageClock.for_device(device)
    t0 = time.perf_counter()
    clock.mark()
    with torch.inference_mode():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            request.prompt, device, n, cfg, negative_prompt=request.negative_prompt or None
        )
        clock.mark()

        def step_end(_pipe, i: int, _t, kwargs: dict) -> dict:
            clock.mark()
            if on_step is not None:
                on_step(i + 1, request.steps)
            return kwargs

        # CPU generators, one per image: the same seed gives the same image on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            height=request.height,
            width=request.width,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
        ).images
        clock.mark()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * n)
    total_ms = (time.perf_counter() - t0) * 1000.0
    # Marks: start, text encoded, each step, denoising returned. The VAE stage is the rest of the
    # total (decode, and the copy to PIL images).
    text_ms, *steps, tail_ms = clock.intervals_ms()
    denoise_ms = sum(steps) + tail_ms
    timings = Timings(
        total_ms=total_ms,
        text_encoder_ms=text_ms,
        denoise_ms=denoise_ms,
        step_ms=steps,
        vae_ms=max(0.0, total_ms - text_ms - denoise_ms),
    )
    return images, timings


def label_images(images: list[Any], request: GenerationRequest, seeds: list[int], model: str,
                 backend: str, latency_ms: float | None) -> list[Any]:
    """Attach each image's infotext."""
    return [attach(img, infotext_for(request, s, model, backend, latency_ms)) for img, s in zip(images, seeds)]


def generate_locked(request: GenerationRequest, on_step: StepCallback | None, *, lock: threading.Lock,
                    device: "DeviceThread", pipeline_for: Any, schedulers: dict[str, "SchedulerCache"],
                    model: str, backend: str, where: str) -> GenerationResult:
    """The common body of an in-process backend's generate(), for a request already validated.

    Resolves seed -1, then under `lock` runs the pipeline of the request's precision
    (`pipeline_for(precision)`, called on the device thread) on `device`; any error that is not
    already a BackendError becomes GenerationFailed naming `where` (e.g. "cpu", "neuron")."""
    base_seed = random_seed() if request.seed == RANDOM_SEED else request.seed
    request = request.__class__(**{**request.to_dict(), "seed": base_seed})
    seeds = request.image_seeds(base_seed)
    with lock:
        pipe = device.run(pipeline_for, request.precision)
        warnings = truncation_warnings(pipe.tokenizer, request)
        scheduler = schedulers[request.precision].get(request.scheduler)
        try:
            images, timings = device.run(run, pipe, request, seeds, on_step, scheduler=scheduler)
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is this generation failing
            log.exception("generation failed")
            raise GenerationFailed(f"generation failed on {where}: {short_error(exc)}") from exc
    images = label_images(images, request, seeds, model, backend, timings.total_ms)
    return GenerationResult(images=images, seeds=seeds, timings=timings, request=request,
                            backend=backend, model=model, warnings=warnings)


def short_error(exc: BaseException) -> str:
    """An exception as one line, without this machine's paths, for a user's eyes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"(?<![\w.-])(/[^\s'\"]+)+", "<path>", text)
    return f"{type(exc).__name__}: {text}"[:300]


def random_seed() -> int:
    """A seed for seed=-1 (from the OS, not torch's global generator)."""
    return int.from_bytes(os.urandom(4), "little")

