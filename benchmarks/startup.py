"""Start-up of the neuron backend on a compiled root: each part loaded, the warm-ups, ready, the first image.

    python -m compile_scripts.compile --model tiny --out /tmp/sizes_root --target cpu \\
        --sizes 512x512,768x512,512x768
    python -m benchmarks.startup --artifacts /tmp/sizes_root            # the endpoint (serving/server.py)
    python -m benchmarks.startup --artifacts /tmp/sizes_root --app      # the app (app.py)

Starts the endpoint or the app on the root as its own process, asks for one image (1 step, the default
size) as soon as it answers, stops it, and prints what the backend logged while starting: each part with
its bytes and seconds, each warm-up, "ready in", and the time from the process start to the first image.
The figures are the backend's own log lines (backend/neuron/backend.py), so the same lines on inf2 give the real
ones; docs/benchmarks.md has them for a tiny root.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import free_port, run_app, run_process  # noqa: E402

LINES = re.compile(r"(loaded \d+.*|loading \d+/\d+: .*|built the .*|warmed up .*|ready in .*|first image in .*"
                   r"|device memory: .*)$")


def first_image_from_endpoint(root: str, log_path: Path) -> None:
    """serving/server.py on the root, one describe-free 1-step request."""
    port = free_port()
    args = ["-m", "serving.server", "--backend", "neuron", "--artifacts", root, "--port", str(port)]
    with run_process(args, f"http://127.0.0.1:{port}/ping", timeout=600, log_path=log_path):
        body = json.dumps({"prompt": "a lovely cat", "parameters": {"num_inference_steps": 1}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "image/png"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()


def first_image_from_app(root: str, work_dir: Path) -> str:
    """app.py on the root, one 1-step /generate; returns its log."""
    from gradio_client import Client

    with run_app(["--backend", "neuron", "--artifacts", root], work_dir, timeout=600) as app:
        Client(app.url, verbose=False).predict(prompt="a lovely cat", steps=1, api_name="/generate")
        return app.log()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="the compiled root")
    parser.add_argument("--app", action="store_true", help="start app.py instead of serving/server.py")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        if args.app:
            log = first_image_from_app(args.artifacts, Path(work))
        else:
            log_path = Path(work) / "server.log"
            first_image_from_endpoint(args.artifacts, log_path)
            log = log_path.read_text(errors="replace")
    for line in log.splitlines():
        match = LINES.search(line)
        if match:
            print(match.group(1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
