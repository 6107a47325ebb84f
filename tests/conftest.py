"""Shared fixtures (the tiny model, compiled roots, a real app, Chromium, throwaway AWS settings), the session
set-up, and how the tests are split between pytest-xdist's workers (docs/testing.md says why and what it costs).

Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, AppProcess, build_once, free_port, run_app, run_process, screenshot

# Every test run gets its own Gradio cache, removed at the end (set before gradio is imported).
_GRADIO_TMP = tempfile.mkdtemp(prefix="sd-tests-gradio-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers share the two cores: torch in each, and in the apps, endpoints and TorchServe workers they
# start (which inherit the variable), runs one OpenMP thread instead of one per core, so that four busy-waiting
# OpenMP teams do not fight over two cores (docs/testing.md measures both). Set before anything imports torch:
# this file imports none (neuron_helpers is imported in the fixtures that need it, so xdist's controller never
# loads torch), and test modules are imported after it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_GRADIO_TMP, ignore_errors=True)


# --- how pytest-xdist splits the run (pytest.ini: -n 2 --dist loadscope --no-loadscope-reorder) ---------

# Each test module is one unit of work (its module fixtures are built once), and these modules share one: the
# SageMaker toolkit refuses to start while another TorchServe runs on the machine ("multiple ts model servers are
# not supported"), and the "tiny_servers" modules share one `python app.py --model tiny` (tiny_app), one
# `python -m serving.server --model tiny` (tiny_endpoint) and one Chromium, started once in the run.
GROUPS = {
    # The toolkit refuses a second TorchServe on one machine: every module that starts one is in this unit.
    **dict.fromkeys(("test_torchserve", "test_torchserve_modes", "test_torchserve_uncompressed", "test_deploy"),
                    "torchserve"),
    **dict.fromkeys(("test_load", "test_security", "test_browser", "test_browser_modes", "test_browser_pnginfo",
                     "test_browser_hires", "test_serving"),
                    "tiny_servers"),
}
# The longest units first, so that the two workers end together (the longest-first rule); measured in
# docs/testing.md. The order changes only which worker runs a unit and when, never what a test does.
LONGEST_FIRST = ("tiny_servers", "test_neuron", "test_benchmarks", "test_app", "test_faults", "test_spaces",
                 "torchserve", "test_neuron_sizes", "test_sagemaker_backend", "test_app_modes")


def unit_of(nodeid: str) -> str:
    """The unit of work of a test (by its node id): its module's name, or the shared one GROUPS names."""
    module = Path(nodeid.split("::")[0]).stem
    return GROUPS.get(module, module)


def pytest_collection_modifyitems(config, items):
    """The longest units first; a test keeps its place within its module."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable: the rest keep their order


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling with unit_of as the scope. (Its loadgroup marks do not take on pytest 9:
    xdist 3.8 renames a test by setting Item._nodeid, which pytest 9 no longer reads; pytest-xdist issue #1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)


# --- what is built once per run and shared by every module and worker ---------------------------------


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model saved once as a diffusers folder by `python -m backend.models.tiny`."""
    def build(folder: Path) -> Path:
        path = folder / "tiny-model"
        subprocess.run([sys.executable, "-m", "backend.models.tiny", str(path)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        return path
    return build_once(tmp_path_factory, "tiny-model", build)


@pytest.fixture(scope="session")
def compiled_root(tmp_path_factory) -> Path:
    """The tiny model traced for the CPU, bf16 and fp32, at neuron_helpers.SIZE (read only: copy_root to change it)."""
    import neuron_helpers  # torch: only where a root is needed

    return neuron_helpers.compiled_root(tmp_path_factory)


@pytest.fixture(scope="session")
def sizes_root(tmp_path_factory) -> Path:
    """The tiny model traced for the CPU in fp32 at the three neuron_helpers.SIZES (read only)."""
    import neuron_helpers  # torch: only where a root is needed

    return neuron_helpers.sizes_root(tmp_path_factory)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    """The tiny model traced for the CPU in fp32 at 128x128, every part: what the TorchServe and S3 tests serve and
    publish (read only: copy_root, then compile.py with neuron_helpers.small_root_args and --upload publishes it)."""
    import neuron_helpers  # torch: only where a root is needed

    return neuron_helpers.small_root(tmp_path_factory)


@pytest.fixture(scope="session")
def neuron_backend(compiled_root):
    """One NeuronBackend on the compiled root, for the tests that only read it."""
    from backend import Settings, create_backend

    backend = create_backend(Settings(backend="neuron", artifacts=str(compiled_root)))
    yield backend
    backend.close()


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
def tiny_endpoint(tmp_path_factory) -> str:
    """One `python -m serving.server --model tiny` answering to the endpoint name sd-test: its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("tiny-endpoint") / "endpoint.log"
    with run_process(["-m", "serving.server", "--model", "tiny", "--device", "cpu", "--port", str(port),
                      "--name", "sd-test"], url + "/ping", log_path=log):
        yield url


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
