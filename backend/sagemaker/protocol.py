"""The endpoint's wire format, shared by the SageMaker backend (client) and serving/ (server).

Request (`Content-Type: application/json`); everything but `prompt` is optional:

    {"prompt": "a lovely cat", "negative_prompt": "", "parameters": {
      "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 42, "num_images_per_prompt": 1,
      "height": 512, "width": 512, "scheduler": "dpm++2m", "precision": "bf16"}}

Image to image and inpainting add the input picture(s) beside the prompt, as base64 text of a PNG or
JPEG file (or a `data:image/png;base64,...` URL), and four parameters:

    {"prompt": "a lovely cat", "image": "iVBORw0KGgo...", "mask": "iVBORw0KGgo...", "parameters": {
      "strength": 0.75, "mask_blur": 4, "resize_mode": "crop", "mode": "inpaint", ...}}

The hires fix (text to image) adds `hr_scale` (1-2; 1 or left out: off), `hr_upscaler` (`latent`,
`latent-nearest`, `lanczos`), `hr_steps` (0: as many as num_inference_steps) and `denoising_strength`
(default 0.7); sent only when hr_scale is above 1. `describe` lists `hr_upscalers` and (compiled sizes) `hr_scales`.

`mask` is white where to repaint. `parameters.mode` may be left out: it is then `inpaint` when both
`image` and `mask` are given, `img2img` when only `image` is, and `txt2img` otherwise; a `mask`
without an `image` is refused naming `mask`. The pictures are checked (decodable, within the pixel
limit, the mask the image's size or shape and not empty) and fitted to width x height by
api.GenerationRequest.validated, as for every backend (backend/core/input_images.py).

`{"describe": true}` asks for the endpoint's capabilities instead (Capabilities.to_dict(), whose
`modes` lists the modes it runs). A key that is not listed here is refused with a 400 that names it: a
misspelt parameter ("num_inference_step") would otherwise be ignored and silently give a different
image. A `null` value means "the default". Numbers must be JSON numbers and texts JSON strings; the
values themselves are checked by api.GenerationRequest.validated against the backend's capabilities.

Request size: a body is at most MAX_REQUEST_BYTES, SageMaker's own limit for a real-time invocation
(6 MB); a request without a picture at most MAX_TEXT_REQUEST_BYTES. The SageMaker backend measures its
body before sending and refuses one over the limit itself (backend/sagemaker/client.py).

Responses, chosen by `Accept`:
- `image/png` (the default, and what `*/*` gets): the first image's PNG, infotext included;
- `application/json`: `{"images": [base64 PNG], "seeds": [...], "timings": {...}, "info": "...",
  "warnings": [...], "model": "...", "backend": "..."}`.
Either way the server's own times ride in the `X-Amzn-SageMaker-Custom-Attributes` header as
`key=value` pairs joined by `;`, which SageMaker passes back to the caller as `CustomAttributes`.

Errors are JSON, alike under TorchServe (serving/inference.py) and serving/server.py:
`{"code": 400, "message": "InvalidRequest", "error": "steps: ..."}` where `message` names the kind
and `error` is the text a person can read; ERRORS below is the one table of kinds and statuses
(InvalidRequest 400, or 404/406/411/413/415 for what HTTP names more precisely; Busy 429;
GenerationFailed 500; BackendUnavailable 503). One answer comes from TorchServe itself, before the request reaches this
code: its 503 `{"code": 503, "type": "ServiceUnavailableException", "message": ...}` when its job
queue is full or no worker is running, which parse_error reads as Busy.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Mapping

from ..core.api import GenerationRequest
from ..core.errors import BackendError, BackendUnavailable, GenerationFailed, InvalidRequest

JSON = "application/json"
PNG = "image/png"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"

# SageMaker's limit on a real-time invocation's body: 6 MB, which AWS counts as 6 MiB, 6291456 bytes
# (botocore's sagemaker-runtime model, 2017-05-13/service-2.json: InvokeEndpoint's Body is a BodyBlob
# with "max": 6291456; AWS answers a larger one with "Member must have length less than or equal to
# 6291456"). It is the most a request with an input image can be.
MAX_REQUEST_BYTES = 6 * 1024 * 1024
# A request without a picture: prompts are at most 2000 characters each; this leaves room for \u escapes.
MAX_TEXT_REQUEST_BYTES = 64 * 1024
# SageMaker real-time endpoints refuse payloads over 6 MB in either direction (an answer is counted here
# in decimal megabytes, the stricter reading).
MAX_RESPONSE_BYTES = 6 * 1000 * 1000
MAX_CUSTOM_ATTRIBUTES_CHARS = 1024  # SageMaker's limit on the header
_MB = 1024 * 1024  # AWS's "MB" in its payload limits

# wire name -> GenerationRequest field; the wire uses diffusers' argument names.
PARAMETERS: dict[str, str] = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "num_images_per_prompt": "num_images",
    "height": "height",
    "width": "width",
    "scheduler": "scheduler",
    "precision": "precision",
    "strength": "strength",
    "mask_blur": "mask_blur",
    "resize_mode": "resize_mode",
    "mode": "mode",
    # The hires fix (text to image): A1111's API names (StableDiffusionProcessingTxt2Img's hr_scale, hr_upscaler,
    # denoising_strength; its hr_second_pass_steps is hr_steps here).
    "hr_scale": "hr_scale",
    "hr_upscaler": "hr_upscaler",
    "hr_steps": "hr_steps",
    "denoising_strength": "denoising_strength",
}
_NUMBERS = {"num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt", "height", "width", "strength",
            "mask_blur", "hr_scale", "hr_steps", "denoising_strength"}
_TEXTS = {"scheduler", "precision", "resize_mode", "mode", "hr_upscaler"}
# Sent only for image to image and inpainting, so that a text-to-image request stays what older endpoints read.
_IMAGE_PARAMETERS = ("strength", "mask_blur", "resize_mode", "mode")
# Sent only with a hires pass, for the same reason.
_HIRES_PARAMETERS = ("hr_scale", "hr_upscaler", "hr_steps", "denoising_strength")
PICTURES = ("image", "mask")
TOP_LEVEL = ("prompt", "negative_prompt", "image", "mask", "parameters", "describe")
# The PNGs the client sends: zlib level 1, the cheapest that still compresses (they cross the internet).
_PICTURE_PNG_LEVEL = 1

BUSY = "Busy"


# The exception TorchServe names in its 503 for a full job queue or a model with no worker
# (pytorch/serve v0.11.0: ApiUtils.addRESTInferenceJob, NettyUtils.sendError).
MODEL_SERVER_BUSY = "ServiceUnavailableException"


class Busy(BackendUnavailable):
    """Too many requests are waiting already; safe to retry later (the model did not run)."""


# Bad requests the endpoint answers with a more precise HTTP status than 400; still InvalidRequest on the wire.
class NotFound(InvalidRequest):
    """No such route on the endpoint."""


class NotAcceptable(InvalidRequest):
    """The Accept header allows no answer type the endpoint offers."""


class LengthRequired(InvalidRequest):
    """The request has no Content-Length."""


class TooLarge(InvalidRequest):
    """The request body is over MAX_REQUEST_BYTES."""


class UnsupportedMediaType(InvalidRequest):
    """The Content-Type is not JSON (or left unset)."""


# The one table of the endpoint's error answers: error class -> (kind, HTTP status). The kind is the
# answer's "message" and the client's error class; an error takes the first row it is an instance of.
ERRORS: tuple[tuple[type[BaseException], str, int], ...] = (
    (Busy, BUSY, 429),
    (NotFound, "InvalidRequest", 404),
    (NotAcceptable, "InvalidRequest", 406),
    (LengthRequired, "InvalidRequest", 411),
    (TooLarge, "InvalidRequest", 413),
    (UnsupportedMediaType, "InvalidRequest", 415),
    (InvalidRequest, "InvalidRequest", 400),
    (BackendUnavailable, "BackendUnavailable", 503),
    (GenerationFailed, "GenerationFailed", 500),
    (BaseException, "GenerationFailed", 500),  # anything unexpected (GenerationCancelled included)
)
# Each kind's own status: the row of the class that names it.
STATUS_OF_KIND = {kind: status for error, kind, status in ERRORS if error.__name__ == kind}


def check_request_size(size: int) -> None:
    """Refuse a request body over MAX_REQUEST_BYTES (SageMaker's limit), before it is read."""
    if size > MAX_REQUEST_BYTES:
        raise TooLarge(f"body: {size / _MB:.1f} MB ({size} bytes); SageMaker accepts at most "
                       f"{MAX_REQUEST_BYTES // _MB} MB ({MAX_REQUEST_BYTES} bytes) per request: send a smaller image "
                       f"or mask (at the generation size), or a JPEG.", "body")


def check_text_request_size(size: int, payload: Mapping[str, Any]) -> None:
    """Refuse a body over MAX_TEXT_REQUEST_BYTES that carries no picture (the limit for images is larger)."""
    if size > MAX_TEXT_REQUEST_BYTES and not any(payload.get(name) is not None for name in PICTURES):
        raise TooLarge(f"body: {size} bytes; a request without an image is at most {MAX_TEXT_REQUEST_BYTES} "
                       f"bytes.", "body")


def parse_json(body: bytes | bytearray | str) -> dict[str, Any]:
    """Decode a request body into a JSON object, or raise InvalidRequest saying what is wrong."""
    try:
        # Decoded here: json.loads would guess UTF-16 or UTF-32 from the first bytes.
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    except UnicodeDecodeError:
        raise InvalidRequest("body: not UTF-8 text; send a JSON object.", "body") from None
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"body: not valid JSON ({exc}); send a JSON object like "
                             f'{{"prompt": "a lovely cat"}}.', "body") from None
    except RecursionError:  # [[[[...]]]] a few thousand deep fits in the size limit
        raise InvalidRequest("body: JSON nested too deeply; send a JSON object like "
                             '{"prompt": "a lovely cat"}.', "body") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"body: must be a JSON object, not {_json_type(payload)}.", "body")
    return payload


def is_describe(payload: Mapping[str, Any]) -> bool:
    """True for `{"describe": true}`; a describe that is not a boolean is an error."""
    value = payload.get("describe")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"describe: must be true or false, not {_json_type(value)}.", "describe")
    return value


def request_from_json(payload: Mapping[str, Any]) -> GenerationRequest:
    """The GenerationRequest a wire request asks for (not yet validated against capabilities)."""
    _refuse_unknown(payload, TOP_LEVEL, "")
    prompt = payload.get("prompt")
    if prompt is None:
        raise InvalidRequest('prompt: missing; send at least {"prompt": "a lovely cat"}.', "prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt: must be a string, not {_json_type(prompt)}.", "prompt")
    negative = payload.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidRequest(f"negative_prompt: must be a string, not {_json_type(negative)}.", "negative_prompt")
    params = payload.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"parameters: must be a JSON object, not {_json_type(params)}.", "parameters")
    _refuse_unknown(params, tuple(PARAMETERS), "parameters.")
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative or ""}
    for name in PICTURES:
        value = payload.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{name}: must be a string, the base64 text of a PNG or JPEG file, not "
                                 f"{_json_type(value)}.", name)
        if value is not None:
            fields[name] = value
    for wire, value in params.items():
        if value is None:
            continue
        if wire in _NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidRequest(f"parameters.{wire}: must be a number, not {_json_type(value)}.", PARAMETERS[wire])
        if wire in _TEXTS and not isinstance(value, str):
            raise InvalidRequest(f"parameters.{wire}: must be a string, not {_json_type(value)}.", PARAMETERS[wire])
        fields[PARAMETERS[wire]] = value
    if "mode" not in fields:
        fields["mode"] = implied_mode("image" in fields, "mask" in fields)
    return GenerationRequest(**fields)


def implied_mode(has_image: bool, has_mask: bool) -> str:
    """The mode of a request that names none: inpaint with an image and a mask, img2img with an image alone."""
    if has_mask and not has_image:
        raise InvalidRequest('mask: a mask needs the image it belongs to; send "image" too (white in the mask '
                             'is repainted).', "mask")
    return "inpaint" if has_mask else "img2img" if has_image else "txt2img"


def request_to_json(request: GenerationRequest) -> dict[str, Any]:
    """The wire form of a request (what SageMakerBackend sends): a validated request's pictures as base64 PNG.

    A text-to-image request carries none of the image parameters, so older endpoints still read it."""
    params: dict[str, Any] = {}
    for wire, name in PARAMETERS.items():
        value = getattr(request, name)
        if value is None or (wire in _IMAGE_PARAMETERS and request.mode == "txt2img"):
            continue
        if wire not in _HIRES_PARAMETERS or request.hires:
            params[wire] = value
    payload: dict[str, Any] = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    for name in PICTURES:
        picture = getattr(request, name)
        if picture is not None:
            payload[name] = encode_picture(picture)
    payload["parameters"] = params
    return payload


def encode_picture(picture: Any) -> str:
    """A picture as base64 text for the wire: a PIL image as PNG (lossless, so the endpoint gets these very
    pixels); bytes as they are; base64 text unchanged."""
    if isinstance(picture, str):
        return picture
    if isinstance(picture, (bytes, bytearray)):
        return base64.b64encode(bytes(picture)).decode("ascii")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=_PICTURE_PNG_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def check_body_to_send(body: bytes, payload: Mapping[str, Any]) -> None:
    """The client's check before sending: a body over SageMaker's limit is refused here, naming the largest picture."""
    if len(body) <= MAX_REQUEST_BYTES:
        return
    sizes = {name: len(payload.get(name) or "") for name in PICTURES}
    field = max(sizes, key=lambda name: sizes[name]) if any(sizes.values()) else "body"
    raise InvalidRequest(
        f"{field}: the request would be {len(body) / _MB:.1f} MB; SageMaker accepts at most "
        f"{MAX_REQUEST_BYTES // _MB} MB per request. The {field} is sent as a PNG at the generation size: choose "
        f"a smaller width x height, or a picture with less fine detail (noise does not compress).", field)


def check_response_size(request: GenerationRequest, as_json: bool) -> None:
    """Refuse, before running, a request whose answer could exceed SageMaker's payload limit."""
    width, height = request.output_size if request.width and request.height else (0, 0)  # a hires pass's size
    count = request.num_images if as_json else 1
    # An incompressible PNG is its raw RGB size plus a byte per row and a little framing.
    worst = count * (width * height * 3 + height + 4096)
    if as_json:
        worst = worst * 4 // 3 + 4096
    if worst > MAX_RESPONSE_BYTES:
        raise InvalidRequest(
            f"num_images_per_prompt/size: {count} image(s) of {width}x{height} could exceed the endpoint's "
            f"{MAX_RESPONSE_BYTES // 1_000_000} MB answer limit; ask for fewer images or a smaller size.",
            "num_images",
        )


def encode_png_list(pngs: list[bytes]) -> list[str]:
    """PNG bytes as base64 text for the JSON answer."""
    return [base64.b64encode(p).decode("ascii") for p in pngs]


def decode_png_list(values: Any) -> list[bytes]:
    """The inverse of encode_png_list; raises ValueError on anything that is not base64 text."""
    if not isinstance(values, list) or not values:
        raise ValueError("`images` must be a non-empty list")
    return [base64.b64decode(v, validate=True) for v in values]


def format_attributes(values: Mapping[str, Any]) -> str:
    """`key=value;key=value` for the custom-attributes header (ASCII, at most 1024 characters)."""
    parts = []
    for key, value in values.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}")
    header = ";".join(parts)
    return header[:MAX_CUSTOM_ATTRIBUTES_CHARS].encode("ascii", "replace").decode("ascii")


def parse_attributes(header: str | None) -> dict[str, str]:
    """The inverse of format_attributes; pieces without `=` are ignored."""
    values: dict[str, str] = {}
    for part in (header or "").split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def kind_of(error: BaseException) -> str:
    """The wire name of an error's kind (ERRORS)."""
    return _row_of(error)[1]


def status_of(error: BaseException) -> int:
    """The HTTP status the endpoint answers an error with (ERRORS)."""
    return _row_of(error)[2]


def _row_of(error: BaseException) -> tuple[type[BaseException], str, int]:
    return next(row for row in ERRORS if isinstance(error, row[0]))


def error_body(kind: str, text: str, status: int | None = None) -> bytes:
    """A JSON error answer: {"code", "message" (the kind), "error" (the text)}."""
    code = status or STATUS_OF_KIND[kind]
    return json.dumps({"code": code, "message": kind, "error": text}).encode("utf-8")


def parse_error(body: bytes | str | None) -> tuple[str | None, str]:
    """(kind, text) of an error answer; kind is None when the body is not ours (plain text, HTML)."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else (body or "")
    try:
        data = json.loads(text)
    except ValueError:
        return None, text.strip()[:500]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        kind = data.get("message")
        return (kind if kind in STATUS_OF_KIND else None), data["error"]
    if isinstance(data, dict) and data.get("code") == 503 and data.get("type") == MODEL_SERVER_BUSY:
        # TorchServe's words ("has no worker ... use scale workers API") would send a caller astray.
        return BUSY, ("the model server's queue is full, or its worker is restarting; the request did not run. "
                      "Try again shortly.")
    return None, text.strip()[:500]


def error_for(kind: str | None, status: int, text: str) -> BackendError:
    """The backend error a client raises for an endpoint's error answer."""
    if kind == "InvalidRequest" or (kind is None and 400 <= status < 500 and status != 429):
        return InvalidRequest(text)
    if kind == BUSY or status == 429:
        return Busy(text)
    if kind == "BackendUnavailable" or (kind is None and status == 503):
        return BackendUnavailable(text)
    return GenerationFailed(text)


def _refuse_unknown(mapping: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    unknown = [k for k in mapping if k not in known]
    if unknown:
        raise InvalidRequest(
            f"{prefix}{unknown[0]}: not a known field; known: {', '.join(prefix + k for k in known)}.",
            unknown[0],
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
