"""Shared fixtures (the tiny model, a real app, Chromium, throwaway AWS settings) and the session set-up.

Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, AppProcess, run_app, screenshot

# Every test run gets its own Gradio cache, removed at the end (set before gradio is imported).
_GRADIO_TMP = tempfile.mkdtemp(prefix="sd-tests-gradio-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_GRADIO_TMP, ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory) -> AppProcess:
    """One `python app.py --model tiny` shared by the browser, load and security tests."""
    with run_app(["--model", "tiny"], tmp_path_factory.mktemp("tiny-app")) as app:
        yield app


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
def page(browser, request, tmp_path):
    """A fresh browser context and page; its full-page screenshot is saved when the test ends."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.errors = []  # uncaught page errors: the app's own JS must not throw
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    screenshot(pg, tmp_path, request.node.name)
    context.close()


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
