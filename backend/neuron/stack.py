"""The one Neuron software stack this project supports, in one place.

requirements-neuron.txt pins these versions (tests/test_neuron_stack.py keeps the two in step),
compile_scripts/compile.py records them in every manifest, and backend/neuron/backend.py and
backend/neuron/preflight.py compare what is installed against them.

Why Neuron SDK 2.31.x. The name torch-neuronx now covers two PyTorch backends. This project compiles with the
first: the XLA-based line with torch_neuronx.trace, the one that runs on Inferentia2. It is in maintenance, not
ended ("in maintenance status as of Neuron SDK 2.32 ... continues to receive critical bug fixes and security
patches ... It is not end-of-support": aws-neuron-sdk archive/frameworks/torch/inference-torch-neuronx.rst), and
its newest build, 2.9.0.2.15.32035 for torch 2.9, is the one 2.31 shipped: 2.32.0 left it out (setup/pytorch/
manual.rst: "torch-neuronx (PyTorch/XLA) is not included in Neuron 2.32.0 ... use the latest Neuron release that
ships it, Neuron 2.31"), and 2.33.0 lists the same build again (release-notes/components/index.rst at v2.33.0:
"PyTorch NeuronX ... 2.9.0.2.15.32035"). 2.31.x is also the last release with a pytorch-inference-neuronx
container for the endpoint (release-notes/components/containers.rst, 2.32.0: "the pytorch-inference-neuronx DLC
... no longer published"). Compiling in that container or with these pins gives parts the endpoint can load.

The second backend, since Neuron SDK 2.33, is TorchNeuron, the native one, published under the same name:
"The release notes for torch-neuronx, the native PyTorch backend for AWS Trainium" (release-notes/components/
torchneuron.rst, 2.33.0), versions 2.13.3.0.* and 2.14.3.0.* for torch 2.13 and 2.14, on Trn2 and Trn3 only.
Its version numbers sort above the XLA line's 2.9.0.x, so an unpinned `pip install torch-neuronx` now picks a
TorchNeuron build, which does not run on Inferentia2: requirements-neuron.txt pins the exact XLA build with ==.

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
    "torch-neuronx": "2.9.0.2.15.32035",  # the XLA line; unpinned, pip would pick TorchNeuron (above)
    "neuronx-cc": "2.26.6360.0",
    "numpy": "2.3.5",
}
PYTHONS = ("3.11", "3.12", "3.13")
# The endpoint's container, with this very SDK inside (ECR path: 763104351884.dkr.ecr.<region>.amazonaws.com/
# in SageMaker regions, public.ecr.aws/neuron/ for anyone).
DLC_IMAGE = "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"

# Which Neuron SDK release shipped a neuronx-cc build (n2-manifest.json, inf2 packages, through 2.32). The
# compiler is what turns a graph into a NEFF, so it names the release that compiled a part; the loader's warning
# (root_format.version_problems) and a published root's check (root_store.stack_problem) name it from here.
# 2.32.0 ships a compiler but no torch-neuronx; AWS pairs it with 2.31's torch-neuronx (setup/pytorch/manual.rst).
# 2.33.0's compiler is from its release notes (release-notes/components/index.rst and releasecontent.rst at v2.33.0:
# "Neuron Compiler ... 2.28.7631.0", "neuronx-cc-2.28.7631.0"), beside the same XLA torch-neuronx 2.9.0.2.15.32035.
# Not listed, for want of a source that names them: 2.33.1's and 2.34.0's compilers. A root compiled with one of
# those is named "unknown (neuronx-cc X)" and still gets the loader's warning; add a line here once a release note
# (release-notes/components/index.rst of that version, "Neuron Compiler") names it.
COMPILER_RELEASES = {
    "2.22.12471.0": "2.27",
    "2.23.6484.0": "2.28",
    "2.24.5133.0": "2.29.0",
    "2.24.8799.0": "2.29.1",
    "2.25.3371.0": "2.30",
    "2.26.6360.0": "2.31",
    "2.27.5334.0": "2.32",
    "2.28.7631.0": "2.33",
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
