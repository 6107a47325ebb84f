"""The hires fix (issue 27) on the real tiny pipeline: txt2img at the first size, upscale, then a partial img2img
pass at the larger size, equal to a reference written by hand from diffusers' public API and A1111's arithmetic;
the fields' checks, the infotext, Stop and the steps counted through both passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend import GenerationCancelled, GenerationRequest, InvalidRequest, Settings, create_backend
from backend.core.api import Capabilities, hires_scales_between, hires_size
from backend.core.metadata import parse_infotext
from backend.core.schedulers import scheduler_class_and_overrides
from backend.models.tiny import build_pipeline

SIZE, BIG = 64, 96  # 64 x 1.5
PROMPT, NEGATIVE = "a lovely cat", "blurry"
HIRES = dict(steps=4, width=SIZE, height=SIZE, hr_scale=1.5, hr_steps=3, denoising_strength=0.6)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def reference(upscaler: str, seed: int, n: int = 1, steps: int = 4, hr_steps: int = 3, strength: float = 0.6,
              scheduler: str = "dpm++2m") -> list[Image.Image]:
    """The hires fix written by hand: diffusers txt2img with output_type="latent"; the upscale as A1111's
    sample_hr_pass does it (modules/processing.py: torch.nn.functional.interpolate of the latents to
    (target // 8) with "Latent" = bilinear / "Latent (nearest)" = nearest, antialias off; or decode, PIL Lanczos,
    and the img2img pipeline's VAE encode); then diffusers' StableDiffusionImg2ImgPipeline at the larger size, with
    generators of the same seeds, and A1111's hires step arithmetic (modules/sd_samplers_common.py
    setup_img2img_steps with steps given: a schedule of int(steps / min(strength, 0.999)) steps, its last `steps`)."""
    import diffusers

    base = build_pipeline()
    cls, overrides = scheduler_class_and_overrides(scheduler)
    components = {**base.components, "scheduler": cls.from_config({**base.scheduler.config, "steps_offset": 1},
                                                                  **overrides)}
    txt2img = diffusers.StableDiffusionPipeline(**components)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    seeds = [seed + i for i in range(n)]
    latents = txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, width=SIZE,
                      height=SIZE, num_images_per_prompt=n, output_type="latent",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    if upscaler == "lanczos":
        with torch.no_grad():
            decoded = txt2img.vae.decode(latents / txt2img.vae.config.scaling_factor).sample
        image = [p.resize((BIG, BIG), Image.LANCZOS) for p in txt2img.image_processor.postprocess(decoded)]
    else:
        image = torch.nn.functional.interpolate(latents, size=(BIG // 8, BIG // 8), antialias=False,
                                                mode={"latent": "bilinear", "latent-nearest": "nearest"}[upscaler])
    total = int(hr_steps / min(strength, 0.999))
    # diffusers runs the last int(total x strength) steps: a strength a hair above hr_steps / total runs hr_steps.
    return img2img(PROMPT, negative_prompt=NEGATIVE, image=image, strength=min(1.0, (hr_steps + 0.5) / total),
                   num_inference_steps=total, guidance_scale=7.5, num_images_per_prompt=n,
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images


@pytest.fixture(scope="module")
def eager_backend():
    """The tiny model with --optimize none: the plain diffusers modules, for pixel-exact comparisons."""
    backend = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none"))
    yield backend
    backend.close()


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_local_hires_equals_the_reference(eager_backend, upscaler):
    steps = []
    result = eager_backend.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=11, num_images=2,
                                                      hr_upscaler=upscaler, **HIRES),
                                    on_step=lambda step, total: steps.append((step, total)))
    want = reference(upscaler, 11, n=2)
    assert [im.size for im in result.images] == [(BIG, BIG)] * 2
    for got, expected in zip(result.images, want):
        assert np.array_equal(pixels(got), pixels(expected))
    assert steps == [(i, 7) for i in range(1, 8)]  # 4 steps, then the 3 hires steps
    assert len(result.timings.step_ms) == 4 and len(result.timings.hires_step_ms) == 3
    details = result.details()
    assert details["size"] == "64x64" and details["hires"]["size"] == "96x96"


def test_infotext_is_a1111s(eager_backend):
    result = eager_backend.generate(GenerationRequest(PROMPT, seed=3, hr_upscaler="Latent (nearest)", **HIRES))
    text = result.infotexts[0]
    assert "Size: 64x64" in text
    assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (nearest)" in text
    params = parse_infotext(text)["params"]
    assert params["Hires upscaler"] == "Latent (nearest)"
    # Hires steps 0 (the same as steps) is not written, as A1111 writes it only when set.
    plain = eager_backend.generate(GenerationRequest(PROMPT, seed=3, **{**HIRES, "hr_steps": 0})).infotexts[0]
    assert "Hires steps" not in plain and "Hires upscaler: Latent," in plain
    # Off: nothing of it.
    off = eager_backend.generate(GenerationRequest(PROMPT, seed=3, steps=2, width=SIZE, height=SIZE))
    assert "Hires" not in off.infotexts[0] and "Denoising strength" not in off.infotexts[0]
    assert off.images[0].size == (SIZE, SIZE)


def test_stop_in_the_hires_pass(eager_backend):
    def stop(step, total):
        if step == 5:  # the first hires step
            raise GenerationCancelled("stopped")

    with pytest.raises(GenerationCancelled):
        eager_backend.generate(GenerationRequest(PROMPT, seed=1, **HIRES), on_step=stop)


def test_previews_run_through_both_passes(eager_backend):
    from backend.inprocess import pipeline
    from backend.inprocess.preview import PreviewPacer

    request = GenerationRequest(PROMPT, seed=2, **HIRES).validated(eager_backend.capabilities())
    pipe = eager_backend.precision_pipeline("fp32")
    shown = []
    images, _ = pipeline.run(pipe, request, [2], on_preview=lambda step, total, pictures: shown.append(
        (step, total, pictures[0].size)), pacer=PreviewPacer(1))
    # After every step but the last (the decoder makes that one), the hires ones of the larger latents.
    assert [(step, total) for step, total, _ in shown] == [(i, 7) for i in range(1, 7)]
    assert shown[0][2] != shown[-1][2] and images[0].size == (BIG, BIG)


CAPS = Capabilities(backend="t", model="m", device="cpu", precisions=("fp32",), hr_upscalers=("latent", "lanczos"))


@pytest.mark.parametrize("fields, named", [
    (dict(hr_scale=2.5), "hr_scale"),
    (dict(hr_scale=0.5), "hr_scale"),
    (dict(hr_scale=2.0, width=640, height=640), "hr_scale"),  # 1280 > max_size 1024
    (dict(hr_scale=1.5, hr_upscaler="latent-nearest"), "hr_upscaler"),  # not offered by these caps
    (dict(hr_scale=1.5, hr_upscaler="ESRGAN_4x"), "hr_upscaler"),
    (dict(hr_scale=1.5, denoising_strength=1.5), "denoising_strength"),
    (dict(hr_scale=1.5, denoising_strength=0), "denoising_strength"),
    (dict(hr_scale=1.5, denoising_strength=0.01), "denoising_strength"),  # a schedule of 2000 steps
    (dict(hr_scale=1.5, hr_steps=101), "hr_steps"),
    (dict(hr_scale=1.5, hr_steps=-1), "hr_steps"),
])
def test_bad_hires_fields_are_refused_naming_them(fields, named):
    with pytest.raises(InvalidRequest) as err:
        GenerationRequest(PROMPT, **{"width": 512, "height": 512, **fields}).validated(CAPS)
    assert err.value.field == named and str(err.value).startswith(named)


def test_hires_refusals_of_mode_backend_and_compiled_sizes():
    with pytest.raises(InvalidRequest, match="^hr_scale: this backend runs no hires"):
        GenerationRequest(PROMPT, hr_scale=1.5).validated(Capabilities("t", "m", "cpu", ("fp32",)))
    fixed = Capabilities("t", "m", "cpu", ("fp32",), fixed_sizes=((512, 512), (768, 768)), hr_upscalers=("latent",),
                         hr_scales=hires_scales_between(((512, 512), (768, 768))))
    assert fixed.hr_scales == (1.5,)
    assert GenerationRequest(PROMPT, width=512, height=512, hr_scale=1.5).validated(fixed).output_size == (768, 768)
    with pytest.raises(InvalidRequest, match=r"^hr_scale: 2 takes 512x512 to 1024x1024.*offers 1.5 \(512x512 to"):
        GenerationRequest(PROMPT, width=512, height=512, hr_scale=2).validated(fixed)
    assert Capabilities.from_dict(fixed.to_dict()) == fixed
    older = {k: v for k, v in fixed.to_dict().items() if not k.startswith("hr_")}  # an endpoint before hires
    assert Capabilities.from_dict(older).hr_upscalers == ()


def test_hires_size_is_a1111s_rounded_down_to_the_latent_grid():
    assert hires_size(512, 512, 1.5) == (768, 768)
    assert hires_size(512, 768, 1.3) == (664, 992)  # int(665.6) = 665 -> 664, int(998.4) = 998 -> 992
    assert hires_size(64, 64, 1.5) == (BIG, BIG)


# --- the neuron backend: the CPU stand-in (neuron_helpers: parts traced with --target cpu, the static-shape guard)


@pytest.fixture(scope="module")
def hires_root(tmp_path_factory):
    import neuron_helpers  # torch and compile.py: only where a root is needed

    return neuron_helpers.hires_root(tmp_path_factory)


@pytest.fixture(scope="module")
def hires_neuron_backend(hires_root):
    backend = create_backend(Settings(backend="neuron", artifacts=str(hires_root)))
    yield backend
    backend.close()


def test_neuron_offers_the_scales_between_its_sizes(hires_neuron_backend):
    caps = hires_neuron_backend.capabilities()
    assert caps.fixed_sizes == ((SIZE, SIZE), (BIG, BIG)) and caps.hr_scales == (1.5,)
    assert caps.hr_upscalers == ("latent", "latent-nearest", "lanczos")
    assert caps.to_dict()["hr_scales"] == [1.5]


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_neuron_hires_equals_the_reference(hires_neuron_backend, upscaler):
    result = hires_neuron_backend.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=5,
                                                             hr_upscaler=upscaler, precision="fp32", **HIRES))
    assert result.images[0].size == (BIG, BIG)
    # The traced parts: at most one level apart where a value sits on a rounding boundary (as test_neuron_sizes).
    assert np.abs(pixels(result.images[0]) - pixels(reference(upscaler, 5)[0])).max() <= 1
    assert "Hires upscale: 1.5" in result.infotexts[0] and "Size: 64x64" in result.infotexts[0]


def test_neuron_root_without_the_size_says_how_to_compile_it(hires_root):
    backend = create_backend(Settings(backend="neuron", artifacts=str(hires_root), sizes="64x64"))
    try:
        assert backend.capabilities().hr_scales == ()
        with pytest.raises(InvalidRequest) as err:
            backend.generate(GenerationRequest(PROMPT, hr_scale=1.5, steps=1, width=SIZE, height=SIZE))
    finally:
        backend.close()
    assert err.value.field == "hr_scale"
    assert (f"python -m compile_scripts.compile --model tiny --out {hires_root} --dtype fp32 --sizes 96x96 "
            f"--target cpu") in str(err.value)


# --- the endpoint (serving/) and the SageMaker backend through it, as test_sagemaker_backend.py runs them -------


@pytest.fixture(scope="module")
def endpoint_url(eager_backend):
    """serving/server.py's EndpointServer on the eager tiny backend, answering to the name sd-test."""
    import threading

    from helpers import free_port
    from serving.handler import Handler
    from serving.server import EndpointServer

    server = EndpointServer(("127.0.0.1", free_port()), Handler(eager_backend), endpoint_name="sd-test",
                            region="us-east-2")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def remote(aws_env, endpoint_url):
    backend = create_backend(Settings(backend="sagemaker", endpoint_name="sd-test", region="us-east-2",
                                      endpoint_url=endpoint_url))
    yield backend
    backend.close()


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_endpoint_hires_equals_the_reference(remote, upscaler):
    assert remote.capabilities().hr_upscalers == ("latent", "latent-nearest", "lanczos")  # from describe
    result = remote.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, seed=9, hr_upscaler=upscaler,
                                               **HIRES))
    assert np.array_equal(pixels(result.images[0]), pixels(reference(upscaler, 9)[0]))
    assert len(result.timings.hires_step_ms) == 3 and result.timings.hires_denoise_ms > 0
    assert "Hires steps: 3" in result.infotexts[0]


def test_endpoint_wire_fields_and_refusals(eager_backend):
    from backend.sagemaker import protocol
    from serving.handler import Handler

    request = GenerationRequest(PROMPT, seed=1, hr_upscaler="lanczos", **HIRES).validated(
        eager_backend.capabilities())
    params = protocol.request_to_json(request)["parameters"]
    assert (params["hr_scale"], params["hr_upscaler"], params["hr_steps"], params["denoising_strength"]) == (
        1.5, "lanczos", 3, 0.6)
    plain = GenerationRequest(PROMPT, steps=2).validated(eager_backend.capabilities())
    assert not any(key.startswith("hr_") or key == "denoising_strength"
                   for key in protocol.request_to_json(plain)["parameters"])  # what older endpoints read
    handler = Handler(eager_backend)
    for wire, value in (("hr_scale", 3), ("hr_steps", 1000), ("denoising_strength", -0.1), ("hr_upscaler", "ESRGAN")):
        answer = handler.handle(json.dumps({"prompt": "cat", "parameters": {
            "hr_scale": 1.5, "width": 64, "height": 64, wire: value}}).encode(), {"Content-Type": "application/json"})
        assert answer.status == 400 and json.loads(answer.body)["error"].startswith(wire), (wire, answer.body)


# --- PNG Info: A1111's Hires keys restored, and "Send to text to image" fills the Hires fix group --------------


A1111_HIRES = ("a lovely cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
               "Model hash: 6ce0161689, Model: v2-1_512-ema-pruned, Denoising strength: 0.55, Hires upscale: 1.5, "
               "Hires steps: 10, "
               "Hires upscaler: Latent (nearest), Version: v1.10.1")


def test_send_to_text_to_image_fills_the_hires_controls():
    from app import send_settings
    from ui.pnginfo import unusable_notes, values_for_controls

    caps = Capabilities("local", "tiny", "cpu", ("fp32",), hr_upscalers=("latent", "latent-nearest", "lanczos"))
    sent = values_for_controls(A1111_HIRES, caps)
    assert {k: sent.values[k] for k in ("hires", "hr_scale", "hr_upscaler", "hr_steps", "denoising_strength",
                                        "width")} == dict(hires=True, hr_scale=1.5, hr_upscaler="latent-nearest",
                                                          hr_steps=10, denoising_strength=0.55, width=512)
    assert not sent.notes and not unusable_notes(parse_infotext(A1111_HIRES)["params"])
    names = ["prompt", "hires", "hr_scale", "hr_upscaler", "hr_steps", "denoising_strength"]
    values = send_settings(caps, names, False, False, "txt2img", A1111_HIRES)
    assert values[:6] == ["a lovely cat", True, 1.5, "latent-nearest", 10, 0.55]
    # An upscaler with weights (A1111's ESRGAN family) is named, and the hires fix is sent off.
    other = values_for_controls(A1111_HIRES.replace("Latent (nearest)", "R-ESRGAN 4x+"), caps)
    assert other.values["hires"] is False and "hr_upscaler: 'R-ESRGAN 4x+' is not offered" in other.notes[0]
    # No Hires keys: sent with the hires fix off, so the tab makes what the image's settings make.
    assert values_for_controls("cat\nSteps: 2, Sampler: Euler a, Seed: 1", caps).values["hires"] is False
    # This app's own infotext goes round.
    ours = GenerationRequest(PROMPT, seed=1, hr_upscaler="lanczos", **HIRES).validated(caps)
    from backend.core.metadata import infotext_for

    back = values_for_controls(infotext_for(ours, 1, "tiny", "local", None), caps).values
    assert (back["hr_scale"], back["hr_upscaler"], back["hr_steps"], back["denoising_strength"]) == (
        1.5, "lanczos", 3, 0.6)


def test_latency_benchmark_rows_with_the_hires_fix(tmp_path, capsys):
    from benchmarks.latency import main

    out = tmp_path / "rows.json"
    assert main(["--model", "tiny", "--device", "cpu", "--optimize", "none", "--precisions", "fp32", "--steps", "2",
                 "--width", "64", "--height", "64", "--runs", "1", "--warmup", "0", "--hr-scale", "1.5",
                 "--hr-upscaler", "lanczos", "--hr-steps", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert (row["hr_scale"], row["hr_upscaler"], row["hr_size"], row["hr_steps_run"]) == (1.5, "lanczos", "96x96", 1)
    assert "| hires | upscaler | hires size | hires steps |" in capsys.readouterr().out


def test_a_real_a1111_hires_image_is_read_and_sent_with_what_cannot_run_named():
    """AUTOMATIC1111 v1.10.1's own file (tests/fixtures/png_info/README.md): 1024x1024 x 1.5 with R-ESRGAN."""
    from pathlib import Path

    from ui.pnginfo import png_info, values_for_controls

    result = png_info((Path(__file__).parent / "fixtures" / "png_info" / "sd-webui-hires.png").read_bytes())
    assert "Not available here: Hires upscaler: R-ESRGAN 4x+ Anime6B." in result["notes"]
    caps = Capabilities("local", "tiny", "cpu", ("fp32",), hr_upscalers=("latent", "latent-nearest", "lanczos"))
    sent = values_for_controls(result["info"], caps)
    assert sent.values["hires"] is False and sent.values["width"] == 1024
    assert any(note.startswith("Hires fix (Hires upscale: 1.5, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ "
                               "Anime6B): hr_upscaler:") for note in sent.notes), sent.notes
    # With an upscaler this app has, 1.5 would take 1024 to 1536, past the local backend's 1024: named too.
    latent = values_for_controls(result["info"].replace("R-ESRGAN 4x+ Anime6B", "Latent"), caps)
    assert latent.values["hires"] is False and "hr_scale: 1.5 takes 1024x1024 to 1536x1536" in latent.notes[-1]
