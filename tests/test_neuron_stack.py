"""backend/stack.py and requirements-neuron.txt name one Neuron stack: the same exact versions,
each pin with the AWS file it came from, and the rest of requirements.txt unchanged; and the compiler-to-SDK
table names the release of a root compiled under a later SDK (2.33) in the loader's and the store's messages."""

from __future__ import annotations

import re

import pytest

from backend.neuron import root_store, stack
from backend.neuron.root_format import build_index, version_problems, write_json
from helpers import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)$")


def pins(path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, the comment lines just above it)} for every `name==version` line of a requirements file."""
    found, comments = {}, []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            comments.append(line)
            continue
        match = PIN.match(line)
        if match:
            found[match.group(1).lower().replace("_", "-")] = (match.group(2), comments)
        comments = [] if line else comments
    return found


def test_requirements_neuron_pins_the_stack_exactly():
    neuron = pins(ROOT / "requirements-neuron.txt")
    for name, version in stack.PACKAGES.items():
        assert name in neuron, f"requirements-neuron.txt does not pin {name}"
        assert neuron[name][0] == version, f"{name}: requirements-neuron.txt {neuron[name][0]}, neuron_stack {version}"
        # Each stack pin says which of AWS's files it comes from.
        assert any("aws-neuron" in c for c in neuron[name][1]), f"{name}: no comment naming AWS's source file"
    text = (ROOT / "requirements-neuron.txt").read_text()
    assert stack.NEURON_SDK in text and stack.DLC_IMAGE in text
    assert "--extra-index-url https://pip.repos.neuron.amazonaws.com" in text


def test_requirements_neuron_is_requirements_txt_with_the_stack_swapped_in():
    neuron, base = pins(ROOT / "requirements-neuron.txt"), pins(ROOT / "requirements.txt")
    others = {n: v for n, (v, _) in neuron.items() if n not in stack.PACKAGES}
    assert others == {n: v for n, (v, _) in base.items() if n not in stack.PACKAGES}


def test_stack_is_consistent():
    assert stack.torch_line(stack.PACKAGES["torch-neuronx"]) == \
        stack.torch_line(stack.PACKAGES["torch"])  # torch-neuronx 2.9.0.x is built for torch 2.9
    assert stack.sdk_release(stack.PACKAGES) == stack.supported_sdk_line() == "2.31"
    assert stack.DLC_IMAGE.endswith(f"-sdk{stack.NEURON_SDK}-ubuntu24.04")
    assert stack.PACKAGES["torch"] in stack.DLC_IMAGE
    major, minor, _ = stack.PACKAGES["numpy"].split(".")
    assert (major, minor) in (("2", "2"), ("2", "3"))  # what Neuron states


@pytest.mark.parametrize("versions, release", [
    ({"neuronx-cc": "2.26.6360.0+6f180f47"}, "2.31"),
    ({"neuronx-cc": "2.27.5334.0"}, "2.32"),
    ({"neuronx-cc": "2.28.7631.0"}, "2.33"),  # v2.33.0 release-notes/components/index.rst
    ({"neuronx-cc": "2.99.1.0"}, "unknown (neuronx-cc 2.99.1.0)"),
    ({"neuronx-cc": None}, None),
])
def test_sdk_release_of_a_compiler(versions, release):
    assert stack.sdk_release(versions) == release


# What a root compiled under Neuron SDK 2.33 records: its compiler, beside the same XLA torch-neuronx build as 2.31's
# (2.33.0 lists PyTorch NeuronX 2.9.0.2.15.32035), so only the SDK release tells the two apart.
SDK_2_33 = {"torch": "2.9.0", "torch-neuronx": "2.9.0.2.15.32035+de43f57c", "neuronx-cc": "2.28.7631.0+0a1b2c3d"}


def test_the_loader_warns_naming_sdk_2_33():
    errors, warnings = version_problems(SDK_2_33, dict(stack.PACKAGES), "neuron")
    assert errors == []  # the same torch line: the parts load
    assert len(warnings) == 1
    assert "compiled under Neuron SDK 2.33 (" in warnings[0] and "this machine has Neuron SDK 2.31 (" in warnings[0]
    assert "unknown" not in warnings[0]


def test_a_published_root_from_sdk_2_33_is_refused_naming_it(tmp_path):
    # A root's file index as compile.py --upload writes it (root_format.build_index), from a manifest that records
    # the 2.33 compiler: the store refuses it before downloading, naming the release.
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "compiled_models" / "bf16").mkdir(parents=True)
    write_json(tmp_path / "compiled_models" / "bf16" / "manifest.json", {"target": "neuron", "versions": SDK_2_33})
    index = build_index(tmp_path)
    assert index["compiled"]["bf16"]["neuron_sdk"] == "2.33"
    problem = root_store.stack_problem(index, installed=dict(stack.PACKAGES))
    assert problem and "compiled under Neuron SDK 2.33 (neuronx-cc 2.28.7631.0" in problem
    assert f"this project serves Neuron SDK {stack.NEURON_SDK}" in problem
    # Under an installed 2.33 stack the same root is that machine's own release, and passes.
    assert root_store.stack_problem(index, installed=SDK_2_33) is None
