"""backend/stack.py and requirements-neuron.txt name one Neuron stack: the same exact versions,
each pin with the AWS file it came from, and the rest of requirements.txt unchanged."""

from __future__ import annotations

import re

import pytest

from backend.neuron import stack
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
    ({"neuronx-cc": "2.99.1.0"}, "unknown (neuronx-cc 2.99.1.0)"),
    ({"neuronx-cc": None}, None),
])
def test_sdk_release_of_a_compiler(versions, release):
    assert stack.sdk_release(versions) == release
