"""Which model runs: its name as people see it, and whether its weights are random (not SD2.1)."""

from __future__ import annotations

import os
from pathlib import Path

from .sd21_random import SD21_RANDOM_ID
from .tiny import TINY_MODEL_ID

# The models with random weights, as a note names them. Their images are noise.
RANDOM_WEIGHTS = {
    TINY_MODEL_ID: "the built-in tiny model: random weights, SD2.1-shaped",
    SD21_RANDOM_ID: "sd21-random: the SD2.1-base architecture with random weights, for measuring real-size latency",
}


def model_display_name(model: str) -> str:
    """A folder's own name (not its path on this machine); a Hub id or 'tiny' as given."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path.resolve().name or model
    return model


def is_tiny_folder(model: str) -> bool:
    """True for a folder saved by `python -m backend.models.tiny` (random weights, not SD2.1)."""
    readme = Path(os.path.expanduser(model)) / "README.md"
    try:
        return readme.is_file() and readme.read_text(errors="replace").startswith("# tiny (random weights)")
    except OSError:
        return False


def random_weights_of(model: str, folder: str | None = None) -> str | None:
    """The RANDOM_WEIGHTS key of a model id (or of a folder saved by backend.models.tiny), None for real weights."""
    if model in RANDOM_WEIGHTS:
        return model
    if is_tiny_folder(folder or model):
        return TINY_MODEL_ID
    return None


def random_weights_note(kind: str, verb: str, real_model_advice: str) -> str:
    """The one warning for random weights, e.g. "Running the built-in tiny model: ...", with how to get SD2.1."""
    return f"{verb} {RANDOM_WEIGHTS[kind]}, so images are noise. It is not Stable Diffusion 2.1. {real_model_advice}"
