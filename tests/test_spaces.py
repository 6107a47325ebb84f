"""The app as a Hugging Face Space runs it: `python app.py` with no arguments, the Space's variables and secrets in
the environment, the model preloaded into the Hub cache; and on ZeroGPU, with the real `spaces` package forking a
worker per call against a stand-in of its device API (tests/zerogpu_standin.py) and of the GPU
(tests/zerogpu_worker/sitecustomize.py). docs/spaces.md is the owner's side of it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from backend import GenerationRequest, InvalidRequest
from backend.core.metadata import read_infotext
from backend.core.settings import DEFAULT_MODEL, DEFAULT_MODEL_REVISION
from backend.inprocess.local import CPU_DEFAULT_STEPS
from helpers import ROOT, free_port, run_process, wait_until
from zerogpu_standin import DeviceApi

# What every Space's container has (the Spaces runtime sets these; the app is started as `python app.py`).
SPACE_ENV = {"SYSTEM": "spaces", "SPACE_ID": "sd-tests/stable-diffusion", "GRADIO_SERVER_NAME": "0.0.0.0"}
SMALL = dict(steps=3, width=64, height=64)
SUGGESTED_HARDWARE = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4",
                      "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4",
                      "a100x8")  # hub-docs spaces-config-reference.md, suggested_hardware's valid flavors


@contextlib.contextmanager
def space_app(work_dir: Path, env: dict[str, str]):
    """`python app.py`, no arguments, as a Space starts app_file: the port and address from GRADIO_SERVER_*, the rest
    from the Space's variables and secrets (SD_*). Yields (url, process, log path)."""
    port = free_port()
    temp_dir = work_dir / f"gradio-{port}"
    temp_dir.mkdir(parents=True)
    log_path = work_dir / f"app-{port}.log"
    url = f"http://127.0.0.1:{port}/"
    full_env = {**SPACE_ENV, "GRADIO_SERVER_PORT": str(port), "GRADIO_TEMP_DIR": str(temp_dir), **env}
    with run_process(["app.py"], url, env=full_env, log_path=log_path, timeout=240) as proc:
        yield url, proc, log_path


def front_matter() -> dict[str, object]:
    """README.md's front matter (the Space's configuration), read as the flat YAML it is."""
    text = (ROOT / "README.md").read_text()
    block = text.split("---\n")[1]
    config: dict[str, object] = {}
    key = None
    for line in block.splitlines():
        if line.startswith("  - ") and key:
            config.setdefault(key, []).append(line[4:].strip())  # type: ignore[union-attr]
        elif ":" in line:
            key, _, value = line.partition(":")
            value = value.strip()
            if value:
                config[key] = value
    return config


class HubStandIn:
    """A STAND-IN for the Hub's HTTP API (HF_ENDPOINT): answers 503 to everything and counts what it was asked, so a
    test can show the app made no call to the Hub."""

    def __init__(self):
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _refuse(self):
                hub.requests.append(f"{self.command} {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self._refuse()

            def do_HEAD(self):
                self._refuse()

            def do_POST(self):
                self._refuse()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def test_the_front_matter_is_a_valid_space_config_that_preloads_the_pinned_default_model():
    config = front_matter()
    assert config["sdk"] == "gradio" and config["app_file"] == "app.py"
    pinned_gradio = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert config["sdk_version"] == pinned_gradio
    assert config["suggested_hardware"] in SUGGESTED_HARDWARE
    [preload] = config["preload_from_hub"]
    repo, files, revision = preload.split(" ")
    assert (repo, revision) == (DEFAULT_MODEL, DEFAULT_MODEL_REVISION)
    files = files.split(",")
    # What from_pretrained reads for a StableDiffusionPipeline without the safety checker and feature extractor.
    assert "model_index.json" in files and "scheduler/scheduler_config.json" in files
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        assert f"{part}/config.json" in files and f"{part}/{weights}.safetensors" in files
    assert {f"tokenizer/{name}" for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                             "vocab.json")} <= set(files)


# The Hub refuses a git push whose binary files are not in its Xet / LFS storage above a size: 1 MB when
# huggingface_hub's docs said so (huggingface/huggingface_hub pull request 657, 2022); a 1.67 MB mp4 was refused in
# 2026-08 (qdonnars/ohmywind pull request 289). This repository has no .gitattributes for LFS: it stays under that.
PUSHABLE_BINARY_BYTES = 1_000_000


def test_every_binary_file_is_small_enough_to_push_to_a_space_without_lfs():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    too_big = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            binary = b"\0" in f.read(8192)
        if binary and path.stat().st_size >= PUSHABLE_BINARY_BYTES:
            too_big.append(f"{name}: {path.stat().st_size} bytes")
    assert too_big == [], "a Space push would be refused for these (shrink them or track them with Xet / LFS)"


def test_a_cpu_space_loads_the_preloaded_model_from_the_cache_with_no_hub_call_and_keeps_its_secret(
        tiny_dir, tmp_path):
    """CPU basic: the default model (here the tiny one's files, laid out as preload_from_hub lays the pinned commit's
    in the Hub cache) loads with no request to the Hub; SD_AUTH, set as a Space secret, guards the app."""
    snapshot = (tmp_path / "hub" / f"models--{DEFAULT_MODEL.replace('/', '--')}" / "snapshots" /
                DEFAULT_MODEL_REVISION)
    shutil.copytree(tiny_dir, snapshot)
    (snapshot / "README.md").unlink()  # the tiny model's marker: this stands for the real model's files
    hub = HubStandIn()
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "SD_AUTH": "owner:a-space-secret"}
    try:
        with space_app(tmp_path, env) as (url, _, log_path):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + "config", timeout=30)
            assert refused.value.code == 401  # the secret guards the page and the API
            client = Client(url, auth=("owner", "a-space-secret"), verbose=False)
            gallery, details = client.predict(prompt="a lovely cat", seed=7, api_name="/generate", **SMALL)
            # A real model on a CPU starts at fewer steps (inprocess/local.py), so a first image comes sooner.
            _, default = client.predict(prompt="a lovely cat", width=64, height=64, api_name="/generate")
            log = log_path.read_text()
    finally:
        hub.close()
    assert len(gallery) == 1 and details["model"] == DEFAULT_MODEL
    assert default["steps"] == CPU_DEFAULT_STEPS
    assert f"loaded {DEFAULT_MODEL} at {DEFAULT_MODEL_REVISION}" in log
    assert "could not be loaded" not in log
    # About the model, none (huggingface_hub may ask for other things of its own, e.g. its agent registry when a
    # coding agent's variables are set: not the model's load).
    assert [r for r in hub.requests if DEFAULT_MODEL in r or "/api/models" in r] == [], hub.requests


@pytest.fixture(scope="module")
def zerogpu_app(tmp_path_factory):
    """The app on a ZeroGPU Space: SPACES_ZERO_GPU=true and the device API's address, as the Space sets them; the
    stand-in device API; the stand-in GPU in the worker (sitecustomize on PYTHONPATH); the tiny model on the CPU."""
    work_dir = tmp_path_factory.mktemp("zerogpu")
    cgroup = work_dir / "cgroup"
    cgroup.write_text("0::/standin\n")
    with DeviceApi() as api:
        env = {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": api.url,
               "ZEROGPU_PROC_SELF_CGROUP_PATH": str(cgroup), "PYTHONPATH": str(ROOT / "tests" / "zerogpu_worker"),
               "SD_MODEL": "tiny", "SD_DEVICE": "cpu"}
        with space_app(work_dir, env) as (url, proc, log_path):
            yield url, proc, api, log_path


def test_zerogpu_runs_each_generation_in_a_forked_worker_with_the_local_backends_pixels(zerogpu_app):
    from backend import Settings, create_backend

    url, proc, api, log_path = zerogpu_app
    assert api.log.of("/startup-report"), "spaces reports the decorated function at launch"
    gallery, details = Client(url, verbose=False).predict(prompt="a lovely cat", seed=7, api_name="/generate",
                                                          **SMALL)
    # The local backend as the ZeroGPU one runs it (--optimize auto is plain diffusers there, inprocess/zerogpu.py).
    local = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none"))
    try:
        expected = local.generate(GenerationRequest("a lovely cat", seed=7, **SMALL))
    finally:
        local.close()
    with Image.open(gallery[0]["image"]) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected.images[0].convert("RGB")))
    assert details["seeds"] == [7] and "Seed: 7" in read_infotext(gallery[0]["image"])  # the infotext crossed too
    [schedule] = api.log.of("/schedule")
    assert int(schedule["durationSeconds"]) == 15  # the floor: 3 steps at 64x64 cost far less
    allows = api.log.of("/allow")
    assert allows and all(int(a["pid"]) != proc.pid for a in allows), "the GPU work runs in a forked worker"
    wait_until(lambda: len(api.log.of("/release")) == 1, 30, "the GPU released")
    assert api.log.of("/release")[0]["fail"].lower() == "false"
    assert "ZeroGPU" in log_path.read_text()


def test_zerogpu_reserves_by_the_request_streams_steps_and_previews_and_stops(zerogpu_app, tiny_backend,
                                                                              monkeypatch):
    from backend.inprocess import zerogpu

    url, _, api, _ = zerogpu_app
    client = Client(url, verbose=False)
    scheduled = len(api.log.of("/schedule"))
    # Stop: the progress bar moves (each step comes back from the worker), then the client cancels.
    job = client.submit(prompt="a long one", steps=100, api_name="/generate")
    wait_until(lambda: steps_done(job) >= 3, 120, "steps from the worker")
    assert job.cancel()
    wait_until(lambda: len(api.log.of("/release")) == len(api.log.of("/schedule")), 60, "the GPU released")
    long_schedule = api.log.of("/schedule")[scheduled]
    monkeypatch.setattr(zerogpu, "_BACKEND", tiny_backend)  # gpu_seconds validates against a backend's caps
    expected = zerogpu.gpu_seconds(GenerationRequest("a long one", steps=100))
    assert int(long_schedule["durationSeconds"]) == expected > zerogpu.GPU_FLOOR_S
    # Previews cross the fork too; the run is long enough (50 steps at 512x512) for the app's first one to be due.
    job = client.submit(prompt="a lovely cat", seed=3, steps=50, width=512, height=512, api_name="/generate")
    final_gallery, _ = job.result(timeout=300)
    *previews, _ = job.outputs()
    assert len(final_gallery) == 1
    assert previews and previews[0][0][0]["caption"].startswith("Preview: step ")
    wait_until(lambda: len(api.log.of("/release")) == len(api.log.of("/schedule")), 60, "the GPU released")


def steps_done(job) -> int:
    """Denoising steps the job's progress bar has shown."""
    progress = job.status().progress_data
    return (progress[0].index or 0) if progress else 0


def test_gpu_seconds_grows_with_steps_size_and_images_above_a_floor(tiny_backend, monkeypatch):
    from backend.inprocess import zerogpu

    monkeypatch.setattr(zerogpu, "_BACKEND", tiny_backend)
    small = zerogpu.gpu_seconds(GenerationRequest("x", steps=4, width=256, height=256))
    base = zerogpu.gpu_seconds(GenerationRequest("x", steps=100))
    assert small == zerogpu.GPU_FLOOR_S
    assert zerogpu.gpu_seconds(GenerationRequest("x", steps=100, num_images=4)) > base
    assert zerogpu.gpu_seconds(GenerationRequest("x", steps=100, width=768, height=768)) > base
    assert zerogpu.gpu_seconds(GenerationRequest("x", steps=100, guidance_scale=1.0)) < base
    assert zerogpu.gpu_seconds(GenerationRequest("x", steps=100, hr_scale=2.0)) > base  # the hires pass, 4x pixels
    assert zerogpu.gpu_seconds(GenerationRequest("", steps=100)) == zerogpu.GPU_FLOOR_S  # refused: the floor


def test_the_estimate_beside_generate_follows_the_controls_from_the_warm_up(tiny_backend):
    from ui.estimate import estimate_note

    one = estimate_note(tiny_backend, 20, 512, 512, 1)
    assert one.startswith("Up to about ") and "20 steps, 512x512" in one and "measured at start-up" in one
    after = tiny_backend.generate(GenerationRequest("a lovely cat", steps=4, width=128, height=128, seed=1))
    followed = estimate_note(tiny_backend, 20, 512, 512, 1, after.details())
    assert followed.startswith("About ") and "measured by the last generation" in followed
    assert estimate_note(tiny_backend, 20, 512, 512, 4) != one
    assert estimate_note(tiny_backend, "", 512, 512, 1) == ""
    hires = estimate_note(tiny_backend, 20, 512, 512, 1, hires=True, hr_scale=2.0, hr_steps=10)
    assert "then 10 at 1024x1024" in hires and estimate_note(tiny_backend, 20, 512, 512, 1, hr_scale=2.0) == one


def test_off_zerogpu_the_decorator_is_a_no_op_and_the_events_run_here(monkeypatch):
    """--zero-gpu without SPACES_ZERO_GPU: spaces.GPU returns the function unchanged; steps, previews, the result and
    Stop go through the same events, in this process, with the local backend's pixels."""
    from backend import GenerationCancelled, Settings, create_backend
    from backend.inprocess import zerogpu

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(zerogpu, "_BACKEND", None)
    backend = create_backend(Settings(backend="local", model="tiny", device="cpu", zero_gpu=True, preview_every=1))
    local = create_backend(Settings(backend="local", model="tiny", device="cpu", optimize="none"))
    try:
        assert isinstance(backend, zerogpu.ZeroGPUBackend) and not backend.on_zero_gpu
        steps, previews = [], []
        request = GenerationRequest("a lovely cat", seed=5, steps=4, width=64, height=64)
        result = backend.generate(request, on_step=lambda i, n: steps.append((i, n)),
                                  on_preview=lambda i, n, images: previews.append(i))
        assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)] and previews == [1, 2, 3]  # the last: the images
        expected = local.generate(request)
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))

        def stop_at_two(i, n):
            if i == 2:
                raise GenerationCancelled("stopped")
        with pytest.raises(GenerationCancelled):
            backend.generate(dataclasses.replace(request, steps=50), on_step=stop_at_two)
        with pytest.raises(InvalidRequest):
            backend.generate(GenerationRequest("", steps=4))
        # A caller that paces its previews (the app's handler: wanted()) cannot be asked across the fork: the worker
        # makes them at the interval instead of every step (a minute here: none in a 4-step run).
        monkeypatch.setattr(zerogpu, "IntervalPaced", functools.partial(zerogpu.IntervalPaced, interval_s=60.0))

        class Paced:
            def __init__(self):
                self.got = []

            def wanted(self):
                raise AssertionError("asked across the fork")

            def __call__(self, i, n, images):
                self.got.append(i)

        paced = Paced()
        backend.generate(request, on_preview=paced)
        assert paced.got == []
        # Beside Generate: the GPU time a request reserves, not a CPU estimate.
        from ui.estimate import estimate_note

        assert estimate_note(backend, 20, 512, 512, 1).startswith(f"Reserves up to **{zerogpu.GPU_FLOOR_S} s**")
    finally:
        backend.close()
        local.close()
