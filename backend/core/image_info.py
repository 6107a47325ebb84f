"""Generation settings read from images other tools made: which tool, its prompt and settings as A1111's
keys, and notes on what this app cannot take. Light: PIL only (no torch).

Read here, each from the tool's own writer (sources named at each reader):

| tool                              | where                                                          |
|-----------------------------------|----------------------------------------------------------------|
| AUTOMATIC1111, Forge, SD.Next ... | PNG `parameters` (tEXt/iTXt/zTXt); JPEG/WebP EXIF UserComment   |
|   ... "stealth" (and NovelAI)     | the pixels' lowest bits (alpha or RGB), when no chunk has any   |
| ComfyUI                           | PNG `prompt`: the API graph (sampler node and its encoders);    |
|                                   | savers' EXIF "Prompt: {...}" or UserComment JSON; Civitai's     |
|                                   | graph in UserComment (or its summary, `extraMetadata`)         |
| InvokeAI 2.x                      | PNG `sd-metadata` JSON, or the `Dream` command line             |
| InvokeAI 3.x-6.x                  | PNG `invokeai_metadata` JSON                                    |
| NovelAI (V4/V4.5 too)             | `Comment` JSON, prompt in `Description` or `v4_prompt`; WebP:   |
|                                   | every chunk as JSON in UserComment                             |
| Fooocus, RuinedFooocus, SwarmUI,  | JSON in `parameters` (or UserComment)                           |
| Hugging Face Spaces               |                                                                |

Written ourselves rather than with sd-parsers 0.6 (PyPI's newest, MIT): its A1111 reader splits every value
on ":" and "," (a quoted value holding either is lost) and matches keys case-sensitively ("CFG Scale" is
dropped); it leaves UTF-8 in tEXt as mojibake, reads no SwarmUI, RuinedFooocus or Space JSON, reads
UserComment only as big-endian UTF-16, and caches JPEG UserComment and alpha extraction in module globals
keyed by id(image), which a long-running server reuses across images (sd_parsers/parsers/_automatic1111.py,
extractors/_get_exif_value.py, _jpeg_usercomment.py). Each format here is a few dozen lines.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .metadata import KEY, parse_infotext, write_infotext

# EXIF: the Exif IFD pointer and its UserComment tag (EXIF 2.32, 4.6.5 and 4.6.6.F).
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


class NotAnImage(ValueError):
    """The bytes are not an image PIL reads."""


class NoSettings(ValueError):
    """The image carries no generation settings any reader here knows."""


@dataclass
class ImageInfo:
    """What an image says about how it was made."""

    tool: str
    infotext: str  # A1111's infotext: the tool's own for A1111 and forks, else written from the fields read
    parameters: dict[str, Any]  # A1111's keys: Prompt, Negative prompt, Steps, Sampler, CFG scale, Seed, Size-1 ...
    items: dict[str, str] = field(default_factory=dict)  # the other text chunks, as they are
    notes: list[str] = field(default_factory=list)  # what was read but cannot be used here, said to the person


def read_image_info(data: bytes) -> ImageInfo:
    """The generation settings of an image file's bytes; NotAnImage or NoSettings (with the message to show)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        chunks = text_chunks(image)
    except Image.DecompressionBombError as exc:  # PIL's guard against a small file that decodes huge
        raise NotAnImage(f"this image is too large to read ({exc}); drop the file as its tool saved it.") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise NotAnImage("this file cannot be read as an image; drop a PNG, JPEG or WebP.") from exc
    try:
        info = _read_chunks(chunks)
        if info is None:
            # Only when no text chunk carries settings, as the stealth-pnginfo extension itself reads it.
            hidden = stealth_text(image)
            if hidden is not None:
                signature, text = hidden
                info = _read_chunks({**chunks, **_chunk_set(text)})
                if info is not None:
                    where = "alpha channel" if signature.startswith("stealth_png") else "RGB channels"
                    info.notes.insert(0, f"Read from the image's pixels ({signature} in the lowest bits of the "
                                         f"{where}): no text chunk carried settings.")
    finally:
        image.close()
    if info is None:
        raise NoSettings("this image carries no generation settings that PNG Info knows (A1111 and its forks, "
                         "ComfyUI, InvokeAI, NovelAI, Fooocus, SwarmUI): it was saved by another program, or "
                         "something re-encoded it (a paste from the clipboard, a chat app, an editor).")
    return info


def _read_chunks(chunks: dict[str, str]) -> ImageInfo | None:
    # A1111's infotext first; JSON in `parameters` before ComfyUI's graph: SwarmUI writes both, and its JSON
    # is the summary of what it ran.
    for reader in (_a1111, _json_in_parameters, _comfyui, _invokeai, _novelai, _prompt_only):
        info = reader(chunks)
        if info is not None:
            return info
    return None


def text_chunks(image: Image.Image) -> dict[str, str]:
    """An image's text: PNG text chunks (UTF-8 in tEXt repaired); JPEG/WebP EXIF UserComment as `parameters`,
    and the "Prompt: {...}" / "Workflow: {...}" EXIF tags ComfyUI's savers write, as ComfyUI's chunks."""
    chunks: dict[str, str] = {}
    for key, value in {**image.info, **(getattr(image, "text", None) or {})}.items():
        if isinstance(value, str):
            chunks[key] = _utf8_in_latin1(value)
    if KEY not in chunks:
        comment = user_comment(image)
        if comment:
            chunks[KEY] = comment
            # NovelAI's WebP and ComfyUI's SaveImagePlus put every chunk there, as one JSON object.
            chunks.update(_chunk_set(comment) if _is_chunk_set(_json(comment)) else {})
    if "prompt" not in chunks:
        chunks.update(_comfy_exif(image))
    return chunks


def _is_chunk_set(data: Any) -> bool:
    """A JSON object that is a set of chunks: NovelAI's ({"Comment": "{...}", "Software": ...}) or ComfyUI's
    ({"prompt": {graph}, "workflow": {...}})."""
    return isinstance(data, dict) and (isinstance(data.get("Comment"), str) or isinstance(data.get("prompt"), dict))


def _chunk_set(text: str) -> dict[str, str]:
    """Text that is a set of chunks as chunks (values that are JSON dumped back to text); else `parameters`."""
    data = _json(text)
    if not _is_chunk_set(data):
        return {KEY: str(text)}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


# EXIF tags ComfyUI's savers write their JSON to as "Name: {...}": ImageDescription, Make, Model (ComfyUI's
# SaveAnimatedWEBP: Model "prompt:", Make "workflow:"; comfyui-save-image-extended: Make "Prompt: ").
_COMFY_EXIF_TAGS = (0x010E, 0x010F, 0x0110)


def _comfy_exif(image: Image.Image) -> dict[str, str]:
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block is no settings, not a failure to read the image
        return {}
    found = {}
    for tag in _COMFY_EXIF_TAGS:
        value = exif.get(tag)
        if not isinstance(value, str):
            continue
        match = re.fullmatch(r"\s*(prompt|workflow)\s*:\s*(\{.*)", value, re.S | re.I)
        if match:
            found[match[1].lower()] = match[2].rstrip("\0")
    return found


def _utf8_in_latin1(text: str) -> str:
    # The PNG spec makes tEXt Latin-1, and Pillow decodes it so; some savers (Stability Matrix) write UTF-8
    # there anyway, which then reads as mojibake ("cafÃ©"). Text that is valid UTF-8 once re-encoded was that.
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:  # iTXt: already real Unicode
        return text
    if raw.isascii():
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


def user_comment(image: Image.Image) -> str:
    """EXIF UserComment as text ('' if none): A1111 saves JPEG and WebP infotext there (piexif's
    UserComment.dump(..., encoding="unicode"): b"UNICODE\\0" then UTF-16, big-endian; others write
    little-endian), b"ASCII\\0\\0\\0" then ASCII, or 8 zero bytes (undefined; read as UTF-8)."""
    try:
        exif = image.getexif()
        # Where EXIF puts it (the Exif IFD), or in IFD0 where ComfyUI's SaveImagePlus writes it.
        value = exif.get_ifd(EXIF_IFD).get(USER_COMMENT, exif.get(USER_COMMENT))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no settings, not a failure to read the image
        return ""
    if isinstance(value, str):
        return value.strip("\0")
    if not isinstance(value, bytes) or len(value) <= 8:
        return ""
    header, body = value[:8], value[8:]
    if header == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16")
        else:
            # No BOM: the byte order whose zero bytes fall on the high half of ASCII characters.
            big = body[0::2].count(0) >= body[1::2].count(0)
            text = body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    else:
        text = body.decode("utf-8", errors="replace")
    return text.strip("\0")


# --- A1111 "stealth" metadata: the infotext in the pixels' lowest bits ------------------------------------------
# The layout of the stealth-pnginfo extension (github.com/ashen-sensored/sd_webui_stealth_pnginfo, commit
# b58ed5f28be72196b8dd47601ec11c9fa6d8664a, scripts/stealth_pnginfo.py: prepare_data, add_data,
# read_info_from_image_stealth), which Forge, reForge and NovelAI (its images' alpha) write too: one bit stream,
# taken column by column (x outer, y inner), from the alpha channel's lowest bit ("stealth_pnginfo",
# "stealth_pngcomp") or from R, G and B's lowest bits in turn ("stealth_rgbinfo", "stealth_rgbcomp"): the
# 15-byte signature, the payload's length in BITS as 32 bits, the payload (UTF-8, gzip for the *comp ones);
# bytes most significant bit first. The RGB signature is complete at pixel 40, the alpha one at 120: the
# extension checks RGB first, and so does this.

STEALTH_SIGNATURES = ("stealth_pnginfo", "stealth_pngcomp", "stealth_rgbinfo", "stealth_rgbcomp")
# Bounds, so that a hostile image cannot make a read slow or big: an infotext is a few KB, NovelAI's whole
# JSON under 10 KB gzipped. Only the columns holding the bits needed are converted, never the whole image.
STEALTH_MAX_PAYLOAD = 256 * 1024  # bytes in the image
STEALTH_MAX_TEXT = 1024 * 1024  # bytes once un-gzipped
_HEADER_BITS = 15 * 8 + 32


def stealth_text(image: Image.Image) -> tuple[str, str] | None:
    """(signature, text) of stealth-pnginfo metadata in an image's pixels, or None (no signature, a length out
    of bounds, a payload that does not decode)."""
    has_alpha = "A" in image.getbands()
    for channels in ("rgb", "alpha") if has_alpha else ("rgb",):
        header = _lowest_bits(image, channels, _HEADER_BITS)
        if header is None:
            continue
        signature = np.packbits(header[:120]).tobytes().decode("latin-1")
        if signature not in STEALTH_SIGNATURES or signature[8:11] != ("png" if channels == "alpha" else "rgb"):
            continue
        length = int("".join(map(str, header[120:])), 2)
        if length == 0 or length % 8 or length > STEALTH_MAX_PAYLOAD * 8:
            return None
        bits = _lowest_bits(image, channels, _HEADER_BITS + length)
        if bits is None:
            return None
        payload = np.packbits(bits[_HEADER_BITS:]).tobytes()
        if signature.endswith("comp"):
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip
            try:
                payload = inflate.decompress(payload, STEALTH_MAX_TEXT)
            except zlib.error:
                return None
            if inflate.unconsumed_tail or not inflate.eof:  # past STEALTH_MAX_TEXT (a bomb), or cut short
                return None
        text = payload.decode("utf-8", errors="replace").strip("\0")
        return (signature, text) if text.strip() else None
    return None


def _lowest_bits(image: Image.Image, channels: str, count: int) -> np.ndarray | None:
    """The first `count` bits of the stream (column by column; alpha, or R, G, B in turn), or None if the
    image has fewer."""
    width, height = image.size
    per_pixel = 1 if channels == "alpha" else 3
    pixels = -(-count // per_pixel)
    if pixels > width * height:
        return None
    try:
        columns = image.crop((0, 0, -(-pixels // height), height)).convert("RGBA" if channels == "alpha" else "RGB")
    except (ValueError, OSError):  # a mode Pillow cannot convert (16-bit, CMYK ...): no stealth metadata read
        return None
    values = np.asarray(columns)[..., 3:] if channels == "alpha" else np.asarray(columns)
    return (values.transpose(1, 0, 2).reshape(-1)[:count] & 1).astype(np.uint8)


def _json(text: str | None) -> Any:
    if not text or text.lstrip()[:1] not in "{[":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _number(value: Any) -> Any:
    """A number as A1111 writes it: 7.0 -> 7, 7.5 -> 7.5; anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _info(tool: str, prompt: str, negative: str, params: dict[str, Any], chunks: dict[str, str], used: set[str],
          notes: list[str] | None = None) -> ImageInfo:
    """An ImageInfo from the fields read: the infotext written from them, Size-1/Size-2 as A1111's API has them."""
    params = {k: _number(v) for k, v in params.items() if v is not None and v != ""}
    infotext = write_infotext(prompt or "", negative or "", params)
    return ImageInfo(tool=tool, infotext=infotext, parameters=_parameters_of(infotext),
                     items={k: v for k, v in chunks.items() if k not in used}, notes=notes or [])


def _parameters_of(infotext: str) -> dict[str, Any]:
    """An infotext's fields under A1111's API keys (/sdapi/v1/png-info: Prompt, Negative prompt, each key,
    and Size split into Size-1 and Size-2)."""
    parsed = parse_infotext(infotext)
    fields: dict[str, Any] = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"],
                              **parsed["params"]}
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(fields.get("Size", "")))
    if match:
        fields["Size-1"], fields["Size-2"] = match[1], match[2]  # strings, as A1111's parser gives them
    return fields


# --- A1111 and forks; JSON in `parameters` ---------------------------------------------------------------------

def _a1111(chunks: dict[str, str]) -> ImageInfo | None:
    """An A1111 infotext with its settings line in `parameters` (read first: a ComfyUI saver that writes one,
    such as ComfyUI-Image-Saver, summarises its graph there better than any reading of the graph)."""
    text = chunks.get(KEY)
    if not text or _json(text) is not None or not parse_infotext(text)["params"]:
        return None
    if "smproj" in chunks:  # Stability Matrix's own project chunk, beside the infotext it writes
        tool = "Stability Matrix"
    else:
        tool = "ComfyUI (an A1111-style saver)" if "workflow" in chunks else "AUTOMATIC1111 (or a fork)"
    return ImageInfo(tool=tool, infotext=text, parameters=_parameters_of(text),
                     items={k: v for k, v in chunks.items() if k != KEY}, notes=[])


def _json_in_parameters(chunks: dict[str, str]) -> ImageInfo | None:
    data = _json(chunks.get(KEY))
    return _json_parameters(data, chunks) if isinstance(data, dict) else None


def _prompt_only(chunks: dict[str, str]) -> ImageInfo | None:
    """Plain text in `parameters` without a settings line: the prompt, and a note saying that is all."""
    text = chunks.get(KEY)
    if not text or not text.strip() or _json(text) is not None:
        return None
    return ImageInfo(tool="unknown (a `parameters` text)", infotext=text, parameters=_parameters_of(text),
                     items={k: v for k, v in chunks.items() if k != KEY},
                     notes=["The `parameters` text has no settings line (Steps: ..., Sampler: ...): only the "
                            "prompt is read."])


def _json_parameters(data: dict[str, Any], chunks: dict[str, str]) -> ImageInfo | None:
    """JSON in `parameters`: SwarmUI (`sui_image_params`), Fooocus (`full_prompt`, its `fooocus_scheme`
    chunk), RuinedFooocus (`software`: RuinedFooocus) and diffusers Spaces (diffusers' argument names)."""
    if isinstance(data.get("sui_image_params"), dict):
        # SwarmUI: its docs/Image Metadata Format.md (parameter ids: prompt, negativeprompt, cfgscale, ...).
        p = data["sui_image_params"]
        sampler = _sampler_label(p.get("sampler"), p.get("scheduler"))
        return _info("SwarmUI", p.get("prompt", ""), p.get("negativeprompt", ""), {
            "Steps": p.get("steps"), "Sampler": sampler, "CFG scale": p.get("cfgscale"), "Seed": p.get("seed"),
            "Size": _size(p.get("width"), p.get("height")), "Model": p.get("model")}, chunks, {KEY})
    if str(data.get("software", "")).lower().startswith("ruinedfooocus") or ("Prompt" in data and "cfg" in data):
        # RuinedFooocus: "software": "RuinedFooocus", Prompt, Negative, steps, cfg, seed, sampler_name, scheduler,
        # base_model_name (as sd-prompt-reader's format/ruinedfooocus.py reads it).
        return _info("RuinedFooocus", data.get("Prompt", ""), data.get("Negative", ""), {
            "Steps": data.get("steps"), "Sampler": _sampler_label(data.get("sampler_name"), data.get("scheduler")),
            "CFG scale": data.get("cfg"), "Seed": data.get("seed"),
            "Size": _size(data.get("width"), data.get("height")), "Model": data.get("base_model_name")},
            chunks, {KEY})
    if "full_prompt" in data or chunks.get("fooocus_scheme") == "fooocus" or "base_model_hash" in data:
        # Fooocus: modules/meta_parser.py, FooocusMetadataParser (resolution as "(w, h)"); the fixture
        # tests/fixtures/png_info/fooocus1_cropped.png has each key.
        size = re.findall(r"\d+", str(data.get("resolution", "")))
        return _info("Fooocus", data.get("prompt", ""), data.get("negative_prompt", ""), {
            "Steps": data.get("steps"), "Sampler": _sampler_label(data.get("sampler"), data.get("scheduler")),
            "CFG scale": data.get("guidance_scale"), "Seed": data.get("seed"),
            "Size": _size(*size[:2]) if len(size) >= 2 else None, "Model": data.get("base_model")},
            chunks, {KEY, "fooocus_scheme"})
    if "prompt" in data and not isinstance(data["prompt"], dict):
        # A Space saving its diffusers call's arguments (prompt, negative_prompt, num_inference_steps, ...).
        return _info("Hugging Face Space (diffusers arguments)", str(data.get("prompt", "")),
                     str(data.get("negative_prompt", "") or ""), {
                         "Steps": data.get("num_inference_steps", data.get("steps")),
                         "Sampler": data.get("scheduler", data.get("sampler")),
                         "CFG scale": data.get("guidance_scale", data.get("cfg_scale")), "Seed": data.get("seed"),
                         "Size": _size(data.get("width"), data.get("height")), "Model": data.get("model")},
                     chunks, {KEY})
    return None


def _size(width: Any, height: Any) -> str | None:
    try:
        return f"{int(width)}x{int(height)}"
    except (TypeError, ValueError):
        return None


# Sampler names other tools write (ComfyUI's KSAMPLER_NAMES, k-diffusion's, InvokeAI's, diffusers' classes) ->
# A1111's labels, which this app's schedulers use; a name not here is passed through and Send names it.
_SAMPLERS = {
    "euler": "Euler", "k_euler": "Euler", "euler_a": "Euler a", "euler_ancestral": "Euler a",
    "k_euler_ancestral": "Euler a", "k_euler_a": "Euler a", "eulerdiscretescheduler": "Euler",
    "eulerancestraldiscretescheduler": "Euler a", "dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_k": "DPM++ 2M Karras", "dpmsolvermultistepscheduler": "DPM++ 2M", "ddim": "DDIM",
    "ddimscheduler": "DDIM", "unipc": "UniPC", "uni_pc": "UniPC", "uni_pc_bh2": "UniPC",
    "unipcmultistepscheduler": "UniPC", "lms": "LMS", "k_lms": "LMS", "heun": "Heun", "k_heun": "Heun",
    "dpm_2": "DPM2", "k_dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "k_dpm_2_a": "DPM2 a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "k_dpmpp_2s_a": "DPM++ 2S a", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "lcm": "LCM", "tcd": "TCD", "plms": "PLMS",
}


def _sampler_label(name: Any, schedule: Any = None) -> str | None:
    """A sampler as A1111 names it; a Karras schedule joined to it as A1111 did before "Schedule type"."""
    if not name:
        return None
    key = str(name).strip().lower()
    key = key[len("sample_"):] if key.startswith("sample_") else key  # early ComfyUI: "sample_dpmpp_2m"
    karras = key.endswith("_karras") or str(schedule or "").lower() == "karras"
    key = key[: -len("_karras")] if key.endswith("_karras") else key
    label = _SAMPLERS.get(key, str(name))
    return f"{label} Karras" if karras and not label.endswith("Karras") else label


# --- ComfyUI ---------------------------------------------------------------------------------------------------

_COMFY_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
# SamplerCustom(Advanced) take their settings from the nodes wired to them (comfy_extras/nodes_custom_sampler.py):
# the noise (RandomNoise: noise_seed), the guider (CFGGuider: cfg, positive, negative; BasicGuider:
# conditioning), the sampler (KSamplerSelect: sampler_name) and the sigmas (BasicScheduler: scheduler, steps,
# denoise). Read through, they are a KSampler's inputs.
_COMFY_WIRED_SETTINGS = (("noise", ("noise_seed",)), ("guider", ("cfg", "positive", "negative", "conditioning")),
                         ("sampler", ("sampler_name",)), ("sigmas", ("steps", "scheduler", "denoise")))


def _comfyui(chunks: dict[str, str]) -> ImageInfo | None:
    """ComfyUI's `prompt` chunk: its API graph ({id: {"class_type", "inputs"}}, an input wired to another node
    as [id, output]; nodes.py, SaveImage.save_images). The settings are the sampler node's; the prompts
    the text of the encoders wired to its positive and negative inputs (through conditioning nodes)."""
    graph = _comfy_graph(chunks.get("prompt")) or _comfy_graph(chunks.get(KEY))
    if graph is None:
        return None
    samplers = [(i, n) for i, n in graph.items() if n.get("class_type") in _COMFY_SAMPLERS]
    notes: list[str] = []
    if not samplers and (civitai := _civitai_summary(chunks)) is not None:
        return civitai
    if not samplers:
        return ImageInfo(tool="ComfyUI", infotext="", parameters={}, items=dict(chunks), notes=[
            "ComfyUI graph without a KSampler node: no settings this app can use (the graph is under items)."])
    if len(samplers) > 1:
        notes.append(f"ComfyUI graph with {len(samplers)} sampler nodes (a second pass, such as a hires fix or a "
                     f"refiner): only the first one's settings are read; this app runs one pass.")
    # The first pass: a sampler whose latent does not come (through upscales) from another sampler; the
    # lowest id of those.
    first = [(i, n) for i, n in samplers if not _from_sampler(graph, n.get("inputs", {}).get("latent_image"), set())]
    first = first or samplers
    node_id, node = sorted(first, key=lambda item: _id_order(item[0]))[0]
    inputs = {k: (v if k in ("positive", "negative", "latent_image", "model") else _comfy_value(graph, v))
              for k, v in _sampler_inputs(graph, node).items()}
    prompt = _comfy_text(graph, inputs.get("positive"), set())
    negative = _comfy_text(graph, inputs.get("negative"), set())
    width, height = _comfy_size(graph, inputs.get("latent_image"), set())
    denoise = inputs.get("denoise")
    params = {"Steps": inputs.get("steps"), "Sampler": _sampler_label(inputs.get("sampler_name"),
                                                                      inputs.get("scheduler")),
              "CFG scale": inputs.get("cfg"), "Seed": inputs.get("seed", inputs.get("noise_seed")),
              "Size": _size(width, height), "Model": _comfy_model(graph),
              "Denoising strength": round(denoise, 4) if isinstance(denoise, (int, float)) and denoise < 1 else None}
    if str(inputs.get("scheduler", "normal")).lower() not in ("normal", "karras", "simple"):
        notes.append(f"ComfyUI scheduler {inputs.get('scheduler')!r} has no counterpart here.")
    return _info("ComfyUI", prompt, negative, params, chunks, {"prompt", "workflow"}, notes)


def _civitai_summary(chunks: dict[str, str]) -> ImageInfo | None:
    """Civitai's generator's own summary (`extraMetadata`, JSON text beside its graph in UserComment: prompt,
    negativePrompt, steps, cfgScale, sampler, seed, width, height), read when the graph has no sampler: an
    upscale of an image it made, whose graph only upscales (tests/fixtures/png_info/civitai-upscale.jpg)."""
    data = _json(chunks.get(KEY))
    summary = _json(data.get("extraMetadata")) if isinstance(data, dict) else None
    if not isinstance(summary, dict) or "prompt" not in summary:
        return None
    notes = ["Civitai: the file's ComfyUI graph only post-processes (such as an upscale); these are the settings "
             "of the image it started from, from Civitai's summary."]
    return _info("Civitai", str(summary.get("prompt", "")).strip(), str(summary.get("negativePrompt", "")).strip(),
                 {"Steps": summary.get("steps"), "Sampler": _sampler_label(summary.get("sampler")),
                  "CFG scale": summary.get("cfgScale"), "Seed": summary.get("seed"),
                  "Size": _size(summary.get("width"), summary.get("height")), "Clip skip": summary.get("clipSkip")},
                 chunks, {KEY}, notes)


def _sampler_inputs(graph: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A sampler node's inputs as a KSampler's: a custom sampler's settings read from the nodes wired to it."""
    inputs = dict(node.get("inputs", {}))
    for wire, names in _COMFY_WIRED_SETTINGS:
        wired = graph.get(str(_link(inputs.get(wire))), {}).get("inputs", {})
        inputs.update({name: wired[name] for name in names if name in wired and name not in inputs})
    if "positive" not in inputs and "conditioning" in inputs:  # BasicGuider: one conditioning, no CFG
        inputs["positive"] = inputs["conditioning"]
    return inputs


def _comfy_graph(text: str | None) -> dict[str, Any] | None:
    """The nodes of a ComfyUI API graph (other keys, such as Civitai's "extra", left out), or None."""
    data = _json(text)
    if not isinstance(data, dict):
        return None
    nodes = {str(k): v for k, v in data.items() if isinstance(v, dict) and "class_type" in v}
    return nodes or None


def _comfy_value(graph: dict[str, Any], value: Any, seen: set[str] | None = None) -> Any:
    """A sampler input's value: as it is, or, wired to another node (a seed or number node), that node's
    value (its only scalar input, or the one named like a value)."""
    seen = seen if seen is not None else set()
    node_id = _link(value)
    if node_id is None:
        return value
    if str(node_id) in seen or str(node_id) not in graph:
        return None
    seen.add(str(node_id))
    inputs = graph[str(node_id)].get("inputs", {})
    for name in ("seed", "noise_seed", "value", "int", "float", "number", "steps", "cfg", "sampler_name",
                 "scheduler"):
        if name in inputs:
            return _comfy_value(graph, inputs[name], seen)
    scalars = [v for v in inputs.values() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return scalars[0] if len(scalars) == 1 else None


def _from_sampler(graph: dict[str, Any], wire: Any, seen: set[str]) -> bool:
    node_id = _link(wire)
    if node_id is None or str(node_id) in seen or str(node_id) not in graph:
        return False
    seen.add(str(node_id))
    node = graph[str(node_id)]
    return node.get("class_type") in _COMFY_SAMPLERS or any(
        _from_sampler(graph, v, seen) for v in node.get("inputs", {}).values())


def _id_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _link(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) else None


def _comfy_text(graph: dict[str, Any], wire: Any, seen: set[str]) -> str:
    """The text behind a conditioning input: an encoder's `text` (SDXL's text_g/text_l), the texts of the
    nodes a conditioning node combines, joined as ComfyUI's combine does (both apply)."""
    node_id = _link(wire)
    if node_id is None or str(node_id) in seen or str(node_id) not in graph:
        return ""
    seen.add(str(node_id))
    node = graph[str(node_id)]
    inputs = node.get("inputs", {})
    for name in ("text", "text_g", "prompt", "string", "value"):
        if isinstance(inputs.get(name), str):
            return inputs[name].strip()
        if _link(inputs.get(name)) is not None:  # the text itself comes from another node (a primitive)
            text = _comfy_text(graph, inputs[name], seen) or _comfy_string(graph, inputs[name])
            if text:
                return text
    texts = [_comfy_text(graph, v, seen) for k, v in sorted(inputs.items()) if _link(v) is not None]
    return ", ".join(t for t in texts if t)


def _comfy_string(graph: dict[str, Any], wire: Any) -> str:
    node = graph.get(str(_link(wire)), {})
    for value in node.get("inputs", {}).values():
        if isinstance(value, str):
            return value.strip()
    return ""


def _comfy_size(graph: dict[str, Any], wire: Any, seen: set[str]) -> tuple[Any, Any]:
    node_id = _link(wire)
    if node_id is None or str(node_id) in seen or str(node_id) not in graph:
        return None, None
    seen.add(str(node_id))
    inputs = graph[str(node_id)].get("inputs", {})
    if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
        return inputs["width"], inputs["height"]
    # Latent nodes that take a size as text, such as rgthree's "SDXL Empty Latent Image" ("1216 x 832 (landscape)").
    match = re.match(r"\s*(\d+)\s*x\s*(\d+)", str(inputs.get("dimensions", inputs.get("resolution", ""))))
    if match:
        return int(match[1]), int(match[2])
    for value in inputs.values():
        width, height = _comfy_size(graph, value, seen)
        if width is not None:
            return width, height
    return None, None


def _comfy_model(graph: dict[str, Any]) -> str | None:
    for node in graph.values():
        inputs = node.get("inputs", {})
        name = inputs.get("ckpt_name", inputs.get("unet_name"))  # a checkpoint, or a UNETLoader's model
        if isinstance(name, str):
            return name
    return None


# --- InvokeAI --------------------------------------------------------------------------------------------------

def _invokeai(chunks: dict[str, str]) -> ImageInfo | None:
    """InvokeAI 3.x-6.x `invokeai_metadata` (invokeai/app/invocations/metadata.py, CoreMetadataInvocation);
    2.x `sd-metadata` (ldm/invoke/pngwriter.py) or only its `Dream` command line (-s steps -S seed -C cfg)."""
    meta = _json(chunks.get("invokeai_metadata"))
    if isinstance(meta, dict):
        model = meta.get("model")
        notes = []
        if meta.get("hrf_enabled"):
            notes.append("InvokeAI high-resolution fix: not available here; not sent.")
        if meta.get("refiner_model") or meta.get("refiner_steps"):
            notes.append("InvokeAI SDXL refiner pass: not available here; not sent.")
        strength = meta.get("strength") if "img2img" in str(meta.get("generation_mode", "")) else None
        return _info("InvokeAI", _prompt_text(meta.get("positive_prompt")), _prompt_text(meta.get("negative_prompt")),
                     {"Steps": meta.get("steps"), "Sampler": _sampler_label(meta.get("scheduler")),
                      "CFG scale": meta.get("cfg_scale"), "Seed": meta.get("seed"),
                      "Size": _size(meta.get("width"), meta.get("height")),
                      "Model": model.get("name", model.get("model_name")) if isinstance(model, dict) else model,
                      "Denoising strength": strength}, chunks, {"invokeai_metadata", "invokeai_graph"}, notes)
    meta = _json(chunks.get("sd-metadata"))
    if isinstance(meta, dict) and isinstance(meta.get("image"), dict):
        image = meta["image"]
        prompt, negative = _invoke2_prompt(image.get("prompt"))
        return _info("InvokeAI", prompt, negative, {
            "Steps": image.get("steps"), "Sampler": _sampler_label(image.get("sampler")),
            "CFG scale": image.get("cfg_scale"), "Seed": image.get("seed"),
            "Size": _size(image.get("width"), image.get("height")), "Model": meta.get("model_weights")},
            chunks, {"sd-metadata", "Dream"})
    dream = chunks.get("Dream")
    if dream:
        return _dream(dream, chunks)
    return None


def _prompt_text(value: Any) -> str:
    if isinstance(value, list):  # older 3.x: [{"prompt": ..., "weight": ...}]
        return ", ".join(str(v.get("prompt", "")) if isinstance(v, dict) else str(v) for v in value)
    return "" if value is None else str(value)


def _invoke2_prompt(value: Any) -> tuple[str, str]:
    """InvokeAI 2.x keeps the negative prompt inside the prompt, in [square brackets] at its end."""
    text = _prompt_text(value)
    match = re.fullmatch(r"(.*?)\s*\[([^\[\]]*)\]\s*", text, re.S)
    return (match[1], match[2]) if match else (text, "")


def _dream(dream: str, chunks: dict[str, str]) -> ImageInfo | None:
    match = re.match(r'\s*"((?:\\.|[^"\\])*)"(.*)', dream, re.S)
    if not match:
        return None
    prompt, negative = _invoke2_prompt(match[1])
    flags = dict(re.findall(r"-(\w+)\s+([^\s-][^\s]*)", match[2]))
    return _info("InvokeAI", prompt, negative, {
        "Steps": flags.get("s"), "Sampler": _sampler_label(flags.get("A")), "CFG scale": flags.get("C"),
        "Seed": flags.get("S"), "Size": _size(flags.get("W"), flags.get("H"))}, chunks, {"Dream"})


# --- NovelAI ---------------------------------------------------------------------------------------------------

def _novelai(chunks: dict[str, str]) -> ImageInfo | None:
    """NovelAI: `Software` NovelAI, the prompt in `Description`, settings in `Comment` JSON (scale is CFG,
    uc the negative prompt; tests/fixtures/png_info/novelai1_cropped.png). NovelAI Diffusion V4 / V4.5 add
    `v4_prompt` and `v4_negative_prompt`: {"caption": {"base_caption": ..., "char_captions": [{"char_caption":
    ..., "centers": [{"x", "y"}]}]}, "use_coords", "use_order"}; the base caption is the prompt, each character
    caption a prompt of its own placed at its centres, which one prompt here cannot hold. Layout as read by
    github.com/enslo/sd-metadata (MIT) src/parsers/novelai.ts at commit 634f14a02d721e12395af3dcd9463db56dcd2aa5,
    and as in its real V4.5 sample, tests/fixtures/png_info/novelai-full-3char.png."""
    comment = _json(chunks.get("Comment"))
    if not isinstance(comment, dict) or ("NovelAI" not in chunks.get("Software", "") and "uc" not in comment):
        return None
    notes = []
    if comment.get("sm") or comment.get("sm_dyn"):
        notes.append("NovelAI SMEA sampling: not available here; not sent.")
    # NovelAI's WebP copies its EXIF ImageDescription, 4 NUL bytes first, into Description.
    prompt = chunks.get("Description", comment.get("prompt", "")).strip("\0")
    negative = comment.get("uc", "")
    v4, v4_negative = comment.get("v4_prompt"), comment.get("v4_negative_prompt")
    base, characters = _v4_caption(v4)
    if base is not None:
        prompt = base
    base_negative, negative_characters = _v4_caption(v4_negative)
    if base_negative is not None:
        negative = base_negative
    if characters or negative_characters:
        placed = " (placed by position)" if isinstance(v4, dict) and v4.get("use_coords") else ""
        listed = "; ".join(f"{i}: {c}" for i, c in enumerate(characters, 1))
        note = f"NovelAI V4 character prompts{placed}, which this app has no place for; not sent"
        notes.append(f"{note}: {listed}." if listed else f"{note}.")
        if negative_characters:
            notes[-1] += " Their negative prompts: " + "; ".join(
                f"{i}: {c}" for i, c in enumerate(negative_characters, 1)) + "."
    return _info("NovelAI", prompt, negative, {
        "Steps": comment.get("steps"), "Sampler": _sampler_label(comment.get("sampler")),
        "CFG scale": comment.get("scale"), "Seed": comment.get("seed"),
        "Size": _size(comment.get("width"), comment.get("height")), "Model": chunks.get("Source")},
        chunks, {"Comment", "Description"}, notes)


def _v4_caption(value: Any) -> tuple[str | None, list[str]]:
    """A NovelAI V4 prompt's base caption (None without one) and its character captions that hold text."""
    caption = value.get("caption") if isinstance(value, dict) else None
    if not isinstance(caption, dict):
        return None, []
    base = caption.get("base_caption")
    characters = [str(c.get("char_caption", "")).strip() for c in caption.get("char_captions") or []
                  if isinstance(c, dict)]
    return (str(base) if isinstance(base, str) else None), [c.rstrip(", ") for c in characters if c]
