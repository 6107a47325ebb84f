"""Start the project's servers as real processes and wait for them: used by the benchmarks and the tests.

    with run_app(["--model", "tiny"], work_dir) as app: ...      # app.url, app.proc, app.log()
    with run_process(["-m", "serving.server", "--port", str(port)], f"http://127.0.0.1:{port}/ping") as proc: ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until url answers (any HTTP status), failing early if proc dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode} "
                               f"before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def run_process(args: list[str], url: str, env: dict | None = None, timeout: float = 180.0,
                log_path: Path | None = None):
    """Start `python args...` in the repo root, wait for url, yield the Popen, stop it after.

    env is added to this process's environment; the output goes to log_path (or nowhere)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(url, timeout, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()


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
def run_app(app_args: list[str], work_dir: Path, env: dict | None = None,
            timeout: float = 180.0) -> Iterator[AppProcess]:
    """`python app.py APP_ARGS` on a free port, its output in work_dir/app-PORT.log and its Gradio cache in
    work_dir/gradio-PORT (its own, so what it leaves behind can be checked); stopped after."""
    port = free_port()
    temp_dir = Path(work_dir) / f"gradio-{port}"
    temp_dir.mkdir(parents=True)
    log_path = Path(work_dir) / f"app-{port}.log"
    url = f"http://127.0.0.1:{port}/"
    full_env = {"GRADIO_TEMP_DIR": str(temp_dir), **(env or {})}
    with run_process(["app.py", "--port", str(port), *app_args], url, env=full_env, timeout=timeout,
                     log_path=log_path) as proc:
        yield AppProcess(url, proc, log_path, temp_dir)
