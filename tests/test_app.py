"""The app as a client sees it: launched on a free port and driven with gradio_client."""

import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from backend.metadata import parse_infotext, read_infotext
from helpers import run_app

FAST = dict(steps=3, width=128, height=128)


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    with run_app(["--model", str(tiny_dir), "--max-queue", "2"], tmp_path_factory.mktemp("app")) as app:
        yield app.url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_api_is_callable_by_keyword_with_defaults(client):
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names == ["prompt", "negative_prompt", "steps", "precision", "guidance_scale", "seed", "scheduler",
                     "width", "height", "num_images"]
    assert [p["parameter_has_default"] for p in params] == [False] + [True] * 9


def test_generation_returns_pngs_with_infotext_and_details(client, tiny_dir):
    gallery, details = client.predict(prompt="a lovely cat", negative_prompt="blurry", seed=7, num_images=2,
                                      api_name="/generate", **FAST)
    assert len(gallery) == 2
    assert details["seeds"] == [7, 8] and details["backend"] == "local" and details["model"] == tiny_dir.name
    assert set(details["timings"]) >= {"total_ms", "text_encoder_ms", "denoise_ms", "step_ms", "vae_ms"}
    for item, seed in zip(gallery, [7, 8]):
        with open(item["image"], "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
        info = parse_infotext(read_infotext(item["image"]))
        assert info["prompt"] == "a lovely cat" and info["negative_prompt"] == "blurry"
        assert info["params"]["Seed"] == str(seed) and info["params"]["Model"] == tiny_dir.name
        assert info["params"]["Steps"] == "3" and info["params"]["Size"] == "128x128"


def test_only_the_prompt_is_required(client):
    gallery, details = client.predict("a lovely cat", api_name="/generate")
    assert len(gallery) == 1 and details["size"] == "512x512" and details["steps"] == 20
    assert details["scheduler"] == "dpm++2m" and details["precision"] == "fp32"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="   "), "prompt: must not be empty"),
        (dict(prompt="cat", steps=0), "steps: 0 is out of range"),
        (dict(prompt="cat", seed="abc"), "seed: must be a whole number"),
        (dict(prompt="cat", seed=2**33), "seed: 8589934592 is out of range"),
        (dict(prompt="cat", scheduler="plms"), "scheduler: 'plms' is not known"),
        (dict(prompt="cat", precision="int8"), "precision: 'int8' is not available"),
        (dict(prompt="cat", width=100), "width: 100 is not a multiple of 8"),
        (dict(prompt="cat", height=4096), "height: 4096 is out of range"),
        (dict(prompt="cat", num_images=9), "num_images: 9 is out of range"),
    ],
)
def test_bad_input_is_a_clear_message_and_the_next_request_works(client, kwargs, message):
    with pytest.raises(AppError) as info:
        client.predict(api_name="/generate", **{**FAST, **kwargs})
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    gallery, _ = client.predict(prompt="still works", api_name="/generate", **FAST)
    assert len(gallery) == 1


def test_long_prompt_warning_reaches_the_api(client):
    _, details = client.predict(prompt="a lovely cat, " * 40 + "purple dragon", api_name="/generate", **FAST)
    assert any("purple dragon" in w and "77 tokens" in w for w in details["warnings"])


def test_cancel_ends_a_running_generation_and_frees_the_device(client, app_url):
    """An API client stops with job.cancel() (the UI's Stop does the same): the device is free at once."""
    job = client.submit(prompt="a long one", steps=100, api_name="/generate")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (job.status().progress_data is None):
        time.sleep(0.1)  # wait until denoising has started
    assert job.status().progress_data is not None
    assert job.cancel()
    started = time.monotonic()
    gallery, _ = Client(app_url, verbose=False).predict(prompt="after stop", api_name="/generate", **FAST)
    assert len(gallery) == 1
    # 100 steps at 512x512 take several seconds; a 3-step 128x128 request behind a cancelled one must not wait.
    assert time.monotonic() - started < 3


def test_full_queue_is_a_clear_message_and_nothing_else_is_lost(app_url):
    """One running, two waiting (--max-queue 2): the next is refused, the three others finish."""
    clients = [Client(app_url, verbose=False) for _ in range(4)]
    jobs = []
    for i, c in enumerate(clients[:3]):
        # Long enough (several seconds each) that none can finish before the fourth arrives.
        jobs.append(c.submit(prompt=f"user {i}", seed=i, steps=100, api_name="/generate"))
        time.sleep(0.3)  # keep the order deterministic
    with pytest.raises(Exception) as info:
        clients[3].predict(prompt="one too many", api_name="/generate", **FAST)
    assert "queue is full" in str(info.value).lower()
    for i, job in enumerate(jobs):
        gallery, details = job.result(timeout=120)
        assert details["seeds"] == [i]
        assert parse_infotext(read_infotext(gallery[0]["image"]))["prompt"] == f"user {i}"
    assert len(clients[3].predict(prompt="room again", api_name="/generate", **FAST)[0]) == 1


def test_default_launch_offline_says_it_runs_the_tiny_model(tmp_path):
    """`python app.py` with no model and no network starts on the tiny model and says so."""
    import json
    import urllib.request

    with run_app([], tmp_path, env={"HF_HUB_OFFLINE": "1"}) as app:
        url = app.url
        config = json.loads(urllib.request.urlopen(url + "config", timeout=10).read())
        banner = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
        assert "tiny-warning" in banner and "not Stable Diffusion 2.1" in banner and "--model" in banner
        gallery, details = Client(url, verbose=False).predict("a lovely cat", api_name="/generate", **FAST)
        assert details["model"] == "tiny" and len(gallery) == 1
    log = next(tmp_path.glob("app-*.log")).read_text()
    assert "tiny model" in log and "could not be loaded" in log


def test_demo_is_importable_for_spaces(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    code = "import app, gradio; d = app.demo; assert isinstance(d, gradio.Blocks); print('ok', d.title)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "SD_MODEL": "tiny"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok Stable Diffusion" in done.stdout
