"""Shared fixtures: the tiny model on disk, free ports, and real app / server processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import procs  # noqa: E402
from benchmarks.procs import free_port, run_process  # noqa: E402 - the tests import them from here too

# Every test run gets its own Gradio cache, removed at the end (set before gradio is imported).
_GRADIO_TMP = tempfile.mkdtemp(prefix="sd-tests-gradio-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_GRADIO_TMP, ignore_errors=True)


def run_app(extra_args: list[str], tmp_path: Path, env: dict | None = None):
    """Launch `python app.py ...` on a free port, its output in tmp_path; yields its base URL."""
    return procs.run_app(extra_args, env=env, log_path=tmp_path / f"app-{free_port()}.log")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model saved once as a diffusers folder by `python -m backend.tiny`."""
    path = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, "-m", "backend.tiny", str(path)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def tiny_backend():
    """One in-process LocalBackend on the tiny model, shared by the tests that only read it."""
    from backend import Settings, create_backend

    backend = create_backend(Settings(backend="local", model="tiny", device="cpu"))
    yield backend
    backend.close()


@dataclasses.dataclass
class AppProcess:
    """A running `python app.py`: its URL, process, log file and its own GRADIO_TEMP_DIR."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    temp_dir: Path

    def log(self) -> str:
        """Everything the app has printed so far."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def launch_app(extra_args: list[str], tmp_path: Path, env: dict | None = None):
    """Like run_app, but yields an AppProcess whose cache folder is its own (for leak checks)."""
    port = free_port()
    temp_dir = tmp_path / f"gradio-{port}"
    temp_dir.mkdir()
    log_path = tmp_path / f"app-{port}.log"
    url = f"http://127.0.0.1:{port}/"
    full_env = {"GRADIO_TEMP_DIR": str(temp_dir), **(env or {})}
    with run_process(["app.py", "--port", str(port), *extra_args], url, env=full_env, log_path=log_path) as proc:
        yield AppProcess(url, proc, log_path, temp_dir)


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory) -> AppProcess:
    """One `python app.py --model tiny` shared by the browser, load and security tests."""
    with launch_app(["--model", "tiny"], tmp_path_factory.mktemp("tiny-app")) as app:
        yield app


CHROMIUM = os.environ.get("SD_CHROMIUM", "/usr/bin/chromium")  # Debian's; Playwright never downloads one
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (through Playwright) for the whole run; skips where there is none."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SD_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def aws_env(monkeypatch):
    """Throwaway AWS credentials and region, and none of this machine's AWS config (no AWS is called)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-2",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return "us-east-2"
