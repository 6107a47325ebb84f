"""Backends for Stable Diffusion generation: the contract, and create_backend(settings).

`import backend` is cheap: torch, diffusers, boto3 and torch-neuronx are imported only by the
backend that needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .core.api import Backend, Capabilities, GenerationRequest, GenerationResult, Timings
from .neuron.host import neuron_devices
from .neuron.root_store import is_remote
from .core.errors import BackendError, BackendUnavailable, GenerationCancelled, GenerationFailed, InvalidRequest
from .core.schedulers import SCHEDULERS
from .core.settings import (
    DEFAULT_ARTIFACTS,
    DEFAULT_MODEL,
    LocalSettings,
    NeuronSettings,
    SageMakerSettings,
    Settings,
)

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULERS", "Backend", "BackendError", "BackendUnavailable", "Capabilities", "GenerationCancelled",
    "GenerationFailed", "GenerationRequest", "GenerationResult", "InvalidRequest", "Timings", "Settings",
    "DEFAULT_MODEL", "create_backend", "choose_backend",
]


def neuron_available(settings: Settings) -> bool:
    """True when torch-neuronx imports, a Neuron device exists and compiled artifacts are present (or published)."""
    root = Path(settings.artifacts or DEFAULT_ARTIFACTS)
    if not is_remote(settings.artifacts) and not (root / "compiled_models").is_dir():
        return False  # a remote root is downloaded by the backend, once chosen
    if not neuron_devices():
        return False
    try:
        import torch_neuronx  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def choose_backend(settings: Settings) -> str:
    """The backend `auto` resolves to: neuron, else sagemaker (with an endpoint name), else local."""
    if settings.backend != "auto":
        return settings.backend
    if neuron_available(settings):
        return "neuron"
    if settings.endpoint_name:
        return "sagemaker"
    return "local"


def create_backend(settings: Settings) -> Backend:
    """Build the backend the settings ask for."""
    name = choose_backend(settings)
    log.info("backend: %s (asked: %s)", name, settings.backend)
    if name == "local" and settings.zero_gpu:
        from .inprocess.zerogpu import ZeroGPUBackend  # torch, diffusers and spaces

        return ZeroGPUBackend(LocalSettings.of(settings))
    if name == "local":
        from .inprocess.local import LocalBackend  # torch and diffusers

        return LocalBackend(LocalSettings.of(settings))
    if name == "neuron":
        from .neuron.backend import NeuronBackend  # torch and diffusers

        return NeuronBackend(NeuronSettings.of(settings))
    if name == "sagemaker":
        from .sagemaker.client import SageMakerBackend  # PIL; boto3 when it connects

        return SageMakerBackend(SageMakerSettings.of(settings))
    raise ValueError(f"--backend: {name!r} is not one of auto, local, neuron, sagemaker")


