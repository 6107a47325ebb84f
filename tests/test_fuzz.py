"""Property tests: request validation, the infotext writer/parser, and the endpoint's wire protocol.

Each property runs a bounded number of examples so the file takes seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.sagemaker import protocol
from backend.core.api import MAX_SEED, Capabilities, GenerationRequest
from backend.core.errors import InvalidRequest
from backend.core.metadata import NEGATIVE, attach, parse_infotext, png_bytes, read_infotext, write_infotext
from backend.core.schedulers import SCHEDULERS
from helpers import NarrowedBackend

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest))

FREE = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32", "bf16"))
FIXED = Capabilities(backend="neuron", model="sd21", device="inf2", precisions=("bf16", "fp32"),
                     fixed_sizes=((512, 512), (768, 768)), default_size=(512, 512))

# Text as JSON can carry it: any code point, unpaired surrogates included ("\ud800" is valid JSON).
any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))
any_text = st.text(alphabet=any_char, max_size=40)
# What a client can put in any field of a JSON request, and a few things only Python callers can.
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), any_text,
    st.integers(-10, 5000).map(str), st.floats(-5, 120).map(repr),  # numbers as strings
    st.integers(10**300, 10**400), st.integers(10**300, 10**400).map(lambda i: -i),  # past float range
    st.text(max_size=3000),  # long text
)
any_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=4,
)


def _check_normalized(req: GenerationRequest, caps: Capabilities) -> None:
    assert isinstance(req.prompt, str) and req.prompt.strip() and len(req.prompt) <= caps.max_prompt_chars
    assert isinstance(req.negative_prompt, str) and len(req.negative_prompt) <= caps.max_prompt_chars
    (req.prompt + req.negative_prompt).encode("utf-8")  # every later stage (tokenizer, PNG, HTTP) needs this
    for name in ("steps", "seed", "num_images", "width", "height"):
        assert type(getattr(req, name)) is int, name
    assert caps.min_steps <= req.steps <= caps.max_steps
    assert -1 <= req.seed <= MAX_SEED
    assert 1 <= req.num_images <= caps.max_images
    assert type(req.guidance_scale) is float and 0.0 <= req.guidance_scale <= caps.max_guidance
    assert req.scheduler in caps.schedulers and req.precision in caps.precisions
    if caps.fixed_sizes:
        assert (req.width, req.height) in caps.fixed_sizes
    else:
        assert caps.min_size <= req.width <= caps.max_size and req.width % caps.size_multiple == 0
        assert caps.min_size <= req.height <= caps.max_size and req.height % caps.size_multiple == 0
    assert req.validated(caps) == req  # normalizing twice changes nothing


def _check_invalid(exc: InvalidRequest) -> None:
    message = str(exc)
    assert exc.field in FIELDS, exc.field
    assert message.startswith(exc.field) or message.startswith("width/height:"), message
    # Whatever a client sent, the message a person sees stays short.
    assert len(message) < 600, message[:200]


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional={name: any_value for name in FIELDS}),
       caps=st.sampled_from([FREE, FIXED]))
@example(fields={"prompt": "cat", "guidance_scale": 10**400}, caps=FREE)  # float() overflowed
@example(fields={"prompt": "cat \ud800"}, caps=FREE)  # crashed the tokenizer, after validation
@example(fields={"prompt": "cat", "negative_prompt": "\udfff"}, caps=FREE)
@example(fields={"prompt": "cat", "scheduler": "x" * 100_000}, caps=FREE)  # echoed in full
@example(fields={"prompt": "cat", "seed": 10**5000}, caps=FREE)  # str() of it raises ValueError
@example(fields={"prompt": "cat", "precision": [10**400] * 10}, caps=FIXED)
def test_any_request_validates_or_names_the_field(fields, caps):
    """Any values at all: a normalized request, or InvalidRequest naming the field; nothing else."""
    fields.setdefault("prompt", "a lovely cat")
    try:
        req = GenerationRequest(**fields).validated(caps)
    except InvalidRequest as exc:
        _check_invalid(exc)
    else:
        _check_normalized(req, caps)


@FUZZ
@given(
    prompt=st.text(min_size=1, max_size=200).filter(str.strip),
    negative=st.one_of(st.none(), st.text(max_size=100)),
    steps=st.one_of(st.integers(1, 100), st.integers(1, 100).map(float), st.integers(1, 100).map(str)),
    guidance=st.one_of(st.floats(0, 30), st.integers(0, 30), st.floats(0, 30).map(repr)),
    seed=st.one_of(st.integers(-1, MAX_SEED), st.integers(-1, MAX_SEED).map(str)),
    scheduler=st.sampled_from(["dpm++2m", "DPM++ 2M", " euler-a ", "Euler a", "UniPC", "ddim"]),
    precision=st.sampled_from([None, "", "fp32", "bf16"]),
    size=st.one_of(st.none(), st.integers(8, 128).map(lambda k: k * 8)),
    num_images=st.one_of(st.integers(1, 4), st.integers(1, 4).map(float)),
)
def test_sensible_values_are_accepted_and_normalized(prompt, negative, steps, guidance, seed, scheduler,
                                                     precision, size, num_images):
    """Values a form or a JSON client sends (numbers as floats or strings, display names) all work."""
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance,
                            seed=seed, scheduler=scheduler, precision=precision, width=size, height=size,
                            num_images=num_images)
    out = req.validated(FREE)
    _check_normalized(out, FREE)
    assert out.steps == int(float(steps)) and out.seed == int(seed) and out.num_images == int(num_images)
    assert out.width == (size or 512) and out.precision == (precision or "fp32")


def test_regressions_name_the_field():
    """The inputs the fuzzer found, as plain cases: each is refused with its field named."""
    cases = {
        "guidance_scale": dict(guidance_scale=10**400),
        "prompt": dict(prompt="a cat \ud800"),
        "negative_prompt": dict(negative_prompt="\ud83d"),
        "scheduler": dict(scheduler="<b>x</b>" * 10_000),
        "seed": dict(seed=10**5000),
    }
    for field, kwargs in cases.items():
        with pytest.raises(InvalidRequest) as info:
            GenerationRequest(**{"prompt": "cat", **kwargs}).validated(FREE)
        assert info.value.field == field
        _check_invalid(info.value)


# --- infotext -------------------------------------------------------------------------------------

INFOTEXT_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Precision", "Backend", "Latency")


def _no_negative_line(text: str) -> bool:
    # A1111's format cannot tell a prompt line starting with "Negative prompt:" from the negative
    # prompt itself (metadata.py says so); every other prompt must come back exactly.
    return not any(line.startswith(NEGATIVE) for line in text.split("\n"))


@FUZZ
@given(prompt=st.text(max_size=300).filter(_no_negative_line), negative=st.text(max_size=200),
       values=st.lists(st.text(max_size=30), min_size=len(INFOTEXT_KEYS), max_size=len(INFOTEXT_KEYS)))
@example(prompt="a, b: c\n\"quoted\"\nSteps: 1, Sampler: x, Seed: 2", negative="n1\nn2", values=["1"] * 9)
@example(prompt="", negative="", values=["", " x ", ",", ":", '"', "\n", "\\", '\\"', "a: b, c: d"])
def test_infotext_round_trip(prompt, negative, values):
    """write_infotext then parse_infotext gives back prompt, negative prompt and every parameter."""
    params = dict(zip(INFOTEXT_KEYS, values))
    parsed = parse_infotext(write_infotext(prompt, negative, params))
    assert parsed == {"prompt": prompt, "negative_prompt": negative, "params": params}


@FUZZ
@given(prompt=st.text(min_size=1, max_size=500).filter(_no_negative_line), negative=st.text(max_size=100),
       level=st.sampled_from([0, 1]), mode=st.sampled_from(["RGB", "RGBA"]))
@example(prompt="\x00nul and \u00e9 Latin-1", negative="", level=0, mode="RGB")  # tEXt
@example(prompt="\u732b \U0001f431 cat", negative="\u202eRTL", level=0, mode="RGB")  # iTXt
def test_infotext_survives_a_real_png(prompt, negative, level, mode):
    """Through PNG bytes (our stored writer at level 0, Pillow at 1) and back, with any unicode prompt."""
    params = {"Steps": 20, "Seed": 42, "Size": "16x8", "Model": "tiny"}
    text = write_infotext(prompt, negative, params)
    image = attach(Image.new(mode, (16, 8), (200, 10, 30, 255)[: len(mode)]), text)
    data = png_bytes(image, level)
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        assert decoded.size == (16, 8) and decoded.mode == mode
        assert decoded.getpixel((3, 3))[:3] == (200, 10, 30)
    assert read_infotext(data) == text
    parsed = parse_infotext(read_infotext(data))
    assert (parsed["prompt"], parsed["negative_prompt"]) == (prompt, negative)
    assert parsed["params"] == {k: str(v) for k, v in params.items()}


# --- wire protocol: the endpoint's handler (serving/handler.py) with any body ------------------------

@pytest.fixture(scope="module")
def endpoint_handler(tiny_backend):
    from serving.handler import Handler

    # Only 64x64, 2 steps and 1 image, so that the valid requests the fuzzer makes run in milliseconds;
    # everything else is the real pipeline.
    return Handler(NarrowedBackend(tiny_backend, max_steps=2, max_size=64, default_size=(64, 64), max_images=1))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400),
              st.floats(allow_nan=False, allow_infinity=False), any_text, st.sampled_from(["dpm++2m", "fp32"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=6,
)
wire_parameters = st.dictionaries(st.one_of(st.sampled_from(sorted(protocol.PARAMETERS)), any_text),
                                  st.one_of(json_values, st.integers(-2, 70)), max_size=6)
wire_objects = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(any_text, json_values), "negative_prompt": st.one_of(any_text, json_values),
    "parameters": st.one_of(wire_parameters, json_values), "describe": json_values,
})
near_valid = st.fixed_dictionaries({  # mostly runnable on the narrowed backend, now and then one field off
    "prompt": st.text(min_size=1, max_size=30),
    "parameters": st.fixed_dictionaries({"num_inference_steps": st.sampled_from([1, 2, 2, 2, 0, 3])}, optional={
        "guidance_scale": st.floats(0, 30), "seed": st.one_of(st.integers(-1, MAX_SEED), st.just(MAX_SEED + 1)),
        "height": st.sampled_from([64, 64, 64, 63]), "width": st.sampled_from([64, 64, 64, 72]),
        "scheduler": st.sampled_from([*SCHEDULERS, "DPM++ 2M", "nope"]),
        "precision": st.sampled_from(["fp32", "bf16", None, "fp16"]),
        "num_images_per_prompt": st.sampled_from([1, 1, 0]),
    }),
}, optional={"negative_prompt": st.text(max_size=20)})
bodies = st.one_of(
    near_valid.map(lambda v: json.dumps(v).encode()),  # requests that mostly run
    st.binary(max_size=300),  # not even text
    json_values.map(lambda v: json.dumps(v).encode()),  # any JSON at all
    wire_objects.map(lambda v: json.dumps(v).encode()),  # the shape of a request, any values
    st.dictionaries(any_text, json_values, max_size=3).map(lambda v: json.dumps(v).encode()),
)
header_values = st.one_of(st.none(), st.just("application/json"),
                          st.sampled_from(["image/png", "*/*", "text/plain", "application/json; charset=utf-8",
                                           "image/*;q=0", "application/json;q=0.5, image/png"]),
                          st.text(max_size=30))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=header_values, accept=header_values)
@example(body=json.dumps({"prompt": "cat \ud800"}).encode(), content_type=None, accept=None)
@example(body=json.dumps({"prompt": "cat", "parameters": {"guidance_scale": 10**400}}).encode(),
         content_type=None, accept=None)
@example(body=b'{"prompt": "cat", "parameters": {"seed": 1' + b"0" * 5000 + b"}}", content_type=None, accept=None)
@example(body=b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", content_type=None, accept=None)  # was a 500
@example(body=json.dumps({"prompt": "cat", "parameters": {"num_inference_steps": 2, "height": 64,
                                                          "width": 64}}).encode(),
         content_type="application/json", accept="application/json")
def test_endpoint_answers_any_body_with_a_result_or_a_clean_4xx(endpoint_handler, body, content_type, accept):
    """Any bytes, any JSON, any headers: 200 with images, or a 4xx/429/503 JSON error; never a 500."""
    headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v is not None}
    answer = endpoint_handler.handle(body, headers)
    event(f"status {answer.status}")
    if answer.status == 200:
        if answer.content_type == protocol.PNG:
            assert answer.body.startswith(b"\x89PNG")
        else:
            data = json.loads(answer.body)
            assert "images" in data or "precisions" in data  # an answer or a describe
        return
    assert answer.status in (400, 406, 411, 413, 415, 429, 503), (answer.status, answer.body[:300])
    error = json.loads(answer.body)
    assert error["code"] == answer.status and error["message"] in protocol.STATUS_OF_KIND
    assert "Traceback" not in error["error"] and 'File "' not in error["error"]
    assert len(error["error"]) < 1000, error["error"][:200]


@FUZZ
@given(prompt=st.text(min_size=1, max_size=100).filter(str.strip), negative=st.text(max_size=50),
       steps=st.integers(1, 100), seed=st.integers(-1, MAX_SEED), size=st.integers(8, 128).map(lambda k: k * 8),
       guidance=st.floats(0, 30), scheduler=st.sampled_from(sorted(FREE.schedulers)))
def test_wire_request_round_trip(prompt, negative, steps, seed, size, guidance, scheduler):
    """What the SageMaker client sends is what the endpoint reads back, field for field."""
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, seed=seed, width=size,
                                height=size, guidance_scale=guidance, scheduler=scheduler,
                                precision="fp32").validated(FREE)
    wire = json.loads(json.dumps(protocol.request_to_json(request)))
    assert protocol.request_from_json(wire).validated(FREE) == request
