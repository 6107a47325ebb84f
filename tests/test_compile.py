"""compile_scripts/compile.py: both ways of running it, the manifest, skipping what is up to date,
the Neuron compiler's arguments, the Neuron path without a device (through a stand-in for
torch_neuronx, which cannot be installed here), and the clear errors (no Neuron SDK here, another
model's root, NKI attention for the CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import neuron_helpers
from backend.neuron import stack
from backend.neuron.parts import PARTS
from compile_scripts.compile import (
    MIN_UNET_MEMORY_GB,
    TARGET_COMPILER_ARGS,
    Compiler,
    compiler_args,
    main,
    part_attention,
    part_dtype,
)
from helpers import ROOT


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="torch-neuronx is installed here")
@pytest.mark.parametrize("invocation", [["-m", "compile_scripts.compile"], ["compile_scripts/compile.py"]],
                         ids=["module", "script"])
def test_target_neuron_without_the_sdk_says_how_to_install_it(invocation, tmp_path):
    out = tmp_path / "root"
    proc = subprocess.run([sys.executable, *invocation, "--model", "tiny", "--out", str(out), "--target", "neuron"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needed in ("torch-neuronx", "neuronx-cc", "pip.repos.neuron.amazonaws.com", "torch 2.9", "--target cpu"):
        assert needed in proc.stderr, needed
    assert not out.exists()  # it stopped before writing anything


def test_manifest_records_what_was_compiled(compiled_root):
    for dtype in ("bf16", "fp32"):
        manifest = json.loads((compiled_root / "compiled_models" / dtype / "manifest.json").read_text())
        size = neuron_helpers.SIZE
        assert manifest["model"] == "tiny" and manifest["dtype"] == dtype and manifest["target"] == "cpu"
        assert manifest["format"] == 2 and manifest["batch_per_core"] == 1 and manifest["tokens"] == 77
        assert list(manifest["sizes"]) == [f"{size}x{size}"]  # --height/--width: one size
        compiled = manifest["sizes"][f"{size}x{size}"]
        assert (compiled["width"], compiled["height"], compiled["latent_height"]) == (size, size, size // 8)
        assert set(manifest["versions"]) == {"torch", "diffusers", "transformers", "torch-neuronx", "neuronx-cc"}
        assert manifest["versions"]["torch-neuronx"] is None and manifest["versions"]["diffusers"]
        assert manifest["architecture"]["unet_in_channels"] == 4
        architecture = manifest["architecture"]
        assert architecture["unet_cross_attention_dim"] == architecture["text_hidden_size"] == 32
        # The text encoder once per dtype, the rest once per size.
        assert set(manifest["parts"]) == {"text_encoder"} and set(compiled["parts"]) == set(PARTS) - {"text_encoder"}
        parts = {**manifest["parts"], **compiled["parts"]}
        assert parts["text_encoder"]["file"] == "text_encoder.pt" and parts["unet"]["file"] == f"{size}x{size}/unet.pt"
        unet = parts["unet"]
        torch_dtype = "bfloat16" if dtype == "bf16" else "float32"
        assert unet["inputs"] == [{"shape": [1, 4, size // 8, size // 8], "dtype": torch_dtype},
                                  {"shape": [1], "dtype": "float32"},
                                  {"shape": [1, 77, 32], "dtype": torch_dtype}]
        assert unet["compiler_args"] == [] and unet["attention"] == "sdpa"  # the CPU target's default kernel
        assert parts["text_encoder"]["attention"] is None
        # Every part records its dtype; the VAE parts are fp32 in both roots, as AWS's notebook compiles them.
        assert {p: e["dtype"] for p, e in parts.items()} == {
            "text_encoder": dtype, "unet": dtype, "vae_decoder": "fp32", "vae_post_quant_conv": "fp32",
            "vae_encoder": "fp32"}
        assert parts["vae_decoder"]["inputs"][0]["dtype"] == "float32"
        assert parts["vae_encoder"]["inputs"] == [{"shape": [1, 3, size, size], "dtype": "float32"}]
        assert manifest["neuron_sdk"] is None  # no Neuron compiler built these
        assert manifest["supported_stack"] == stack.record()
        assert all(p["seconds"] > 0 and (compiled_root / "compiled_models" / dtype / p["file"]).is_file()
                   for p in parts.values())
    assert json.loads((compiled_root / "compiled_models" / "source.json").read_text())["model"] == "tiny"


def test_up_to_date_parts_are_skipped(tmp_path, capsys):
    out = tmp_path / "root"
    args = ["--model", "tiny", "--out", str(out), "--target", "cpu", "--parts", "vae_post_quant_conv",
            "--height", "128", "--width", "128"]
    part = out / "compiled_models" / "bf16" / "128x128" / "vae_post_quant_conv.pt"
    assert main(args) == 0
    first = part.stat().st_mtime_ns
    capsys.readouterr()

    assert main(args) == 0
    log = capsys.readouterr().out
    assert "already holds tiny" in log and "vae_post_quant_conv: up to date" in log and "tracing" not in log
    assert part.stat().st_mtime_ns == first

    assert main(args + ["--force"]) == 0
    assert "vae_post_quant_conv: tracing" in capsys.readouterr().out
    assert part.stat().st_mtime_ns != first

    # Another size is added beside the first, which stays as it is.
    assert main(args[:-4] + ["--height", "64", "--width", "64"]) == 0
    log = capsys.readouterr().out
    assert "64x64 vae_post_quant_conv: tracing" in log and "128x128" not in log
    assert part.stat().st_mtime_ns != first  # (the --force run's)
    manifest = json.loads((out / "compiled_models" / "bf16" / "manifest.json").read_text())
    assert list(manifest["sizes"]) == ["128x128", "64x64"]
    assert manifest["sizes"]["64x64"]["parts"]["vae_post_quant_conv"]["inputs"][0]["shape"] == [1, 4, 8, 8]

    # A change to what every part shares makes them all stale.
    assert main(args[:-4] + ["--height", "64", "--width", "64", "--vae-dtype", "same"]) == 0
    assert "64x64 vae_post_quant_conv: tracing" in capsys.readouterr().out


def test_another_model_into_the_same_root_is_refused(compiled_root, tiny_dir, tmp_path, capsys):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    assert main(["--model", str(tiny_dir), "--out", str(root), "--target", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "holds the files of model 'tiny'" in err and "--force" in err


def test_size_must_be_a_multiple_of_8(tmp_path, capsys):
    assert main(["--model", "tiny", "--out", str(tmp_path / "r"), "--target", "cpu", "--height", "500"]) == 2
    assert "--height 500" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_neuron_compiler_arguments():
    unet = compiler_args("unet", "bf16", "neuron")
    assert unet[:2] == ["--model-type=unet-inference", "--enable-fast-loading-neuron-binaries"]
    assert unet[2:] == ["--auto-cast=matmult", "--auto-cast-type=bf16"]
    assert compiler_args("vae_decoder", "fp32", "neuron") == ["--model-type=unet-inference",
                                                              "--enable-fast-loading-neuron-binaries"]
    assert "--auto-cast=matmult" in compiler_args("vae_post_quant_conv", "bf16", "neuron")
    assert "--auto-cast=matmult" not in compiler_args("text_encoder", "fp32", "neuron")
    assert compiler_args("text_encoder", "bf16", "neuron")[0] == "--model-type=transformer"  # as optimum-neuron
    assert all(compiler_args(p, "bf16", "cpu") == [] for p in PARTS)


def test_bf16_parts_keep_the_compilers_fp32_accumulation():
    # neuronx-cc 2.22 turned mixed-precision accumulation on and names --disable-mixed-precision-accumulation for the
    # old behaviour; compile.py restores only the old --auto-cast (BF16_COMPILER_ARGS says why), as docs/neuron.md
    # ("Precision") states.
    for part in PARTS:
        for dtype in ("bf16", "fp32"):
            args = compiler_args(part, dtype, "neuron")
            assert not any("mixed-precision-accumulation" in a for a in args), (part, dtype, args)
    assert TARGET_COMPILER_ARGS == ["--target=inf2"]


def test_part_dtypes_and_attention():
    assert PARTS == ("text_encoder", "unet", "vae_decoder", "vae_post_quant_conv", "vae_encoder")
    assert [part_dtype(p, "bf16") for p in PARTS] == ["bf16", "bf16", "fp32", "fp32", "fp32"]
    assert [part_dtype(p, "bf16", "same") for p in PARTS] == ["bf16"] * 5
    assert [part_dtype(p, "fp32", "same") for p in PARTS] == ["fp32"] * 5
    # The VAE's one head is too wide for the NKI kernel, in the decoder and the encoder.
    assert [part_attention(p, "nki") for p in PARTS] == [None, "nki", "bmm", None, "bmm"]
    assert [part_attention(p, "sdpa") for p in PARTS] == [None, "sdpa", "sdpa", None, "sdpa"]


def test_vae_dtype_same_keeps_the_vae_in_the_asked_dtype(tmp_path):
    out = tmp_path / "root"
    assert main(["--model", "tiny", "--out", str(out), "--target", "cpu", "--parts", "vae_post_quant_conv",
                 "--height", "64", "--width", "64", "--vae-dtype", "same"]) == 0
    manifest = json.loads((out / "compiled_models" / "bf16" / "manifest.json").read_text())
    entry = manifest["sizes"]["64x64"]["parts"]["vae_post_quant_conv"]
    assert entry["dtype"] == "bf16" and entry["inputs"][0]["dtype"] == "bfloat16"


def test_nki_attention_cannot_be_traced_for_the_cpu(tmp_path, capsys):
    out = tmp_path / "root"
    assert main(["--model", "tiny", "--out", str(out), "--target", "cpu", "--attention", "nki"]) == 1
    err = capsys.readouterr().err
    assert "--attention nki" in err and "neuronx-cc" in err and "--attention bmm" in err
    assert not out.exists()


class FakeTorchNeuronx(types.ModuleType):
    """A stand-in for torch_neuronx (which only installs from AWS's index): trace() records how it was
    called and returns a CPU trace, so the compile script's Neuron path runs end to end here."""

    def __init__(self):
        super().__init__("torch_neuronx")
        self.calls: list[dict] = []

    def trace(self, module, example_inputs, *, compiler_workdir=None, compiler_args=None, cpu_backend=False):
        self.calls.append({"compiler_args": list(compiler_args), "cpu_backend": cpu_backend,
                           "platform": os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE")})
        return torch.jit.trace(module, example_inputs, check_trace=False)


@pytest.fixture
def fake_neuron_sdk(monkeypatch):
    """FakeTorchNeuronx as `torch_neuronx`, neuronx-cc's NKI attention kernel as a CPU stand-in, and an
    environment of its own (the compile sets NEURON_* variables)."""
    import diffusers  # noqa: F401 - imported before the stand-ins: it probes for torch_neuronx once, at import

    sdk = FakeTorchNeuronx()
    ops = types.ModuleType("ops")
    ops.nki_jit = lambda: (lambda kernel: kernel)
    kernels = types.ModuleType("attention")

    def attention_isa_kernel(q, k, v, scale, out, kernel_name):
        out.copy_(torch.bmm((torch.bmm(q.transpose(1, 2), k) * scale).softmax(dim=-1), v))

    kernels.attention_isa_kernel = attention_isa_kernel
    modules = {"torch_neuronx": sdk, "torch_neuronx.xla_impl": types.ModuleType("xla_impl"),
               "torch_neuronx.xla_impl.ops": ops, "neuronxcc": types.ModuleType("neuronxcc"),
               "neuronxcc.nki": types.ModuleType("nki"), "neuronxcc.nki._private_kernels": types.ModuleType("pk"),
               "neuronxcc.nki._private_kernels.attention": kernels}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")})
    return sdk


@pytest.mark.parametrize("device", [False, True], ids=["no-device", "inf2"])
def test_target_neuron_compiles_for_inf2_with_or_without_a_device(fake_neuron_sdk, monkeypatch, tmp_path, capsys,
                                                                   device):
    import compile_scripts.compile as compile_module

    monkeypatch.setattr(compile_module, "neuron_devices", lambda: [Path("/dev/neuron0")] if device else [])
    out = tmp_path / "root"
    assert main(["--model", "tiny", "--out", str(out), "--target", "neuron", "--attention", "nki",
                 "--parts", "text_encoder", "unet", "vae_decoder", "--height", "64", "--width", "64"]) == 0
    log = capsys.readouterr().out
    assert ("cpu_backend=True" in log) is not device
    calls = fake_neuron_sdk.calls
    assert [c["cpu_backend"] for c in calls] == [not device] * 3
    assert [c["platform"] for c in calls] == [None if device else "inf2"] * 3  # told before torch_neuronx is imported
    assert all(c["compiler_args"][0] == "--target=inf2" for c in calls)
    assert calls[0]["compiler_args"][1] == "--model-type=transformer"
    assert "--auto-cast=matmult" in calls[1]["compiler_args"] and "--auto-cast=matmult" not in calls[2]["compiler_args"]
    manifest = json.loads((out / "compiled_models" / "bf16" / "manifest.json").read_text())
    assert manifest["target"] == "neuron"
    parts = {**manifest["parts"], **manifest["sizes"]["64x64"]["parts"]}
    assert parts["unet"]["attention"] == "nki" and parts["vae_decoder"]["attention"] == "bmm"
    assert parts["vae_decoder"]["dtype"] == "fp32" and parts["unet"]["compiler_args"] == calls[1]["compiler_args"]


def test_warns_before_the_unet_when_memory_is_short(monkeypatch, tmp_path):
    import compile_scripts.compile as compile_module

    lines: list[str] = []
    compiler = Compiler("tiny", tmp_path, [(512, 512)], "cpu", echo=lines.append)
    monkeypatch.setattr(compile_module, "host_memory_gb", lambda: 16.0)
    compiler.warn_if_short_of_memory()
    assert lines and "16 GB" in lines[0] and f"{MIN_UNET_MEMORY_GB} GB" in lines[0] and "inf2.8xlarge" in lines[0]
    lines.clear()
    monkeypatch.setattr(compile_module, "host_memory_gb", lambda: 128.0)
    compiler.warn_if_short_of_memory()
    assert not lines
