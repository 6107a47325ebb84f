"""The compiled VAE encoder (issue 13, item 3): the part, its adapter against diffusers' own vae.encode, and
diffusers' image-to-image and inpaint pipelines running on the compiled parts (the inpaint one on the compiled
UNet), equal to the same pipelines on the eager model.

Stand-ins as in test_neuron.py (neuron_helpers.py): parts traced with --target cpu, run through the CPU stand-in
for the NeuronCores with its static-shape guard.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import neuron_helpers
from backend import GenerationRequest, Settings, create_backend
from backend.inprocess import pipeline
from backend.neuron.adapters import NeuronVaeEncoder, StaticShapeError

SIZE = neuron_helpers.SIZE
STEPS = 4
# As test_neuron.py: fp32 traced parts against eager differ in the last bits of MKL/oneDNN sums.
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def eager_vae(compiled_root):
    """diffusers' AutoencoderKL from the root's own fp32 files."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(compiled_root / "vae", dtype=torch.float32).eval().requires_grad_(False)


def images_in_range(batch: int, seed: int = 0) -> torch.Tensor:
    """A batch of SIZE x SIZE images in [-1, 1], as the pipelines hand the VAE."""
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the part and its adapter --------------------------------------------------------------------


def test_root_offers_the_image_modes(neuron_backend):
    caps = neuron_backend.capabilities()
    assert caps.modes == ("txt2img", "img2img", "inpaint")
    assert not any("vae_encoder" in note for note in caps.notes)
    for precision in ("bf16", "fp32"):
        encoder = neuron_backend._pipelines[precision].vae.encoder
        assert isinstance(encoder, NeuronVaeEncoder) and encoder.dtype == torch.float32  # fp32 in both, as the VAE
        assert neuron_backend._pipelines[precision].vae.quant_conv is None  # traced into the part


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_equals_diffusers_vae_encode_fp32(neuron_backend, eager_vae, batch):
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = neuron_backend._pipelines["fp32"].vae
    images = images_in_range(batch)
    with torch.inference_mode():
        ours, theirs = vae.encode(images), eager_vae.encode(images)
        assert isinstance(ours, AutoencoderKLOutput) and isinstance(ours.latent_dist, DiagonalGaussianDistribution)
        for name in ("mean", "logvar", "std"):
            got, expected = getattr(ours.latent_dist, name), getattr(theirs.latent_dist, name)
            assert got.shape == expected.shape == (batch, 4, SIZE // 8, SIZE // 8) and got.dtype == torch.float32
            assert (got - expected).abs().max().item() <= FP32_TOL, name
        # What img2img's retrieve_latents draws, with the same generator: the same sample.
        sampled = retrieve_latents(ours, generator=torch.Generator().manual_seed(5))
        expected = retrieve_latents(theirs, generator=torch.Generator().manual_seed(5))
        assert (sampled - expected).abs().max().item() <= FP32_TOL
        assert vae.encode(images, return_dict=False)[0].mean.shape == (batch, 4, SIZE // 8, SIZE // 8)


def test_encode_in_a_bf16_pipeline_runs_the_fp32_part_and_answers_in_bf16(neuron_backend, eager_vae):
    vae = neuron_backend._pipelines["bf16"].vae
    images = images_in_range(2, seed=1).bfloat16()  # the pipelines cast the image to their dtype
    with torch.inference_mode():
        moments = vae.encode(images).latent_dist.parameters
        expected = eager_vae.encode(images.float()).latent_dist.parameters
    # The moments come back in the pipeline's dtype, so the latents and the noise drawn for them are bf16, as
    # with an eager bf16 VAE; computed in fp32, they are the fp32 moments rounded once (one bf16 ulp).
    assert moments.dtype == torch.bfloat16
    assert ((moments.float() - expected).abs() <= expected.abs() * 2.0 ** -8 + 1e-6).all()


def test_the_encoder_refuses_another_size_as_the_neuron_runtime_would(neuron_backend):
    with pytest.raises(StaticShapeError, match=f"vae_encoder: no part was compiled for .*compiled: {SIZE}x{SIZE}"):
        neuron_backend._pipelines["fp32"].vae.encode(torch.zeros(1, 3, SIZE // 2, SIZE // 2))


# --- diffusers' img2img and inpaint pipelines on the compiled parts --------------------------------


@pytest.fixture(scope="module")
def eager_pipe(compiled_root, neuron_backend):
    """The root's eager fp32 pipeline, its UNet run on the batches the compiled one gets (see test_neuron.py)."""
    pipe = pipeline.load_pipeline(str(compiled_root), torch.float32, "cpu", local_files_only=True)
    chunk = len(neuron_backend.device_ids) * neuron_backend.sets[0].batch_per_core
    pipe.unet.forward = neuron_helpers.in_chunks(pipe.unet.forward, chunk)
    return pipe


def _input_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 255  # repaint the middle
    return Image.fromarray(mask)


def _run(cls, pipe, generator, n: int, **inputs) -> np.ndarray:
    """diffusers' pipeline `cls` built from `pipe`'s components (no second copy of anything), as float pixels."""
    from diffusers import DPMSolverMultistepScheduler

    components = {**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)}
    mode_pipe = cls(**components, requires_safety_checker=False)
    mode_pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return mode_pipe(prompt="a lovely cat", negative_prompt="blurry", num_inference_steps=STEPS,
                         guidance_scale=7.5, height=SIZE, width=SIZE, num_images_per_prompt=n,
                         generator=generator, output_type="np", **inputs).images


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("generators", ["one per image", "one for all"])
def test_image_pipelines_on_the_compiled_parts_match_eager(neuron_backend, eager_pipe, monkeypatch, mode,
                                                           generators):
    """The img2img pipeline encodes num_images x the image (one call per generator, or one batch); the inpaint
    pipeline encodes the image and the masked image, and denoises on the compiled UNet (4 channels: it blends
    the known latents back outside the mask after each step)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    inputs = {"image": _input_image(), "strength": 0.75}
    if mode == "inpaint":
        inputs["mask_image"] = _mask()
    n = 2

    def generator():
        if generators == "one for all":
            return torch.Generator().manual_seed(8)
        return [torch.Generator().manual_seed(8 + i) for i in range(n)]

    compiled = neuron_backend._pipelines["fp32"]
    calls = []
    forward = compiled.unet.forward
    monkeypatch.setattr(compiled.unet, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    ours = _run(cls, compiled, generator(), n, **inputs)
    monkeypatch.undo()
    theirs = _run(cls, eager_pipe, generator(), n, **inputs)
    assert ours.shape == theirs.shape == (n, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= FP32_TOL
    # int(steps x strength) steps on the compiled UNet, each on both images' CFG pair.
    assert calls == [(2 * n, 4, SIZE // 8, SIZE // 8)] * int(STEPS * 0.75)


# --- the neuron backend's image modes, end to end --------------------------------------------------


def pixels(images) -> np.ndarray:
    """PIL images as one int array."""
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_backend_image_modes_match_the_local_backend(neuron_backend, compiled_root, mode):
    """Image to image and inpaint through the neuron backend (inpaint on the compiled UNet) against the local
    backend on the same model files, within test_neuron's neuron-vs-local bound."""
    local = create_backend(Settings(backend="local", model=str(compiled_root), device="cpu"))
    image = _input_image()
    request = GenerationRequest(prompt="a lovely cat", negative_prompt="blurry", steps=STEPS, seed=11,
                                precision="fp32", num_images=2, mode=mode, image=image, strength=0.75,
                                mask=_mask() if mode == "inpaint" else None, width=SIZE, height=SIZE)
    try:
        ours, theirs = neuron_backend.generate(request), local.generate(request)
    finally:
        local.close()
    assert ours.seeds == theirs.seeds == [11, 12]
    assert [img.size for img in ours.images] == [(SIZE, SIZE)] * 2
    # PNG pixels: at most one level apart where a value sits on a rounding boundary.
    assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1
    assert len(ours.timings.step_ms) == ours.request.denoising_steps == int(STEPS * 0.75)
    assert ours.timings.vae_encode_ms > 0 and ours.details()["mode"] == mode
    if mode == "inpaint":  # pasted back: far from the mask's blurred edge, the input's pixels exactly
        outside = np.asarray(_mask()) == 0
        outside[SIZE // 4 - 16: 3 * SIZE // 4 + 16, SIZE // 4 - 16: 3 * SIZE // 4 + 16] = False
        assert all(np.array_equal(np.asarray(img)[outside], np.asarray(image)[outside]) for img in ours.images)


def test_bf16_image_to_image_runs_every_part(neuron_backend):
    request = GenerationRequest(prompt="a lovely cat", steps=2, seed=3, precision="bf16", mode="img2img",
                                image=_input_image(), strength=1.0)
    result = neuron_backend.generate(request)
    assert result.images[0].size == (SIZE, SIZE) and result.timings.vae_encode_ms > 0


# --- a dedicated inpainting checkpoint: a 9-channel UNet -------------------------------------------


def test_a_9_channel_unet_is_compiled_with_its_channels_and_inpaints(tmp_path):
    """compile.py traces the UNet with unet.config.in_channels (latents, mask, masked-image latents); the backend
    then offers only Inpaint (text to image and image to image feed a UNet 4 channels) and runs it on the
    compiled UNet, as the local backend runs the same model."""
    from backend.models.tiny import build_pipeline
    from compile_scripts.compile import main as compile_main

    model, root, size = tmp_path / "tiny-inpainting", tmp_path / "root", 128
    build_pipeline(unet_in_channels=9).save_pretrained(model)
    assert compile_main(["--model", str(model), "--out", str(root), "--target", "cpu", "--dtype", "fp32",
                         "--sizes", f"{size}x{size}"]) == 0
    backend = create_backend(Settings(backend="neuron", artifacts=str(root)))
    local = create_backend(Settings(backend="local", model=str(model), device="cpu"))
    try:
        assert backend.sets[0].input_specs("unet")[0].shape == (1, 9, size // 8, size // 8)
        assert backend.capabilities().modes == ("inpaint",)
        image = _input_image().resize((size, size))
        mask = _mask().resize((size, size))
        request = GenerationRequest(prompt="a red fox", steps=STEPS, seed=2, precision="fp32", mode="inpaint",
                                    image=image, mask=mask, strength=1.0, width=size, height=size)
        ours, theirs = backend.generate(request), local.generate(request)
    finally:
        backend.close()
        local.close()
    assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1
