"""The app as a client sees it: launched on a free port and driven with gradio_client."""

import time

import pytest
from PIL import Image
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from backend.core.metadata import parse_infotext, read_infotext
from helpers import run_app

FAST = dict(steps=3, width=128, height=128)


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """Where the module's app writes its log."""
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(tiny_dir, app_dir):
    with run_app(["--model", str(tiny_dir), "--max-queue", "2"], app_dir) as app:
        yield app.url


def wait_for(condition, what: str, timeout_s: float = 120.0):
    """Poll until condition() is true (a generous bound against hanging, not a timing assumption)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.02)


def steps_done(job) -> int:
    """Denoising steps the job's progress bar has shown."""
    progress = job.status().progress_data
    return (progress[0].index or 0) if progress else 0


def is_queued(job) -> bool:
    """The server has the job: it waits in the queue with a rank, or runs."""
    status = job.status()
    # ITERATING: a generator handler (the previews) that has yielded at least once.
    return (status.code == Status.IN_QUEUE and status.rank is not None) or status.code in (
        Status.PROCESSING, Status.PROGRESS, Status.ITERATING)


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_api_is_callable_by_keyword_with_defaults(client):
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names == ["prompt", "negative_prompt", "steps", "precision", "guidance_scale", "seed", "scheduler",
                     "width", "height", "num_images", "preview", "enable_hr", "hr_scale", "hr_upscaler", "hr_steps",
                     "denoising_strength"]
    assert [p["parameter_has_default"] for p in params] == [False] + [True] * 15


# The app sends its first preview once a preview fits 5% of the time since the start (ui/handlers.LatestPreview: at
# least 25 ms each, so after about 0.5 s): a generation must outlast that for a preview to be due at all.
# The tiny model takes milliseconds a step at 128x128 on 2 cores: the run is 512x512, its steps sized to last this.
PREVIEW_RUN_S = 3.0
PREVIEW_SIZE = 512


def test_the_api_streams_previews_unless_asked_not_to(client):
    """job.outputs() holds every update: pictures of the latents (latent size) before the PNG gallery."""
    sized = dict(width=PREVIEW_SIZE, height=PREVIEW_SIZE)
    quiet = client.submit(prompt="a lovely cat", seed=3, preview=False, api_name="/generate", steps=8, **sized)
    _, quiet_details = quiet.result(timeout=120)
    assert len(quiet.outputs()) == 1
    # Sized by that measurement, so the run with previews outlasts the first one's pacing on a fast machine too.
    per_step_s = quiet_details["timings"]["total_ms"] / 8 / 1000
    steps = min(100, max(8, int(PREVIEW_RUN_S / per_step_s) + 1))
    job = client.submit(prompt="a lovely cat", seed=3, api_name="/generate", steps=steps, **sized)
    final_gallery, details = job.result(timeout=300)
    *previews, last = job.outputs()
    assert previews, f"no preview came before the result ({steps} steps, {details['timings']['total_ms']:.0f} ms)"
    assert last[1] == details and len(final_gallery) == 1
    [item] = previews[0][0]
    assert item["caption"].startswith("Preview: step ") and item["caption"].endswith(f" of {steps}")
    with Image.open(item["image"]) as picture:
        assert picture.size == (PREVIEW_SIZE // 8, PREVIEW_SIZE // 8)  # the latents' size
    assert final_gallery[0]["caption"] is None


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


def test_png_info_api_reads_the_apps_png_and_another_tools_and_says_when_it_cannot(client, tmp_path):
    from pathlib import Path

    from gradio_client import handle_file

    gallery, _ = client.predict(prompt="a lovely cat", negative_prompt="blurry", seed=7, api_name="/generate", **FAST)
    result = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert result["info"] == read_infotext(gallery[0]["image"]) and result["tool"].startswith("AUTOMATIC1111")
    p = result["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"]) == ("a lovely cat", "blurry", "3", "7")
    assert (p["Size-1"], p["Size-2"], p["CFG scale"]) == ("128", "128", "7.5") and result["notes"] == []
    comfy = Path(__file__).parent / "fixtures" / "png_info" / "noisy_latents_3_subjects_cropped.png"
    result = client.predict(handle_file(str(comfy)), api_name="/png_info")
    assert result["tool"] == "ComfyUI" and result["parameters"]["Steps"] == "16"
    assert "sampler nodes" in result["notes"][0] and "workflow" not in result["items"]
    (tmp_path / "text.png").write_text("not a picture")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for name, message in (("text.png", "cannot be read as an image"), ("plain.png", "no generation settings")):
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(tmp_path / name)), api_name="/png_info")


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
    """An API client stops with job.cancel() (the UI's Stop does the same): the device is free at once.

    Measured first, here and now: a small request alone, and the long one's seconds per step. One
    generation runs at a time, so if the cancelled one held the device, the next would wait for its rest.
    """
    after = Client(app_url, verbose=False)
    started = time.monotonic()
    after.predict(prompt="alone", api_name="/generate", **FAST)
    small_s = time.monotonic() - started

    job = client.submit(prompt="a long one", steps=100, api_name="/generate")
    wait_for(lambda: steps_done(job) >= 1, "denoising")
    k1, t1 = steps_done(job), time.monotonic()
    wait_for(lambda: steps_done(job) >= k1 + 2, "two more steps")
    k2, t2 = steps_done(job), time.monotonic()
    remaining_s = (100 - k2) * (t2 - t1) / (k2 - k1)
    assert job.cancel()
    stopped_at = time.monotonic()
    gallery, _ = after.predict(prompt="after stop", api_name="/generate", **FAST)
    waited = time.monotonic() - stopped_at
    assert len(gallery) == 1
    print(f"cancel: small request {small_s:.2f} s alone, {remaining_s:.1f} s were left, next one took {waited:.2f} s")
    assert waited < small_s + remaining_s / 2, (
        f"the next request took {waited:.1f} s after cancel; alone {small_s:.1f} s, the cancelled one had "
        f"~{remaining_s:.0f} s left")


def test_full_queue_is_a_clear_message_and_nothing_else_is_lost(app_url):
    """One running, two waiting (--max-queue 2): the next is refused, the three others finish."""
    clients = [Client(app_url, verbose=False) for _ in range(4)]
    jobs = []
    for i, c in enumerate(clients[:3]):
        # Long enough (several seconds each) that none can finish before the fourth arrives.
        jobs.append(c.submit(prompt=f"user {i}", seed=i, steps=100, api_name="/generate"))
        # In order: the first runs before the next is sent, each next one is in the queue before the one after.
        wait_for((lambda job=jobs[-1]: steps_done(job) >= 1) if i == 0 else (lambda job=jobs[-1]: is_queued(job)),
                 f"job {i} in the queue")
    with pytest.raises(Exception) as info:
        clients[3].predict(prompt="one too many", api_name="/generate", **FAST)
    assert "queue is full" in str(info.value).lower()
    for i, job in enumerate(jobs):
        gallery, details = job.result(timeout=120)
        assert details["seeds"] == [i]
        assert parse_infotext(read_infotext(gallery[0]["image"]))["prompt"] == f"user {i}"
    assert len(clients[3].predict(prompt="room again", api_name="/generate", **FAST)[0]) == 1


def test_bad_input_is_one_log_line_not_a_traceback(client, app_dir):
    """What the operator reads for a person's typo: one line naming the field, under the request's id."""
    with pytest.raises(AppError):
        client.predict(api_name="/generate", **{**FAST, "prompt": "logged", "steps": 0})
    log = next(app_dir.glob("app-*.log")).read_text()
    lines = [line for line in log.splitlines() if "refused: invalid steps: 'steps: 0 is out of range" in line]
    assert lines and all(" INFO app: request " in line for line in lines), log[-2000:]
    assert "Traceback" not in log and "gradio.exceptions.Error" not in log, log[-3000:]


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


def test_a_host_that_launches_demo_itself_gets_login_upload_limit_and_css(tmp_path):
    """Spaces and `gradio app.py` import app.demo and call demo.launch() with no arguments of ours."""
    import os

    import httpx

    from helpers import free_port, run_process

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    code = "import threading, app; app.demo.launch(prevent_thread_lock=True); threading.Event().wait()"
    env = {"SD_MODEL": "tiny", "SD_AUTH": "alice:s3cret-pa55word", "GRADIO_SERVER_PORT": str(port)}
    with run_process(["-c", code], url, env=env, log_path=tmp_path / "host.log"), \
            httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/config").status_code == 401
        assert http.post("/login", data={"username": "alice", "password": "guess"}).status_code == 400
        assert http.post("/login", data={"username": "alice", "password": "s3cret-pa55word"}).status_code == 200
        config = http.get("/config").json()
        assert "#tiny-warning" in config["css"] and config["theme"] == "soft", (config["css"], config["theme"])
        big = http.post("/gradio_api/upload", files={"files": ("big.bin", os.urandom(11 * 2**20))})
        assert big.status_code == 413, (big.status_code, big.text[:200])
        small = http.post("/gradio_api/upload", files={"files": ("small.txt", b"fine")})
        assert small.status_code == 200
