"""Image to image and inpaint through the app's API (/img2img, /inpaint with gradio_client), and the bad-input
table: each bad picture or value a message naming its field, the app still serving, the next request fine."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from backend.core.metadata import parse_infotext, read_infotext
from backend.models.tiny import build_pipeline
from helpers import run_app

W, H = 128, 96


def picture() -> Image.Image:
    image = Image.new("RGB", (W, H), (30, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 10, 100, 80), fill=(240, 200, 40))
    return image


def mask(size=(W, H), box=(32, 24, 96, 72)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The pictures the tests upload, good and bad."""
    d = tmp_path_factory.mktemp("pictures")
    picture().save(d / "in.png")
    mask().save(d / "mask.png")
    mask(size=(50, 50), box=(10, 10, 20, 20)).save(d / "mask-other-size.png")
    Image.new("L", (W, H), 0).save(d / "mask-empty.png")
    (d / "notes.txt").write_text("not a picture at all")
    png = (d / "in.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("RGB", (5000, 5000), "white").save(d / "enormous.png")  # 75 MP, a few tens of KB compressed
    return d


@pytest.fixture(scope="module")
def client(tiny_dir, tmp_path_factory):
    with run_app(["--model", str(tiny_dir), "--optimize", "none"], tmp_path_factory.mktemp("app")) as app:
        yield Client(app.url, verbose=False)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_img2img_by_keyword_returns_the_gallery_and_details(client, files):
    gallery, details = client.predict(prompt="a lovely cat", image=handle_file(str(files / "in.png")), strength=0.5,
                                      steps=6, seed=3, width=64, height=64, num_images=2, api_name="/img2img")
    assert len(gallery) == 2 and details["mode"] == "img2img" and details["seeds"] == [3, 4]
    assert details["strength"] == 0.5 and details["denoising_steps"] == 3 and len(details["timings"]["step_ms"]) == 3
    assert details["timings"]["vae_encode_ms"] > 0 and details["size"] == "64x64"
    params = parse_infotext(read_infotext(gallery[0]["image"]))["params"]
    assert (params["Mode"], params["Denoising strength"], params["Size"]) == ("img2img", "0.5", "64x64")


def test_inpaint_by_keyword_keeps_the_input_outside_the_mask(client, files):
    gallery, details = client.predict(prompt="a red fox", image=handle_file(str(files / "in.png")),
                                      mask=handle_file(str(files / "mask.png")), mask_blur=0, strength=1.0, steps=4,
                                      seed=1, width=W, height=H, api_name="/inpaint")
    assert details["mode"] == "inpaint" and details["denoising_steps"] == 4
    out, source = pixels(gallery[0]["image"]), pixels(files / "in.png")
    outside = np.asarray(mask()) == 0
    assert np.array_equal(out[outside], source[outside])
    assert not np.array_equal(out[~outside], source[~outside])
    params = parse_infotext(read_infotext(gallery[0]["image"]))["params"]
    assert (params["Mode"], params["Mask blur"], params["Denoising strength"]) == ("inpaint", "0", "1.0")


def test_the_pipelines_pixels_reach_the_client_unchanged(client, files):
    """The app's PNG is what the backend made: bare diffusers' img2img on the same fitted input and seed."""
    import diffusers
    import torch

    from backend.core.api import Capabilities, GenerationRequest

    gallery, _ = client.predict(prompt="a lovely cat", image=handle_file(str(files / "in.png")), strength=0.75,
                                steps=4, seed=11, width=64, height=64, api_name="/img2img")
    caps = Capabilities(backend="local", model="tiny", device="cpu", precisions=("fp32",),
                        modes=("txt2img", "img2img", "inpaint"))
    fitted = GenerationRequest("x", mode="img2img", image=picture(), width=64, height=64).validated(caps).image
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**build_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    [want] = pipe("a lovely cat", image=fitted, strength=0.75, num_inference_steps=4, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(11)]).images
    assert np.array_equal(pixels(gallery[0]["image"]), np.asarray(want, dtype=np.int16))


BAD = [
    ("/img2img", dict(image="notes.txt"), "image: is not a PNG, JPEG or WebP image"),
    ("/img2img", dict(image="truncated.png"), "image: the image file is corrupt or truncated"),
    ("/img2img", dict(image="enormous.png"), "image: 5000x5000 is too large"),
    ("/img2img", dict(image=None), "image: Image to image needs an input image; upload one."),
    ("/img2img", dict(image="in.png", strength=1.5), "strength: 1.5 is out of range; use a number from 0 to 1"),
    ("/img2img", dict(image="in.png", strength=-0.1), "strength: -0.1 is out of range"),
    ("/img2img", dict(image="in.png", strength=0.01), "strength: 0.01 with 4 steps runs no denoising step"),
    ("/img2img", dict(image="in.png", resize_mode="zoom"), "resize_mode: 'zoom' is not known"),
    ("/inpaint", dict(image="in.png", mask="mask-other-size.png"), "mask: 50x50 does not match the image's 128x96"),
    ("/inpaint", dict(image="in.png", mask="mask-empty.png"), "mask: is empty (all black)"),
    ("/inpaint", dict(image="in.png", mask=None), "mask: Inpaint needs an input mask"),
    ("/inpaint", dict(image="in.png", mask="truncated.png"), "mask: the image file is corrupt or truncated"),
    ("/inpaint", dict(image="in.png", mask="mask.png", mask_blur=99), "mask_blur: 99 is out of range"),
]


@pytest.mark.parametrize("endpoint, bad, message", BAD, ids=[f"{e}-{m.split(':')[0]}-{i}"
                                                            for i, (e, _, m) in enumerate(BAD)])
def test_bad_input_is_a_message_naming_the_field_and_the_next_request_works(client, files, endpoint, bad, message):
    kwargs = {name: handle_file(str(files / value)) if name in ("image", "mask") and value else value
              for name, value in bad.items()}
    if endpoint == "/inpaint" and "mask" not in kwargs:
        kwargs["mask"] = handle_file(str(files / "mask.png"))
    with pytest.raises(AppError) as info:
        client.predict(prompt="cat", steps=4, width=64, height=64, api_name=endpoint, **kwargs)
    assert message in str(info.value) and "Traceback" not in str(info.value)
    gallery, details = client.predict(prompt="still works", image=handle_file(str(files / "in.png")), steps=2,
                                      width=64, height=64, api_name="/img2img")
    assert len(gallery) == 1 and details["denoising_steps"] == 1


def test_text_to_image_is_unchanged_beside_them(client):
    gallery, details = client.predict(prompt="a lovely cat", steps=3, width=64, height=64, api_name="/generate")
    assert len(gallery) == 1 and details["mode"] == "txt2img" and "strength" not in details
    assert "Mode" not in parse_infotext(read_infotext(gallery[0]["image"]))["params"]


def test_a_backend_that_cannot_take_an_image_says_so(tmp_path_factory, files):
    """A model whose UNet is an inpainting one (9 channels) runs Inpaint only: /img2img names the mode."""
    folder = tmp_path_factory.mktemp("tiny-inpainting")
    build_pipeline(unet_in_channels=9).save_pretrained(folder)
    with run_app(["--model", str(folder), "--optimize", "none"], tmp_path_factory.mktemp("app9")) as app:
        client = Client(app.url, verbose=False)
        with pytest.raises(AppError) as info:
            client.predict(prompt="cat", image=handle_file(str(files / "in.png")), steps=4, width=64, height=64,
                           api_name="/img2img")
        assert "mode: Image to image (img2img) is not available on this backend; it offers Inpaint (inpaint)" in str(
            info.value)
        gallery, details = client.predict(prompt="cat", image=handle_file(str(files / "in.png")),
                                          mask=handle_file(str(files / "mask.png")), steps=4, width=W, height=H,
                                          api_name="/inpaint")
        assert len(gallery) == 1 and details["mode"] == "inpaint"
