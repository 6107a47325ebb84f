"""The contract every backend keeps: requests, results, capabilities and errors.

This module imports nothing heavy (of the project: the errors, the scheduler names and input_images, which
imports PIL only when a picture is checked), so the UI, the endpoint and the scripts can all share it. A
`GenerationRequest` is validated here, and only here, against the `Capabilities` of the backend that will run it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from . import input_images
from .errors import InvalidRequest
from .schedulers import CFG_SCHEDULERS, SCHEDULERS  # light: names only, diffusers is imported on use

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1
# What a generation starts from: nothing (text to image), an input image (image to image), or an input
# image and a mask of the part to repaint (inpaint). Capabilities.modes says which a backend offers.
MODES = ("txt2img", "img2img", "inpaint")
MODE_LABELS = {"txt2img": "Text to image", "img2img": "Image to image", "inpaint": "Inpaint"}
DEFAULT_STRENGTH = 0.75  # AUTOMATIC1111's default denoising strength
MAX_MASK_BLUR = 64
DEFAULT_GUIDANCE = 7.5  # a CFG model's guidance scale when a request leaves it out (the walk-through's)
DEFAULT_STEPS = 20  # a CFG model's steps when a request leaves them out
# Hires fix (text to image only): generate at width x height, upscale by hr_scale, then a partial img2img pass at
# the larger size, as AUTOMATIC1111's "Hires. fix" (modules/processing.py, StableDiffusionProcessingTxt2Img).
HR_UPSCALERS = ("latent", "latent-nearest", "lanczos")  # the first is the default
# A1111's labels (modules/shared_items.py latent_upscale_modes: "Latent" bilinear, "Latent (nearest)";
# modules/upscaler.py UpscalerLanczos: "Lanczos"), written in the infotext's "Hires upscaler".
HR_UPSCALER_LABELS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
HR_LATENT_UPSCALERS = ("latent", "latent-nearest")  # the latents interpolated; lanczos needs a VAE encode
MAX_HR_SCALE = 2.0
DEFAULT_HR_STRENGTH = 0.7  # A1111's hires "Denoising strength" default
TRAIN_TIMESTEPS = 1000  # SD's schedulers' training timesteps: the longest schedule a hires pass may stretch to


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: int(size x scale) as A1111 computes hr_upscale_to_x/y, down to a multiple of 8, the
    latent grid A1111 interpolates to (target // opt_f, modules/processing.py sample_hr_pass)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def hires_scales_between(sizes: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """The scales (above 1, at most MAX_HR_SCALE) that take one of `sizes` to another: what a compiled root can run."""
    scales = set()
    for w, h in sizes:
        for big_w, big_h in sizes:
            scale = round(big_w / w, 4)
            if 1.0 < scale <= MAX_HR_SCALE and hires_size(w, h, scale) == (big_w, big_h):
                scales.add(scale)
    return tuple(sorted(scales))


def hires_schedule(steps: int, strength: float) -> tuple[int, float]:
    """(num_inference_steps, strength) for diffusers' img2img so that the hires pass runs exactly `steps` steps from
    the point of the schedule A1111 starts at. A1111 (modules/sd_samplers_common.py setup_img2img_steps, called with
    the hires steps) makes a schedule of int(steps / min(strength, 0.999)) steps and runs its last `steps`; diffusers
    runs the last int(num_inference_steps x strength) (get_timesteps), so strength is set just above steps / total."""
    total = int(steps / min(strength, 0.999))
    return total, min(1.0, (steps + 0.5) / total)


def random_seed() -> int:
    """A seed for seed=-1 (from the OS, not torch's global generator)."""
    return int.from_bytes(os.urandom(4), "little")


def new_request_id() -> str:
    """A short id that ties a message a person or a client sees to its line in the server log."""
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; drives validation and the UI's controls."""

    backend: str
    model: str
    device: str
    precisions: tuple[str, ...]
    schedulers: tuple[str, ...] = CFG_SCHEDULERS  # the first is the default
    # Sizes: either any multiple of `size_multiple` within [min_size, max_size] or, when
    # `fixed_sizes` is set (compiled Neuron graphs), exactly one of those (width, height) pairs.
    min_size: int = 64
    max_size: int = 1024
    size_multiple: int = 8
    fixed_sizes: tuple[tuple[int, int], ...] = ()
    default_size: tuple[int, int] = (512, 512)
    min_steps: int = 1
    max_steps: int = 100
    max_images: int = 4
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    is_tiny: bool = False
    # Pictures of the latents while denoising (generate's on_preview): in-process backends only; a
    # remote endpoint answers once per request.
    previews: bool = False
    # The modes it runs (MODES). A compiled Neuron root without the VAE encoder part offers txt2img only;
    # a dedicated inpainting checkpoint (9-channel UNet) runs inpaint only (pipeline.unet_modes).
    modes: tuple[str, ...] = ("txt2img",)
    # Requests the backend runs at once (the app's queue and the endpoint's turns follow it): the number of
    # NeuronCores with --neuron-parallel pipeline, else 1 for an in-process backend.
    concurrency: int = 1
    notes: tuple[str, ...] = ()
    # False for a few-step model (backend/core/fewstep.py): no classifier-free guidance, so no negative prompt
    # and guidance_scale at most 1 (diffusers then runs one UNet batch); the UI hides both and says why.
    guidance: bool = True
    default_steps: int = DEFAULT_STEPS  # a request without steps runs these (1 for SD-Turbo, 4 for LCM / TCD)
    # Hires fix: the upscalers offered (HR_UPSCALERS; empty: no hires fix, as an endpoint too old to say). With
    # fixed_sizes, hr_scales lists the scales that take a compiled size to another (hires_scales_between); with free
    # sizes any scale from 1 to MAX_HR_SCALE whose size fits max_size runs, and hr_scales is empty.
    hr_upscalers: tuple[str, ...] = ()
    hr_scales: tuple[float, ...] = ()

    @property
    def default_guidance(self) -> float:
        """A request without guidance_scale gets this: 7.5, or 0 (off) for a few-step model."""
        return DEFAULT_GUIDANCE if self.guidance else 0.0

    @property
    def default_precision(self) -> str:
        """The first precision is the backend's preferred one."""
        return self.precisions[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the endpoint's `describe` answer)."""
        data = dataclasses.asdict(self)
        data["fixed_sizes"] = [list(s) for s in self.fixed_sizes]
        data["default_size"] = list(self.default_size)
        for key in ("precisions", "schedulers", "modes", "notes", "hr_upscalers", "hr_scales"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Capabilities":
        """Inverse of to_dict; unknown keys are ignored so older clients keep working."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("precisions", "schedulers", "modes", "notes", "hr_upscalers", "hr_scales"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "fixed_sizes" in kwargs:
            kwargs["fixed_sizes"] = tuple(tuple(int(v) for v in s) for s in kwargs["fixed_sizes"])
        if "default_size" in kwargs:
            kwargs["default_size"] = tuple(int(v) for v in kwargs["default_size"])
        return cls(**kwargs)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as a person asked for it. Call `validated(caps)` before running it."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the backend's Capabilities.default_steps
    guidance_scale: float | None = None  # None: Capabilities.default_guidance (7.5, or 0 for a few-step model)
    seed: int = RANDOM_SEED
    scheduler: str | None = None  # None: the backend's first scheduler (DPM++ 2M, or the few-step model's own)
    precision: str | None = None  # None: the backend's default
    width: int | None = None  # None: the backend's default size
    height: int | None = None
    num_images: int = 1
    mode: str = "txt2img"
    # img2img and inpaint: the input image and (inpaint) the mask, white where to repaint. Given as
    # PNG/JPEG bytes, base64 text or PIL images; validated() returns them fitted to width x height
    # (RGB and L) by resize_mode (backend/core/input_images.py).
    image: Any = None
    mask: Any = None
    strength: float = DEFAULT_STRENGTH  # how much of the input to repaint: 1.0 keeps nothing of it
    mask_blur: int = 4  # pixels of Gaussian blur on the mask's edge, as AUTOMATIC1111's "Mask blur"
    resize_mode: str = "crop"
    # Hires fix (txt2img): hr_scale 1.0 (or None) is off; hr_steps 0 runs `steps` again; the second pass's
    # denoising_strength is A1111's hires one (0.7), apart from img2img's `strength`.
    hr_scale: float | None = 1.0
    hr_upscaler: str | None = None  # None: HR_UPSCALERS[0]
    hr_steps: int | None = 0
    denoising_strength: float | None = None  # None: DEFAULT_HR_STRENGTH; an image mode's is `strength`

    def validated(self, caps: Capabilities) -> "GenerationRequest":
        """Return a normalized copy, or raise InvalidRequest naming the field and what is allowed."""
        if self.mode not in MODES:
            raise InvalidRequest(f"mode: {_show(self.mode)} is not known; choose one of {', '.join(MODES)}.", "mode")
        if self.mode not in caps.modes:
            raise InvalidRequest(
                f"mode: {MODE_LABELS[self.mode]} ({self.mode}) is not available on this backend; it offers "
                f"{', '.join(f'{MODE_LABELS[m]} ({m})' for m in caps.modes)}.", "mode")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequest("prompt: must not be empty; type what the image should show.", "prompt")
        _check_text("prompt", self.prompt)
        if len(self.prompt) > caps.max_prompt_chars:
            raise InvalidRequest(
                f"prompt: {len(self.prompt)} characters; at most {caps.max_prompt_chars} are allowed.", "prompt"
            )
        negative = self.negative_prompt or ""
        if not isinstance(negative, str):
            raise InvalidRequest("negative_prompt: must be text.", "negative_prompt")
        _check_text("negative_prompt", negative)
        if len(negative) > caps.max_prompt_chars:
            raise InvalidRequest(
                f"negative_prompt: {len(negative)} characters; at most {caps.max_prompt_chars} are allowed.",
                "negative_prompt",
            )
        if negative and not caps.guidance:
            raise InvalidRequest("negative_prompt: this few-step model runs without guidance, so a negative prompt "
                                 "has no effect; leave it empty.", "negative_prompt")
        steps = caps.default_steps if self.steps in (None, "") else self.steps
        steps = _integer("steps", steps, caps.min_steps, caps.max_steps)
        guidance = caps.default_guidance if self.guidance_scale in (None, "") else self.guidance_scale
        guidance = _number("guidance_scale", guidance, 0.0, caps.max_guidance)
        if guidance > 1.0 and not caps.guidance:  # diffusers runs CFG (a second UNet batch) above 1
            raise InvalidRequest(f"guidance_scale: {guidance:g} asks for classifier-free guidance, which this "
                                 f"few-step model runs without; use 0 (or at most 1) or leave it out.",
                                 "guidance_scale")
        seed = _integer("seed", self.seed, RANDOM_SEED, MAX_SEED, hint=" (-1 picks a random seed)")
        num_images = _integer("num_images", self.num_images, 1, caps.max_images)
        scheduler = caps.schedulers[0] if self.scheduler in (None, "") else normalize_scheduler(self.scheduler, caps)
        precision = self.precision if self.precision not in (None, "") else caps.default_precision
        if precision not in caps.precisions:
            raise InvalidRequest(
                f"precision: {_show(precision)} is not available on this backend; choose one of "
                f"{', '.join(caps.precisions)}.",
                "precision",
            )
        width = caps.default_size[0] if self.width in (None, "") else self.width
        height = caps.default_size[1] if self.height in (None, "") else self.height
        width, height = _size(width, height, caps)
        hires = self._validated_hires(steps, width, height, caps)
        inputs = self._validated_inputs(steps, width, height)
        return dataclasses.replace(
            self,
            **inputs,
            **hires,
            prompt=self.prompt,
            negative_prompt=negative,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            scheduler=scheduler,
            precision=precision,
            width=width,
            height=height,
            num_images=num_images,
        )

    def _validated_inputs(self, steps: int, width: int, height: int) -> dict[str, Any]:
        """The mode's own fields, checked and with the pictures fitted to width x height."""
        wants_image, wants_mask = self.mode in ("img2img", "inpaint"), self.mode == "inpaint"
        for name, value, wanted in (("image", self.image, wants_image), ("mask", self.mask, wants_mask)):
            if wanted and value is None:
                raise InvalidRequest(f"{name}: {MODE_LABELS[self.mode]} needs an input {name}; upload one.", name)
            if not wanted and value is not None:
                raise InvalidRequest(f"{name}: {MODE_LABELS[self.mode]} ({self.mode}) takes no input {name}; "
                                     f"leave it out or choose a mode that uses it.", name)
        if not wants_image:
            return {"image": None, "mask": None}
        strength = _number("strength", self.strength, 0.0, 1.0)
        if int(steps * strength) < 1:  # diffusers runs int(steps * strength) steps (get_timesteps)
            raise InvalidRequest(f"strength: {strength:g} with {steps} steps runs no denoising step; raise "
                                 f"strength or steps so that steps x strength is at least 1.", "strength")
        if self.resize_mode not in input_images.RESIZE_MODES:
            raise InvalidRequest(f"resize_mode: {_show(self.resize_mode)} is not known; choose one of "
                                 f"{', '.join(input_images.RESIZE_MODES)}.", "resize_mode")
        source = input_images.load_picture("image", self.image)
        image = input_images.fit_image(source, width, height, self.resize_mode)
        mask, mask_blur = None, _integer("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        if wants_mask:
            mask = input_images.fit_mask(input_images.load_picture("mask", self.mask), source.size, width, height,
                                         self.resize_mode)
        return {"image": image, "mask": mask, "strength": strength, "mask_blur": mask_blur}

    def _validated_hires(self, steps: int, width: int, height: int, caps: Capabilities) -> dict[str, Any]:
        """The hires fields, checked (off: their defaults), the second size fitting the backend's sizes."""
        off = {"hr_scale": 1.0, "hr_upscaler": None, "hr_steps": 0, "denoising_strength": None}
        if self.mode != "txt2img" and self.denoising_strength not in (None, ""):  # A1111's img2img name for it
            raise InvalidRequest(f"denoising_strength: is the hires fix's (text to image); "
                                 f"{MODE_LABELS[self.mode]}'s is strength.", "denoising_strength")
        scale = 1.0 if self.hr_scale in (None, "") else _number("hr_scale", self.hr_scale, 1.0, MAX_HR_SCALE)
        if scale == 1.0:
            return off
        if self.mode != "txt2img":
            raise InvalidRequest(f"hr_scale: the hires fix is a second pass of Text to image (txt2img), not of "
                                 f"{MODE_LABELS[self.mode]}; leave hr_scale at 1 (off).", "hr_scale")
        if not caps.hr_upscalers:
            raise InvalidRequest("hr_scale: this backend runs no hires fix; leave hr_scale at 1 (off).", "hr_scale")
        upscaler = caps.hr_upscalers[0] if self.hr_upscaler in (None, "") else normalize_upscaler(self.hr_upscaler,
                                                                                                  caps)
        big = hires_size(width, height, scale)
        if caps.fixed_sizes and big not in caps.fixed_sizes:
            offered = [f"{s:g} ({w}x{h} to {hires_size(w, h, s)[0]}x{hires_size(w, h, s)[1]})"
                       for s in caps.hr_scales for w, h in caps.fixed_sizes if hires_size(w, h, s) in caps.fixed_sizes]
            raise InvalidRequest(
                f"hr_scale: {scale:g} takes {width}x{height} to {big[0]}x{big[1]}, which this backend was not compiled "
                f"for; " + (f"it offers {', '.join(offered)}." if offered else "it offers no hires scale."), "hr_scale")
        if not caps.fixed_sizes and max(big) > caps.max_size:
            raise InvalidRequest(f"hr_scale: {scale:g} takes {width}x{height} to {big[0]}x{big[1]}, beyond this "
                                 f"backend's largest side, {caps.max_size}; use a smaller scale or size.", "hr_scale")
        if min(big) < caps.min_size or big == (width, height):
            raise InvalidRequest(f"hr_scale: {scale:g} leaves {width}x{height} at {big[0]}x{big[1]}; use a larger "
                                 f"scale (or 1 for no hires fix).", "hr_scale")
        hr_steps = _integer("hr_steps", 0 if self.hr_steps in (None, "") else self.hr_steps, 0, caps.max_steps,
                            hint=" (0: the same as steps)")
        strength = DEFAULT_HR_STRENGTH if self.denoising_strength in (None, "") else self.denoising_strength
        strength = _number("denoising_strength", strength, 0.0, 1.0)
        run = hr_steps or steps
        if strength <= 0.0:
            raise InvalidRequest(f"denoising_strength: 0 leaves the upscaled image as it is; use more than 0 (A1111's "
                                 f"default is {DEFAULT_HR_STRENGTH:g}).", "denoising_strength")
        if hires_schedule(run, strength)[0] > TRAIN_TIMESTEPS:
            raise InvalidRequest(f"denoising_strength: {strength:g} with {run} hires steps would stretch the hires "
                                 f"schedule past the model's {TRAIN_TIMESTEPS} timesteps (A1111 runs the hires steps "
                                 f"from a schedule of steps / strength); use a larger strength or fewer hires steps.",
                                 "denoising_strength")
        return {"hr_scale": scale, "hr_upscaler": upscaler, "hr_steps": hr_steps, "denoising_strength": strength}

    @property
    def hires(self) -> bool:
        """Whether a validated request runs a hires pass."""
        return self.mode == "txt2img" and self.hr_scale not in (None, "") and float(self.hr_scale) > 1.0

    @property
    def hires_steps_run(self) -> int:
        """The hires pass's denoising steps: hr_steps, or steps (A1111: hr_second_pass_steps or steps); 0 without."""
        return (int(self.hr_steps or 0) or int(self.steps)) if self.hires else 0

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images returned: the hires pass's where it runs, else width x height."""
        if self.hires:
            return hires_size(int(self.width), int(self.height), float(self.hr_scale))
        return int(self.width), int(self.height)

    @property
    def denoising_steps(self) -> int:
        """The denoising steps that actually run: all of them from text (and the hires pass's after them),
        int(steps x strength) from an image."""
        if self.mode == "txt2img":
            return int(self.steps) + self.hires_steps_run
        return min(int(int(self.steps) * float(self.strength)), int(self.steps))

    def image_seeds(self, base_seed: int) -> list[int]:
        """Image i uses seed + i (wrapping at 2**32), so any image can be reproduced alone."""
        return [(base_seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields; the pictures as their size ("512x512") or None."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("image", "mask"):
            picture = data[name]
            data[name] = None if picture is None else (
                f"{picture.width}x{picture.height}" if hasattr(picture, "width") else f"{len(picture)} bytes")
        return data


def normalize_upscaler(value: Any, caps: Capabilities) -> str:
    """Map a hires upscaler key or A1111 label ("Latent (nearest)", "lanczos") to its key, one the backend offers."""
    return _choice("hr_upscaler", value, caps.hr_upscalers, HR_UPSCALER_LABELS, "is not offered here")


def normalize_scheduler(value: Any, caps: Capabilities) -> str:
    """Map a scheduler key or display name ("DPM++ 2M", "euler-a") to its key."""
    return _choice("scheduler", value, caps.schedulers, SCHEDULERS, "is not known")


def _choice(name: str, value: Any, keys: tuple[str, ...], labels: dict[str, str], refusal: str) -> str:
    """The key of `keys` that `value` names, by key or by label (case and spaces aside), or InvalidRequest naming
    the field and every choice."""
    if isinstance(value, str):
        wanted = value.strip().lower()
        for key in keys:
            if wanted in (key, labels.get(key, key).lower()):
                return key
    names = ", ".join(f"{labels.get(k, k)} ({k})" for k in keys)
    raise InvalidRequest(f"{name}: {_show(value)} {refusal}; choose one of {names}.", name)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 30, 4, 4, 2


def _show(value: Any) -> str:
    """A value as it goes in an error message: short, whatever a client sent."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"a {type(value).__name__} too large to show"


def _check_text(name: str, text: str) -> None:
    # JSON can carry unpaired surrogates ("\ud800"); no tokenizer, PNG chunk or HTTP body can.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name}: contains characters that are not valid text (unpaired "
                             f"surrogates); remove them.", name) from None


def _integer(name: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    allowed = f"a whole number from {lo} to {hi}{hint}"
    if isinstance(value, bool):
        raise InvalidRequest(f"{name}: must be {allowed}, not {_show(value)}.", name)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidRequest(f"{name}: must be {allowed}, not {_show(value)}.", name)
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name}: must be {allowed}, not {_show(value)}.", name) from None
    elif not isinstance(value, int):
        raise InvalidRequest(f"{name}: must be {allowed}, not {type(value).__name__}.", name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name}: {_show(value)} is out of range; use {allowed}.", name)
    return value


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    allowed = f"a number from {lo:g} to {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"{name}: must be {allowed}, not {_show(value)}.", name)
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond float range, e.g. 10**400
        raise InvalidRequest(f"{name}: must be {allowed}, not {_show(value)}.", name) from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise InvalidRequest(f"{name}: {_show(value)} is out of range; use {allowed}.", name)
    return number


def _size(width: Any, height: Any, caps: Capabilities) -> tuple[int, int]:
    if caps.fixed_sizes:
        allowed = " or ".join(f"{w}x{h}" for w, h in caps.fixed_sizes)
        w = _integer("width", width, 1, 16384)
        h = _integer("height", height, 1, 16384)
        if (w, h) not in caps.fixed_sizes:
            raise InvalidRequest(
                f"width/height: {w}x{h} is not available; this backend was compiled for {allowed} only.",
                "width" if w not in {s[0] for s in caps.fixed_sizes} else "height",
            )
        return w, h
    sizes = []
    for name, value in (("width", width), ("height", height)):
        v = _integer(name, value, caps.min_size, caps.max_size, hint=f", a multiple of {caps.size_multiple}")
        if v % caps.size_multiple:
            raise InvalidRequest(
                f"{name}: {v} is not a multiple of {caps.size_multiple}; use a multiple of "
                f"{caps.size_multiple} from {caps.min_size} to {caps.max_size}.",
                name,
            )
        sizes.append(v)
    return sizes[0], sizes[1]


@dataclass
class Timings:
    """Where the time of one generation went, in milliseconds."""

    total_ms: float = 0.0
    text_encoder_ms: float = 0.0
    denoise_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    vae_ms: float = 0.0
    vae_encode_ms: float = 0.0  # img2img and inpaint: the input image (and masked image) to latents
    # Hires fix: the upscale (latent: the interpolation; lanczos: VAE decode, resize and VAE encode) and the second
    # pass's denoising; step_ms and denoise_ms are the first pass's, vae_ms the final decode (at the larger size).
    hires_upscale_ms: float = 0.0
    hires_denoise_ms: float = 0.0
    hires_step_ms: list[float] = field(default_factory=list)
    # Remote backends: the server's own total; network + queue = total_ms - server_ms.
    server_ms: float | None = None

    @property
    def network_ms(self) -> float | None:
        """Client round trip minus the server's time (remote backends only)."""
        return None if self.server_ms is None else max(0.0, self.total_ms - self.server_ms)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, rounded to 0.1 ms."""
        data: dict[str, Any] = {
            "total_ms": round(self.total_ms, 1),
            "text_encoder_ms": round(self.text_encoder_ms, 1),
            "denoise_ms": round(self.denoise_ms, 1),
            "step_ms": [round(s, 1) for s in self.step_ms],
            "vae_ms": round(self.vae_ms, 1),
            "vae_encode_ms": round(self.vae_encode_ms, 1),
        }
        if self.hires_step_ms:  # only with a hires pass, so a text request's timings stay what older clients read
            data["hires_upscale_ms"] = round(self.hires_upscale_ms, 1)
            data["hires_denoise_ms"] = round(self.hires_denoise_ms, 1)
            data["hires_step_ms"] = [round(s, 1) for s in self.hires_step_ms]
        if self.server_ms is not None:
            data["server_ms"] = round(self.server_ms, 1)
            data["network_ms"] = round(self.network_ms or 0.0, 1)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Timings":
        """Inverse of to_dict (derived keys are ignored)."""
        return cls(
            total_ms=float(data.get("total_ms", 0.0)),
            text_encoder_ms=float(data.get("text_encoder_ms", 0.0)),
            denoise_ms=float(data.get("denoise_ms", 0.0)),
            step_ms=[float(s) for s in data.get("step_ms", [])],
            vae_ms=float(data.get("vae_ms", 0.0)),
            vae_encode_ms=float(data.get("vae_encode_ms", 0.0)),
            hires_upscale_ms=float(data.get("hires_upscale_ms", 0.0)),
            hires_denoise_ms=float(data.get("hires_denoise_ms", 0.0)),
            hires_step_ms=[float(s) for s in data.get("hires_step_ms", [])],
            server_ms=None if data.get("server_ms") is None else float(data["server_ms"]),
        )


@dataclass
class GenerationResult:
    """Images (PIL, each carrying its infotext in `.info["parameters"]`), seeds and timings."""

    images: list[Any]
    seeds: list[int]
    timings: Timings
    request: GenerationRequest
    backend: str
    model: str
    warnings: list[str] = field(default_factory=list)

    @property
    def infotexts(self) -> list[str]:
        """The A1111-style parameters text of each image."""
        return [img.info.get("parameters", "") for img in self.images]

    def details(self) -> dict[str, Any]:
        """The JSON details the UI and the API return beside the images."""
        details = {
            "backend": self.backend,
            "model": self.model,
            "mode": self.request.mode,
            "precision": self.request.precision,
            "scheduler": self.request.scheduler,
            "steps": self.request.steps,
            "size": f"{self.request.width}x{self.request.height}",  # the first pass's, as the infotext writes it
            "seeds": list(self.seeds),
            "timings": self.timings.to_dict(),
            "warnings": list(self.warnings),
        }
        if self.request.mode != "txt2img":
            details["strength"] = self.request.strength
            details["denoising_steps"] = self.request.denoising_steps
        if self.request.hires:
            width, height = self.request.output_size
            details["hires"] = {"scale": self.request.hr_scale, "upscaler": self.request.hr_upscaler,
                                "steps": self.request.hires_steps_run, "size": f"{width}x{height}",
                                "denoising_strength": self.request.denoising_strength}
        return details


StepCallback = Callable[[int, int], None]
# on_preview(step, total, images): small PIL pictures of the latents after `step` (backend/inprocess/preview.py).
# It may also have a `wanted()` method (preview_wanted): then the caller paces the previews, the backend asks it
# before making one and makes none it would drop.
PreviewCallback = Callable[[int, int, list[Any]], None]
# SD2.1-base's own size: per-step figures (the estimate beside Generate, ZeroGPU's reservation) are kept per this
# many pixels and scaled by a request's, as a step's work grows with the latents' area.
BASE_PIXELS = 512 * 512
# At most one preview shown each this many seconds: by the app's handler (ui/handlers.LatestPreview) and, across
# ZeroGPU's fork where it cannot be asked, by its stand-in in the worker (inprocess/preview.IntervalPaced). Each
# preview sent briefly hides Gradio's progress bar, and two a second is what a person follows.
PREVIEW_INTERVAL_S = 0.5


def preview_wanted(on_preview: PreviewCallback | None) -> Callable[[], bool] | None:
    """The caller's own pacing of previews, where on_preview has one: `on_preview.wanted()` says, on the thread that
    generates, whether a preview made now would be shown. One pacer, the one that shows them: a backend pacing
    previews by its own measure made one every step on a fast model, and the app dropped all but one or two a
    second, which cost 3% of the denoising for pictures nobody saw (docs/benchmarks.md, benchmarks.preview)."""
    wanted = getattr(on_preview, "wanted", None)
    return wanted if callable(wanted) else None


class Backend(Protocol):
    """What the app, the endpoint and the benchmarks need of a backend."""

    name: str

    def capabilities(self) -> Capabilities:
        """What this backend can run."""

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Run one request; on_step(step, total) is called after each denoising step, and, where
        capabilities().previews, on_preview(step, total, images) after some of them (those on_preview.wanted()
        allows, where it has one: preview_wanted)."""

    def close(self) -> None:
        """Free what the backend holds."""
