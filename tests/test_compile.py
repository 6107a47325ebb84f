"""compile_scripts/compile.py: both ways of running it, the manifest, skipping what is up to date,
the Neuron compiler's arguments, and the clear errors (no Neuron SDK here, another model's root)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import neuron_helpers
from compile_scripts.compile import (
    MIN_UNET_MEMORY_GB,
    PARTS,
    Compiler,
    compiler_args,
    main,
)
from conftest import ROOT


@pytest.fixture(scope="session")
def compiled_root(tmp_path_factory):
    """The tiny model traced for the CPU, bf16 and fp32 (shared with test_neuron.py)."""
    return neuron_helpers.compiled_root(tmp_path_factory)


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
        assert (manifest["height"], manifest["width"], manifest["batch_per_core"]) == (size, size, 1)
        assert manifest["tokens"] == 77 and manifest["latent_height"] == size // 8
        assert set(manifest["versions"]) == {"torch", "diffusers", "transformers", "torch-neuronx", "neuronx-cc"}
        assert manifest["versions"]["torch-neuronx"] is None and manifest["versions"]["diffusers"]
        assert manifest["architecture"]["unet_in_channels"] == 4
        assert manifest["architecture"]["unet_cross_attention_dim"] == manifest["architecture"]["text_hidden_size"] == 32
        assert set(manifest["parts"]) == set(PARTS)
        unet = manifest["parts"]["unet"]
        torch_dtype = "bfloat16" if dtype == "bf16" else "float32"
        assert unet["inputs"] == [{"shape": [1, 4, size // 8, size // 8], "dtype": torch_dtype},
                                  {"shape": [1], "dtype": "float32"},
                                  {"shape": [1, 77, 32], "dtype": torch_dtype}]
        assert unet["compiler_args"] == [] and unet["attention"] == "sdpa"  # the CPU target's default kernel
        assert manifest["parts"]["text_encoder"]["attention"] is None
        assert all(p["seconds"] > 0 and (compiled_root / "compiled_models" / dtype / p["file"]).is_file()
                   for p in manifest["parts"].values())
    assert json.loads((compiled_root / "compiled_models" / "source.json").read_text())["model"] == "tiny"


def test_up_to_date_parts_are_skipped(tmp_path, capsys):
    out = tmp_path / "root"
    args = ["--model", "tiny", "--out", str(out), "--target", "cpu", "--parts", "vae_post_quant_conv",
            "--height", "128", "--width", "128"]
    part = out / "compiled_models" / "bf16" / "vae_post_quant_conv.pt"
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

    assert main(args[:-4] + ["--height", "64", "--width", "64"]) == 0
    log = capsys.readouterr().out
    assert "settings changed (height, width, latent_height, latent_width)" in log and "tracing" in log
    manifest = json.loads((out / "compiled_models" / "bf16" / "manifest.json").read_text())
    assert manifest["parts"]["vae_post_quant_conv"]["inputs"][0]["shape"] == [1, 4, 8, 8]


def test_another_model_into_the_same_root_is_refused(compiled_root, tiny_dir, tmp_path, capsys):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    assert main(["--model", str(tiny_dir), "--out", str(root), "--target", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "holds the files of model 'tiny'" in err and "--force" in err


def test_size_must_be_a_multiple_of_8(tmp_path, capsys):
    assert main(["--model", "tiny", "--out", str(tmp_path / "r"), "--target", "cpu", "--height", "500"]) == 2
    assert "--height 500" in capsys.readouterr().err


def test_neuron_compiler_arguments():
    unet = compiler_args("unet", "bf16", "neuron")
    assert unet[:2] == ["--model-type=unet-inference", "--enable-fast-loading-neuron-binaries"]
    assert unet[2:] == ["--auto-cast=matmult", "--auto-cast-type=bf16"]
    assert compiler_args("vae_decoder", "fp32", "neuron") == ["--model-type=unet-inference",
                                                              "--enable-fast-loading-neuron-binaries"]
    assert "--auto-cast=matmult" in compiler_args("vae_post_quant_conv", "bf16", "neuron")
    assert "--auto-cast=matmult" not in compiler_args("text_encoder", "fp32", "neuron")
    assert all(compiler_args(p, "bf16", "cpu") == [] for p in PARTS)


def test_warns_before_the_unet_when_memory_is_short(monkeypatch, tmp_path):
    import compile_scripts.compile as compile_module

    lines: list[str] = []
    compiler = Compiler("tiny", tmp_path, 512, 512, "cpu", echo=lines.append)
    monkeypatch.setattr(compile_module, "host_memory_gb", lambda: 16.0)
    compiler.warn_if_short_of_memory()
    assert lines and "16 GB" in lines[0] and f"{MIN_UNET_MEMORY_GB} GB" in lines[0] and "inf2.8xlarge" in lines[0]
    lines.clear()
    monkeypatch.setattr(compile_module, "host_memory_gb", lambda: 128.0)
    compiler.warn_if_short_of_memory()
    assert not lines
