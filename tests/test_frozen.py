"""--optimize trace: the UNet and VAE decoder as frozen TorchScript graphs per shape (backend/inprocess/frozen.py)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from backend import GenerationRequest, Settings, create_backend
from backend.inprocess.frozen import FrozenUNet, FrozenVAE, ShapeCache, eager_module
from backend.inprocess.local import auto_optimize


@pytest.fixture(scope="module")
def parts():
    """The tiny model's UNet and VAE, sdpa-optimized as the trace mode has them, in eval mode."""
    from backend.inprocess.pipeline import load_pipeline, optimize_pipeline

    pipe = optimize_pipeline(load_pipeline("tiny", torch.float32), "sdpa")
    return pipe.unet.eval(), pipe.vae.eval()


def _unet_inputs(batch: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=g),
            torch.randn(batch, 77, 32, generator=g))


def test_graph_is_not_baked_to_the_values_it_was_traced_with(parts):
    """Traced at one timestep and input, it gives eager's answer at others (timesteps are an input)."""
    unet, _ = parts
    frozen = FrozenUNet(unet)
    with torch.inference_mode():
        sample, text = _unet_inputs(2, 16, 16, 0)
        frozen(sample, torch.tensor(999), text)  # traces here
        for seed, t in ((1, torch.tensor(1)), (2, torch.tensor(500.5)), (3, 250)):
            sample, text = _unet_inputs(2, 16, 16, seed)
            got = frozen(sample, t, text).sample
            want = unet(sample, t, encoder_hidden_states=text).sample
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (t, (got - want).abs().max())
    assert frozen.graphs.traces == 1


@pytest.mark.parametrize("height, width", [(16, 16), (25, 41), (8, 24)])
def test_each_shape_gets_its_own_correct_graph(parts, height, width):
    """Odd latent sizes take diffusers' forwarded-upsample-size branch; the graph for them is right too."""
    unet, _ = parts
    frozen = FrozenUNet(unet)
    with torch.inference_mode():
        for batch in (2, 1):
            sample, text = _unet_inputs(batch, height, width, batch)
            got = frozen(sample, torch.tensor(700), text, return_dict=False)[0]
            want = unet(sample, 700, text, return_dict=False)[0]
            assert got.shape == want.shape == (batch, 4, height, width)
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert frozen.graphs.traces == 2


def test_decoder_graph_matches_eager_and_the_rest_of_the_vae_is_eager(parts):
    _, vae = parts
    frozen = FrozenVAE(vae)
    with torch.inference_mode():
        z = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(0))
        got = frozen.decode(z).sample
        want = vae.decode(z).sample
        assert got.shape == want.shape == (1, 3, 72, 56)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert frozen.decode(z * 2, return_dict=False)[0].shape == want.shape
    assert frozen.graphs.traces == 1
    assert frozen.config.scaling_factor == vae.config.scaling_factor  # what the pipeline reads comes from eager
    assert frozen.dtype == torch.float32 and frozen.device.type == "cpu"
    assert eager_module(frozen) is vae and eager_module(vae) is vae


def test_cache_keeps_the_most_recent_shapes():
    built = []

    def build():
        built.append(1)
        return torch.nn.Identity()

    cache = ShapeCache("part", build, max_shapes=2)
    a, b, c = torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 4)
    for x in (a, b, a, c):  # c pushes out b, the least recently used
        assert cache.get(x) is not None
    assert len(cache.graphs) == 2 and len(built) == 3
    cache.get(a)
    assert len(built) == 3  # still there
    cache.get(b)
    assert len(built) == 4  # was dropped, traced again
    with pytest.raises(ValueError):
        ShapeCache("part", build, max_shapes=0)


def test_calls_the_graph_does_not_take_run_eagerly(parts):
    """LoRA scales, ControlNet residuals, gradients: eager, untraced."""
    unet, _ = parts
    frozen = FrozenUNet(unet)
    sample, text = _unet_inputs(2, 8, 8, 0)
    with torch.inference_mode():
        out = frozen(sample, 10, text, cross_attention_kwargs={"scale": 0.5}).sample
        assert torch.allclose(out, unet(sample, 10, text).sample, atol=1e-5)
    with torch.no_grad():
        frozen(sample, 10, text, timestep_cond=None, added_cond_kwargs=None)  # None is "not set": traced
    assert frozen.graphs.traces == 1
    grad_unet = FrozenUNet(copy.deepcopy(unet))
    grad_unet(sample, 10, text)  # grad mode on: eager, so training through the stand-in works
    assert grad_unet.graphs.traces == 0


def test_a_part_that_cannot_be_traced_runs_eagerly_with_one_warning(parts, monkeypatch, caplog):
    unet, _ = parts
    frozen = FrozenUNet(unet)

    def refuse(*args, **kwargs):
        raise RuntimeError("this model does not trace")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    sample, text = _unet_inputs(2, 8, 8, 0)
    with caplog.at_level(logging.WARNING, logger="backend.inprocess.frozen"), torch.inference_mode():
        first = frozen(sample, 10, text).sample
        second = frozen(sample, 10, text).sample
        assert torch.equal(first, second)
        assert torch.allclose(first, unet(sample, 10, text).sample, atol=1e-6)
    warnings = [r for r in caplog.records if "could not trace" in r.getMessage()]
    assert len(warnings) == 1 and "this model does not trace" in warnings[0].getMessage()


def test_backend_trace_mode_gives_sdpa_pixels_and_traces_each_shape_once():
    """The default on a CPU: same images as --optimize sdpa (and eager up to rounding), in fp32 and bf16."""
    assert auto_optimize("cpu") == "trace" and auto_optimize("cuda") == "sdpa"
    traced = create_backend(Settings(backend="local", model="tiny", device="cpu"))
    sdpa = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="sdpa"))
    assert traced.optimize == "trace"
    pipe = traced._pipelines["fp32"]
    assert isinstance(pipe.unet, FrozenUNet) and isinstance(pipe.vae, FrozenVAE)
    warmed = pipe.unet.graphs.traces  # the load's warm-up traced the 512x512 CFG shape
    assert warmed == 1
    for precision in ("fp32", "bf16"):
        for size in (64, 72):
            request = GenerationRequest("cat", seed=3, steps=3, width=size, height=64, precision=precision)
            a, b = (np.asarray(r.generate(request).images[0], dtype=np.int16) for r in (traced, sdpa))
            assert np.array_equal(a, b), (precision, size, np.abs(a - b).max())
    request = GenerationRequest("cat", seed=4, steps=3, width=64, height=64, num_images=2, scheduler="euler")
    traced.generate(request)
    traced.generate(request)
    assert pipe.unet.graphs.traces == warmed + 3  # 64x64, 72x64 and the batch of 4: each once
    assert isinstance(traced._pipelines["bf16"].unet, FrozenUNet)  # bf16 built from the eager modules
