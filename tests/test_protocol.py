"""The endpoint wire format (backend/protocol.py): requests, answers, attributes, errors."""

from __future__ import annotations

import base64
import json

import pytest

from backend import BackendUnavailable, Capabilities, GenerationFailed, GenerationRequest, InvalidRequest
from backend import protocol

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
    protocol.check_request_size(protocol.MAX_REQUEST_BYTES)
    with pytest.raises(InvalidRequest, match=f"^body: {protocol.MAX_REQUEST_BYTES + 1} bytes; at most"):
        protocol.check_request_size(protocol.MAX_REQUEST_BYTES + 1)


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
