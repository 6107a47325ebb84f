"""The endpoint wire format (backend/sagemaker/protocol.py): requests, answers, attributes, errors."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from input_pictures import b64, centred_mask, picture
from PIL import Image

from backend import BackendUnavailable, Capabilities, GenerationFailed, GenerationRequest, InvalidRequest
from backend.sagemaker import protocol
from backend.core.api import MODES

CAPS = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32", "bf16"))


def parse(payload) -> GenerationRequest:
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return protocol.request_from_json(protocol.parse_json(body))


@pytest.mark.parametrize("payload", [{"prompt": "cat"}, {"prompt": "cat", "parameters": {}}])
def test_the_walkthroughs_own_requests_keep_working(payload):
    request = parse(payload).validated(CAPS)
    assert request.prompt == "cat"
    assert (request.steps, request.guidance_scale, request.scheduler) == (20, 7.5, "dpm++2m")
    assert (request.width, request.height, request.precision) == (512, 512, "fp32")


def test_every_parameter_maps_to_its_request_field():
    request = parse({"prompt": "a lovely cat", "negative_prompt": "blurry", "parameters": {
        "num_inference_steps": 12, "guidance_scale": 5.5, "seed": 42, "num_images_per_prompt": 2,
        "height": 256, "width": 320, "scheduler": "euler-a", "precision": "bf16"}}).validated(CAPS)
    assert request == GenerationRequest(prompt="a lovely cat", negative_prompt="blurry", steps=12, guidance_scale=5.5,
                                        seed=42, num_images=2, height=256, width=320, scheduler="euler-a",
                                        precision="bf16")


def test_request_to_json_round_trips():
    original = GenerationRequest("a fox", negative_prompt="rain", steps=7, guidance_scale=3.0, seed=9, num_images=3,
                                 width=128, height=64, scheduler="ddim", precision="bf16")
    assert parse(protocol.request_to_json(original)) == original


def test_null_means_the_default():
    request = parse({"prompt": "cat", "negative_prompt": None, "parameters": {"seed": None, "width": None}})
    assert (request.negative_prompt, request.seed, request.width) == ("", -1, None)


@pytest.mark.parametrize("payload, names", [
    ({"prompt": "cat", "text_length": 128}, ["text_length", "known: prompt"]),
    ({"prompt": "cat", "parameters": {"num_inference_step": 20}}, ["parameters.num_inference_step",
                                                                   "parameters.num_inference_steps"]),
])
def test_unknown_keys_are_refused_by_name(payload, names):
    with pytest.raises(InvalidRequest) as err:
        parse(payload)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("payload, expected", [
    ({"prompt": 5}, "prompt: must be a string, not the number 5"),
    ({"negative_prompt": "x"}, "prompt: missing"),
    ({"prompt": "cat", "negative_prompt": ["x"]}, "negative_prompt: must be a string, not a list"),
    ({"prompt": "cat", "parameters": "fast"}, "parameters: must be a JSON object, not the string 'fast'"),
    ({"prompt": "cat", "parameters": {"num_inference_steps": "20"}},
     "parameters.num_inference_steps: must be a number, not the string '20'"),
    ({"prompt": "cat", "parameters": {"guidance_scale": True}},
     "parameters.guidance_scale: must be a number, not a boolean"),
    ({"prompt": "cat", "parameters": {"scheduler": 1}}, "parameters.scheduler: must be a string, not the number 1"),
])
def test_fields_of_the_wrong_type_are_refused(payload, expected):
    with pytest.raises(InvalidRequest, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        parse(payload)


@pytest.mark.parametrize("parameters, field", [
    ({"num_inference_steps": 0}, "steps"), ({"num_inference_steps": 2.5}, "steps"),
    ({"guidance_scale": 99}, "guidance_scale"), ({"num_images_per_prompt": 9}, "num_images"),
    ({"width": 500}, "width"), ({"precision": "fp16"}, "precision"), ({"scheduler": "plms"}, "scheduler"),
])
def test_values_out_of_range_are_refused_by_validation(parameters, field):
    with pytest.raises(InvalidRequest) as err:
        parse({"prompt": "cat", "parameters": parameters}).validated(CAPS)
    assert err.value.field == field


@pytest.mark.parametrize("body, expected", [
    (b"{not json", "body: not valid JSON"),
    (b"\xff\xfe", "body: not UTF-8"),
    (b"[1, 2]", "body: must be a JSON object, not a list"),
])
def test_bodies_that_are_not_a_json_object_are_refused(body, expected):
    with pytest.raises(InvalidRequest, match="^" + expected):
        protocol.parse_json(body)


def test_bodies_over_the_limit_are_refused():
    assert protocol.MAX_REQUEST_BYTES == 6291456  # SageMaker's InvokeEndpoint Body limit (botocore's model)
    protocol.check_request_size(protocol.MAX_REQUEST_BYTES)
    with pytest.raises(InvalidRequest, match=r"^body: 6\.0 MB \(6291457 bytes\); SageMaker accepts at most 6 MB "
                                             r"\(6291456 bytes\) per request: send a smaller image") as err:
        protocol.check_request_size(protocol.MAX_REQUEST_BYTES + 1)
    assert isinstance(err.value, protocol.TooLarge) and protocol.status_of(err.value) == 413


def test_a_request_without_a_picture_keeps_the_small_limit():
    text_only = {"prompt": "cat"}
    protocol.check_text_request_size(protocol.MAX_TEXT_REQUEST_BYTES, text_only)
    with pytest.raises(protocol.TooLarge, match=f"^body: {protocol.MAX_TEXT_REQUEST_BYTES + 1} bytes; a request "
                                                f"without an image is at most {protocol.MAX_TEXT_REQUEST_BYTES}"):
        protocol.check_text_request_size(protocol.MAX_TEXT_REQUEST_BYTES + 1, text_only)
    protocol.check_text_request_size(protocol.MAX_REQUEST_BYTES, {"prompt": "cat", "image": "iVBOR"})


def test_describe():
    assert protocol.is_describe({"describe": True})
    assert not protocol.is_describe({"prompt": "cat"})
    with pytest.raises(InvalidRequest, match="describe: must be true or false"):
        protocol.is_describe({"describe": "yes"})


def test_answers_that_could_exceed_sagemakers_limit_are_refused_before_running():
    protocol.check_response_size(GenerationRequest("cat", width=512, height=512, num_images=4), as_json=True)
    with pytest.raises(InvalidRequest, match="6 MB"):
        protocol.check_response_size(GenerationRequest("cat", width=1024, height=1024, num_images=2), as_json=True)
    # A PNG answer carries only the first image.
    protocol.check_response_size(GenerationRequest("cat", width=1024, height=1024, num_images=4), as_json=False)


def test_custom_attributes_round_trip_and_stay_within_sagemakers_limit():
    header = protocol.format_attributes({"handler_ms": 12.345, "steps": 20, "seeds": "1,2"})
    assert header == "handler_ms=12.3;steps=20;seeds=1,2"
    assert protocol.parse_attributes(header) == {"handler_ms": "12.3", "steps": "20", "seeds": "1,2"}
    assert protocol.parse_attributes("junk;a=1") == {"a": "1"}
    assert len(protocol.format_attributes({f"k{i}": "v" * 50 for i in range(40)})) == 1024


def test_png_lists_round_trip_and_refuse_what_is_not_base64():
    assert protocol.decode_png_list(protocol.encode_png_list([b"\x89PNG", b"x"])) == [b"\x89PNG", b"x"]
    with pytest.raises(ValueError):
        protocol.decode_png_list(["not base64!"])
    with pytest.raises(ValueError):
        protocol.decode_png_list([])
    assert base64.b64decode(protocol.encode_png_list([b"abc"])[0]) == b"abc"


def test_errors_round_trip_to_the_same_kind():
    for error in (InvalidRequest("steps: bad"), GenerationFailed("broke"), BackendUnavailable("down"),
                  protocol.Busy("busy")):
        kind = protocol.kind_of(error)
        body = protocol.error_body(kind, str(error))
        assert json.loads(body)["code"] == protocol.STATUS_OF_KIND[kind]
        parsed_kind, text = protocol.parse_error(body)
        assert (parsed_kind, text) == (kind, str(error))
        assert type(protocol.error_for(parsed_kind, protocol.STATUS_OF_KIND[kind], text)) is type(error)


def test_errors_that_are_not_ours_map_by_status():
    assert protocol.parse_error(b"<html>Bad Gateway</html>") == (None, "<html>Bad Gateway</html>")
    assert isinstance(protocol.error_for(None, 413, "too big"), InvalidRequest)
    assert isinstance(protocol.error_for(None, 429, "slow down"), protocol.Busy)
    assert isinstance(protocol.error_for(None, 503, "down"), BackendUnavailable)
    assert isinstance(protocol.error_for(None, 502, "bad gateway"), GenerationFailed)


def test_torchserves_own_503_is_busy_and_its_other_errors_are_not():
    busy = json.dumps({"code": 503, "type": "ServiceUnavailableException",
                       "message": 'Model "model" has no worker to serve inference request.'})
    kind, text = protocol.parse_error(busy)
    assert kind == protocol.BUSY and "queue is full" in text and "scale workers" not in text
    assert isinstance(protocol.error_for(kind, 503, text), protocol.Busy)
    missing = json.dumps({"code": 404, "type": "ModelNotFoundException", "message": "Model not found: other"})
    assert protocol.parse_error(missing)[0] is None


# ---- image to image and inpainting on the wire ----------------------------------------------------------

IMAGE_CAPS = dataclasses.replace(CAPS, modes=MODES, default_size=(64, 64))


@pytest.mark.parametrize("pictures, mode", [
    ({}, "txt2img"), ({"image": True}, "img2img"), ({"image": True, "mask": True}, "inpaint"),
])
def test_the_mode_follows_from_the_pictures_sent_when_none_is_named(pictures, mode):
    payload = {"prompt": "cat", **{name: b64(picture() if name == "image" else centred_mask())
                                   for name in pictures}}
    request = parse(payload)
    assert request.mode == mode
    validated = request.validated(IMAGE_CAPS)
    assert validated.mode == mode and (validated.image is None) == (mode == "txt2img")
    assert (validated.mask is None) == (mode != "inpaint")


def test_a_mask_without_an_image_is_refused_naming_the_mask():
    with pytest.raises(InvalidRequest, match='^mask: a mask needs the image it belongs to; send "image" too') as err:
        parse({"prompt": "cat", "mask": b64(centred_mask())})
    assert err.value.field == "mask"


def test_every_image_parameter_maps_to_its_request_field():
    image, mask = b64(picture(96, 64)), b64(centred_mask(96, 64))
    request = parse({"prompt": "cat", "image": image, "mask": mask, "parameters": {
        "strength": 0.5, "mask_blur": 8, "resize_mode": "pad", "mode": "inpaint", "num_inference_steps": 10}})
    assert (request.mode, request.strength, request.mask_blur, request.resize_mode) == ("inpaint", 0.5, 8, "pad")
    assert (request.image, request.mask) == (image, mask)  # base64 text; validated() decodes it
    validated = request.validated(IMAGE_CAPS)
    assert validated.image.size == validated.mask.size == (64, 64) and validated.denoising_steps == 5


def test_an_image_request_round_trips_with_the_same_pixels():
    """What the SageMaker backend sends (the validated pictures, as PNG) is what the endpoint validates back."""
    original = GenerationRequest("a fox", steps=8, seed=3, width=64, height=64, mode="inpaint", strength=0.6,
                                 mask_blur=2, resize_mode="crop", image=base64.b64decode(b64(picture(80, 64))),
                                 mask=centred_mask(80, 64)).validated(IMAGE_CAPS)
    wire = json.loads(json.dumps(protocol.request_to_json(original)))
    assert set(wire) == {"prompt", "negative_prompt", "image", "mask", "parameters"}
    assert wire["parameters"]["mode"] == "inpaint" and wire["parameters"]["strength"] == 0.6
    back = protocol.request_from_json(wire).validated(IMAGE_CAPS)
    assert back.image.tobytes() == original.image.tobytes() and back.mask.tobytes() == original.mask.tobytes()
    assert (back.image.mode, back.mask.mode) == ("RGB", "L")
    same = ("prompt", "steps", "seed", "width", "height", "mode", "strength", "mask_blur", "resize_mode")
    assert all(getattr(back, name) == getattr(original, name) for name in same)


def test_a_text_to_image_request_carries_no_image_fields():
    """So that the client keeps working against an endpoint that predates image to image."""
    wire = protocol.request_to_json(GenerationRequest("cat", width=64, height=64).validated(IMAGE_CAPS))
    assert set(wire) == {"prompt", "negative_prompt", "parameters"}
    assert not set(wire["parameters"]) & {"strength", "mask_blur", "resize_mode", "mode"}


def test_pictures_may_come_as_data_urls_and_jpeg():
    jpeg = b64(picture(), "JPEG")
    request = parse({"prompt": "cat", "image": "data:image/jpeg;base64," + jpeg}).validated(IMAGE_CAPS)
    assert request.mode == "img2img" and request.image.size == (64, 64)


def truncated_png() -> str:
    data = base64.b64decode(b64(picture()))
    return base64.b64encode(data[: len(data) // 2]).decode()


def enormous_png() -> str:
    """A small file that declares more pixels than the limit (a decompression bomb's shape)."""
    return b64(Image.new("L", (5000, 4000)))


@pytest.mark.parametrize("payload, field, expected", [
    ({"image": "not base64!"}, "image", "image: is not base64 text of a PNG or JPEG file"),
    ({"image": base64.b64encode(b"just some text, not a picture").decode()}, "image",
     "image: is not a PNG, JPEG or WebP image"),
    ({"image": "TRUNCATED"}, "image", "image: the image file is corrupt or truncated"),
    ({"image": "ENORMOUS"}, "image", "image: 5000x4000 is too large"),
    ({"image": 5}, "image", "image: must be a string, the base64 text of a PNG or JPEG file, not the number 5"),
    ({"image": "IMAGE", "mask": "SMALL_MASK"}, "mask", "mask: 32x48 does not match the image's 64x64"),
    ({"image": "IMAGE", "mask": "BLACK_MASK"}, "mask", "mask: is empty (all black)"),
    ({"image": "IMAGE", "parameters": {"strength": 1.5}}, "strength", "strength: 1.5 is out of range"),
    ({"image": "IMAGE", "parameters": {"strength": -0.1}}, "strength", "strength: -0.1 is out of range"),
    ({"image": "IMAGE", "parameters": {"strength": "high"}}, "strength",
     "parameters.strength: must be a number, not the string 'high'"),
    ({"image": "IMAGE", "parameters": {"mask_blur": 500}}, "mask_blur", "mask_blur: 500 is out of range"),
    ({"image": "IMAGE", "parameters": {"resize_mode": "zoom"}}, "resize_mode", "resize_mode: 'zoom' is not known"),
    ({"image": "IMAGE", "parameters": {"mode": "sketch"}}, "mode", "mode: 'sketch' is not known"),
    ({"image": "IMAGE", "parameters": {"mode": "inpaint"}}, "mask", "mask: Inpaint needs an input mask"),
    ({"image": "IMAGE", "parameters": {"mode": "txt2img"}}, "image", "image: Text to image (txt2img) takes no"),
    ({"parameters": {"mode": "img2img"}}, "image", "image: Image to image needs an input image"),
    ({"images": "IMAGE"}, "images", "images: not a known field"),
    ({"image": "IMAGE", "parameters": {"denoising_strength": 0.5}}, "denoising_strength",
     "denoising_strength: is the hires fix's (text to image); Image to image's is strength"),
])
def test_bad_pictures_and_image_parameters_are_refused_naming_the_field(payload, field, expected):
    stand_ins = {"IMAGE": b64(picture()), "TRUNCATED": truncated_png(), "ENORMOUS": enormous_png(),
                 "SMALL_MASK": b64(centred_mask(32, 48)), "BLACK_MASK": b64(Image.new("L", (64, 64)))}
    payload = {"prompt": "cat", **{k: stand_ins.get(v, v) if isinstance(v, str) else v for k, v in payload.items()}}
    with pytest.raises(InvalidRequest) as err:
        parse(payload).validated(IMAGE_CAPS)
    assert err.value.field == field
    assert str(err.value).startswith(expected), str(err.value)


def test_an_image_mode_the_backend_does_not_offer_is_refused_naming_the_mode():
    with pytest.raises(InvalidRequest, match=r"^mode: Image to image \(img2img\) is not available on this backend; "
                                             r"it offers Text to image \(txt2img\)") as err:
        parse({"prompt": "cat", "image": b64(picture())}).validated(CAPS)  # CAPS: txt2img only
    assert err.value.field == "mode"


def test_the_client_refuses_a_body_over_sagemakers_limit_naming_the_largest_picture():
    image = "A" * (7 * 1024 * 1024)
    payload = {"prompt": "cat", "image": image, "mask": "B" * 1000}
    body = json.dumps(payload).encode()
    with pytest.raises(InvalidRequest, match=r"^image: the request would be 7\.0 MB; SageMaker accepts at most 6 MB "
                                             r"per request\.") as err:
        protocol.check_body_to_send(body, payload)
    assert err.value.field == "image"
    protocol.check_body_to_send(json.dumps({"prompt": "cat", "image": "A" * 1000}).encode(), payload)
