"""The one Neuron software stack this project supports, in one place.

requirements-neuron.txt pins these versions (tests/test_neuron_stack.py keeps the two in step),
compile_scripts/compile.py records them in every manifest, and backend/neuron/backend.py and
backend/neuron/preflight.py compare what is installed against them.

Why Neuron SDK 2.31.x: it is the last release that ships torch-neuronx, the torch_neuronx.trace
line built on PyTorch/XLA for torch 2.9 (aws-neuron-sdk setup/pytorch/manual.rst: "torch-neuronx
(PyTorch/XLA) is not included in Neuron 2.32.0 ... use the latest Neuron release that ships it,
Neuron 2.31"), and the last one with a pytorch-inference-neuronx container for the endpoint
(release-notes/components/containers.rst, 2.32.0: "the pytorch-inference-neuronx DLC ... no longer
published"). Compiling in that container or with these pins gives parts the endpoint can load.

Sources, all in AWS's public repositories:
- aws-neuron-sdk src/helperscripts/n2-manifest.json, release 2.31.1, instance inf2:
  torch-neuronx 2.9.0.2.15.32035, neuronx-cc 2.26.6360.0, Python 3.11-3.13.
- aws-neuron-sdk setup/troubleshooting.rst ("pip install torch==2.9.0" before torch-neuronx) and
  release-notes/components/containers.rst (pytorch-inference-neuronx "PyTorch 2.9.0").
- aws-neuron-sdk about-neuron/whats-new.rst (2.32.0): "NumPy 2.1 — no longer supported; use NumPy
  2.2 or 2.3"; release-notes/prev/content.rst (2.31.1): "Neuron currently supports NumPy versions 2.X".
- aws-neuron/deep-learning-containers README.md and pytorch/inference/2.9.0/Dockerfile.neuronx at
  2.31.1: the image below, Python 3.12, NEURONX_CC_VERSION=2.26.6360.0+6f180f47,
  NEURONX_FRAMEWORK_VERSION=2.9.0.2.15.32035+de43f57c.
"""

from __future__ import annotations

NEURON_SDK = "2.31.1"
# Exact versions, as pip names them; requirements-neuron.txt pins each one with ==.
PACKAGES = {
    "torch": "2.9.0",
    "torch-neuronx": "2.9.0.2.15.32035",
    "neuronx-cc": "2.26.6360.0",
    "numpy": "2.3.5",
}
PYTHONS = ("3.11", "3.12", "3.13")
# The endpoint's container, with this very SDK inside (ECR path: 763104351884.dkr.ecr.<region>.amazonaws.com/
# in SageMaker regions, public.ecr.aws/neuron/ for anyone).
DLC_IMAGE = "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"

# Which Neuron SDK release shipped a neuronx-cc build (n2-manifest.json, inf2 packages). The
# compiler is what turns a graph into a NEFF, so it names the release that compiled a part.
# 2.32.0 ships a compiler but no torch-neuronx; AWS pairs it with 2.31's torch-neuronx.
COMPILER_RELEASES = {
    "2.22.12471.0": "2.27",
    "2.23.6484.0": "2.28",
    "2.24.5133.0": "2.29.0",
    "2.24.8799.0": "2.29.1",
    "2.25.3371.0": "2.30",
    "2.26.6360.0": "2.31",
    "2.27.5334.0": "2.32",
}


def public_version(version: str | None) -> str | None:
    """A version without its local label: AWS's wheels are '2.26.6360.0+6f180f47'."""
    return version.split("+", 1)[0] if version else version


def sdk_release(versions: dict[str, str | None]) -> str | None:
    """The Neuron SDK release of the neuronx-cc in `versions` ('2.31'), 'unknown (neuronx-cc X)', or None
    when no neuronx-cc is there (CPU parts)."""
    compiler = public_version(versions.get("neuronx-cc"))
    if not compiler:
        return None
    return COMPILER_RELEASES.get(compiler, f"unknown (neuronx-cc {compiler})")


def supported_sdk_line() -> str:
    """'2.31': the release line of NEURON_SDK (its patch releases ship the same Python packages)."""
    return ".".join(NEURON_SDK.split(".")[:2])


def torch_line(version: str) -> str:
    """'2.9.0.2.15.32035' (torch-neuronx: torch version + Neuron release) or '2.9.0' -> '2.9'."""
    return ".".join(version.split(".")[:2])


def describe() -> str:
    """One line naming the supported stack, for messages."""
    return (f"Neuron SDK {NEURON_SDK}: torch {PACKAGES['torch']}, torch-neuronx {PACKAGES['torch-neuronx']}, "
            f"neuronx-cc {PACKAGES['neuronx-cc']}, numpy {PACKAGES['numpy']}, Python {PYTHONS[0]}-{PYTHONS[-1]}")


def record() -> dict[str, object]:
    """What compile.py writes into a manifest about the supported stack it was built for."""
    return {"neuron_sdk": NEURON_SDK, "packages": dict(PACKAGES), "dlc_image": DLC_IMAGE}


# How to get this stack, for the messages of the loader and the compile script when torch-neuronx is missing.
NEURON_SDK_HINT = (
    f"Install the supported Neuron stack ({describe()}) in its own virtual environment: "
    "pip install -r requirements-neuron.txt (torch-neuronx and neuronx-cc come from pip.repos.neuron.amazonaws.com), "
    f"or work inside the endpoint's container {DLC_IMAGE}; see docs/neuron.md. "
    "To try the Neuron code path on this machine instead, compile CPU parts with --target cpu."
)
