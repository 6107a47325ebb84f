"""Few-step models and --lora: a tiny model saved with SD-Turbo's scheduler config runs 1-step generations without
guidance through the local, neuron (CPU stand-in) and SageMaker backends (the real endpoint code); a tiny LoRA
fused at load equals diffusers' own fuse_lora, and fused at compile time gives the same UNet output."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from backend import BackendUnavailable, GenerationRequest, InvalidRequest, Settings, create_backend
from backend.core.fewstep import few_step_kind, kind_from_scheduler_config
from backend.core.metadata import parse_infotext
from helpers import free_port
from serving.handler import Handler
from serving.server import EndpointServer

# SD-Turbo's scheduler config, as stabilityai/sd-turbo ships it (scheduler/scheduler_config.json on the Hub).
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "trailing", "timestep_type": "discrete", "use_karras_sigmas": False,
}
SIZE = 64


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory) -> Path:
    """The tiny model saved as a diffusers folder with SD-Turbo's scheduler config."""
    from backend.models.tiny import save

    folder = save(tmp_path_factory.mktemp("turbo") / "tiny-turbo")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_TURBO_SCHEDULER))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", SD_TURBO_SCHEDULER["_class_name"]]  # SD-Turbo's model_index.json names it too
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def turbo_backend(turbo_folder):
    backend = create_backend(Settings(backend="local", model=str(turbo_folder), device="cpu", optimize="none"))
    yield backend
    backend.close()


def unet_batches(unet) -> tuple[list[int], object]:
    """The batch size of every UNet call, recorded by a forward pre-hook (and the hook's handle)."""
    batches: list[int] = []

    def record(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        batches.append(int(sample.shape[0]))

    return batches, unet.register_forward_pre_hook(record, with_kwargs=True)


def test_the_kind_comes_from_the_scheduler_config_or_the_flag():
    assert kind_from_scheduler_config(SD_TURBO_SCHEDULER) == "turbo"
    assert kind_from_scheduler_config({"_class_name": "LCMScheduler"}) == "lcm"
    assert kind_from_scheduler_config({"_class_name": "TCDScheduler"}) == "tcd"
    sd21 = {"_class_name": "DDIMScheduler", "timestep_spacing": "leading"}
    assert kind_from_scheduler_config(sd21) is None
    assert few_step_kind("lcm", sd21) == "lcm" and few_step_kind("off", SD_TURBO_SCHEDULER) is None
    assert Settings.from_args(["--few-step", "tcd"], env={}).few_step == "tcd"
    assert Settings.from_args([], env={"SD_FEW_STEP": "turbo", "SD_LORA": "x"}).lora == "x"


def test_a_turbo_model_runs_one_step_with_one_unet_batch_and_no_guidance(turbo_backend):
    caps = turbo_backend.capabilities()
    assert (caps.guidance, caps.default_steps, caps.max_steps, caps.schedulers) == (False, 1, 4, ("euler-a-trailing",))
    pipe = turbo_backend._pipelines["fp32"]
    batches, hook = unet_batches(pipe.unet)
    try:
        result = turbo_backend.generate(GenerationRequest("a lovely cat", width=SIZE, height=SIZE, seed=3))
    finally:
        hook.remove()
    assert batches == [1]  # one step, no CFG batch
    request = result.request
    assert (request.steps, request.guidance_scale, request.scheduler) == (1, 0.0, "euler-a-trailing")
    params = parse_infotext(result.infotexts[0])["params"]
    assert (params["Steps"], params["Sampler"], params["CFG scale"]) == ("1", "Euler a trailing", "0")


def test_a_turbo_model_refuses_what_guidance_would_need(turbo_backend):
    with pytest.raises(InvalidRequest, match="negative_prompt: .*without guidance") as info:
        turbo_backend.generate(GenerationRequest("cat", negative_prompt="dog", width=SIZE, height=SIZE))
    assert info.value.field == "negative_prompt"
    with pytest.raises(InvalidRequest, match="guidance_scale: 7.5 .*use 0") as info:
        turbo_backend.generate(GenerationRequest("cat", guidance_scale=7.5, width=SIZE, height=SIZE))
    with pytest.raises(InvalidRequest, match="steps: 20 is out of range; use a whole number from 1 to 4"):
        turbo_backend.generate(GenerationRequest("cat", steps=20, width=SIZE, height=SIZE))
    with pytest.raises(InvalidRequest, match=r"scheduler: .*Euler a trailing \(euler-a-trailing\)"):
        turbo_backend.generate(GenerationRequest("cat", scheduler="dpm++2m", width=SIZE, height=SIZE))
    # Guidance 1 is allowed: diffusers runs no CFG batch at or below 1.
    assert turbo_backend.generate(GenerationRequest("cat", guidance_scale=1, steps=2, width=SIZE, height=SIZE,
                                                    seed=1)).request.steps == 2


def test_a_cfg_model_keeps_its_defaults(tiny_backend):
    caps = tiny_backend.capabilities()
    assert (caps.guidance, caps.default_steps, caps.schedulers[0]) == (True, 20, "dpm++2m")
    assert "lcm" not in caps.schedulers
    request = GenerationRequest("cat").validated(caps)
    assert (request.steps, request.guidance_scale, request.scheduler) == (20, 7.5, "dpm++2m")


def test_few_step_mode_reaches_the_sagemaker_backend_through_describe(turbo_backend, aws_env):
    handler = Handler(turbo_backend)
    server = EndpointServer(("127.0.0.1", free_port()), handler, endpoint_name="sd-turbo", region=aws_env)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = create_backend(Settings(backend="sagemaker", endpoint_name="sd-turbo", region=aws_env,
                                          endpoint_url=server.url))
        caps = backend.capabilities()
        assert (caps.guidance, caps.default_steps, caps.schedulers) == (False, 1, ("euler-a-trailing",))
        with pytest.raises(InvalidRequest, match="negative_prompt"):
            backend.generate(GenerationRequest("cat", negative_prompt="dog", width=SIZE, height=SIZE))
        batches, hook = unet_batches(turbo_backend._pipelines["fp32"].unet)
        try:
            result = backend.generate(GenerationRequest("a lovely cat", width=SIZE, height=SIZE, seed=3))
        finally:
            hook.remove()
        assert batches == [1] and len(result.timings.step_ms) == 1
        local = turbo_backend.generate(GenerationRequest("a lovely cat", width=SIZE, height=SIZE, seed=3))
        assert result.images[0].tobytes() == local.images[0].tobytes()
        backend.close()
    finally:
        server.shutdown()
        server.server_close()


# ---- --lora ------------------------------------------------------------------------------------


def save_tiny_lora(folder: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA on the tiny UNet's attention projections, with random (non-zero) up weights, saved the diffusers way."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from backend.models.tiny import build_pipeline

    torch.manual_seed(seed)
    unet = build_pipeline().unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> Path:
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny-lora")


def plain_state(unet) -> dict[str, torch.Tensor]:
    """A UNet's weights under their plain names: a peft layer's base_layer (where fuse_lora wrote) as the module's."""
    return {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items() if "lora_" not in key}


def test_lora_fused_at_load_equals_diffusers_own_fuse_lora(lora_folder, tiny_backend):
    from backend.models.tiny import build_pipeline

    backend = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none",
                                      lora=str(lora_folder)))
    try:
        fused = backend._pipelines["fp32"].unet
        assert not any("lora" in type(m).__name__.lower() for m in fused.modules())  # plain modules again
        reference = build_pipeline()
        reference.load_lora_weights(str(lora_folder))
        reference.fuse_lora()
        expected = plain_state(reference.unet)
        got = fused.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        base = build_pipeline().unet.state_dict()
        to_q = next(key for key in got if key.endswith("attn1.to_q.weight"))
        assert not torch.equal(got[to_q], base[to_q])  # the LoRA changed the weights
        backend.generate(GenerationRequest("cat", steps=1, width=SIZE, height=SIZE))
    finally:
        backend.close()


@pytest.mark.parametrize("kind", ["missing", "not-a-lora", "mismatched"])
def test_a_bad_lora_is_refused_naming_the_flag(kind, tmp_path):
    from safetensors.torch import save_file

    if kind == "missing":
        source, words = tmp_path / "nowhere", "no such file or folder"
    elif kind == "not-a-lora":
        source, words = tmp_path / "weights.safetensors", "could not be loaded as a LoRA .*Invalid LoRA checkpoint"
        save_file({"some.weight": torch.zeros(2, 2)}, source)
    else:  # made for a model whose attention is wider than the tiny UNet's
        source, words = save_tiny_lora(tmp_path / "wide", rank=4), "could not be loaded as a LoRA"
        path = source / "pytorch_lora_weights.safetensors"
        from safetensors.torch import load_file

        state = {key: torch.zeros(value.shape[0], value.shape[1] * 2) if "lora_A" in key else value
                 for key, value in load_file(path).items()}
        save_file(state, path)
    with pytest.raises(BackendUnavailable, match=f"--lora .*{words}"):
        create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none", lora=str(source)))


# ---- the neuron backend (CPU stand-in): compiled few-step, LoRA fused at compile time -----------------------


@pytest.fixture(scope="module")
def lora_turbo_root(tmp_path_factory, lora_folder) -> Path:
    """The tiny model with the tiny LoRA fused and SD-Turbo's scheduler, compiled for the CPU in fp32 at SIZE."""
    from compile_scripts.compile import main

    root = tmp_path_factory.mktemp("fewstep-root") / "root"
    assert main(["--model", "tiny", "--out", str(root), "--target", "cpu", "--dtype", "fp32", "--sizes",
                 f"{SIZE}x{SIZE}", "--lora", str(lora_folder), "--few-step", "turbo"]) == 0
    return root


def test_compile_records_the_lora_and_the_few_step_scheduler(lora_turbo_root, lora_folder):
    from backend.inprocess.lora import lora_sha256

    manifest = json.loads((lora_turbo_root / "compiled_models" / "fp32" / "manifest.json").read_text())
    assert manifest["lora"] == {"source": str(lora_folder.resolve()), "sha256": lora_sha256(str(lora_folder))}
    config = json.loads((lora_turbo_root / "scheduler" / "scheduler_config.json").read_text())
    assert (config["_class_name"], config["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")


def test_the_neuron_backend_runs_a_compiled_few_step_root_without_guidance(lora_turbo_root, lora_folder, tmp_path):
    backend = create_backend(Settings(backend="neuron", artifacts=str(lora_turbo_root)))
    try:
        caps = backend.capabilities()
        assert (caps.guidance, caps.default_steps, caps.schedulers) == (False, 1, ("euler-a-trailing",))
        batches, hook = unet_batches(backend._pipelines["fp32"].unet)
        try:
            result = backend.generate(GenerationRequest("a lovely cat", seed=3))
        finally:
            hook.remove()
        assert batches == [1] and result.request.steps == 1
        with pytest.raises(InvalidRequest, match="negative_prompt"):
            backend.generate(GenerationRequest("cat", negative_prompt="dog"))
    finally:
        backend.close()
    # --lora with a neuron root: only the LoRA it was compiled with (no run-time LoRA on Neuron graphs).
    assert create_backend(Settings(backend="neuron", artifacts=str(lora_turbo_root),
                                   lora=str(lora_folder))).lora["sha256"]
    other = save_tiny_lora(tmp_path / "other", seed=1)
    with pytest.raises(BackendUnavailable, match="--lora .*fused at compile time.*compile_scripts.compile --lora"):
        create_backend(Settings(backend="neuron", artifacts=str(lora_turbo_root), lora=str(other)))


def test_the_compile_time_fused_unet_gives_the_local_fused_unets_output(lora_turbo_root, lora_folder):
    local = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none",
                                    lora=str(lora_folder)))
    neuron = create_backend(Settings(backend="neuron", artifacts=str(lora_turbo_root)))
    try:
        unet = local._pipelines["fp32"].unet
        traced = neuron._pipelines["fp32"].unet
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1, unet.config.in_channels, SIZE // 8, SIZE // 8, generator=generator)
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
        t = torch.tensor([999])
        with torch.inference_mode():
            expected = unet(sample, t, encoder_hidden_states=hidden).sample
            got = traced(sample, t, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        local.close()
        neuron.close()


# ---- benchmarks/latency.py: the few-step rows --------------------------------------------------


def test_latency_script_runs_a_few_step_model_at_1_2_and_4_steps_without_cfg(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.latency", "--model", "tiny", "--few-step", "turbo", "--device", "cpu",
         "--optimize", "none", "--precisions", "fp32", "--runs", "1", "--warmup", "0", "--width", "64", "--height",
         "64", "--json", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| steps | CFG | P50 (s) |" in done.stdout
    rows = json.loads(out.read_text())
    assert [(r["steps"], r["cfg"]) for r in rows] == [(1, False), (2, False), (4, False)]


@pytest.mark.parametrize("kind", ["turbo", "lcm", "tcd"])
def test_each_few_step_scheduler_matches_diffusers_without_guidance(kind):
    """--few-step KIND on a CFG model's folder: its scheduler, run as diffusers runs it at guidance 0 (TCD with the
    eta its LoRA's card recommends)."""
    import numpy as np

    from backend.core.fewstep import FEW_STEP_KINDS, step_eta
    from backend.core.schedulers import scheduler_class_and_overrides
    from backend.models.tiny import build_pipeline

    key = FEW_STEP_KINDS[kind][0]
    backend = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none", few_step=kind))
    try:
        assert backend.capabilities().schedulers == (key,)
        ours = backend.generate(GenerationRequest("a lovely cat", steps=2, seed=5, width=SIZE, height=SIZE))
    finally:
        backend.close()
    cls, overrides = scheduler_class_and_overrides(key)
    pipe = build_pipeline()
    pipe.scheduler = cls.from_config({**pipe.scheduler.config, "steps_offset": 1}, **overrides)
    bare = pipe("a lovely cat", num_inference_steps=2, guidance_scale=0.0, height=SIZE, width=SIZE,
                eta=step_eta(key), generator=[torch.Generator().manual_seed(5)]).images[0]
    assert np.abs(np.asarray(ours.images[0], dtype=np.int16) - np.asarray(bare, dtype=np.int16)).max() <= 1


def test_the_page_hides_guidance_and_negative_prompt_in_every_tab_and_says_why(turbo_backend, tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    import app

    demo = app.build_demo(turbo_backend, Settings())
    blocks = list(demo.blocks.values())
    negatives = [b for b in blocks if isinstance(b, gr.Textbox) and b.label == "Negative prompt"]
    guidance = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Guidance scale"]
    steps = [b for b in blocks if isinstance(b, gr.Slider) and b.label == "Steps"]
    notes = {b.elem_id: b.value for b in blocks if isinstance(b, gr.Markdown) and (b.elem_id or "").startswith(
        "no-guidance")}
    assert len(negatives) == len(guidance) == len(steps) == 3  # one per generating tab
    assert not any(b.visible for b in negatives + guidance)
    assert [(s.value, s.maximum) for s in steps] == [(1, 4)] * 3
    assert set(notes) == {"no-guidance", "no-guidance-img2img", "no-guidance-inpaint"}
    assert all("without classifier-free guidance" in text for text in notes.values())
