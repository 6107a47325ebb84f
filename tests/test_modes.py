"""Image to image and inpaint on the real tiny pipeline: what bare diffusers computes, the steps that strength
implies, the input kept outside the mask, the same modules, --optimize trace, Stop, previews and infotext."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend import GenerationCancelled, GenerationRequest, InvalidRequest, Settings, create_backend
from backend.inprocess import pipeline
from backend.core.metadata import parse_infotext
from backend.core.schedulers import scheduler_class_and_overrides
from backend.models.tiny import build_pipeline

SIZE = 64
FAST = dict(steps=6, width=SIZE, height=SIZE)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def a_picture(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A picture with structure (gradients and a shape), not noise, so that encoding it means something."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 40 + seed)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 200, 30))
    return image


def a_mask(size: int = SIZE) -> Image.Image:
    """White (repaint) in a square in the middle, black around it."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


@pytest.fixture(scope="module")
def eager_backend():
    """The tiny model with --optimize none: the plain diffusers modules, for pixel-exact comparisons."""
    backend = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none"))
    yield backend
    backend.close()


def bare(cls_name: str, scheduler: str = "dpm++2m", dtype=None, unet_in_channels: int = 4):
    """Bare diffusers: the img2img or inpaint pipeline over a fresh tiny model with the scheduler's own config."""
    import diffusers

    base = build_pipeline(dtype=dtype, unet_in_channels=unet_in_channels)
    cls, overrides = scheduler_class_and_overrides(scheduler)
    components = {**base.components, "scheduler": cls.from_config({**base.scheduler.config, "steps_offset": 1},
                                                                  **overrides)}
    pipe = getattr(diffusers, cls_name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("scheduler", ["dpm++2m", "euler-a"])  # euler-a draws noise in its steps too
def test_img2img_equals_bare_diffusers(eager_backend, scheduler):
    request = GenerationRequest("a lovely cat", negative_prompt="blurry", mode="img2img", image=a_picture(),
                                strength=0.6, seed=21, num_images=2, scheduler=scheduler, **FAST)
    ours = eager_backend.generate(request)
    fitted = request.validated(eager_backend.capabilities()).image
    want = bare("StableDiffusionImg2ImgPipeline", scheduler)(
        "a lovely cat", negative_prompt="blurry", image=fitted, strength=0.6, num_inference_steps=6,
        guidance_scale=7.5, num_images_per_prompt=2, generator=generators(21, 2)).images
    assert ours.seeds == [21, 22]
    for got, expected in zip(ours.images, want):
        assert np.array_equal(pixels(got), pixels(expected))
    assert not np.array_equal(pixels(ours.images[0]), pixels(ours.images[1]))


@pytest.mark.parametrize("scheduler", ["dpm++2m", "euler-a"])
def test_inpaint_equals_bare_diffusers_pasted_back_over_the_input(eager_backend, scheduler):
    request = GenerationRequest("a red fox", mode="inpaint", image=a_picture(), mask=a_mask(), strength=0.8,
                                mask_blur=4, seed=5, num_images=2, scheduler=scheduler, **FAST)
    ours = eager_backend.generate(request)
    fitted = request.validated(eager_backend.capabilities())
    blurred = pipeline.blurred_mask(fitted)
    generated = bare("StableDiffusionInpaintPipeline", scheduler)(
        "a red fox", image=[fitted.image] * 2, mask_image=blurred, strength=0.8, height=SIZE, width=SIZE,
        num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2, generator=generators(5, 2)).images
    for got, new in zip(ours.images, generated):
        assert np.array_equal(pixels(got), pixels(Image.composite(new, fitted.image, blurred)))
        # Outside the (blurred) mask the input, exactly; inside, what was generated.
        outside = np.asarray(blurred) == 0
        assert outside.sum() > SIZE * SIZE // 3
        assert np.array_equal(pixels(got)[outside], pixels(fitted.image)[outside])
        inside = np.asarray(blurred) == 255
        assert np.array_equal(pixels(got)[inside], pixels(new)[inside]) and inside.sum() > 0
        assert not np.array_equal(pixels(got)[inside], pixels(fitted.image)[inside])


def test_inpaint_image_i_is_what_its_seed_gives_alone(eager_backend):
    """Image i of a batch uses seed + i: alone, that seed gives it again (up to a batch's float rounding)."""
    common = dict(mode="inpaint", image=a_picture(), mask=a_mask(), strength=0.7, **FAST)
    batch = eager_backend.generate(GenerationRequest("a fox", seed=8, num_images=2, **common))
    alone = eager_backend.generate(GenerationRequest("a fox", seed=9, **common))
    diff = np.abs(pixels(alone.images[0]) - pixels(batch.images[1]))
    assert diff.max() <= 2, diff.max()
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 1


def test_without_blur_every_pixel_outside_the_mask_is_the_input(eager_backend):
    request = GenerationRequest("a fox", mode="inpaint", image=a_picture(seed=3), mask=a_mask(), mask_blur=0,
                                strength=1.0, seed=1, **FAST)
    [image] = eager_backend.generate(request).images
    outside = np.asarray(a_mask()) == 0
    assert np.array_equal(pixels(image)[outside], pixels(a_picture(seed=3))[outside])
    assert not np.array_equal(pixels(image)[~outside], pixels(a_picture(seed=3))[~outside])


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("steps, strength", [(10, 0.3), (10, 0.75), (7, 1.0), (20, 0.05)])
def test_the_steps_run_are_what_strength_implies(eager_backend, mode, steps, strength):
    calls = []
    request = GenerationRequest("cat", mode=mode, image=a_picture(), mask=a_mask() if mode == "inpaint" else None,
                                steps=steps, strength=strength, width=SIZE, height=SIZE, seed=1)
    result = eager_backend.generate(request, on_step=lambda step, total: calls.append((step, total)))
    ran = int(steps * strength)
    assert request.denoising_steps == ran
    assert calls == [(i, ran) for i in range(1, ran + 1)]
    t = result.timings
    assert len(t.step_ms) == ran and t.vae_encode_ms > 0 and t.vae_ms > 0 and t.text_encoder_ms > 0
    assert t.text_encoder_ms + t.vae_encode_ms + t.denoise_ms + t.vae_ms == pytest.approx(t.total_ms, abs=0.5)
    details = result.details()
    assert details["mode"] == mode and details["denoising_steps"] == ran and details["strength"] == strength
    assert details["timings"]["vae_encode_ms"] > 0


def test_txt2img_has_no_encode_stage(eager_backend):
    t = eager_backend.generate(GenerationRequest("cat", seed=1, **FAST)).timings
    assert t.vae_encode_ms == 0 and len(t.step_ms) == 6


def test_image_pipelines_run_on_the_same_modules(eager_backend, tiny_backend):
    """No second copy of a weight: img2img and inpaint pipelines hold the very UNet, VAE and text encoder
    objects of the precision's pipeline (also where --optimize trace put its frozen stand-ins)."""
    for backend in (eager_backend, tiny_backend):
        for precision in ("fp32", "bf16"):
            base = backend.precision_pipeline(precision)
            for mode in ("img2img", "inpaint"):
                pipe = backend.pipeline_to_run(precision, mode)
                assert type(pipe).__name__ == {"img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[mode]
                for name in ("unet", "vae", "text_encoder", "tokenizer"):
                    assert getattr(pipe, name) is getattr(base, name), (mode, name)
                assert backend.pipeline_to_run(precision, mode) is pipe  # made once
            assert backend.pipeline_to_run(precision, "txt2img") is base


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_optimize_trace_gives_the_eager_pixels(eager_backend, tiny_backend, mode):
    """--optimize trace (the shared tiny backend) runs the image modes through its frozen UNet and decoder."""
    from backend.inprocess.frozen import FrozenUNet, FrozenVAE

    request = GenerationRequest("a lovely cat", mode=mode, image=a_picture(), strength=0.5, seed=3,
                                mask=a_mask() if mode == "inpaint" else None, **FAST)
    traced = tiny_backend.generate(request)
    pipe = tiny_backend.pipeline_to_run("fp32", mode)
    assert isinstance(pipe.unet, FrozenUNet) and isinstance(pipe.vae, FrozenVAE)
    assert pipe.unet.graphs.graphs and pipe.vae.graphs.graphs
    eager = eager_backend.generate(request)
    assert np.abs(pixels(traced.images[0]) - pixels(eager.images[0])).max() <= 1


def test_bf16_img2img_equals_bare_diffusers_in_bf16(eager_backend):
    """bf16: the reference runs the same kernels on the same batches (docs/architecture.md, Numerics on CPUs)."""
    request = GenerationRequest("a lovely cat", mode="img2img", image=a_picture(), strength=0.75, seed=4,
                                precision="bf16", **FAST)
    ours = eager_backend.generate(request)
    fitted = request.validated(eager_backend.capabilities()).image
    [want] = bare("StableDiffusionImg2ImgPipeline", dtype=torch.bfloat16)(
        "a lovely cat", image=fitted, strength=0.75, num_inference_steps=6, guidance_scale=7.5,
        generator=generators(4, 1)).images
    assert np.array_equal(pixels(ours.images[0]), pixels(want))


def test_stop_ends_an_image_generation_and_the_next_runs(eager_backend):
    seen = []

    def on_step(step, total):
        seen.append((step, total))
        if step == 2:
            raise GenerationCancelled("stopped")

    with pytest.raises(GenerationCancelled):
        eager_backend.generate(GenerationRequest("cat", mode="img2img", image=a_picture(), steps=40, strength=0.5,
                                                 width=SIZE, height=SIZE), on_step=on_step)
    assert seen == [(1, 20), (2, 20)]
    assert eager_backend.generate(GenerationRequest("cat", mode="img2img", image=a_picture(), seed=1,
                                                    **FAST)).images


def test_previews_count_the_steps_that_run(eager_backend, monkeypatch):
    seen = []
    monkeypatch.setattr(eager_backend, "preview_every", 2)
    request = GenerationRequest("cat", mode="inpaint", image=a_picture(), mask=a_mask(), steps=10, strength=0.6,
                                seed=2, width=SIZE, height=SIZE)
    eager_backend.generate(request, on_preview=lambda step, total, images: seen.append((step, total, len(images))))
    assert seen == [(2, 6, 1), (4, 6, 1)]


def test_infotext_says_the_mode_strength_and_mask_blur(eager_backend):
    img2img = eager_backend.generate(GenerationRequest("cat", mode="img2img", image=a_picture(), strength=0.75,
                                                       seed=1, **FAST))
    params = parse_infotext(img2img.infotexts[0])["params"]
    assert params["Mode"] == "img2img" and params["Denoising strength"] == "0.75" and "Mask blur" not in params
    assert "Denoising strength: 0.75, " in img2img.infotexts[0]
    inpaint = eager_backend.generate(GenerationRequest("cat", mode="inpaint", image=a_picture(), mask=a_mask(),
                                                       strength=1.0, mask_blur=4, seed=1, **FAST))
    params = parse_infotext(inpaint.infotexts[0])["params"]
    assert (params["Mode"], params["Denoising strength"], params["Mask blur"]) == ("inpaint", "1.0", "4")
    txt2img = eager_backend.generate(GenerationRequest("cat", seed=1, **FAST))
    assert not {"Mode", "Denoising strength", "Mask blur"} & set(parse_infotext(txt2img.infotexts[0])["params"])


def test_local_offers_all_three_modes(eager_backend, tiny_backend):
    assert eager_backend.capabilities().modes == tiny_backend.capabilities().modes == (
        "txt2img", "img2img", "inpaint")


# --- a dedicated inpainting checkpoint: a 9-channel UNet ------------------------------------------------------

@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory):
    """The tiny model with a 9-channel UNet, saved as a diffusers folder."""
    path = tmp_path_factory.mktemp("tiny-inpainting")
    build_pipeline(unet_in_channels=9).save_pretrained(path)
    return path


def test_a_9_channel_unet_inpaints_as_bare_diffusers_and_offers_only_inpaint(inpainting_dir):
    backend = create_backend(Settings(backend="local", model=str(inpainting_dir), device="cpu", optimize="none"))
    try:
        assert backend.capabilities().modes == ("inpaint",)
        assert backend.precision_pipeline("fp32").unet.config.in_channels == 9
        request = GenerationRequest("a red fox", mode="inpaint", image=a_picture(), mask=a_mask(), strength=0.9,
                                    seed=12, **FAST)
        [ours] = backend.generate(request).images
        fitted = request.validated(backend.capabilities())
        blurred = pipeline.blurred_mask(fitted)
        [new] = bare("StableDiffusionInpaintPipeline", unet_in_channels=9)(
            "a red fox", image=[fitted.image], mask_image=blurred, strength=0.9, height=SIZE, width=SIZE,
            num_inference_steps=6, guidance_scale=7.5, generator=generators(12, 1)).images
        assert np.array_equal(pixels(ours), pixels(Image.composite(new, fitted.image, blurred)))
        with pytest.raises(InvalidRequest, match="mode: Text to image .*not available.*Inpaint"):
            backend.generate(GenerationRequest("cat", **FAST))
    finally:
        backend.close()


def test_a_9_channel_unet_runs_traced_too(inpainting_dir):
    """--optimize trace warms up an inpainting UNet with an inpaint run (it cannot run text to image)."""
    backend = create_backend(Settings(backend="local", model=str(inpainting_dir), device="cpu", optimize="trace"))
    try:
        result = backend.generate(GenerationRequest("a fox", mode="inpaint", image=a_picture(), mask=a_mask(),
                                                    seed=1, **FAST))
        assert result.images[0].size == (SIZE, SIZE)
        assert backend.precision_pipeline("fp32").unet.graphs.traces >= 1
    finally:
        backend.close()
