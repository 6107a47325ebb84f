"""Request validation: every bad field gets a message naming the field and what is allowed."""

import math

import pytest

from backend.core.api import Capabilities, GenerationRequest, Timings
from backend.core.errors import InvalidRequest

CAPS = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32", "bf16"))
FIXED = Capabilities(backend="neuron", model="tiny", device="neuron", precisions=("bf16",),
                     fixed_sizes=((512, 512),))


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   \n\t"}, "prompt", "must not be empty"),
        ({"prompt": None}, "prompt", "must not be empty"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"negative_prompt": 5}, "negative_prompt", "must be text"),
        ({"steps": 0}, "steps", "from 1 to 100"),
        ({"steps": 101}, "steps", "from 1 to 100"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"steps": "many"}, "steps", "whole number"),
        ({"steps": True}, "steps", "whole number"),
        ({"steps": math.nan}, "steps", "whole number"),
        ({"guidance_scale": -1}, "guidance_scale", "from 0 to 30"),
        ({"guidance_scale": math.inf}, "guidance_scale", "from 0 to 30"),
        ({"guidance_scale": "high"}, "guidance_scale", "number"),
        ({"seed": "abc"}, "seed", "whole number from -1 to 4294967295"),
        ({"seed": 1.5}, "seed", "whole number"),
        ({"seed": -2}, "seed", "out of range"),
        ({"seed": 2**32}, "seed", "out of range"),
        ({"scheduler": "plms"}, "scheduler", "DPM++ 2M (dpm++2m)"),
        ({"scheduler": 3}, "scheduler", "choose one of"),  # None: the default (the first offered)
        ({"precision": "fp16"}, "precision", "fp32, bf16"),
        ({"precision": "int8"}, "precision", "fp32, bf16"),
        ({"width": 513}, "width", "multiple of 8"),
        ({"height": 500}, "height", "multiple of 8"),
        ({"width": 32}, "width", "from 64 to 1024"),
        ({"height": 2048}, "height", "from 64 to 1024"),
        ({"num_images": 0}, "num_images", "from 1 to 4"),
        ({"num_images": 5}, "num_images", "from 1 to 4"),
    ],
)
def test_bad_input_names_the_field(changes, field, words):
    request = GenerationRequest(**{"prompt": "a lovely cat", **changes})
    with pytest.raises(InvalidRequest) as info:
        request.validated(CAPS)
    assert info.value.field == field
    assert str(info.value).startswith(field) or str(info.value).startswith("width/height")
    assert words in str(info.value)


def test_defaults_and_normalization():
    r = GenerationRequest("cat", steps="30", seed="7", scheduler="Euler a", width=None,
                          guidance_scale="5").validated(CAPS)
    assert (r.steps, r.seed, r.scheduler, r.precision, r.width, r.height, r.guidance_scale) == (
        30, 7, "euler-a", "fp32", 512, 512, 5.0)
    assert GenerationRequest("cat", steps=20.0).validated(CAPS).steps == 20


def test_fixed_size_backend_names_what_is_compiled():
    with pytest.raises(InvalidRequest, match="compiled for 512x512 only"):
        GenerationRequest("cat", width=768, height=768).validated(FIXED)
    assert GenerationRequest("cat").validated(FIXED).width == 512


def test_image_seeds_are_consecutive_and_wrap():
    assert GenerationRequest("cat", num_images=3).image_seeds(10) == [10, 11, 12]
    assert GenerationRequest("cat", num_images=2).image_seeds(2**32 - 1) == [2**32 - 1, 0]


def test_capabilities_and_timings_round_trip():
    assert Capabilities.from_dict(FIXED.to_dict()) == FIXED
    t = Timings(total_ms=10, text_encoder_ms=1, denoise_ms=8, step_ms=[4, 4], vae_ms=1, server_ms=7)
    back = Timings.from_dict(t.to_dict())
    assert back == t and back.network_ms == 3
