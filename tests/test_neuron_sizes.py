"""Several sizes in one compiled root (issue 14): compile.py --sizes, the format 2 layout, the neuron backend
serving exactly the compiled sizes (each generating as the local backend does, the others refused), --sizes at
load, the device memory check, the start-up log, format 1 roots, the bad input, and the app and the endpoint
serving such a root.

Stand-ins as in test_neuron.py (neuron_helpers.py): parts traced with --target cpu run through the CPU stand-in
for the NeuronCores with its static-shape guard; everything else is the real thing.
"""

from __future__ import annotations

import json
import logging
import shlex

import numpy as np
import pytest

import neuron_helpers
from backend import BackendUnavailable, GenerationRequest, InvalidRequest, Settings, create_backend
from backend.neuron.root_format import common_sizes, read_root, memory_estimate
from backend.core.settings import NeuronSettings
from backend.neuron.backend import NeuronBackend
from backend.neuron.host import CORES_PER_CHIP, DEVICE_MEMORY_HEADROOM
from compile_scripts.compile import main as compile_main

SIZES = neuron_helpers.SIZES
KEYS = [f"{w}x{h}" for w, h in SIZES]


@pytest.fixture(scope="module")
def sizes_backend(sizes_root):
    """One NeuronBackend on the three-size root."""
    backend = create_backend(Settings(backend="neuron", artifacts=str(sizes_root)))
    yield backend
    backend.close()


def pixels(images) -> np.ndarray:
    """PIL images as one int array."""
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def _unavailable(settings: Settings) -> str:
    with pytest.raises(BackendUnavailable) as err:
        NeuronBackend(NeuronSettings.of(settings))
    return str(err.value)


# --- the layout ------------------------------------------------------------------------------------


def test_sizes_are_compiled_into_one_root(sizes_root):
    compiled = sizes_root / "compiled_models" / "fp32"
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["format"] == 2 and list(manifest["sizes"]) == KEYS
    assert list(manifest["parts"]) == ["text_encoder"]  # once, for every size
    assert (compiled / "text_encoder.pt").is_file()
    for (width, height), key in zip(SIZES, KEYS):
        entry = manifest["sizes"][key]
        assert (entry["width"], entry["height"]) == (width, height)
        assert list(entry["parts"]) == ["unet", "vae_decoder", "vae_post_quant_conv", "vae_encoder"]
        files = [e["file"] for e in entry["parts"].values()]
        assert all((compiled / file).is_file() and file.startswith(f"{key}/") for file in files)
        # Latents are height x width / 8; the encoder takes the image itself.
        assert entry["parts"]["unet"]["inputs"][0]["shape"] == [1, 4, height // 8, width // 8]
        assert entry["parts"]["vae_encoder"]["inputs"][0]["shape"] == [1, 3, height, width]


# --- serving them ----------------------------------------------------------------------------------


def test_backend_offers_exactly_the_compiled_sizes(sizes_backend):
    caps = sizes_backend.capabilities()
    assert caps.fixed_sizes == SIZES and caps.default_size == SIZES[0]  # no 512x512 here: the first compiled
    assert caps.precisions == ("fp32",)
    assert caps.to_dict()["fixed_sizes"] == [list(s) for s in SIZES]  # what the endpoint's describe carries


@pytest.mark.parametrize("size", SIZES, ids=KEYS)
def test_each_size_generates_as_the_local_backend_does(sizes_backend, sizes_root, size):
    local = create_backend(Settings(backend="local", model=str(sizes_root), device="cpu"))
    try:
        request = GenerationRequest(prompt="a lovely cat", steps=3, seed=21, precision="fp32", num_images=2,
                                    width=size[0], height=size[1])
        ours, theirs = sizes_backend.generate(request), local.generate(request)
    finally:
        local.close()
    assert [img.size for img in ours.images] == [size] * 2
    # PNG pixels: at most one level apart where a value sits on a rounding boundary (as test_neuron's fp32 check).
    assert np.abs(pixels(ours.images) - pixels(theirs.images)).max() <= 1


def test_another_size_is_refused_naming_the_compiled_ones(sizes_backend):
    with pytest.raises(InvalidRequest) as err:
        sizes_backend.generate(GenerationRequest(prompt="cat", steps=1, width=192, height=192))
    assert "192x192 is not available" in str(err.value)
    assert all(key in str(err.value) for key in KEYS)


def test_sizes_flag_loads_only_those(sizes_root):
    backend = NeuronBackend(NeuronSettings(artifacts=str(sizes_root), sizes="128x192, 192x128"))
    try:
        caps = backend.capabilities()
        assert caps.fixed_sizes == ((192, 128), (128, 192))  # in the root's order
        assert caps.default_size == (192, 128)
    finally:
        backend.close()
    message = _unavailable(Settings(backend="neuron", artifacts=str(sizes_root), sizes="128x128,256x256"))
    assert "--sizes 128x128,256x256" in message and "has no 256x256" in message
    assert all(key in message for key in KEYS) and "--sizes 256x256" in message  # and how to compile it
    message = _unavailable(Settings(backend="neuron", artifacts=str(sizes_root), sizes="128x100"))
    assert "--sizes 128x100" in message and "multiple of 8" in message


def test_sizes_flag_and_device_memory_are_settings():
    settings = Settings.from_args(["--sizes", "512x512,768x512", "--device-memory-gib", "64"])
    assert settings.sizes == "512x512,768x512" and settings.device_memory_gib == 64.0
    env = {"SD_SIZES": "512x768", "SD_DEVICE_MEMORY_GIB": "0.5"}
    settings = Settings.from_args([], env=env)
    assert settings.sizes == "512x768" and settings.device_memory_gib == 0.5


def test_the_deployed_endpoint_takes_sizes_from_its_config_and_environment(tmp_path):
    from serving.inference import read_config, settings_from_config

    (tmp_path / "root" / "compiled_models").mkdir(parents=True)
    config_path = tmp_path / "endpoint.json"
    config_path.write_text(json.dumps({"artifacts": "root", "sizes": "512x512", "device_memory_gib": 64}))
    settings = settings_from_config(tmp_path, read_config(config_path), env={})
    assert (settings.backend, settings.sizes, settings.device_memory_gib) == ("neuron", "512x512", 64.0)
    settings = settings_from_config(tmp_path, read_config(config_path), env={"SD_SIZES": "768x512,512x768"})
    assert settings.sizes == "768x512,512x768"


# --- device memory ---------------------------------------------------------------------------------


def _chip_gib_for(bytes_needed: float) -> float:
    """The --device-memory-gib whose usable share of one core is bytes_needed."""
    return bytes_needed / DEVICE_MEMORY_HEADROOM * CORES_PER_CHIP / 2**30


def test_sizes_that_do_not_fit_the_device_memory_are_named(sizes_root, caplog):
    sets = read_root(sizes_root)
    estimate = memory_estimate(sets, list(SIZES), 2)
    assert estimate.shared == (sizes_root / "compiled_models/fp32/text_encoder.pt").stat().st_size
    unet = (sizes_root / "compiled_models/fp32/128x128/unet.pt").stat().st_size
    assert estimate.per_size[SIZES[0]] > unet  # the UNet once on the fullest core, plus the VAE parts
    # Room for the text encoder and one size: the message names the two to drop and what to start with.
    room = _chip_gib_for(estimate.shared + estimate.per_size[SIZES[0]] + 1024)
    with caplog.at_level(logging.INFO, logger="backend.neuron"):
        message = _unavailable(Settings(backend="neuron", artifacts=str(sizes_root), device_memory_gib=room))
    assert "Drop 192x128, 128x192: start with --sizes 128x128 (or SD_SIZES)" in message
    assert "estimated from the part files" in message and "per Inferentia2 chip" in message
    assert "loading" not in caplog.text  # refused before anything was loaded
    assert "device memory for 192x128" in caplog.text
    # Not even one size: say what else to do.
    message = _unavailable(Settings(backend="neuron", artifacts=str(sizes_root),
                                    device_memory_gib=_chip_gib_for(estimate.shared)))
    assert "Not even one size fits" in message and "--device-memory-gib" in message


# --- the start-up log ------------------------------------------------------------------------------


def test_start_up_log_says_what_is_loaded_and_when_the_first_image_came(sizes_root, caplog):
    with caplog.at_level(logging.INFO, logger="backend.neuron"):
        backend = NeuronBackend(NeuronSettings(artifacts=str(sizes_root), sizes="128x128,192x128"))
        try:
            ready = caplog.text
            backend.generate(GenerationRequest(prompt="cat", steps=1, width=192, height=128))
            backend.generate(GenerationRequest(prompt="cat", steps=1))
        finally:
            backend.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("backend.neuron.")]
    total = 1 + 2 * 4  # the text encoder, then four parts for each of two sizes
    loading = [line for line in lines if line.startswith("loading ")]
    assert len(loading) == total and loading[0].startswith(f"loading 1/{total}: fp32 text_encoder for every size")
    assert any(line.startswith(f"loading 3/{total}: fp32 vae_decoder 128x128 (fp32, ") and " MB)" in line
               for line in loading)
    assert len([line for line in lines if line.startswith("loaded ") and " in " in line]) >= total
    assert sum(line.startswith("warmed up fp32 ") for line in lines) == 2
    assert "ready in " in ready and "sizes 128x128, 192x128" in ready and "first image" not in ready
    first = [line for line in lines if line.startswith("first image in ")]
    assert len(first) == 1 and "from the process start" in first[0]  # the first image only


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, status, needed", [
    (["--sizes", "512x500"], 2, ["--sizes 512x500", "height 500 is not a multiple of 8", "496"]),
    (["--sizes", "512x512,huge"], 2, ["'huge' is not a size", "width x height"]),
    (["--sizes", "512x512", "--height", "512"], 2, ["--sizes and --height/--width both given"]),
    (["--sizes", "2048x512"], 1, ["--sizes 2048x512", "width 2048 is outside this model's range, 64 to 1024"]),
], ids=["not-a-multiple-of-8", "not-a-size", "both-forms", "out-of-range"])
def test_bad_size_lists_say_what_to_fix(tmp_path, capsys, argv, status, needed):
    out = tmp_path / "root"
    assert compile_main(["--model", "tiny", "--out", str(out), "--target", "cpu", *argv]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(text in err for text in needed), err
    assert not (out / "compiled_models" / "bf16").exists()  # nothing traced


def test_a_part_missing_for_one_size_names_it_and_the_way_out(sizes_root, tmp_path):
    root = neuron_helpers.copy_root(sizes_root, tmp_path / "root")
    (root / "compiled_models" / "fp32" / "192x128" / "unet.pt").unlink()
    message = _unavailable(Settings(backend="neuron", artifacts=str(root)))
    assert "fp32 192x128 is missing compiled_models/fp32/192x128/unet.pt" in message
    assert "--dtype fp32 --sizes 192x128 --parts unet" in message
    assert "or serve the other sizes without it: --sizes 128x128,128x192" in message
    # Leaving that size out serves the others.
    assert [a.sizes for a in read_root(root, wanted_sizes=[(128, 128), (128, 192)])] == [[(128, 128), (128, 192)]]


def test_a_size_compiled_in_one_dtype_only_is_not_offered(sizes_root, tmp_path):
    root = neuron_helpers.copy_root(sizes_root, tmp_path / "root")
    # A bf16 folder holding two of the three sizes (the fp32 parts, relabelled: only the manifest is read here).
    bf16 = root / "compiled_models" / "bf16"
    (root / "compiled_models" / "fp32").rename(bf16)
    neuron_helpers.copy_root(bf16, root / "compiled_models" / "fp32")
    manifest = json.loads((bf16 / "manifest.json").read_text())
    manifest["dtype"] = "bf16"
    del manifest["sizes"]["128x192"]
    (bf16 / "manifest.json").write_text(json.dumps(manifest))
    sizes, notes = common_sizes(read_root(root))
    assert sizes == [(128, 128), (192, 128)]
    assert len(notes) == 1 and "128x192 is compiled in fp32 only" in notes[0]
    assert "--dtype bf16 --sizes 128x192" in notes[0]


# --- roots of manifest format 1 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def format_1_root(compiled_root, tmp_path_factory):
    """The test session's one-size root (bf16 and fp32) as the compile.py before several sizes wrote it."""
    copy = neuron_helpers.copy_root(compiled_root, tmp_path_factory.mktemp("f1") / "r")
    return neuron_helpers.downgrade_to_format_1(copy)


def test_a_format_1_root_loads_and_generates_as_before(format_1_root, compiled_root):
    size = neuron_helpers.SIZE
    assert (format_1_root / "compiled_models" / "fp32" / "unet.pt").is_file()
    backend = NeuronBackend(NeuronSettings(artifacts=str(format_1_root)))
    current = NeuronBackend(NeuronSettings(artifacts=str(compiled_root), sizes=f"{size}x{size}"))
    try:
        caps = backend.capabilities()
        assert caps.fixed_sizes == ((size, size),) and caps.precisions == ("bf16", "fp32")
        assert caps.modes == ("txt2img",)  # no VAE encoder in a format 1 root
        assert any("--parts vae_encoder" in note for note in caps.notes)
        request = GenerationRequest(prompt="a lovely cat", steps=2, seed=4, precision="bf16")
        # The very same parts, so the very same pixels.
        assert np.array_equal(pixels(backend.generate(request).images), pixels(current.generate(request).images))
    finally:
        backend.close()
        current.close()


def test_adding_the_vae_encoder_to_a_format_1_root_keeps_its_parts(format_1_root, tmp_path, capsys):
    root = neuron_helpers.copy_root(format_1_root, tmp_path / "root")
    size = neuron_helpers.SIZE
    fp32 = root / "compiled_models" / "fp32"
    before = {p.name: p.stat().st_mtime_ns for p in fp32.glob("*.pt")}
    backend = NeuronBackend(NeuronSettings(artifacts=str(root)))
    note = next(n for n in backend.capabilities().notes if "--parts vae_encoder" in n)
    backend.close()
    command = shlex.split(note.split(": ", 1)[1].split("python -m compile_scripts.compile ", 1)[1])
    assert command[command.index("--sizes") + 1] == f"{size}x{size}" and "--target" in command
    assert compile_main(command) == 0
    log = capsys.readouterr().out
    assert "upgrading the format 1 manifest" in log
    assert log.count("tracing") == 2 and log.count("up to date") == 0  # one encoder per dtype, nothing else
    assert {p.name: p.stat().st_mtime_ns for p in fp32.glob("*.pt")} == before  # the old parts stay where they were
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["sizes"][f"{size}x{size}"]["parts"]["unet"]["file"] == "unet.pt"
    assert manifest["sizes"][f"{size}x{size}"]["parts"]["vae_encoder"]["file"] == f"{size}x{size}/vae_encoder.pt"
    backend = NeuronBackend(NeuronSettings(artifacts=str(root)))
    try:
        assert backend.capabilities().modes == ("txt2img", "img2img", "inpaint")
    finally:
        backend.close()


# --- the app and the endpoint ----------------------------------------------------------------------


def test_app_serves_each_size_and_refuses_the_others(sizes_root, tmp_path):
    from gradio_client import Client

    from helpers import run_app

    with run_app(["--backend", "neuron", "--artifacts", str(sizes_root)], tmp_path) as app:
        client = Client(app.url, verbose=False)
        for width, height in SIZES:
            gallery, details = client.predict(prompt="a lovely cat", steps=1, seed=3, width=width, height=height,
                                              api_name="/generate")[:2]
            assert details["size"] == f"{width}x{height}" and len(gallery) == 1
        with pytest.raises(Exception) as err:
            client.predict(prompt="a lovely cat", steps=1, width=192, height=192, api_name="/generate")
        log = app.log()
    assert "192x192 is not available" in str(err.value) and all(key in str(err.value) for key in KEYS)
    assert "ready in " in log and "first image in " in log


def test_endpoint_serves_each_size_and_refuses_the_others(sizes_root, tmp_path):
    import urllib.error
    import urllib.request

    from helpers import free_port, run_process

    port = free_port()
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}/invocations"

    def invoke(payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(url, json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    with run_process(["-m", "serving.server", "--backend", "neuron", "--artifacts", str(sizes_root), "--port",
                      str(port)], f"http://127.0.0.1:{port}/ping", log_path=log_path):
        status, described = invoke({"describe": True})
        assert status == 200 and described["fixed_sizes"] == [list(s) for s in SIZES]
        assert described["default_size"] == list(SIZES[0]) and described["modes"] == ["txt2img", "img2img", "inpaint"]
        for width, height in SIZES:
            status, answer = invoke({"prompt": "a lovely cat", "parameters": {
                "num_inference_steps": 1, "seed": 5, "width": width, "height": height}})
            assert status == 200 and len(answer["images"]) == 1
            assert f"Size: {width}x{height}" in answer["info"]
        status, answer = invoke({"prompt": "a lovely cat", "parameters": {"width": 192, "height": 192}})
    assert status == 400 and answer["message"] == "InvalidRequest" and "192x192 is not available" in answer["error"]
    assert all(key in answer["error"] for key in KEYS)
    log = log_path.read_text()
    assert "loading 1/13: fp32 text_encoder for every size" in log and "ready in " in log and "first image in " in log
