"""PNG Info: the infotext of a PNG (this app's or AUTOMATIC1111's `parameters` chunk), read and mapped to the
generating tabs' controls for "Send to text to image" / "Send to image to image"."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from backend import Capabilities, InvalidRequest
from backend.core.api import normalize_scheduler
from backend.core.metadata import parse_infotext, read_infotext
from ui.pictures import file_bytes

NO_PNG = "Drop a PNG made by this app or by AUTOMATIC1111 to read its generation settings."
NO_TEXT = ("This image carries no generation settings (no `parameters` text chunk): it was not saved by this app "
           "or AUTOMATIC1111, or something re-encoded it (a paste from the clipboard, a chat app, an editor).")


def read_png_info(value: Any) -> tuple[str, dict[str, Any]]:
    """The infotext of an uploaded PNG and its fields (prompt, negative prompt, then each "Key: value");
    ("", {"note": ...}) when there is none."""
    if value is None:
        return "", {"note": NO_PNG}
    try:
        data = file_bytes("image", value)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            text = read_infotext(image)
    except InvalidRequest as exc:
        return "", {"note": str(exc)}
    except Exception:  # noqa: BLE001 - not an image PIL reads: say so, as for any file without settings
        return "", {"note": "image: this file cannot be read as an image; drop a PNG."}
    if not text:
        return "", {"note": NO_TEXT}
    return text, infotext_fields(text)


def infotext_fields(text: str) -> dict[str, Any]:
    """An infotext as the fields PNG Info shows."""
    parsed = parse_infotext(text)
    return {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"], **parsed["params"]}


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
            value = kind(float(params[key])) if kind is int else kind(params[key])
        except ValueError:
            sent.notes.append(f"{key}: {params[key]!r} is not a number; left as it was.")
            return
        if not lo <= value <= hi:
            sent.notes.append(f"{key}: {value} is outside what this backend takes ({lo:g}-{hi:g}); left as it was.")
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
    return sent


def size_allowed(width: int, height: int, caps: Capabilities) -> bool:
    """Whether the backend generates at width x height."""
    if caps.fixed_sizes:
        return (width, height) in caps.fixed_sizes
    return all(caps.min_size <= v <= caps.max_size and v % caps.size_multiple == 0 for v in (width, height))
