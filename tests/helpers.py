"""What the tests share besides fixtures: the repository root, real processes (from benchmarks/procs.py,
which the benchmarks use too), Chromium's location, and waiting for an event with a deadline."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.procs import AppProcess, free_port, run_app, run_process, wait_http  # noqa: E402, F401 - shared here

CHROMIUM = os.environ.get("SD_CHROMIUM", "/usr/bin/chromium")  # Debian's; Playwright never downloads one
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]

T = TypeVar("T")


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
