"""Backends for Stable Diffusion generation: the contract, and create_backend(settings).

`import backend` is cheap: torch, diffusers, boto3 and torch-neuronx are imported only by the
backend that needs them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .api import (
    Backend,
    BackendError,
    BackendUnavailable,
    Capabilities,
    GenerationCancelled,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Timings,
)
from .schedulers import SCHEDULERS
from .settings import DEFAULT_ARTIFACTS, DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULERS", "Backend", "BackendError", "BackendUnavailable", "Capabilities", "GenerationCancelled",
    "GenerationFailed", "GenerationRequest", "GenerationResult", "InvalidRequest", "Timings", "Settings",
    "DEFAULT_MODEL", "create_backend", "choose_backend",
]


def neuron_available(settings: Settings) -> bool:
    """True when torch-neuronx imports, a Neuron device exists and compiled artifacts are present (or published)."""
    from .root_store import is_remote

    root = Path(settings.artifacts or DEFAULT_ARTIFACTS)
    if not is_remote(settings.artifacts) and not (root / "compiled_models").is_dir():
        return False  # a remote root is downloaded by the backend, once chosen
    from .preflight import neuron_devices  # light: no torch

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
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(settings)
    if name == "neuron":
        from .neuron import NeuronBackend

        return NeuronBackend(settings)
    if name == "sagemaker":
        from .sagemaker import SageMakerBackend

        return SageMakerBackend(settings)
    raise ValueError(f"--backend: {name!r} is not one of auto, local, neuron, sagemaker")


