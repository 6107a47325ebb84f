"""NeuronBackend on CPU-traced parts of the tiny model: same images as eager diffusers, the
walk-through's layout, clear errors, the static-shape guard, and the app end to end.

The Neuron compiler and device cannot exist here (see neuron_helpers.py); everything else is real.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

import neuron_helpers
from backend import (
    BackendUnavailable,
    GenerationRequest,
    InvalidRequest,
    Settings,
    create_backend,
)
from backend.inprocess import pipeline
from backend.neuron.root_format import read_root, is_neuron_archive, version_problems
from backend.core.settings import NeuronSettings
from backend.neuron import assemble
from backend.neuron.backend import NeuronBackend
from backend.neuron.host import neuron_core_ids
from backend.core.schedulers import CFG_SCHEDULERS, make_scheduler
from backend.neuron.adapters import CastDtype, CpuDataParallel, ShapeGuard, StaticBatch, StaticShapeError
from backend.neuron.specs import InputSpec
from backend.neuron.attention import NeuronAttnProcessor, install_neuron_attention

SIZE = neuron_helpers.SIZE
STEPS = 4
# Tolerances on [0, 1] float pixels, traced parts against the eager reference below, which runs the
# same kernels on the same batches (see eager_pipelines). What each one allows, and why:
# - fp32: MKL/oneDNN fp32 GEMMs and convolutions block their sums by shape, and a frozen graph can
#   fuse differently from eager, so the two differ in the last bits; measured 1-3e-5 after 4 steps on
#   AVX2 and AVX-512 CPUs.
# - bf16: nothing but the final rounding. With the same kernels on the same inputs the result is
#   bit-identical (measured: 0.0 for every scheduler on an AVX2 EPYC), so the bound is one bf16 ulp
#   of the decoder's output mapped to [0, 1] (2**-8). It cannot be wider: the tiny model's random
#   weights turn a one-ulp difference anywhere upstream into ~0.1 of pixel within 4 steps, so any
#   slack large enough for a real kernel difference would also pass a wrong timestep or a wrong
#   scheduler (test_comparison_catches_a_broken_wrapper shows each fails).
FP32_TOL = 1e-4
BF16_TOL = 2.0 ** -8
TOLERANCE = {"fp32": FP32_TOL, "bf16": BF16_TOL}


@pytest.fixture(scope="module")
def eager_pipelines(compiled_root, neuron_backend):
    """Plain eager diffusers pipelines on the root's own model files, one per dtype, computing what the
    compiled parts compute the way they compute it.

    Same kernels: load_pipeline drops requires_grad, as frozen graphs have (torch.matmul picks mm or bmm
    by that flag, and without native bf16 the two round differently). Same batches: the UNet runs on
    the chunks the compiled UNet gets (cores x batch per core, the last padded) and the VAE decodes one
    image at a time (vae.enable_slicing), as the decoder compiled for batch 1 does: oneDNN's bf16
    convolutions round a batch of 2 differently from two batches of 1 on AVX-512 CPUs. Same dtypes:
    the bf16 root keeps its VAE decoder and post_quant_conv in fp32 (compile.py's --vae-dtype default),
    fed through the same cast as the compiled ones (bf16 latents up to fp32, an fp32 image out), with
    the root's fp32 weights (not bf16 weights cast back up).
    """
    from diffusers import AutoencoderKL

    chunk = len(neuron_backend.device_ids) * neuron_backend.sets[0].batch_per_core
    vae = AutoencoderKL.from_pretrained(compiled_root / "vae", dtype=torch.float32).eval().requires_grad_(False)
    pipes = {}
    for precision in ("fp32", "bf16"):
        pipe = pipeline.load_pipeline(str(compiled_root), pipeline.DTYPES[precision], "cpu", local_files_only=True)
        pipe.unet.forward = _in_chunks(pipe.unet.forward, chunk)
        for attr in ("decoder", "post_quant_conv"):
            setattr(pipe.vae, attr, CastDtype(copy.deepcopy(getattr(vae, attr)), torch.float32))
        pipe.vae.enable_slicing()
        pipes[precision] = pipe
    return pipes


_in_chunks = neuron_helpers.in_chunks


def float_images(pipe, request: GenerationRequest, seeds: list[int]) -> np.ndarray:
    """What backend.inprocess.pipeline.run computes, as [0, 1] floats before the PNG rounding."""
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    with torch.inference_mode():
        return pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                    num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                    height=request.height, width=request.width, num_images_per_prompt=len(seeds),
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images


def pixels(images) -> np.ndarray:
    """PIL images as one int array."""
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


# --- the attention processor -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet(compiled_root):
    """The tiny UNet (fp32) and an input for it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(compiled_root / "unet").eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 32, 32, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g))
    return unet, inputs


@pytest.mark.parametrize("kernel", ["bmm", "sdpa"])
def test_attention_processor_is_invoked_and_matches_sdpa(tiny_unet, monkeypatch, kernel):
    unet, inputs = tiny_unet
    with torch.no_grad():
        reference = unet(*inputs).sample  # diffusers' own AttnProcessor2_0
        patched = copy.deepcopy(unet)
        count = install_neuron_attention(patched, kernel)
        calls = []
        original = NeuronAttnProcessor.__call__

        def counting(self, attn, *args, **kwargs):
            calls.append(attn.scale)
            return original(self, attn, *args, **kwargs)

        monkeypatch.setattr(NeuronAttnProcessor, "__call__", counting)
        out = patched(*inputs).sample
    assert count == len(patched.attn_processors) > 0
    assert all(isinstance(p, NeuronAttnProcessor) for p in patched.attn_processors.values())
    assert len(calls) == count  # every attention of the UNet ran through it, once
    assert set(calls) == {16 ** -0.5}  # the tiny model's head_dim is 16: the walk-through's 0.125 would be wrong
    assert (out - reference).abs().max().item() < 1e-5


def test_attention_bf16_no_worse_than_diffusers_classic(tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor

    unet, inputs = tiny_unet
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    args = (inputs[0].bfloat16(), inputs[1], inputs[2].bfloat16())
    with torch.no_grad():
        reference = unet(*inputs).sample  # fp32 SDPA
        sdpa = (bf16(*args).sample.float() - reference).abs().max().item()
        classic = copy.deepcopy(bf16)
        classic.set_attn_processor(AttnProcessor())
        classic_err = (classic(*args).sample.float() - reference).abs().max().item()
        ours = copy.deepcopy(bf16)
        install_neuron_attention(ours)
        ours_err = (ours(*args).sample.float() - reference).abs().max().item()
    assert ours_err <= 1.5 * max(sdpa, classic_err)


@pytest.fixture(scope="module")
def bmm_root(tmp_path_factory):
    """fp32 parts traced with the Neuron graph's attention (explicit matmuls) instead of the CPU's SDPA."""
    from compile_scripts.compile import main

    root = tmp_path_factory.mktemp("bmm") / "root"
    assert main(["--model", "tiny", "--out", str(root), "--target", "cpu", "--dtype", "fp32", "--attention", "bmm",
                 "--height", "128", "--width", "128"]) == 0
    return root


def test_cpu_parts_use_fused_attention(compiled_root):
    code = torch.jit.load(str(compiled_root / "compiled_models" / "fp32" / f"{SIZE}x{SIZE}" / "unet.pt")).code
    assert "scaled_dot_product_attention" in code and "torch.bmm(" not in code


def test_neuron_attention_traced_for_cpu_matches_eager(bmm_root):
    for part in ("unet", "vae_decoder"):
        code = torch.jit.load(str(bmm_root / "compiled_models" / "fp32" / "128x128" / f"{part}.pt")).code
        assert "scaled_dot_product_attention" not in code
        assert code.count("torch.bmm(") >= 2 and "softmax" in code
    backend = NeuronBackend(NeuronSettings(artifacts=str(bmm_root)))
    try:
        request = GenerationRequest(prompt="a lovely cat", steps=STEPS, seed=9, num_images=2,
                                    precision="fp32").validated(backend.capabilities())
        seeds = request.image_seeds(request.seed)
        eager = pipeline.load_pipeline(str(bmm_root), torch.float32, "cpu", local_files_only=True)
        diff = np.abs(float_images(backend._pipelines["fp32"], request, seeds) - float_images(eager, request, seeds))
        assert diff.max() <= FP32_TOL, diff.max()
    finally:
        backend.close()


# --- the NKI flash attention kernel (a stand-in: the real one exists only inside neuronx-cc) -------


def _fake_attention_isa_kernel(q, k, v, scale, out, kernel_name):
    """A CPU stand-in for neuronx-cc's attention_isa_kernel, with the layouts AWS's SD2.1 sample hands it:
    Q and K (batch*heads, head_dim, tokens), V (batch*heads, tokens, head_dim), output written in place."""
    assert kernel_name == "AttentionMMSoftmaxMMWithoutSwap"
    _fake_attention_isa_kernel.calls.append(tuple(q.shape))
    scores = torch.bmm(q.transpose(1, 2), k) * scale
    out.copy_(torch.bmm(scores.softmax(dim=-1), v))


def _install_fake_nki(monkeypatch, private: bool = True) -> None:
    """neuronx-cc's kernel module and torch_neuronx's nki_jit, as sys.modules entries (neither package exists here)."""
    import types

    import diffusers  # noqa: F401 - imported before the stand-ins: it probes for torch_neuronx once, at import

    kernels = types.ModuleType("attention")
    kernels.attention_isa_kernel = _fake_attention_isa_kernel
    ops = types.ModuleType("ops")
    ops.nki_jit = lambda: (lambda kernel: kernel)
    names = ["neuronxcc", "neuronxcc.nki", "neuronxcc.nki._private_kernels", "neuronxcc.nki.kernels",
             "torch_neuronx", "torch_neuronx.xla_impl"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name.rsplit(".", 1)[-1]))
    home = "neuronxcc.nki._private_kernels.attention" if private else "neuronxcc.nki.kernels.attention"
    monkeypatch.setitem(sys.modules, home, kernels)
    monkeypatch.setitem(sys.modules, "torch_neuronx.xla_impl.ops", ops)
    _fake_attention_isa_kernel.calls = []


@pytest.mark.parametrize("private", [True, False], ids=["private-kernels", "kernels"])
def test_nki_attention_runs_self_attention_through_the_kernel(tiny_unet, monkeypatch, private):
    unet, inputs = tiny_unet
    _install_fake_nki(monkeypatch, private)
    with torch.no_grad():
        reference = unet(*inputs).sample
        patched = copy.deepcopy(unet)
        install_neuron_attention(patched, "nki")
        out = patched(*inputs).sample
    self_attention = [m for name, m in patched.named_modules() if name.endswith("attn1")]
    assert self_attention and len(_fake_attention_isa_kernel.calls) == len(self_attention)
    # (batch * heads, head_dim, tokens): the tiny UNet's heads are 16 wide
    assert all(shape[0] % 2 == 0 and shape[1] == 16 for shape in _fake_attention_isa_kernel.calls)
    assert (out - reference).abs().max().item() < 1e-5  # the kernel's layouts and scale are right


def test_nki_attention_keeps_bmm_where_the_kernel_does_not_fit(monkeypatch):
    from diffusers.models.attention_processor import Attention

    _install_fake_nki(monkeypatch)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, 32, generator=g)
    cross = Attention(query_dim=32, cross_attention_dim=32, heads=2, dim_head=16).eval()
    wide = Attention(query_dim=256, heads=1, dim_head=256).eval()  # a VAE-like head: wider than 128
    cases = ((cross, (torch.randn(1, 64, 32, generator=g), text)), (wide, (torch.randn(1, 64, 256, generator=g),)))
    for attn, args in cases:
        with torch.no_grad():
            attn.set_processor(NeuronAttnProcessor("bmm"))
            expected = attn(*args)
            attn.set_processor(NeuronAttnProcessor("nki"))
            got = attn(*args)
        assert torch.equal(got, expected)
    assert _fake_attention_isa_kernel.calls == []


def test_nki_attention_without_neuronx_cc_says_what_to_do():
    from backend.neuron.attention import NkiUnavailable

    if importlib.util.find_spec("neuronxcc") is not None:
        pytest.skip("neuronx-cc is installed here")
    with pytest.raises(NkiUnavailable) as err:
        NeuronAttnProcessor("nki")
    assert "neuronx-cc" in str(err.value) and "--attention bmm" in str(err.value)


# --- generation matches eager -------------------------------------------------------------------


_EAGER_IMAGES: dict = {}


def traced_vs_eager(traced_pipe, eager_pipe, request: GenerationRequest, eager_scheduler: str | None = None) -> float:
    """The largest difference between the compiled pipeline's and the eager reference's float pixels."""
    seeds = request.image_seeds(request.seed)
    traced = float_images(traced_pipe, request, seeds)
    eager_request = dataclasses.replace(request, scheduler=eager_scheduler or request.scheduler)
    key = (id(eager_pipe), eager_request)  # the broken-wrapper tests reuse the references of the good runs
    if key not in _EAGER_IMAGES:
        _EAGER_IMAGES[key] = float_images(eager_pipe, eager_request, seeds)
    eager = _EAGER_IMAGES[key]
    assert traced.shape == eager.shape == (request.num_images, SIZE, SIZE, 3)
    return float(np.abs(traced - eager).max())


def match_request(backend, precision: str, scheduler: str = "dpm++2m", guidance: float = 7.5) -> GenerationRequest:
    """The request every traced-vs-eager comparison runs: 2 images, a negative prompt, STEPS steps."""
    return GenerationRequest(prompt="a lovely cat", negative_prompt="blurry", steps=STEPS, seed=7,
                             scheduler=scheduler, precision=precision, guidance_scale=guidance,
                             num_images=2).validated(backend.capabilities())


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("scheduler", CFG_SCHEDULERS)  # the few-step ones: test_fewstep.py
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_images_match_eager(neuron_backend, eager_pipelines, precision, scheduler, guidance):
    request = match_request(neuron_backend, precision, scheduler, guidance)
    diff = traced_vs_eager(neuron_backend._pipelines[precision], eager_pipelines[precision], request)
    assert diff <= TOLERANCE[precision], diff


# What a wrong wrapper or glue could do to the UNet's inputs. Each must fail the comparison above.
BREAKAGES = {
    "timestep off by one": lambda sample, t, text: (sample, t + 1, text),
    # The walk-through's UNet took its timestep in bf16, which holds 999 as 1000 and 749 as 748.
    "timestep rounded to bf16": lambda sample, t, text: (sample, t.to(torch.bfloat16).float(), text),
    "prompt and negative prompt swapped": lambda sample, t, text: (sample, t, torch.cat(text.chunk(2)[::-1])),
    "latents scaled twice": lambda sample, t, text: (sample * 1.01, t, text),
}


@pytest.mark.parametrize("breakage", [*BREAKAGES, "another scheduler"])
def test_comparison_catches_a_broken_wrapper(neuron_backend, eager_pipelines, monkeypatch, breakage):
    """The bf16 tolerance is tight enough to catch small glue bugs (each changes the images by less than a
    careless tolerance would allow, yet is wrong)."""
    pipe = neuron_backend._pipelines["bf16"]
    request = match_request(neuron_backend, "bf16")
    eager_scheduler = None
    if breakage == "another scheduler":
        eager_scheduler = "dpm++2m-karras"  # same solver, other sigmas: the nearest wrong choice
    else:
        forward, breaking = pipe.unet.forward, BREAKAGES[breakage]

        def broken(sample, timestep, encoder_hidden_states, **kwargs):
            return forward(*breaking(sample, torch.as_tensor(timestep), encoder_hidden_states), **kwargs)

        monkeypatch.setattr(pipe.unet, "forward", broken)
    diff = traced_vs_eager(pipe, eager_pipelines["bf16"], request, eager_scheduler)
    assert diff > BF16_TOL, f"{breakage}: {diff}"


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_generate_matches_local_backend_fp32(neuron_backend, compiled_root, guidance):
    local = create_backend(Settings(backend="local", model=str(compiled_root), device="cpu"))
    request = GenerationRequest(prompt="a lovely cat", steps=STEPS, seed=11, precision="fp32",
                                guidance_scale=guidance, num_images=2, width=SIZE, height=SIZE)
    ours, theirs = neuron_backend.generate(request), local.generate(request)
    assert ours.seeds == theirs.seeds == [11, 12]
    assert [img.size for img in ours.images] == [(SIZE, SIZE)] * 2
    # PNG pixels: at most one level apart where a value sits on a rounding boundary.
    assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1
    assert "Backend: neuron" in ours.infotexts[0]
    assert ours.timings.step_ms and len(ours.timings.step_ms) == STEPS


def test_generate_bf16_odd_batch_is_padded(neuron_backend, eager_pipelines):
    # 3 images without CFG: a UNet batch of 3 runs as chunks of 2 (one per core), the last padded.
    request = GenerationRequest(prompt="a fox", steps=2, seed=3, precision="bf16", guidance_scale=1.0,
                                num_images=3)
    result = neuron_backend.generate(request)
    assert len(result.images) == 3
    eager = eager_pipelines["bf16"]
    eager_images, _ = pipeline.run(eager, result.request, result.seeds,
                                 scheduler=make_scheduler(result.request.scheduler, eager.scheduler.config))
    # PNG pixels: at most one level apart where a value sits on a rounding boundary.
    assert np.abs(pixels(result.images) - pixels(eager_images)).max() <= 1


def test_capabilities(neuron_backend):
    caps = neuron_backend.capabilities()
    assert caps.backend == "neuron"
    assert caps.precisions == ("bf16", "fp32")
    assert caps.fixed_sizes == ((SIZE, SIZE),) and caps.default_size == (SIZE, SIZE)
    assert caps.schedulers == CFG_SCHEDULERS
    assert caps.is_tiny and caps.model == "tiny"
    assert caps.device.startswith("cpu")


# --- requests it cannot run ------------------------------------------------------------------------


def test_other_size_is_an_invalid_request(neuron_backend):
    with pytest.raises(InvalidRequest) as err:
        neuron_backend.generate(GenerationRequest(prompt="cat", width=512, height=512, steps=1))
    assert f"{SIZE}x{SIZE}" in str(err.value) and "512x512" in str(err.value)


# --- the walk-through's flat layout ---------------------------------------------------------------


@pytest.fixture(scope="module")
def walkthrough_root(tiny_dir, tmp_path_factory):
    """The tiny model traced exactly as AWS's walk-through traces SD2.1 (flat layout, no manifest)."""
    return neuron_helpers.trace_walkthrough(tiny_dir, tmp_path_factory.mktemp("walkthrough") / "sd2_512_root")


def assert_walkthrough_code_agrees(backend, root, result) -> None:
    """The backend's images are the walk-through's own loading code's (its wrappers, jit.load, no DataParallel),
    run on the same batches: the UNet on the chunks DataParallel would hand the cores, the VAE one image at
    a time as a decoder compiled for batch 1 must (see eager_pipelines for why both matter)."""
    reference = neuron_helpers.walkthrough_pipeline(root)
    reference.unet.forward = _in_chunks(reference.unet.forward, len(backend.device_ids))
    reference.vae.enable_slicing()
    expected, _ = pipeline.run(reference, result.request, result.seeds,
                             scheduler=make_scheduler(result.request.scheduler, reference.scheduler.config))
    # PNG pixels: at most one level apart where a value sits on a rounding boundary.
    assert np.abs(pixels(result.images) - pixels(expected)).max() <= 1


def test_walkthrough_layout_loads_and_generates(walkthrough_root):
    """One image (the UNet's CFG batch of 2 split over the two cores): its bf16 VAE decode at 512x512 takes ~6 s
    on a CPU without native bf16; two images in a batch, same adapters: test_images_match_eager[bf16-*]."""
    backend = create_backend(Settings(backend="neuron", artifacts=str(walkthrough_root)))
    try:
        caps = backend.capabilities()
        assert caps.precisions == ("bf16",) and caps.fixed_sizes == ((512, 512),)
        assert any("walk-through layout" in n for n in caps.notes)
        request = GenerationRequest(prompt="a lovely cat", steps=2, seed=5, num_images=1)
        result = backend.generate(request)
        assert [img.size for img in result.images] == [(512, 512)]
        assert_walkthrough_code_agrees(backend, walkthrough_root, result)
        with pytest.raises(InvalidRequest) as err:
            backend.generate(GenerationRequest(prompt="cat", precision="fp32", steps=1))
        assert "compiled: bf16" in str(err.value) and "--dtype fp32" in str(err.value)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def walkthrough_fp32_vae_root(walkthrough_root, tmp_path_factory):
    """The walk-through's flat layout as AWS's notebook compiles it: bf16 UNet and text encoder, fp32 VAE parts
    (the same UNet and text encoder files as walkthrough_root's: only the VAE parts are traced again)."""
    return neuron_helpers.walkthrough_with_vae_dtype(walkthrough_root, tmp_path_factory.mktemp("wt-fp32-vae") / "root",
                                                     torch.float32)


def test_walkthrough_layout_with_fp32_vae_loads_and_generates(walkthrough_fp32_vae_root):
    backend = create_backend(Settings(backend="neuron", artifacts=str(walkthrough_fp32_vae_root)))
    try:
        art = backend.sets[0]
        assert art.layout == "flat" and art.dtype == "bf16"
        assert {p: art.part_dtype(p) for p in ("unet", "vae_decoder", "vae_post_quant_conv")} == {
            "unet": "bf16", "vae_decoder": "fp32", "vae_post_quant_conv": "fp32"}
        assert any("vae_decoder fp32" in n for n in backend.capabilities().notes)
        result = backend.generate(GenerationRequest(prompt="a lovely cat", steps=2, seed=5, num_images=2))
        assert [img.size for img in result.images] == [(512, 512)] * 2
        assert_walkthrough_code_agrees(backend, walkthrough_fp32_vae_root, result)  # with the notebook's fp32 cast

        # The CPU stand-in refuses a dtype the part was not compiled for, as the Neuron runtime does.
        # BySize -> CastDtype -> StaticBatch -> ShapeGuard
        guard = backend._pipelines["bf16"].vae.decoder.runner((64, 64)).module.module
        with pytest.raises(StaticShapeError) as err:
            guard(torch.zeros(1, 4, 64, 64, dtype=torch.bfloat16))
        message = str(err.value)
        assert message.startswith("vae_decoder:") and "bfloat16" in message
        assert "compiled for 1x4x64x64 float32" in message
    finally:
        backend.close()


def test_walkthrough_neuron_parts_without_recorded_dtypes_are_probed(walkthrough_fp32_vae_root):
    """Neuron parts of torch 1.13 record their input dtypes only in metadata torch_neuronx reads; the loader
    then runs each part once per candidate dtype. The Neuron runtime refuses a wrong dtype as ShapeGuard does."""
    art = read_root(walkthrough_fp32_vae_root)[0]
    truth = {part: art.input_specs(part) for part in ("text_encoder", "unet", "vae_decoder", "vae_post_quant_conv")}
    parts = {part: ShapeGuard(torch.jit.load(str(art.path(part))), part, specs) for part, specs in truth.items()}
    art.flat_dtypes.clear()
    assemble.probe_flat_dtypes(art, parts)
    assert {part: art.input_specs(part) for part in truth} == truth and art.dtype == "bf16"


def test_archive_records_input_dtypes(walkthrough_fp32_vae_root, compiled_root):
    from backend.neuron.part_archive import traced_input_dtypes, weight_dtype

    flat = walkthrough_fp32_vae_root / "compiled_models"
    assert traced_input_dtypes(flat / "unet.pt") == [torch.bfloat16] * 3  # torch.jit.trace kept its example inputs
    assert traced_input_dtypes(flat / "vae_decoder.pt") == [torch.float32]
    assert traced_input_dtypes(flat / "text_encoder.pt") == [torch.int64]
    frozen = compiled_root / "compiled_models" / "bf16" / f"{SIZE}x{SIZE}"
    assert traced_input_dtypes(frozen / "unet.pt") is None  # torch.jit.freeze drops them; the weights remain
    assert weight_dtype(frozen / "unet.pt") == torch.bfloat16
    assert weight_dtype(frozen / "vae_decoder.pt") == torch.float32


def test_walkthrough_layout_compiled_for_neuron_needs_the_sdk(walkthrough_root, tmp_path):
    import zipfile

    root = neuron_helpers.copy_root(walkthrough_root, tmp_path / "root")
    # A Neuron-traced module calls the neuron custom ops; that is how a manifest-less file is told apart.
    with zipfile.ZipFile(root / "compiled_models" / "unet.pt", "w") as archive:
        archive.writestr("unet/code/__torch__.py",
                         "def forward(self, x):\n  return torch.ops.neuron.forward_v2([x], self.model)\n")
    assert is_neuron_archive(root / "compiled_models" / "unet.pt")
    assert not is_neuron_archive(walkthrough_root / "compiled_models" / "unet.pt")
    with pytest.raises(BackendUnavailable) as err:
        NeuronBackend(NeuronSettings(artifacts=str(root)))
    assert "torch-neuronx" in str(err.value) and "pip.repos.neuron.amazonaws.com" in str(err.value)


# --- broken or foreign roots -----------------------------------------------------------------------


def _manifest(root, dtype):
    return root / "compiled_models" / dtype / "manifest.json"


def _edit_manifest(root, dtype, **changes):
    path = _manifest(root, dtype)
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _unavailable(root) -> str:
    with pytest.raises(BackendUnavailable) as err:
        NeuronBackend(NeuronSettings(artifacts=str(root)))
    return str(err.value)


def test_missing_root(tmp_path):
    message = _unavailable(tmp_path / "nowhere")
    assert "no such folder" in message and "compile_scripts.compile" in message


def test_missing_part(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    (root / "compiled_models" / "fp32" / f"{SIZE}x{SIZE}" / "unet.pt").unlink()
    message = _unavailable(root)
    assert f"fp32 {SIZE}x{SIZE} is missing compiled_models/fp32/{SIZE}x{SIZE}/unet.pt" in message
    assert f"--dtype fp32 --sizes {SIZE}x{SIZE} --parts unet" in message


def test_manifest_of_another_model(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _edit_manifest(root, "bf16", model="stabilityai/stable-diffusion-2-1-base")
    message = _unavailable(root)
    assert "stabilityai/stable-diffusion-2-1-base" in message and "'tiny'" in message and "--force" in message


def test_manifest_of_another_architecture(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _edit_manifest(root, "fp32", architecture={"unet_cross_attention_dim": 1024})
    message = _unavailable(root)
    assert "another model" in message and "unet_cross_attention_dim" in message


def test_manifest_of_another_dtype(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    shutil.copy(_manifest(root, "bf16"), _manifest(root, "fp32"))
    message = _unavailable(root)
    assert "for dtype 'bf16', not the folder's 'fp32'" in message


def test_dtypes_of_different_batches(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _edit_manifest(root, "fp32", batch_per_core=2)
    message = _unavailable(root)
    assert "different batches per core" in message and "bf16: 1" in message and "fp32: 2" in message


def test_model_flag_must_match(compiled_root):
    with pytest.raises(BackendUnavailable) as err:
        NeuronBackend(NeuronSettings(artifacts=str(compiled_root), model="some/other-model"))
    assert "some/other-model" in str(err.value) and "'tiny'" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed here")
def test_neuron_artifacts_without_torch_neuronx(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    for dtype in ("bf16", "fp32"):
        _edit_manifest(root, dtype, target="neuron")
    message = _unavailable(root)
    assert "torch-neuronx" in message and "neuronx-cc" in message
    assert "pip.repos.neuron.amazonaws.com" in message and "--target cpu" in message


def test_versions_are_checked(compiled_root, tmp_path):
    errors, warnings = version_problems({"torch-neuronx": "2.8.0.2.10.1", "neuronx-cc": "2.21.1"},
                                        {"torch-neuronx": "2.9.0.2.15.32035", "neuronx-cc": "2.26.6360.0"}, "neuron")
    assert errors and "torch 2.8" in errors[0] and "torch 2.9" in errors[0]
    errors, warnings = version_problems({"torch-neuronx": "2.9.0.2.14.1", "neuronx-cc": "2.24.5133.0"},
                                        {"torch-neuronx": "2.9.0.2.15.32035", "neuronx-cc": "2.26.6360.0"}, "neuron")
    # Another Neuron SDK release: one warning naming the release that compiled the parts and the installed one.
    assert not errors and len(warnings) == 1 and "recompile with --force" in warnings[0]
    assert "compiled under Neuron SDK 2.29.0" in warnings[0] and "this machine has Neuron SDK 2.31" in warnings[0]
    # AWS's wheels carry a local label; the same build is the same release.
    assert version_problems({"torch-neuronx": "2.9.0.2.15.32035", "neuronx-cc": "2.26.6360.0"},
                            {"torch-neuronx": "2.9.0.2.15.32035+de43f57c", "neuronx-cc": "2.26.6360.0+6f180f47"},
                            "neuron") == ([], [])
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _edit_manifest(root, "bf16", versions={"torch": "2.0.0"})
    sets = read_root(root)
    assert any("torch 2.0.0" in w for w in sets[0].warnings) and not sets[1].warnings


def test_neuron_core_ids():
    assert neuron_core_ids(env={}) == [0, 1]
    assert neuron_core_ids(env={"NEURON_RT_VISIBLE_CORES": "3"}) == [0]
    assert neuron_core_ids(env={"NEURON_RT_VISIBLE_CORES": "0-3"}) == [0, 1]
    assert neuron_core_ids(env={"NEURON_RT_NUM_CORES": "1"}) == [0]
    assert neuron_core_ids(4, env={"NEURON_RT_NUM_CORES": "1"}) == [0, 1, 2, 3]  # --neuron-cores / SD_NEURON_CORES


def test_auto_does_not_pick_cpu_artifacts_without_a_device(compiled_root):
    from backend import choose_backend

    assert choose_backend(Settings(backend="auto", artifacts=str(compiled_root))) == "local"


# --- the shape guard -------------------------------------------------------------------------------


def test_shape_guard_refuses_other_shapes():
    guard = ShapeGuard(torch.nn.Identity(), "vae_decoder", [InputSpec((1, 4, 32, 32), torch.float32)])
    guard(torch.zeros(1, 4, 32, 32))
    with pytest.raises(StaticShapeError, match="input 0 is 2x4x32x32 float32 but the part was compiled for 1x4x32x32"):
        guard(torch.zeros(2, 4, 32, 32))
    with pytest.raises(StaticShapeError, match="1x4x64x64"):
        guard(torch.zeros(1, 4, 64, 64))
    with pytest.raises(StaticShapeError, match="bfloat16"):
        guard(torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16))


def test_data_parallel_stand_in_needs_the_exact_batch():
    guard = ShapeGuard(torch.nn.Identity(), "unet", [InputSpec((1, 3), torch.float32)])
    parallel = CpuDataParallel(guard, [0, 1], batch_per_core=1)
    assert parallel(torch.arange(6.0).reshape(2, 3)).shape == (2, 3)
    with pytest.raises(StaticShapeError, match="needs a batch of 2 x 1"):
        parallel(torch.zeros(4, 3))
    # StaticBatch is what feeds it exact chunks: 3 rows run as 2 + (1 padded to 2).
    assert torch.equal(StaticBatch(parallel, 2)(torch.arange(9.0).reshape(3, 3)), torch.arange(9.0).reshape(3, 3))


def test_guard_catches_shape_bugs_in_the_loaded_pipeline(neuron_backend):
    pipe = neuron_backend._pipelines["fp32"]
    # A request past validation at another size reaches the compiled parts, which refuse it as inf2 would.
    request = GenerationRequest(prompt="cat", steps=1, seed=1, precision="fp32", guidance_scale=7.5,
                                width=SIZE * 2, height=SIZE * 2)
    with pytest.raises(StaticShapeError, match="compiled for"):
        pipeline.run(pipe, request, [1])
    latent = SIZE // 8
    parallel = pipe.unet.unetwrap.module.runner((latent, latent))  # CpuDataParallel under the chunking and BySize
    with pytest.raises(StaticShapeError, match="needs a batch of 2 x 1"):
        parallel(torch.zeros(4, 4, latent, latent), torch.zeros(4), torch.zeros(4, 77, 32))


# --- the app, end to end -----------------------------------------------------------------------


def test_app_generates_through_gradio_client(compiled_root, tmp_path):
    from helpers import run_app
    from gradio_client import Client

    with run_app(["--backend", "neuron", "--artifacts", str(compiled_root)], tmp_path) as app:
        client = Client(app.url, verbose=False)
        result = client.predict(prompt="a lovely cat", steps=2, seed=42, precision="fp32", num_images=2,
                                api_name="/generate")
    gallery, details = result[0], result[1]
    assert len(gallery) == 2
    assert details["backend"] == "neuron" and details["size"] == f"{SIZE}x{SIZE}"
    assert details["seeds"] == [42, 43] and details["precision"] == "fp32"
