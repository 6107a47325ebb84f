"""--model ID@REVISION and the default model's pinned commit: parsed in one place (backend/models/catalog.py), passed
to diffusers' from_pretrained as revision=, recorded by compile.py in source.json and the manifests, and never shown
in the model's name (banner, infotext).

Stand-in, and why: the Hub cannot be reached here, so StableDiffusionPipeline.from_pretrained is replaced by a
recorder that keeps the arguments it was called with and returns the offline tiny pipeline (backend.models.tiny), as
a download of a real repository would return its pipeline. Folders load through the real from_pretrained."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from backend import Settings, create_backend
from backend.core.api import GenerationRequest
from backend.core.settings import DEFAULT_MODEL, DEFAULT_MODEL_REVISION
from backend.inprocess.pipeline import load_pipeline
from backend.models import catalog
from backend.models.catalog import model_display_name, resolve_model, split_model_revision
from backend.models.tiny import build_pipeline as build_tiny
from compile_scripts.compile import main as compile_main

REPO = "someone/sd21-finetune"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch):
    """from_pretrained replaced by a recorder returning the tiny pipeline; its calls, as (source, kwargs)."""
    calls = []

    def from_pretrained(cls, source, **kwargs):
        calls.append((str(source), kwargs))
        return build_tiny(dtype=kwargs.get("dtype", torch.float32))

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    return calls


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, expected", [
    (f"{REPO}@{COMMIT}", (REPO, COMMIT)),
    (f"{REPO}@main", (REPO, "main")),
    (f"{REPO}@refs/pr/3", (REPO, "refs/pr/3")),  # a pull request's ref, as the Hub names them
    (f"{REPO}@v1@rc", (REPO, "v1@rc")),  # a repo id has no '@': the first one splits
    (REPO, (REPO, None)),
    ("tiny", ("tiny", None)),
    ("./no/such/folder", ("./no/such/folder", None)),
])
def test_split_model_revision(model, expected):
    assert split_model_revision(model) == expected


@pytest.mark.parametrize("model", [f"{REPO}@", f"@{COMMIT}"])
def test_an_empty_side_of_the_at_is_an_error_naming_the_form(model):
    with pytest.raises(ValueError, match="OWNER/NAME@REVISION"):
        split_model_revision(model)


def test_a_folder_with_an_at_in_its_path_stays_a_folder(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "tiny@v2")
    assert split_model_revision(str(folder)) == (str(folder), None)
    assert resolve_model(str(folder)) == (str(folder), None)
    assert model_display_name(str(folder)) == "tiny@v2"  # its own name, not cut at the '@'


def test_the_default_model_resolves_to_its_pinned_commit():
    assert resolve_model(DEFAULT_MODEL) == (DEFAULT_MODEL, DEFAULT_MODEL_REVISION)
    assert resolve_model(f"{DEFAULT_MODEL}@main") == (DEFAULT_MODEL, "main")  # asked for: the newest instead
    assert resolve_model(REPO) == (REPO, None)  # other repositories: their main branch
    assert resolve_model("tiny") == ("tiny", None)
    with pytest.raises(ValueError, match="no revisions"):
        resolve_model("tiny@main")


def test_the_pin_is_a_full_commit():
    # backend/core/settings.py says how to read it from the Hub; a branch name or a placeholder would not pin anything.
    assert catalog.COMMIT_SHA.fullmatch(DEFAULT_MODEL_REVISION), DEFAULT_MODEL_REVISION


@pytest.mark.parametrize("pin", ["", "FILL-IN-THE-COMMIT", "main", None])
def test_a_missing_or_placeholder_pin_is_never_used_as_a_revision(monkeypatch, caplog, pin):
    monkeypatch.setattr(catalog, "DEFAULT_MODEL_REVISION", pin)
    with caplog.at_level(logging.WARNING, logger="backend.models.catalog"):
        assert resolve_model(DEFAULT_MODEL) == (DEFAULT_MODEL, None)
    assert "is not a 40-hex commit" in caplog.text and "model_info" in caplog.text


def test_the_display_name_is_the_plain_id():
    assert model_display_name(f"{REPO}@{COMMIT}") == REPO
    assert model_display_name(DEFAULT_MODEL) == DEFAULT_MODEL
    assert model_display_name("tiny") == "tiny"


# --- loading -------------------------------------------------------------------------------------------------------


def test_load_pipeline_passes_the_revision_to_from_pretrained(hub):
    load_pipeline(f"{REPO}@{COMMIT}", torch.float32)
    load_pipeline(DEFAULT_MODEL, torch.float32)
    load_pipeline(REPO, torch.float32)
    assert [(source, kwargs["revision"]) for source, kwargs in hub] == [
        (REPO, COMMIT), (DEFAULT_MODEL, DEFAULT_MODEL_REVISION), (REPO, None)]
    assert all(kwargs["dtype"] == torch.float32 and kwargs["safety_checker"] is None for _, kwargs in hub)


def test_a_folder_with_an_at_loads_through_diffusers_as_a_folder(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "tiny@v2")
    pipe = load_pipeline(str(folder), torch.float32)  # the real from_pretrained, from the folder
    assert pipe.unet.config.sample_size == build_tiny().unet.config.sample_size


def test_the_local_backend_loads_the_default_model_at_its_pin_and_shows_the_plain_id(hub):
    backend = create_backend(Settings(backend="local", device="cpu", optimize="none", offline=True))
    try:
        (source, kwargs), = hub
        assert (source, kwargs["revision"]) == (DEFAULT_MODEL, DEFAULT_MODEL_REVISION)
        assert kwargs["local_files_only"] is True  # --offline: the pinned commit from the Hub cache only
        assert backend.capabilities().model == DEFAULT_MODEL
    finally:
        backend.close()


def test_the_local_backend_takes_id_at_revision_and_writes_the_plain_id(hub):
    backend = create_backend(Settings(backend="local", device="cpu", optimize="none", model=f"{REPO}@{COMMIT}"))
    try:
        assert [(s, k["revision"]) for s, k in hub] == [(REPO, COMMIT)]
        assert backend.capabilities().model == REPO
        result = backend.generate(GenerationRequest("cat", seed=1, steps=1, width=64, height=64))
        assert f"Model: {REPO}," in result.infotexts[0] and COMMIT not in result.infotexts[0]
    finally:
        backend.close()


# --- compiling -----------------------------------------------------------------------------------------------------

# The smallest compile: one small part at one small size.
SMALL = ["--target", "cpu", "--parts", "vae_post_quant_conv", "--height", "64", "--width", "64"]


def recorded(root):
    """(source.json, the bf16 manifest) of a compiled root."""
    compiled = root / "compiled_models"
    return (json.loads((compiled / "source.json").read_text()),
            json.loads((compiled / "bf16" / "manifest.json").read_text()))


def test_compile_records_the_revision(hub, tmp_path):
    root = tmp_path / "root"
    assert compile_main(["--model", f"{REPO}@{COMMIT}", "--out", str(root), *SMALL]) == 0
    assert [(s, k["revision"]) for s, k in hub] == [(REPO, COMMIT)]
    source, manifest = recorded(root)
    assert (source["model"], source["revision"]) == (manifest["model"], manifest["revision"]) == (REPO, COMMIT)


def test_compile_records_the_default_models_pin(hub, tmp_path):
    root = tmp_path / "root"
    assert compile_main(["--model", DEFAULT_MODEL, "--out", str(root), *SMALL]) == 0
    assert hub[0][1]["revision"] == DEFAULT_MODEL_REVISION
    source, manifest = recorded(root)
    assert source["revision"] == manifest["revision"] == DEFAULT_MODEL_REVISION
    assert source["model"] == manifest["model"] == DEFAULT_MODEL


def test_compile_records_no_revision_for_the_tiny_model(tmp_path):
    root = tmp_path / "root"
    assert compile_main(["--model", "tiny", "--out", str(root), *SMALL]) == 0
    source, manifest = recorded(root)
    assert source["model"] == manifest["model"] == "tiny"
    assert source["revision"] is None and manifest["revision"] is None


def test_another_revision_into_the_same_root_is_refused_naming_both(hub, tmp_path, capsys):
    root = tmp_path / "root"
    assert compile_main(["--model", f"{REPO}@{COMMIT}", "--out", str(root), *SMALL]) == 0
    capsys.readouterr()
    assert compile_main(["--model", f"{REPO}@main", "--out", str(root), *SMALL]) == 1
    err = capsys.readouterr().err
    assert f"holds the files of model '{REPO}' at {COMMIT}, not '{REPO}' at main" in err and "--force" in err


def test_a_root_saved_before_revisions_were_recorded_keeps_its_parts(hub, tmp_path, capsys):
    root = tmp_path / "root"
    assert compile_main(["--model", DEFAULT_MODEL, "--out", str(root), *SMALL]) == 0
    # As compile.py wrote a root before it recorded revisions: no "revision" anywhere.
    for path in (root / "compiled_models" / "source.json", root / "compiled_models" / "bf16" / "manifest.json"):
        data = json.loads(path.read_text())
        del data["revision"]
        path.write_text(json.dumps(data))
    capsys.readouterr()
    assert compile_main(["--model", DEFAULT_MODEL, "--out", str(root), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "saved before compile.py recorded revisions" in out and "up to date" in out and "tracing" not in out
    assert recorded(root)[1]["revision"] is None  # unknown, not claimed to be the pin
    # Asking for a revision explicitly is another matter: the files' commit is unknown, so they are not taken for it.
    assert compile_main(["--model", f"{DEFAULT_MODEL}@{DEFAULT_MODEL_REVISION}", "--out", str(root), *SMALL]) == 1
    assert "at an unrecorded revision" in capsys.readouterr().err


def test_the_neuron_backend_serves_a_root_only_at_the_revision_asked_for(compiled_root, tmp_path):
    """--backend neuron --model ID@REVISION: the root's manifest must record that revision (compile.py writes it);
    an unrecorded one is refused with the compile command, never assumed."""
    from backend import BackendUnavailable
    from backend.neuron.root_format import read_root

    assert read_root(compiled_root, "tiny")  # no revision asked: the id alone is compared
    with pytest.raises(BackendUnavailable, match="at a revision it did not record; drop @abc1234"):
        read_root(compiled_root, "tiny@abc1234")
    root = shutil.copytree(compiled_root, tmp_path / "root")
    for manifest_path in (root / "compiled_models").glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "revision": "abc1234"}))
    assert [art.model for art in read_root(root, "tiny@abc1234")] == ["tiny"] * len(read_root(root))
    with pytest.raises(BackendUnavailable, match="at revision abc1234; drop @def5678"):
        read_root(root, "tiny@def5678")
