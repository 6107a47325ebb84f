"""A1111 prompt emphasis (backend/core/emphasis.py, applied in backend/inprocess/pipeline.py): the parser against
A1111's own documented examples, pixels against embeddings weighted by hand on the tiny model (its text encoder's
final LayerNorm given a bias: model_dir says why), plain prompts unchanged, --emphasis off, a few-step model, and
the same pixels from the neuron backend (CPU stand-in) and the endpoint (serving/server.py in its own process)."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationRequest, InvalidRequest, Settings, create_backend
from backend.core import emphasis
from backend.core.metadata import parse_infotext
from backend.core.schedulers import scheduler_class_and_overrides
from backend.core.settings import InProcessSettings, LocalSettings, NeuronSettings
from backend.inprocess import pipeline
from backend.inprocess.prompts import truncation_warnings, weighted_tokens
from backend.models.tiny import build_pipeline
from helpers import free_port, run_process

SIZE = 64
FAST = dict(steps=4, width=SIZE, height=SIZE)
SQUARE = 1 / 1.1
# An emphasised prompt and negative prompt, and the runs A1111's rules make of them, written out by hand.
# (A strong weight: on the tiny model's random weights a token's weight moves the pixels less than on a real one.)
PROMPT, PROMPT_RUNS = "a (lovely:3) cat, [[ugly]]", [("a ", 1.0), ("lovely", 3.0), (" cat, ", 1.0),
                                                     ("ugly", 1.0 * SQUARE * SQUARE)]
NEGATIVE, NEGATIVE_RUNS = "(blurry)", [("blurry", 1.1)]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---- the parser: A1111's docstring examples (modules/prompt_parser.py, parse_prompt_attention) ------------------

# Each pair is a `>>>` example of A1111's docstring and the answer it prints (at commit 28bd8e14 of
# AUTOMATIC1111/stable-diffusion-webui), lists turned to tuples.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, runs", A1111_EXAMPLES, ids=[t for t, _ in A1111_EXAMPLES])
def test_the_parser_gives_a1111s_documented_answers(text, runs):
    assert emphasis.parse(text) == runs  # == on floats: the same products in the same order, to the last bit


@pytest.mark.parametrize("text, runs", [
    ("", [("", 1.0)]),
    ("a [b] c", [("a ", 1.0), ("b", SQUARE), (" c", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("(cat : 1.2)", [("cat ", 1.2)]),  # spaces around the number, as A1111's pattern allows
    ("(a:-0.5)", [("a", -0.5)]),
    ("a:1.2) b) c]", [("a:1.2) b) c]", 1.0)]),  # closers with nothing open, and a lone colon: text
    ("\\(a\\) \\[b\\] \\\\", [("(a) [b] \\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped, as A1111 drops it
    ("[a (b] c)", [("a ", SQUARE), ("b", SQUARE * 1.1), (" c", 1.1)]),  # each kind closes its own
    ("a BREAK b", [("a BREAK b", 1.0)]),  # one 77-token window here: BREAK is text
])
def test_the_parser_on_escapes_nesting_and_stray_brackets(text, runs):
    parsed = emphasis.parse(text)
    assert [t for t, _ in parsed] == [t for t, _ in runs]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in runs])


def test_a_weight_that_is_no_number_is_refused_naming_the_field(tiny_backend):
    with pytest.raises(InvalidRequest, match=r"negative_prompt: ':1\.2\.3\)' is not a weight"):
        tiny_backend.generate(GenerationRequest("cat", negative_prompt="(dog:1.2.3)", seed=1, **FAST))
    assert emphasis.parse("dog:1.2.3)") == [("dog:1.2.3)", 1.0)]  # nothing open: text, as A1111 leaves it


# ---- the setting ---------------------------------------------------------------------------------------

def test_emphasis_is_on_by_default_and_the_flag_and_variable_turn_it_off():
    assert Settings.from_args([], env={}).emphasis is True
    assert Settings.from_args(["--emphasis", "off"], env={}).emphasis is False
    assert Settings.from_args([], env={"SD_EMPHASIS": "off"}).emphasis is False
    assert Settings.from_args(["--emphasis", "on"], env={"SD_EMPHASIS": "off"}).emphasis is True
    with pytest.raises(SystemExit):
        Settings.from_args(["--emphasis", "maybe"], env={})
    off = Settings(emphasis=False)
    assert not InProcessSettings.of(off).emphasis and not LocalSettings.of(off).emphasis
    assert not NeuronSettings.of(off).emphasis


def test_the_deployed_endpoint_reads_it_from_endpoint_json_and_its_environment(tmp_path):
    from serving.inference import settings_from_config

    assert settings_from_config(tmp_path, {}, env={}).emphasis is True
    assert settings_from_config(tmp_path, {"emphasis": False}, env={}).emphasis is False
    assert settings_from_config(tmp_path, {"emphasis": False}, env={"SD_EMPHASIS": "on"}).emphasis is True


# ---- tokens: the same 77-token window as diffusers' ------------------------------------------------------

@pytest.mark.parametrize("text", ["", "a lovely cat", "a lovely cat, " * 40 + "dragon"])
def test_plain_runs_give_the_tokenizers_own_window(text):
    tokenizer = build_pipeline().tokenizer
    ids, weights = weighted_tokens(tokenizer, [(text, 1.0)])
    # What diffusers' encode_prompt asks the tokenizer for.
    want = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    assert ids == want and weights == [1.0] * 77


def test_a_long_emphasised_prompt_warns_with_its_dropped_words():
    tokenizer = build_pipeline().tokenizer
    request = GenerationRequest("(a lovely:1.2) cat, " * 40 + "(purple dragon:1.3)", **FAST)
    [warning] = truncation_warnings(tokenizer, request, emphasis_on=True)
    assert warning.startswith("prompt: longer than the text encoder's 77 tokens")
    assert warning.endswith('a lovely cat, purple dragon"') and "(" not in warning and ":1.2" not in warning


# ---- pixels ------------------------------------------------------------------------------------------------

# The tiny model's text encoder ends in a LayerNorm at its initial weights (scale 1, bias 0), so every token's
# embedding has mean 0, the whole output's mean is ~1e-9, and restoring it divides rounding noise by rounding noise
# (the images come out NaN). A trained encoder's final LayerNorm has a learned bias; this model gets a random one,
# so that A1111's mean restore means here what it means on a real model.
BIAS_SEED = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny model, its text encoder's final LayerNorm given a bias, saved as a diffusers folder."""
    pipe = build_pipeline()
    norm = dict(pipe.text_encoder.named_modules())["final_layer_norm"]
    with torch.no_grad():
        norm.bias.copy_(0.3 + 0.5 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(BIAS_SEED)))
    path = tmp_path_factory.mktemp("emphasis") / "tiny-biased"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eager_backend(model_dir):
    """That model with --optimize none: the plain diffusers modules, for pixel-exact comparisons."""
    backend = create_backend(Settings(backend="local", model=str(model_dir), device="cpu", optimize="none"))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def plain_text_backend(model_dir):
    backend = create_backend(Settings(backend="local", model=str(model_dir), device="cpu", optimize="none",
                                      emphasis=False))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def bare(model_dir):
    """A fresh plain diffusers pipeline of that model with the backend's scheduler (as tests/test_modes.py makes its
    references), loaded as the backend loads it (load_pipeline drops requires_grad: docs/architecture.md)."""
    def make(scheduler: str = "dpm++2m"):
        pipe = pipeline.load_pipeline(str(model_dir), torch.float32)
        cls, overrides = scheduler_class_and_overrides(scheduler)
        pipe.scheduler = cls.from_config({**pipe.scheduler.config, "steps_offset": 1}, **overrides)
        return pipe
    return make


def differ(a, b) -> bool:
    """Other pictures, not the same one rounded otherwise: float rounding moves a few pixels by one level (a mean
    under 0.05, tests/test_local.py), a changed prompt moves them by more than 0.3 on average."""
    return np.abs(pixels(a) - pixels(b)).mean() > 0.3


def an_image(image) -> np.ndarray:
    """The pixels, checked to be a picture: NaN latents come out as one flat colour, which equals any other."""
    values = pixels(image)
    assert values.std() > 5, "a flat image: the generation went NaN"
    return values


def by_hand(pipe, runs) -> torch.Tensor:
    """A1111's "Original" emphasis written out on the tiny model: each run tokenized alone, BOS + 75 + EOS + padding,
    the text encoder's output times each token's weight, then scaled back to the unweighted output's mean."""
    tokenizer = pipe.tokenizer
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in runs:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    ids, weights = ids + [tokenizer.eos_token_id], weights + [1.0]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor([ids]))[0].float()
    weighted = z * torch.tensor(weights).reshape(1, 77, 1)
    return weighted * (z.mean() / weighted.mean())


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_emphasis_gives_what_weighted_embeddings_by_hand_give(eager_backend, bare):
    ours = eager_backend.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=5, num_images=2, **FAST))
    pipe = bare()
    want = pipe(prompt_embeds=by_hand(pipe, PROMPT_RUNS), negative_prompt_embeds=by_hand(pipe, NEGATIVE_RUNS),
                num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, num_images_per_prompt=2,
                generator=generators(5, 2)).images
    for got, expected in zip(ours.images, want):
        assert np.array_equal(an_image(got), pixels(expected))
    # Without the weights (the same words, plain): other pixels.
    plain = eager_backend.generate(GenerationRequest("a lovely cat, ugly", negative_prompt="blurry", seed=5,
                                                     num_images=2, **FAST))
    assert differ(an_image(plain.images[0]), ours.images[0])
    # The infotext keeps the prompt as typed.
    info = parse_infotext(ours.infotexts[0])
    assert (info["prompt"], info["negative_prompt"]) == (PROMPT, NEGATIVE)


def test_a_weight_on_one_side_only_keeps_the_other_sides_plain_encoding(eager_backend, bare):
    ours = eager_backend.generate(GenerationRequest("a lovely cat", negative_prompt=NEGATIVE, seed=6, **FAST))
    pipe = bare()
    want = pipe("a lovely cat", negative_prompt_embeds=by_hand(pipe, NEGATIVE_RUNS), num_inference_steps=4,
                guidance_scale=7.5, height=SIZE, width=SIZE, generator=generators(6, 1)).images[0]
    assert np.array_equal(an_image(ours.images[0]), pixels(want))
    ours = eager_backend.generate(GenerationRequest(PROMPT, negative_prompt="blurry", seed=6, **FAST))
    want = pipe(prompt_embeds=by_hand(pipe, PROMPT_RUNS), negative_prompt="blurry", num_inference_steps=4,
                guidance_scale=7.5, height=SIZE, width=SIZE, generator=generators(6, 1)).images[0]
    assert np.array_equal(an_image(ours.images[0]), pixels(want))


def test_a_prompt_without_emphasis_takes_the_untouched_path(eager_backend, plain_text_backend, bare, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a prompt without emphasis was weighted")

    monkeypatch.setattr(pipeline, "emphasised_embeds", never)
    request = GenerationRequest("a lovely cat", negative_prompt="blurry", seed=3, num_images=2, **FAST)
    ours, off = eager_backend.generate(request), plain_text_backend.generate(request)
    want = bare()("a lovely cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                  width=SIZE, num_images_per_prompt=2, generator=generators(3, 2)).images
    for got, got_off, expected in zip(ours.images, off.images, want):
        assert np.array_equal(an_image(got), pixels(expected)) and np.array_equal(pixels(got_off), pixels(expected))
    # Escapes alone weigh nothing: the same path, with the literal characters A1111 would send.
    escaped = eager_backend.generate(GenerationRequest("a \\(lovely\\) cat", seed=3, **FAST))
    want = bare()("a (lovely) cat", num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE,
                  generator=generators(3, 1)).images[0]
    assert np.array_equal(an_image(escaped.images[0]), pixels(want))


def test_emphasis_off_sends_the_syntax_to_the_tokenizer_as_text(plain_text_backend, eager_backend, bare):
    off = plain_text_backend.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=4, **FAST))
    want = bare()(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                  width=SIZE, generator=generators(4, 1)).images[0]
    assert np.array_equal(an_image(off.images[0]), pixels(want))
    on = eager_backend.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=4, **FAST))
    assert differ(an_image(on.images[0]), off.images[0])


def test_a_few_step_model_weights_its_prompt_without_a_negative_one(model_dir):
    backend = create_backend(Settings(backend="local", model=str(model_dir), device="cpu", optimize="none",
                                      few_step="turbo"))
    try:
        assert backend.capabilities().guidance is False
        pipe = backend._pipelines["fp32"]
        encoded = []
        hook = pipe.text_encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
        try:
            result = backend.generate(GenerationRequest(PROMPT, seed=2, steps=1, width=SIZE, height=SIZE))
        finally:
            hook.remove()
        assert encoded == [1]  # the prompt only: no guidance, no negative prompt
        # The pipeline now holds the turbo scheduler that the run used; diffusers runs no CFG at guidance 0.
        want = pipe(prompt_embeds=by_hand(pipe, PROMPT_RUNS), num_inference_steps=1, guidance_scale=0.0,
                    height=SIZE, width=SIZE, generator=generators(2, 1)).images[0]
        assert np.array_equal(an_image(result.images[0]), pixels(want))
    finally:
        backend.close()


# ---- every backend: the same pixels -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emphasis_root(model_dir, tmp_path_factory) -> Path:
    """That model traced for the CPU (the Neuron stand-in) by compile.py, fp32 and bf16, at SIZE x SIZE."""
    from compile_scripts.compile import main

    root = tmp_path_factory.mktemp("emphasis-root") / "root"
    assert main(["--model", str(model_dir), "--target", "cpu", "--out", str(root), "--dtype", "fp32", "bf16",
                 "--height", str(SIZE), "--width", str(SIZE)]) == 0
    return root


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_the_neuron_stand_in_gives_the_local_pixels(emphasis_root, guidance):
    """The compiled text encoder (a traced part with a fixed batch, behind NeuronTextEncoder) runs the plain token
    ids; the weighting is the same code after it, so the images are local's up to the traced parts' rounding (one
    level, as tests/test_neuron.py's test_generate_matches_local_backend_fp32 allows)."""
    neuron = create_backend(Settings(backend="neuron", artifacts=str(emphasis_root)))
    local = create_backend(Settings(backend="local", model=str(emphasis_root), device="cpu"))
    try:
        request = GenerationRequest(PROMPT, negative_prompt=NEGATIVE if guidance > 1 else "", steps=3, seed=11,
                                    precision="fp32", guidance_scale=guidance, num_images=2, width=SIZE, height=SIZE)
        ours, theirs = neuron.generate(request), local.generate(request)
        for image in ours.images:
            an_image(image)
        # PNG pixels: at most one level apart where a value sits on a rounding boundary.
        assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1
        plain = neuron.generate(GenerationRequest("a lovely cat, ugly", steps=3, seed=11, precision="fp32",
                                                  guidance_scale=guidance, width=SIZE, height=SIZE))
        assert differ(an_image(plain.images[0]), ours.images[0])
        # bf16 too: the weighting casts back to the compiled encoder's dtype, which the parts' guards check.
        bf16 = neuron.generate(GenerationRequest(PROMPT, steps=1, seed=11, precision="bf16", guidance_scale=guidance,
                                                 width=SIZE, height=SIZE))
        an_image(bf16.images[0])
    finally:
        local.close()
        neuron.close()


def test_the_endpoint_gives_the_local_pixels(model_dir, tmp_path):
    """`python -m serving.server` (its own process, default settings: emphasis on) answers what a local backend of
    the same settings makes here."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    payload = {"prompt": PROMPT, "negative_prompt": NEGATIVE,
               "parameters": {"num_inference_steps": 3, "height": SIZE, "width": SIZE, "seed": 42}}
    with run_process(["-m", "serving.server", "--model", str(model_dir), "--device", "cpu", "--port", str(port)],
                     url + "/ping", log_path=tmp_path / "endpoint.log"):
        call = urllib.request.Request(url + "/invocations", data=json.dumps(payload).encode(),
                                      headers={"Content-Type": "application/json", "Accept": "image/png"})
        with urllib.request.urlopen(call, timeout=120) as answer:
            served = Image.open(io.BytesIO(answer.read()))
            served.load()
    local = create_backend(Settings(backend="local", model=str(model_dir), device="cpu"))
    try:
        direct = local.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, steps=3, seed=42, width=SIZE,
                                                  height=SIZE))
    finally:
        local.close()
    assert np.array_equal(an_image(served.convert("RGB")), pixels(direct.images[0]))
    assert parse_infotext(served.text["parameters"])["prompt"] == PROMPT


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "attention-mask"])
def test_weights_of_one_give_diffusers_own_encoding(mask):
    """emphasised_embeds runs the text encoder as diffusers' encode_prompt does (the same ids, the attention mask
    where the config asks for one), so weights of 1.0 give its output to the last bit."""
    pipe = build_pipeline()
    pipe.text_encoder.config.use_attention_mask = mask
    text = "a lovely cat, " * 30  # past the window too
    ours = pipeline.emphasised_embeds(pipe, [(text, 1.0)], torch.device("cpu"))
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(text, torch.device("cpu"), 1, False)
    assert torch.equal(ours, theirs)


def test_the_built_in_tiny_model_gives_a_picture_with_emphasis(tiny_backend):
    """The tiny model's text encoder output is centred on zero (its final LayerNorm at bias 0): A1111's mean restore
    would divide rounding noise by rounding noise and the latents go NaN (a flat image). There the weighted output is
    kept as it is (pipeline.emphasised_embeds), so `--model tiny` with `(cat:1.2)` still gives a picture, and one that
    differs from the plain prompt's."""
    emphasised = tiny_backend.generate(GenerationRequest("a (cat:1.5) on a mat", seed=3, **FAST)).images[0]
    plain = tiny_backend.generate(GenerationRequest("a cat on a mat", seed=3, **FAST)).images[0]
    assert differ(an_image(emphasised), an_image(plain))
