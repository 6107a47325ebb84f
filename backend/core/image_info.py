"""Generation settings read from images other tools made: which tool, its prompt and settings as A1111's
keys, and notes on what this app cannot take. Light: PIL only (no torch).

Read here, each from the tool's own writer (sources named at each reader):

| tool                              | where                                                        |
|-----------------------------------|--------------------------------------------------------------|
| AUTOMATIC1111, Forge, SD.Next ... | PNG `parameters` (tEXt/iTXt/zTXt); JPEG/WebP EXIF UserComment |
| ComfyUI                           | PNG `prompt`: the API graph (sampler node and its encoders)   |
| InvokeAI 2.x                      | PNG `sd-metadata` JSON, or the `Dream` command line           |
| InvokeAI 3.x-6.x                  | PNG `invokeai_metadata` JSON                                  |
| NovelAI                           | PNG `Comment` JSON, prompt in `Description`                   |
| Fooocus, RuinedFooocus, SwarmUI,  | JSON in `parameters` (or UserComment)                         |
| Hugging Face Spaces               |                                                               |

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
from dataclasses import dataclass, field
from typing import Any

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
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            chunks = text_chunks(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NotAnImage("this file cannot be read as an image; drop a PNG, JPEG or WebP.") from exc
    for reader in (_a1111, _comfyui, _invokeai, _novelai, _json_in_parameters, _prompt_only):
        info = reader(chunks)
        if info is not None:
            return info
    raise NoSettings("this image carries no generation settings that PNG Info knows (A1111 and its forks, "
                     "ComfyUI, InvokeAI, NovelAI, Fooocus, SwarmUI): it was saved by another program, or "
                     "something re-encoded it (a paste from the clipboard, a chat app, an editor).")


def text_chunks(image: Image.Image) -> dict[str, str]:
    """An image's text: PNG text chunks (UTF-8 in tEXt repaired), and JPEG/WebP EXIF UserComment as `parameters`."""
    chunks: dict[str, str] = {}
    for key, value in {**image.info, **(getattr(image, "text", None) or {})}.items():
        if isinstance(value, str):
            chunks[key] = _utf8_in_latin1(value)
    if KEY not in chunks:
        comment = user_comment(image)
        if comment:
            chunks[KEY] = comment
    return chunks


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
        value = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
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
    if "full_prompt" in data or chunks.get("fooocus_scheme") == "fooocus" or "base_model_hash" in data:
        # Fooocus: modules/meta_parser.py, FooocusMetadataParser (resolution as "(w, h)"); the fixture
        # tests/fixtures/png_info/fooocus1_cropped.png has each key.
        size = re.findall(r"\d+", str(data.get("resolution", "")))
        return _info("Fooocus", data.get("prompt", ""), data.get("negative_prompt", ""), {
            "Steps": data.get("steps"), "Sampler": _sampler_label(data.get("sampler"), data.get("scheduler")),
            "CFG scale": data.get("guidance_scale"), "Seed": data.get("seed"),
            "Size": _size(*size[:2]) if len(size) >= 2 else None, "Model": data.get("base_model")},
            chunks, {KEY, "fooocus_scheme"})
    if str(data.get("software", "")).lower().startswith("ruinedfooocus") or ("Prompt" in data and "cfg" in data):
        # RuinedFooocus: "software": "RuinedFooocus", Prompt, Negative, steps, cfg, seed, sampler_name, scheduler,
        # base_model_name (as sd-prompt-reader's format/ruinedfooocus.py reads it).
        return _info("RuinedFooocus", data.get("Prompt", ""), data.get("Negative", ""), {
            "Steps": data.get("steps"), "Sampler": _sampler_label(data.get("sampler_name"), data.get("scheduler")),
            "CFG scale": data.get("cfg"), "Seed": data.get("seed"),
            "Size": _size(data.get("width"), data.get("height")), "Model": data.get("base_model_name")},
            chunks, {KEY})
    if "prompt" in data:
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

_COMFY_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom")


def _comfyui(chunks: dict[str, str]) -> ImageInfo | None:
    """ComfyUI's `prompt` chunk: its API graph ({id: {"class_type", "inputs"}}, an input wired to another node
    as [id, output]; nodes.py, SaveImage.save_images). The settings are the sampler node's; the prompts
    the text of the encoders wired to its positive and negative inputs (through conditioning nodes)."""
    graph = _json(chunks.get("prompt"))
    if not isinstance(graph, dict) or not all(isinstance(n, dict) for n in graph.values()) or not any(
            "class_type" in n for n in graph.values()):
        return None
    samplers = [(i, n) for i, n in graph.items() if n.get("class_type") in _COMFY_SAMPLERS]
    notes: list[str] = []
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
    inputs = node.get("inputs", {})
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
    for value in inputs.values():
        width, height = _comfy_size(graph, value, seen)
        if width is not None:
            return width, height
    return None, None


def _comfy_model(graph: dict[str, Any]) -> str | None:
    for node in graph.values():
        name = node.get("inputs", {}).get("ckpt_name")
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
    uc the negative prompt; tests/fixtures/png_info/novelai1_cropped.png)."""
    comment = _json(chunks.get("Comment"))
    if not isinstance(comment, dict) or ("NovelAI" not in chunks.get("Software", "") and "uc" not in comment):
        return None
    notes = []
    if comment.get("sm") or comment.get("sm_dyn"):
        notes.append("NovelAI SMEA sampling: not available here; not sent.")
    return _info("NovelAI", chunks.get("Description", comment.get("prompt", "")), comment.get("uc", ""), {
        "Steps": comment.get("steps"), "Sampler": _sampler_label(comment.get("sampler")),
        "CFG scale": comment.get("scale"), "Seed": comment.get("seed"),
        "Size": _size(comment.get("width"), comment.get("height")), "Model": chunks.get("Source")},
        chunks, {"Comment", "Description"}, notes)
