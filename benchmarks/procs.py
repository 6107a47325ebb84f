"""Start the project's servers as real processes and wait for them: used by the benchmarks and the tests.

    with run_process(["app.py", "--port", str(port)], f"http://127.0.0.1:{port}/", env=...) as proc: ...
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


@contextlib.contextmanager
def run_app(app_args: list[str], env: dict | None = None, timeout: float = 180.0, log_path: Path | None = None):
    """`python app.py APP_ARGS` on a free port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with run_process(["app.py", "--port", str(port), *app_args], url, env=env, timeout=timeout, log_path=log_path):
        yield url
