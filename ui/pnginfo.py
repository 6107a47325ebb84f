"""PNG Info: the generation settings of an image from this app, AUTOMATIC1111 and its forks, ComfyUI, InvokeAI,
NovelAI, Fooocus or SwarmUI (backend/core/image_info.py reads them), shown in the tab and answered by the
/png_info API (one function, png_info, for both), and mapped to the generating tabs' controls for "Send to text
to image" / "Send to image to image"."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from backend import Capabilities, GenerationRequest, InvalidRequest
from backend.core.api import DEFAULT_HR_STRENGTH, HR_UPSCALER_LABELS, normalize_scheduler
from backend.core.image_info import NoSettings, NotAnImage, read_image_info
from backend.core.metadata import parse_infotext
from backend.core.schedulers import SCHEDULERS
from ui.pictures import file_bytes

NO_PNG = "Drop an image (PNG, JPEG or WebP) from this app or another Stable Diffusion tool to read its settings."
NO_TEXT = ("This image carries no generation settings PNG Info knows (AUTOMATIC1111 and its forks, ComfyUI, "
           "InvokeAI, NovelAI, Fooocus, SwarmUI): another program saved it, or something re-encoded it (a paste "
           "from the clipboard, a chat app, an editor).")

class PngInfoError(ValueError):
    """No settings to show: the message says why and what to drop instead."""


def png_info(value: Any) -> dict[str, Any]:
    """An uploaded image's settings, as A1111's /sdapi/v1/png-info answers plus the tool and notes:
    {"info": infotext, "items": other text chunks, "parameters": A1111's keys, "tool": ..., "notes": [...]}.
    The tab and the /png_info API both call this; PngInfoError when there is nothing to show."""
    if value is None:
        raise PngInfoError(NO_PNG)
    try:
        data = file_bytes("image", value)
    except InvalidRequest as exc:
        raise PngInfoError(str(exc)) from None
    if data is None:
        raise PngInfoError(NO_PNG)
    try:
        info = read_image_info(bytes(data))
    except NotAnImage as exc:  # its message says why: not an image at all, or too large to decode
        raise PngInfoError(f"image: {exc}") from None
    except NoSettings:
        raise PngInfoError(NO_TEXT) from None
    return {"info": info.infotext, "items": info.items, "parameters": info.parameters, "tool": info.tool,
            "notes": [*info.notes, *unusable_notes(info.parameters)]}


def unusable_notes(fields: dict[str, Any]) -> list[str]:
    """What no backend of this app can run: a sampler it lacks, a hires or refiner pass (Send, which knows the
    backend, adds what that backend cannot take)."""
    notes = []
    sampler = str(fields.get("Sampler", "")).strip()
    if sampler and fields.get("Schedule type", "").lower() == "karras" and not sampler.lower().endswith("karras"):
        sampler = f"{sampler} Karras"
    if sampler and sampler.lower() not in {label.lower() for label in SCHEDULERS.values()}:
        notes.append(f"Sampler {sampler} is not one this app has; Send leaves the scheduler as it is.")
    missing = [f"{key}: {value}" for key, value in fields.items()
               if key.startswith(UNSENT_PREFIXES) and key not in HIRES_KEYS]
    upscaler = str(fields.get("Hires upscaler", "")).strip()
    if upscaler and upscaler.lower() not in {label.lower() for label in HR_UPSCALER_LABELS.values()}:
        missing.append(f"Hires upscaler: {upscaler}")
    if missing:
        notes.append(f"Not available here: {', '.join(missing)}.")
    return notes


def png_info_note(result: dict[str, Any]) -> str:
    """What the tab says under the settings: the tool that made the image, and what cannot be used here."""
    return " ".join([f"Made by {result['tool']}.", *result["notes"]])


def show_png_info(value: Any) -> tuple[str, dict[str, Any], str]:
    """The tab's infotext, fields and note for an uploaded image (the note says why when there is none)."""
    try:
        result = png_info(value)
    except PngInfoError as exc:
        return "", {}, str(exc)
    return result["info"], result["parameters"], png_info_note(result)


def send_note(reading: str, target_label: str, infotext: str, notes: list[str]) -> str:
    """The tab's note after "Send to ...": what reading the image found it cannot map, kept, then what Send left
    as it was on this backend (only Send's, when there is no reading note or nothing was sent)."""
    if not reading or not infotext.strip():
        return " ".join(notes)
    # What reading already said is not said twice: a sampler this app lacks, the same list of settings not run.
    kept = [n for n in notes if not (
        (n.startswith("Sampler: ") and f"Sampler {n[9:].split(' is not offered')[0]} is not one" in reading)
        or (n.startswith("Not available here, so not sent: ")
            and f"Not available here: {n[len('Not available here, so not sent: '):]}" in reading))]
    return f"{reading}\n\n**Sent to {target_label.lower()}.** {' '.join(kept)}".rstrip()


def read_png_info(value: Any) -> tuple[str, dict[str, Any]]:
    """The infotext of an uploaded image and its fields (prompt, negative prompt, then each "Key: value");
    ("", {"note": ...}) when there is none."""
    try:
        result = png_info(value)
    except PngInfoError as exc:
        return "", {"note": str(exc)}
    return result["info"], result["parameters"]


def infotext_fields(text: str) -> dict[str, Any]:
    """An infotext as the fields PNG Info shows."""
    parsed = parse_infotext(text)
    return {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"], **parsed["params"]}


# Infotext keys of settings this app has no control for (A1111's hires fix and refiner, clip skip, variation
# seeds): a key starting with one of these is named in Send's note.
UNSENT_PREFIXES = ("Hires", "Refiner", "Clip skip", "Variation seed")
# A1111's hires fix keys that Send maps to text to image's Hires fix group (the rest of "Hires ...": A1111's
# Hires resize, sampler, prompt, checkpoint, are not sent). A1111 writes "Hires upscaler" only when one was named,
# and otherwise ran its default, "Latent" (modules/shared.py latent_upscale_default_mode).
HIRES_KEYS = ("Hires upscale", "Hires steps", "Hires upscaler")


@dataclass
class Sent:
    """What an infotext sets on a generating tab: each control's new value, or absent to leave it; and notes
    saying what was left as it was and why."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def values_for_controls(text: str, caps: Capabilities) -> Sent:
    """Map an infotext to the controls' values (prompt, negative_prompt, steps, scheduler, guidance_scale, seed,
    width, height, strength), keeping only what this backend accepts; the rest is named in the notes."""
    sent = Sent()
    if not text or not text.strip():
        sent.notes.append("There are no settings to send: drop a PNG with generation settings first.")
        return sent
    parsed = parse_infotext(text)
    params = parsed["params"]
    sent.values["prompt"] = parsed["prompt"]
    sent.values["negative_prompt"] = parsed["negative_prompt"]

    def number(key: str, kind: type, lo: float, hi: float, target: str) -> None:
        if key not in params:
            return
        try:
            # int() first: a 64-bit seed through float() would be another number in the note.
            text = str(params[key]).strip()
            value = (int(text) if re.fullmatch(r"-?\d+", text) else int(float(text))) if kind is int else kind(text)
        except ValueError:
            sent.notes.append(f"{key}: {params[key]!r} is not a number; left as it was.")
            return
        if not lo <= value <= hi:
            sent.notes.append(f"{key}: {value} is outside what this backend takes ({lo:g} to {hi:.10g}); left as it "
                              f"was.")
            return
        sent.values[target] = value

    number("Steps", int, caps.min_steps, caps.max_steps, "steps")
    number("CFG scale", float, 0.0, caps.max_guidance, "guidance_scale")
    number("Seed", int, -1, 2**32 - 1, "seed")
    number("Denoising strength", float, 0.0, 1.0, "strength")
    sampler = params.get("Sampler")
    if sampler:
        # Newer AUTOMATIC1111 writes the Karras schedule apart: "Sampler: DPM++ 2M, Schedule type: Karras".
        if params.get("Schedule type", "").lower() == "karras" and not sampler.lower().endswith("karras"):
            sampler = f"{sampler} Karras"
        try:
            sent.values["scheduler"] = normalize_scheduler(sampler, caps)
        except InvalidRequest:
            sent.notes.append(f"Sampler: {sampler} is not offered here; left as it was.")
    # Passes and options this app does not run: named, so that nobody takes the result for the same picture.
    missing = [f"{key}: {value}" for key, value in params.items()
               if key.startswith(UNSENT_PREFIXES) and key not in HIRES_KEYS]
    if missing:
        sent.notes.append(f"Not available here, so not sent: {', '.join(missing)}.")
    size = params.get("Size", "")
    if size:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            sent.notes.append(f"Size: {size!r} is not WIDTHxHEIGHT; left as it was.")
        else:
            if size_allowed(width, height, caps):
                sent.values["width"], sent.values["height"] = width, height
            else:
                sent.notes.append(f"Size: {width}x{height} is not available on this backend; left as it was.")
    if caps.hr_upscalers:
        hires_values(params, caps, sent)
    return sent


def hires_values(params: dict[str, str], caps: Capabilities, sent: Sent) -> None:
    """The Hires fix group's values from A1111's Hires keys (off where the infotext has none), or a note saying why
    the image's hires pass cannot run here (then it is sent off, and the note says so)."""
    if "Hires upscale" not in params:
        sent.values["hires"] = False
        return
    text = ", ".join(f"{key}: {params[key]}" for key in HIRES_KEYS if key in params)
    try:
        fields = dict(hr_scale=float(params["Hires upscale"]), hr_upscaler=params.get("Hires upscaler") or "Latent",
                      hr_steps=int(float(params.get("Hires steps") or 0)),
                      denoising_strength=float(params.get("Denoising strength") or DEFAULT_HR_STRENGTH))
        width, height = sent.values.get("width"), sent.values.get("height")
        request = GenerationRequest("send", width=width, height=height, steps=sent.values.get("steps"),
                                    **fields).validated(caps)  # the one place requests are checked
    except (InvalidRequest, ValueError) as exc:  # a field refused, or a value that is no number
        sent.values["hires"] = False
        sent.notes.append(f"Hires fix ({text}): {str(exc).rstrip('.')}; sent with the hires fix off.")
        return
    sent.values.update(hires=request.hires, hr_scale=request.hr_scale, hr_upscaler=request.hr_upscaler,
                       hr_steps=request.hr_steps, denoising_strength=request.denoising_strength)


def size_allowed(width: int, height: int, caps: Capabilities) -> bool:
    """Whether the backend generates at width x height."""
    if caps.fixed_sizes:
        return (width, height) in caps.fixed_sizes
    return all(caps.min_size <= v <= caps.max_size and v % caps.size_multiple == 0 for v in (width, height))
