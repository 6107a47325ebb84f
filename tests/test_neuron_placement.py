"""--neuron-parallel pipeline's core placement, and what --attention nki does on the supported Neuron SDK.

Stand-ins, and why: torch-neuronx and neuronx-cc install only from AWS's index (and run only beside a Neuron
device), so neither exists here. Each stand-in is a module object written from what AWS documents:
- torch_neuronx's placement: aws-neuron-sdk frameworks/torch/torch-neuronx/api-reference-guide/inference/
  api-torch-neuronx-core-placement.rst (v2.31.1 tag): `torch_neuronx.neuron_cores_context(start_nc=-1,
  nc_count=-1)`, a context manager inside which torch.jit.load places the models it creates; before Neuron 2.25
  the same function lived in `torch_neuronx.experimental` (release-notes/prev/2.25.0/nx-pytorch.rst).
- Neuron 2.31.1's compiler packages: `neuronxcc` with `__version__` 2.26.6360.0+6f180f47 (backend/neuron/stack.py,
  from AWS's 2.31.1 container), still holding `neuronxcc.nki._private_kernels` (compiler/neuronx-cc/
  how-to-convolution-in-unet.rst imports a kernel from there), beside the top-level `nki` package, NKI 0.5.0
  (release-notes/components/nki.rst); and the sample's `torch_neuronx.xla_impl.ops.nki_jit`, whether or not 2.31.1
  still has it: the refusal comes before it is used.
The part file is real TorchScript, a CPU one (a Neuron part loads only into the Neuron runtime), in the walk-through's
flat layout: a folder of <part>.pt files.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch
from torch import nn

from backend.core.errors import BackendUnavailable
from backend.neuron.assemble import load_part
from backend.neuron.attention import NKI_REFUSED_FROM, NkiUnavailable, load_nki_flash_attention
from backend.neuron.root_format import CompiledDtype
from backend.neuron.root_plan import RootPlan
from backend.neuron.stack import NEURON_SDK, PACKAGES
from compile_scripts.compile import main

SIZE = (512, 512)


# --- core placement (--neuron-parallel pipeline) ------------------------------------------------------------


def fake_torch_neuronx(public: bool = True, experimental: bool = False) -> tuple[types.ModuleType, dict]:
    """A stand-in torch_neuronx with the public placement API, the pre-2.25 experimental one, both or neither,
    and what happened to it: the contexts' arguments, and whether one is open now."""
    state: dict = {"calls": [], "inside": False}

    def neuron_cores_context(start_nc: int = -1, nc_count: int = -1):
        """The API page's signature; the context it returns marks the time torch.jit.load would place models."""
        state["calls"].append({"start_nc": start_nc, "nc_count": nc_count})

        class Placement:
            def __enter__(self):
                state["inside"] = True

            def __exit__(self, *exc):
                state["inside"] = False

        return Placement()

    module = types.ModuleType("torch_neuronx")
    if public:
        module.neuron_cores_context = neuron_cores_context
    if experimental:
        module.experimental = types.ModuleType("torch_neuronx.experimental")
        module.experimental.neuron_cores_context = neuron_cores_context
    return module, state


@pytest.fixture
def flat_root(tmp_path):
    """A walk-through-layout root holding one real TorchScript part, as the RootPlan and CompiledDtype of a Neuron
    root served one pipeline per core."""
    torch.jit.save(torch.jit.trace(nn.Linear(4, 4), torch.zeros(1, 4)), str(tmp_path / "text_encoder.pt"))
    art = CompiledDtype(dtype="fp32", directory=tmp_path, layout="flat", target="neuron", model="walkthrough",
                        sizes=[SIZE], batch_per_core=1, tokens=77, text_hidden=4, latent_channels=4,
                        vae_scale_factor=8)
    plan = RootPlan(root=tmp_path, sets=[art], sizes=[SIZE], model="walkthrough", target="neuron", lora=None,
                    cores=[0, 1], parallel="pipeline", guidance=False)
    return plan, art


@pytest.fixture
def jit_loads(monkeypatch):
    """torch.jit.load, still the real one, noting for each call whether a placement context was open."""
    loads: list[bool] = []
    real = torch.jit.load

    def load(path, *args, **kwargs):
        loads.append(load.state["inside"] if load.state else None)
        return real(path, *args, **kwargs)

    load.state = None
    monkeypatch.setattr(torch.jit, "load", load)
    return load, loads


def test_a_part_is_loaded_onto_its_core_inside_the_public_placement_context(flat_root, jit_loads):
    plan, art = flat_root
    neuronx, state = fake_torch_neuronx()
    load, loads = jit_loads
    load.state = state
    module = load_part(plan, neuronx, art, "text_encoder", core=1)
    assert state["calls"] == [{"start_nc": 1, "nc_count": 1}]  # its lane's core, that core alone
    assert loads == [True] and not state["inside"]  # loaded inside the context, which is closed again
    assert isinstance(module, torch.jit.ScriptModule) and not module.training


@pytest.mark.parametrize("experimental", [True, False], ids=["experimental-only", "neither"])
def test_a_torch_neuronx_without_the_public_api_is_told_to_install_the_supported_stack(flat_root, jit_loads,
                                                                                      experimental):
    plan, art = flat_root
    neuronx, state = fake_torch_neuronx(public=False, experimental=experimental)
    load, loads = jit_loads
    with pytest.raises(BackendUnavailable) as err:
        load_part(plan, neuronx, art, "text_encoder", core=0)
    message = str(err.value)
    assert "torch_neuronx.neuron_cores_context" in message and "--neuron-parallel pipeline" in message
    assert NEURON_SDK in message and PACKAGES["torch-neuronx"] in message  # the stack to install
    assert "--neuron-parallel unet" in message and "recompile" not in message  # not blamed on the part file
    assert state["calls"] == [] and loads == []  # no fallback to the retired experimental scope, nothing loaded


def test_cpu_parts_and_unet_mode_place_nothing(flat_root, jit_loads):
    plan, art = flat_root
    load, loads = jit_loads
    load_part(plan, None, art, "text_encoder", core=None)  # unet mode: the runtime places it
    art.target = "cpu"
    load_part(plan, None, art, "text_encoder", core=1)  # the CPU stand-in: a copy per lane, no placement API
    assert loads == [None, None]


# --- --attention nki: refused by the compilers of Neuron 2.30 on --------------------------------------------


def install_neuron_packages(monkeypatch, compiler: str = "2.26.6360.0+6f180f47") -> dict:
    """Stand-ins for the Neuron SDK's packages (2.31.1's by default) in sys.modules; returns what nki_jit wrapped."""
    import diffusers  # noqa: F401 - imported before the stand-ins: it probes for torch_neuronx once, at import

    wrapped: dict = {"kernels": []}

    def attention_isa_kernel(q, k, v, scale, out, kernel_name):
        raise AssertionError("the refused kernel was run")

    def nki_jit():
        return lambda kernel: wrapped["kernels"].append(kernel) or kernel

    modules = {name: types.ModuleType(name) for name in (
        "neuronxcc", "neuronxcc.nki", "neuronxcc.nki._private_kernels", "neuronxcc.nki._private_kernels.attention",
        "nki", "torch_neuronx", "torch_neuronx.xla_impl", "torch_neuronx.xla_impl.ops")}
    modules["neuronxcc"].__version__ = compiler
    modules["nki"].__version__ = "0.5.0"
    modules["neuronxcc.nki._private_kernels.attention"].attention_isa_kernel = attention_isa_kernel
    modules["torch_neuronx.xla_impl.ops"].nki_jit = nki_jit
    modules["torch_neuronx"].neuron_cores_context = fake_torch_neuronx()[0].neuron_cores_context
    modules["torch_neuronx"].trace_calls = []
    modules["torch_neuronx"].trace = lambda *args, **kwargs: modules["torch_neuronx"].trace_calls.append(args)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    wrapped["torch_neuronx"] = modules["torch_neuronx"]
    return wrapped


def test_nki_without_neuronx_cc_says_the_supported_sdk_refuses_it_too():
    if importlib.util.find_spec("neuronxcc") is not None:
        pytest.skip("neuronx-cc is installed here")
    with pytest.raises(NkiUnavailable) as err:
        load_nki_flash_attention()
    message = str(err.value)
    assert "neuronx-cc" in message and f"Neuron {NKI_REFUSED_FROM}" in message and NEURON_SDK in message
    assert "--attention bmm" in message


def test_nki_is_refused_on_the_supported_sdk_before_its_kernel_is_touched(monkeypatch):
    wrapped = install_neuron_packages(monkeypatch)
    with pytest.raises(NkiUnavailable) as err:
        load_nki_flash_attention()
    message = str(err.value)
    assert "neuronx-cc 2.26.6360.0 (Neuron SDK 2.31)" in message and "neuronxcc.nki.*" in message
    assert "release-notes/components/nki.rst" in message and "--attention bmm" in message
    assert wrapped["kernels"] == []


@pytest.mark.parametrize(("compiler", "refused"), [
    ("2.24.8799.0", False),  # Neuron 2.29.1: the namespace only warned
    ("2.25.3371.0", True),  # 2.30: a compilation error from here on
    ("2.27.5334.0", True),  # 2.32
], ids=["2.29.1", "2.30", "2.32"])
def test_nki_is_refused_from_neuron_2_30_on(monkeypatch, compiler, refused):
    wrapped = install_neuron_packages(monkeypatch, compiler)
    if refused:
        with pytest.raises(NkiUnavailable):
            load_nki_flash_attention()
        assert wrapped["kernels"] == []
    else:  # the sample's path, as before
        kernel = load_nki_flash_attention()
        assert wrapped["kernels"] == [kernel] and kernel.__name__ == "attention_isa_kernel"


def test_compile_stops_before_tracing_anything_when_nki_is_refused(monkeypatch, tmp_path, capsys):
    wrapped = install_neuron_packages(monkeypatch)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")})
    out = tmp_path / "root"
    assert main(["--model", "tiny", "--out", str(out), "--target", "neuron", "--attention", "nki",
                 "--parts", "unet", "--height", "64", "--width", "64"]) == 1
    err = capsys.readouterr().err
    assert "neuronxcc.nki.*" in err and "--attention bmm" in err
    assert wrapped["torch_neuronx"].trace_calls == [] and not out.exists()  # nothing compiled, nothing written
