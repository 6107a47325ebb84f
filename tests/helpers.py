"""What the tests share besides fixtures: the repository root, real processes (from benchmarks/procs.py,
which the benchmarks use too), Chromium's location, and waiting for an event with a deadline."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.procs import AppProcess, free_port, run_app, run_process, wait_http  # noqa: E402, F401 - shared here

from benchmarks.page import CHROMIUM_ARGS, DEFAULT_CHROMIUM  # noqa: E402, F401 - shared here

CHROMIUM = os.environ.get("SD_CHROMIUM", DEFAULT_CHROMIUM)  # Debian's; Playwright never downloads one

T = TypeVar("T")


def run_shared_dir(tmp_path_factory) -> Path:
    """The folder this test run's processes share: under pytest-xdist each worker has its own basetemp
    (.../pytest-N/popen-gwK), whose parent is the run's; without xdist, the basetemp itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """What build(folder) makes (a compiled root, a saved model), made once per test run however many
    modules and xdist workers ask: the first builds it under a file lock, the others wait and reuse it.

    build gets an empty folder and returns the path it made in it. Users only read what it made;
    a test that changes it copies it first (neuron_helpers.copy_root)."""
    from filelock import FileLock  # huggingface_hub's dependency, always installed beside it

    shared = run_shared_dir(tmp_path_factory) / "built-once"
    shared.mkdir(exist_ok=True)
    done = shared / f"{name}.done"  # beside, not inside: a root's own files are what tests check
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            made = build(folder)
            done.write_text(str(made))
        return Path(done.read_text())


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll check() until it returns something true, and return that; fail saying `what` did not happen.

    The timeout only bounds a failure: a test waits for an event, never for a length of time."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.05)
    return value


class NarrowedBackend:
    """A real backend whose capabilities are narrowed by `changes` (dataclasses.replace on Capabilities);
    generation is the real backend's, so validation against the narrower capabilities is what is tested."""

    def __init__(self, backend, **changes):
        import dataclasses

        self.name, self._backend = backend.name, backend
        self._caps = dataclasses.replace(backend.capabilities(), **changes)

    def capabilities(self):
        return self._caps

    def generate(self, request, on_step=None):
        return self._backend.generate(request, on_step)

    def close(self):
        pass


def screenshot(pg, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot of a Playwright page in tmp_path, copied to $SD_SCREENSHOT_DIR when that is set."""
    import shutil

    path = tmp_path / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    if os.environ.get("SD_SCREENSHOT_DIR"):
        Path(os.environ["SD_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["SD_SCREENSHOT_DIR"]) / path.name)
    return path


@contextlib.contextmanager
def moto_server(region: str) -> Iterator[str]:
    """moto's server on a free port, throwaway credentials, AWS_ENDPOINT_URL pointing boto3 at it; yields its URL."""
    import urllib.request

    import pytest
    from moto.server import ThreadedMotoServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": region,
                           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": url}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", method="POST"))
        try:
            yield url
        finally:
            server.stop()
