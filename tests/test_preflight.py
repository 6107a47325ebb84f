"""backend/neuron/preflight.py and `python -m compile_scripts.doctor`: a good CPU root passes with its smoke
generation; broken roots (a missing part, a wrong dtype in the manifest, parts of another torch-neuronx
line, a corrupt .pt) fail with a message naming what is wrong and what to do.

Neuron parts cannot run here: the Neuron checks run against a CPU root whose manifest says "neuron",
with the installed versions and the devices stubbed where noted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import neuron_helpers
from backend.neuron import preflight
from compile_scripts.doctor import main
from helpers import ROOT


def _edit_manifest(root: Path, dtype: str, edit) -> None:
    path = root / "compiled_models" / dtype / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _size_parts(manifest: dict) -> dict:
    """The part entries of the root's one size."""
    (compiled,) = manifest["sizes"].values()
    return compiled["parts"]


def _errors(findings) -> list[str]:
    return [f"{f.what} -> {f.fix}" for f in findings if f.level == "error"]


def test_good_root_passes_with_a_smoke_generation(compiled_root, capsys):
    assert main(["--artifacts", str(compiled_root)]) == 0
    out = capsys.readouterr().out
    size = neuron_helpers.SIZE
    for needed in ("[ok     ] Python", f"bf16 unet {size}x{size}: bf16, inputs 1x4x32x32 bfloat16, 1 float32, "
                   "1x77x32 bfloat16", f"bf16 vae_decoder {size}x{size}: fp32, inputs 1x4x32x32 float32",
                   f"bf16 vae_encoder {size}x{size}: fp32, inputs 1x3x{size}x{size} float32",
                   "bf16 text_encoder: bf16, inputs 1x77 int64",
                   f"sizes {size}x{size}: device memory per NeuronCore, from the part files: {size}x{size} ",
                   f"smoke generation bf16, {size}x{size}, 1 step",
                   "smoke generation fp32", "0 error(s)", "python app.py --backend neuron"):
        assert needed in out, needed
    assert "ERROR" not in out


def test_findings_have_levels_and_say_what_to_do(compiled_root):
    findings = preflight.check(compiled_root, smoke=False)
    assert findings and not preflight.failed(findings)
    assert all(f.level in preflight.LEVELS for f in findings)
    assert all(f.fix for f in findings if f.level != "ok")
    with pytest.raises(ValueError):
        preflight.Finding("fatal", "no such level")


def test_missing_part(compiled_root, tmp_path, capsys):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    size = f"{neuron_helpers.SIZE}x{neuron_helpers.SIZE}"
    (root / "compiled_models" / "fp32" / size / "vae_decoder.pt").unlink()
    assert main(["--artifacts", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"fp32/{size}/vae_decoder.pt" in out and f"--sizes {size} --parts vae_decoder" in out
    assert "smoke generation" not in out


def test_wrong_dtype_in_the_manifest(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")

    def claim_bf16(manifest):  # the part holds fp32 weights and takes fp32 inputs
        entry = _size_parts(manifest)["vae_decoder"]
        entry["dtype"], entry["inputs"][0]["dtype"] = "bf16", "bfloat16"

    _edit_manifest(root, "bf16", claim_bf16)
    errors = _errors(preflight.check(root))
    assert len(errors) == 1
    assert "bf16 vae_decoder" in errors[0] and "holds fp32 weights, but it is recorded as bf16" in errors[0]
    assert "--parts vae_decoder --force" in errors[0]


def test_inconsistent_part_dtype_in_the_manifest(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _edit_manifest(root, "bf16", lambda m: _size_parts(m)["vae_post_quant_conv"].update(dtype="bf16"))
    errors = _errors(preflight.check(root, smoke=False))
    assert errors and "vae_post_quant_conv is recorded as bf16 but its inputs as torch.float32" in errors[0]


def test_corrupt_part(compiled_root, tmp_path):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    size = f"{neuron_helpers.SIZE}x{neuron_helpers.SIZE}"
    (root / "compiled_models" / "bf16" / size / "unet.pt").write_bytes(b"not a zip archive")
    errors = _errors(preflight.check(root))
    assert len(errors) == 1 and "bf16 unet" in errors[0] and "not a readable TorchScript archive" in errors[0]
    assert "--parts unet --force" in errors[0]


def _as_neuron(root: Path, torch_neuronx: str) -> None:
    for dtype in ("bf16", "fp32"):
        _edit_manifest(root, dtype, lambda m: (m.update(target="neuron"),
                                               m["versions"].update({"torch-neuronx": torch_neuronx,
                                                                     "neuronx-cc": "2.21.33363.0"})))


def test_parts_of_another_torch_neuronx_line(compiled_root, tmp_path, monkeypatch):
    """Installed: the supported stack (stubbed: torch-neuronx cannot be installed here); compiled: torch 2.8's."""
    from backend.neuron import root_format
    from backend.neuron import stack as neuron_stack

    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _as_neuron(root, "2.8.0.2.10.16998")
    stack = dict(neuron_stack.PACKAGES)
    monkeypatch.setattr(root_format, "installed_versions", lambda: {"torch": stack["torch"], **stack})
    monkeypatch.setattr(preflight, "installed", lambda name: stack.get(name))
    monkeypatch.setattr(preflight, "neuron_devices", lambda: [Path("/dev/neuron0")])
    errors = _errors(preflight.check(root))
    assert len(errors) == 1
    assert "torch-neuronx 2.8.0.2.10.16998 (torch 2.8)" in errors[0] and "torch-neuronx 2.9.0.2.15.32035" in errors[0]
    assert "recompile with --force" in errors[0]


def test_neuron_parts_on_a_machine_without_the_stack(compiled_root, tmp_path, monkeypatch):
    root = neuron_helpers.copy_root(compiled_root, tmp_path / "root")
    _as_neuron(root, "2.9.0.2.15.32035")
    monkeypatch.setattr(preflight, "neuron_devices", lambda: [])
    monkeypatch.setattr(preflight, "installed", lambda name: {"torch": "2.13.0", "numpy": "2.4.6"}.get(name))
    findings = preflight.check(root)
    errors = _errors(findings)
    assert any(e.startswith("torch 2.13.0 is of the torch 2.13 line") and "requirements-neuron.txt" in e
               for e in errors)
    assert any(e.startswith("torch-neuronx is not installed") for e in errors)
    assert any("no Neuron device" in e and "--device=/dev/neuron0" in e for e in errors)
    assert any(f.level == "warning" and f.what.startswith("numpy 2.4.6") for f in findings)
    assert not any("smoke generation" in f.what for f in findings)  # nothing is loaded after an error


def test_neuron_cores(monkeypatch):
    monkeypatch.setattr(preflight, "neuron_devices", lambda: [Path("/dev/neuron0")])
    assert [f.level for f in preflight.check_neuron_cores({})] == ["ok"]
    one = preflight.check_neuron_cores({"NEURON_RT_VISIBLE_CORES": "1"})
    assert one[0].level == "warning" and "NEURON_RT_VISIBLE_CORES=0-1" in one[0].fix
    bad = preflight.check_neuron_cores({"NEURON_RT_VISIBLE_CORES": "first"})
    assert bad[0].level == "error" and "0-1" in bad[0].fix


def test_memory(monkeypatch):
    monkeypatch.setattr(preflight, "host_memory_gb", lambda: 16.0)
    low = preflight.check_memory()[0]
    assert low.level == "warning" and "16 GB" in low.what and "inf2.8xlarge" in low.fix
    monkeypatch.setattr(preflight, "host_memory_gb", lambda: 128.0)
    assert preflight.check_memory()[0].level == "ok"


@pytest.mark.parametrize("invocation", [["-m", "compile_scripts.doctor"], ["compile_scripts/doctor.py"]],
                         ids=["module", "script"])
def test_command_line(invocation, tmp_path):
    proc = subprocess.run([sys.executable, *invocation, "--artifacts", str(tmp_path / "nowhere"), "--no-smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[ERROR  ] compiled root" in proc.stdout and "no such folder" in proc.stdout
