"""Which model runs: where it loads from (a Hub id at which revision, a folder), its name as people see it, and
whether its weights are random (not SD2.1)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..core.settings import DEFAULT_MODEL, DEFAULT_MODEL_REVISION
from .sd21_random import SD21_RANDOM_ID
from .tiny import TINY_MODEL_ID

log = logging.getLogger(__name__)

# A full git commit id as the Hub names one (HfApi().model_info(id).sha): 40 hex digits.
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")

# The models with random weights, as a note names them. Their images are noise.
RANDOM_WEIGHTS = {
    TINY_MODEL_ID: "the built-in tiny model: random weights, SD2.1-shaped",
    SD21_RANDOM_ID: "sd21-random: the SD2.1-base architecture with random weights, for measuring real-size latency",
}


def split_model_revision(model: str) -> tuple[str, str | None]:
    """--model as (what to load, the revision asked for): 'OWNER/NAME@REVISION' -> ('OWNER/NAME', 'REVISION');
    a folder (even one whose path holds an '@'), 'tiny' or a bare Hub id -> (model, None).

    The one place --model's '@' is read. A Hub repo id never holds an '@' (huggingface_hub's validate_repo_id:
    "Repo id must use alphanumeric chars, '-', '_' or '.'"), so everything after the first one is the revision: a
    branch, tag or commit, as from_pretrained's `revision=` takes it (hf://OWNER/NAME@REVISION roots read the same)."""
    if "@" not in model or os.path.isdir(os.path.expanduser(model)):
        return model, None
    name, _, revision = model.partition("@")
    if not name or not revision:
        raise ValueError(f"--model {model}: write a Hub id at a revision as OWNER/NAME@REVISION (a branch, tag or "
                         f"commit), or give an existing folder")
    return name, revision


def pinned_revision(model_id: str) -> str | None:
    """The commit a Hub id loads at when none is asked for: DEFAULT_MODEL's pin (a community mirror, whose branch could
    move), None for every other id (its main branch). A pin that is not a full commit is never used as a revision."""
    if model_id != DEFAULT_MODEL:
        return None
    if DEFAULT_MODEL_REVISION and COMMIT_SHA.fullmatch(DEFAULT_MODEL_REVISION):
        return DEFAULT_MODEL_REVISION
    log.warning("DEFAULT_MODEL_REVISION %r (backend/core/settings.py) is not a 40-hex commit, so %s loads at its "
                "main branch; fill it with HfApi().model_info(%r).sha", DEFAULT_MODEL_REVISION, model_id, model_id)
    return None


def resolve_model(model: str) -> tuple[str, str | None]:
    """(what from_pretrained loads, the revision it loads at) for a --model value: a folder as its expanded path
    with no revision, 'tiny' and 'sd21-random' as they are, a Hub id at the revision asked for or else its pin."""
    name, revision = split_model_revision(model)
    if os.path.isdir(os.path.expanduser(name)):
        return str(Path(name).expanduser()), None
    if name in RANDOM_WEIGHTS:
        if revision is not None:
            raise ValueError(f"--model {model}: {name} is built here, not downloaded, so it has no revisions; use "
                             f"--model {name}")
        return name, None
    return name, revision if revision is not None else pinned_revision(name)


def model_display_name(model: str) -> str:
    """A folder's own name (not its path on this machine); a Hub id (without its @REVISION) or 'tiny' as given."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path.resolve().name or model
    return split_model_revision(model)[0]


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
