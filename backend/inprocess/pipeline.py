"""Diffusers glue shared by the local and the Neuron backends: load a pipeline, --optimize it, run it with timings."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from PIL import Image, ImageFilter

from ..core.api import (
    MODES,
    GenerationRequest,
    PreviewCallback,
    StepCallback,
    Timings,
    hires_schedule,
    preview_wanted,
)
from ..core.fewstep import step_eta
from .preview import PreviewPacer, noise_scale, preview_images
from .prompts import Runs, parsed_prompts, weighted_tokens
from ..core import emphasis as emphasis_syntax
from ..models.catalog import resolve_model
from ..models.sd21_random import SD21_RANDOM_ID
from ..models.sd21_random import build_pipeline as build_sd21_random
from ..core.settings import OPTIMIZE_MODES
from ..models.tiny import TINY_MODEL_ID
from ..models.tiny import build_pipeline as build_tiny
from .frozen import freeze_pipeline

log = logging.getLogger(__name__)

# Precision name -> torch dtype, for every precision a backend may offer (Neuron runs bf16 and fp32).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(model: str, dtype: torch.dtype, device: str = "cpu", local_files_only: bool = False):
    """Load a StableDiffusionPipeline from 'tiny', a diffusers folder or a Hub id (ID@REVISION, or the default model
    at its pinned commit), on device."""
    from diffusers import StableDiffusionPipeline

    source, revision = resolve_model(model)
    if source == TINY_MODEL_ID:
        pipe = build_tiny(dtype=dtype)
    elif source == SD21_RANDOM_ID:
        return build_sd21_random(dtype=dtype, device=device)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            # A branch, tag or commit of a Hub repository (diffusers 0.42's from_pretrained: "It can be a branch
            # name, a tag name, a commit id, or any identifier allowed by Git"); None: main, and for folders.
            revision=revision,
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
    one per input shape, traced on first use (backend/inprocess/frozen.py; for CPUs). compile: that, plus
    torch.compile of the UNet and the VAE decoder (inductor).
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
        freeze_pipeline(pipe)
    if mode in ("compile", "cuda-graphs"):
        compile_mode = "reduce-overhead" if mode == "cuda-graphs" else "max-autotune-no-cudagraphs"
        if pipe.device.type != "cuda":
            compile_mode = "default"  # CUDA graphs and autotuning are GPU-only; CPU gets plain inductor
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return pipe


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


class _MarksItsEncodeStage:
    """Mixin for the image pipelines: marks the stage clock once the input picture is in latents.

    diffusers encodes the picture inside the pipeline call (prepare_latents, and for inpaint
    prepare_mask_latents too), between the text encoder and the first step; one mark after the last
    of those calls splits that stretch off as the VAE encode stage. `stage_clock` is set by `run`.
    """

    stage_clock: StageClock | None = None

    def _mark_encoded(self) -> None:
        if self.stage_clock is not None:
            self.stage_clock.mark()


def _image_pipeline_classes():
    """The img2img and inpaint pipeline classes, each marking its encode stage (diffusers is imported here)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    class Img2ImgPipeline(_MarksItsEncodeStage, StableDiffusionImg2ImgPipeline):
        """diffusers' StableDiffusionImg2ImgPipeline; prepare_latents (encode, add noise) ends the encode stage."""

        def prepare_latents(self, *args, **kwargs):
            latents = super().prepare_latents(*args, **kwargs)
            self._mark_encoded()
            return latents

    class InpaintPipeline(_MarksItsEncodeStage, StableDiffusionInpaintPipeline):
        """diffusers' StableDiffusionInpaintPipeline; prepare_mask_latents (after the image's encode) ends it."""

        def prepare_mask_latents(self, *args, **kwargs):
            out = super().prepare_mask_latents(*args, **kwargs)
            self._mark_encoded()
            return out

    return {"img2img": Img2ImgPipeline, "inpaint": InpaintPipeline}


_IMAGE_PIPELINES: dict[str, Any] = {}


def mode_pipeline(pipe, mode: str):
    """The pipeline that runs `mode` over `pipe`'s own modules (the same UNet, VAE, text encoder
    objects: no second copy of a weight), or `pipe` itself for txt2img."""
    if mode == "txt2img":
        return pipe
    if not _IMAGE_PIPELINES:
        _IMAGE_PIPELINES.update(_image_pipeline_classes())
    components = {**pipe.components, "safety_checker": None, "feature_extractor": None}
    image_pipe = _IMAGE_PIPELINES[mode](**components, requires_safety_checker=False)
    image_pipe.set_progress_bar_config(disable=True)
    return image_pipe


def unet_input_channels(pipe) -> int:
    """4 for a standard checkpoint; 9 for a dedicated inpainting one (latents + mask + masked image)."""
    return int(pipe.unet.config.in_channels)


def unet_modes(pipe) -> tuple[str, ...]:
    """The modes a pipeline's UNet runs: a standard one all three; an inpainting (9-channel) one only
    inpaint (StableDiffusionPipeline and the img2img pipeline feed it 4 channels)."""
    return ("inpaint",) if unet_input_channels(pipe) == 9 else MODES


def blurred_mask(request: GenerationRequest):
    """The inpaint mask after its Gaussian blur (A1111's "Mask blur": the radius is the blur's sigma, in pixels)."""
    if not request.mask_blur:
        return request.mask
    return request.mask.filter(ImageFilter.GaussianBlur(request.mask_blur))


def paste_back(generated: list[Any], original: Any, mask: Any) -> list[Any]:
    """The generated images over the original through the (blurred) mask, as A1111 does after an inpaint:
    where the mask is 0 the pixels are the input's exactly, where it is 255 the generated ones."""
    return [Image.composite(image, original, mask) for image in generated]


def emphasised_embeds(pipe, runs: Runs, device) -> torch.Tensor:
    """One prompt's text encoder output with A1111's default emphasis ("Original", modules/sd_emphasis.py,
    EmphasisOriginal): each token's embedding times its weight, then the whole rescaled so that its mean is the
    unweighted output's mean, taken over this one prompt's (1, 77, width) output as A1111's process_tokens takes it
    over one prompt's chunk. Returned in the text encoder's dtype.

    The text encoder runs on plain token ids, exactly as diffusers' encode_prompt runs it (clip_skip none, the
    attention mask only where the config asks for one), so a compiled text encoder (the neuron backend's
    NeuronTextEncoder, traced for a fixed batch) needs no other graph. The weighting is done in float32, as A1111's
    float32 multipliers promote a half-precision output to float32, and cast back once."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids, weights = weighted_tokens(tokenizer, runs)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        ends = ids.index(tokenizer.eos_token_id) + 1  # the tokenizer's own mask: 1 through EOS, 0 on the padding
        mask = torch.tensor([[1] * ends + [0] * (len(ids) - ends)], device=device)
    z = encoder(input_ids, attention_mask=mask)[0].float()
    original_mean = z.mean()
    z = z * torch.tensor(weights, dtype=torch.float32, device=z.device).reshape(1, -1, 1)
    weighted_mean = z.mean()
    # The restore is a ratio of two means. A text encoder whose output is centred on zero (the tiny model's final
    # LayerNorm, at its initial bias 0, gives a mean of ~1e-9) makes it rounding noise over rounding noise, and A1111
    # would hand NaN or huge embeddings on: there, the weighted output is kept as it is. A trained encoder's mean is
    # far from zero (its LayerNorm has a learned bias), so this changes nothing there.
    scale = z.abs().mean()
    if torch.isfinite(weighted_mean) and weighted_mean.abs() > 1e-4 * scale and original_mean.abs() > 1e-4 * scale:
        z = z * (original_mean / weighted_mean)
    return z.to(dtype=encoder.dtype, device=device)


def encode_prompts(pipe, request: GenerationRequest, device, n: int, cfg: bool, emphasis: bool = False):
    """(prompt_embeds, negative_prompt_embeds) for `n` images, as pipe.encode_prompt gives them.

    Without emphasis, or where no weight of either prompt differs from 1.0, this is diffusers' own encode_prompt on
    the text (with emphasis on, the text without its syntax: the same text for a prompt that has none, so its
    pixels are what they always were). Otherwise each weighted prompt is encoded by emphasised_embeds and handed to
    encode_prompt, which repeats it per image and casts it as it does its own; a prompt of plain weights is still
    encoded by diffusers."""
    prompt, negative = request.prompt, request.negative_prompt or None
    if not emphasis:
        return pipe.encode_prompt(prompt, device, n, cfg, negative_prompt=negative)
    # Parsed again here (microseconds): base.generate parsed it first, to refuse a bad weight before taking a lane.
    runs, negative_runs = parsed_prompts(request)
    prompt = emphasis_syntax.plain_text(runs)
    negative = emphasis_syntax.plain_text(negative_runs) or None
    weighted, negative_weighted = emphasis_syntax.is_weighted(runs), emphasis_syntax.is_weighted(negative_runs)
    if not weighted and not negative_weighted:
        return pipe.encode_prompt(prompt, device, n, cfg, negative_prompt=negative)
    prompt_embeds = emphasised_embeds(pipe, runs, device) if weighted else None
    # Without CFG (guidance <= 1, a few-step model) diffusers encodes no negative prompt; neither does this.
    negative_embeds = emphasised_embeds(pipe, negative_runs, device) if cfg and negative_weighted else None
    return pipe.encode_prompt(None if weighted else prompt, device, n, cfg,
                              negative_prompt=None if negative_embeds is not None else negative,
                              prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """The hires fix's latent upscalers, as A1111's sample_hr_pass runs them (modules/processing.py):
    torch.nn.functional.interpolate to (height // 8, width // 8), with shared.latent_upscale_modes' mode and antialias
    ("Latent": bilinear, "Latent (nearest)": nearest, both without antialias; modules/shared_items.py)."""
    mode = {"latent": "bilinear", "latent-nearest": "nearest"}[upscaler]
    width, height = size
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=False)


def upscale_pictures(pipe, latents: torch.Tensor, size: tuple[int, int]) -> list[Any]:
    """The hires fix's Lanczos upscaler: the first pass decoded, each picture resized with PIL's Lanczos filter
    (A1111's UpscalerLanczos, modules/upscaler.py, then images.resize_image to the exact size); the img2img pass
    encodes them at the larger size."""
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    pictures = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(latents))
    return [picture.resize(size, resample=Image.LANCZOS) for picture in pictures]


def run(pipe, request: GenerationRequest, seeds: list[int], on_step: StepCallback | None = None,
        scheduler=None, on_preview: PreviewCallback | None = None,
        pacer: PreviewPacer | None = None, emphasis: bool = False,
        hires_pipe=None) -> tuple[list[Any], Timings]:
    """Run a validated request on a pipeline: encode, denoise, decode, each timed.

    `pipe` is the pipeline of the request's mode (`mode_pipeline`). The stages are called one by one
    (rather than one `pipe(...)` call) so that text encoding, the input picture's VAE encode (image
    modes), each denoising step and the VAE decode are timed apart; the arithmetic is the pipeline's
    own, so images equal those of `pipe(prompt, ..., generator=[torch.Generator().manual_seed(s)...])`
    (inpaint: then pasted back over the input through the blurred mask).
    Nothing in the denoising loop waits for the device: on_step is called when a step has been
    queued (on a CPU, when it has run), and the timings are read after the images are on the host.
    on_step's total is the steps that run (`request.denoising_steps`: steps x strength from an image).
    on_preview gets pictures of the latents after the steps `pacer` picks (by default those on_preview.wanted()
    asks for, where it has one: api.preview_wanted; a preview copies them to the host, which on a GPU waits for
    that step); its time counts in the next step's.
    emphasis: read A1111's emphasis syntax in both prompts (encode_prompts); off, the text goes to the tokenizer as is.
    A hires request (request.hires) then upscales the latents (upscale_latents, or upscale_pictures for lanczos) and
    runs `hires_pipe` (the img2img pipeline over the same modules; made here when None) at the larger size with the
    same prompt embeddings and scheduler, fresh generators of the same seeds (A1111 draws the hires noise from
    rng.ImageRNG(shape, seeds) anew) and hires_schedule's steps; on_step and on_preview count on through it.
    """
    if scheduler is not None:
        pipe.scheduler = scheduler
    n = len(seeds)
    cfg = request.guidance_scale > 1.0
    device = pipe._execution_device
    clock = StageClock.for_device(device)
    total_steps = request.denoising_steps
    image_mode = request.mode != "txt2img"
    t0 = time.perf_counter()
    clock.mark()
    with torch.inference_mode():
        prompt_embeds, negative_embeds = encode_prompts(pipe, request, device, n, cfg, emphasis)
        clock.mark()
        pacer = pacer or PreviewPacer(wanted=preview_wanted(on_preview))
        denoise_start = time.perf_counter()

        done = [0]  # the steps of earlier passes (the hires pass counts on after the first)

        def step_end(_pipe, i: int, _t, kwargs: dict) -> dict:
            clock.mark()
            step = done[0] + i + 1
            if on_step is not None:
                on_step(step, total_steps)
            if on_preview is not None and pacer.due(step, total_steps,
                                                    (time.perf_counter() - denoise_start) * 1000.0):
                started = time.perf_counter()
                on_preview(step, total_steps, preview_images(kwargs["latents"], noise_scale(_pipe.scheduler)))
                pacer.record((time.perf_counter() - started) * 1000.0)
            return kwargs

        # CPU generators, one per image: the same seed gives the same image on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                      num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      generator=generators, output_type="latent", callback_on_step_end=step_end,
                      eta=step_eta(request.scheduler))
        mask = None
        if request.mode == "txt2img":
            mode_kwargs = dict(height=request.height, width=request.width)
        elif request.mode == "img2img":
            # The image's size is the generation's (validated() fitted it); diffusers encodes it once per
            # image, each with that image's generator.
            mode_kwargs = dict(image=request.image, strength=request.strength)
        else:
            mask = blurred_mask(request)
            # The input once per image: given one, diffusers encodes it with the first generator only and
            # repeats it, so image i > 0 would not be what seed + i gives alone. Given n, it encodes image
            # i (and the masked image i) with generator i, the same draws as a one-image request of seed + i.
            mode_kwargs = dict(image=[request.image] * n, mask_image=mask, strength=request.strength,
                               height=request.height, width=request.width)
        pipe.stage_clock = clock if image_mode else None
        try:
            latents = pipe(**common, **mode_kwargs).images
        finally:
            pipe.stage_clock = None
        clock.mark()
        if request.hires:
            done[0] = request.steps
            latents = _hires_pass(pipe, hires_pipe, request, seeds, latents, common, clock)
            clock.mark()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * n)
        if mask is not None:
            images = paste_back(images, request.image, mask)
    total_ms = (time.perf_counter() - t0) * 1000.0
    # Marks: start, text encoded, (image modes: picture encoded,) each step, denoising returned. The
    # VAE stage is the rest of the total (decode, the paste-back, and the copy to PIL images).
    # A hires pass adds: upscaled (and, for lanczos, encoded), each hires step, its denoising returned.
    intervals = clock.intervals_ms()
    text_ms = intervals.pop(0)
    encode_ms = intervals.pop(0) if image_mode else 0.0
    hires_steps, hires_tail_ms, upscale_ms = [], 0.0, 0.0
    if request.hires:
        first = request.steps + 1  # the first pass's steps and the mark after its denoising
        upscale_ms, *hires_steps, hires_tail_ms = intervals[first:]
        intervals = intervals[:first]
    *steps, tail_ms = intervals
    denoise_ms = sum(steps) + tail_ms
    hires_denoise_ms = sum(hires_steps) + hires_tail_ms
    timings = Timings(
        total_ms=total_ms,
        text_encoder_ms=text_ms,
        denoise_ms=denoise_ms,
        step_ms=steps,
        vae_ms=max(0.0, total_ms - text_ms - encode_ms - denoise_ms - upscale_ms - hires_denoise_ms),
        vae_encode_ms=encode_ms,
        hires_upscale_ms=upscale_ms,
        hires_denoise_ms=hires_denoise_ms,
        hires_step_ms=hires_steps,
    )
    return images, timings


def _hires_pass(pipe, hires_pipe, request: GenerationRequest, seeds: list[int], latents: torch.Tensor,
                common: dict[str, Any], clock: StageClock) -> torch.Tensor:
    """The hires fix's second pass over the first pass's latents (run's; see its docstring): the latents at the
    larger size. The clock is marked once the input is ready (img2img's prepare_latents), then at each step."""
    size = request.output_size
    if request.hr_upscaler == "lanczos":
        image = upscale_pictures(pipe, latents, size)
    else:
        image = upscale_latents(latents, size, request.hr_upscaler)
    hires_pipe = hires_pipe if hires_pipe is not None else mode_pipeline(pipe, "img2img")
    hires_pipe.scheduler = pipe.scheduler
    steps, strength = hires_schedule(request.hires_steps_run, request.denoising_strength)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # the hires noise from the seeds anew
    hires_pipe.stage_clock = clock
    try:
        return hires_pipe(**{**common, "num_inference_steps": steps, "generator": generators},
                          image=image, strength=strength).images
    finally:
        hires_pipe.stage_clock = None
