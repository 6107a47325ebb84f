"""A STAND-IN for ZeroGPU's device API, the Spaces service that lends GPUs (it cannot exist here), for the tests.

Written from the calls the real `spaces` package makes (spaces 0.51.3, spaces/zero/api.py's APIClient, used by
spaces/zero/client.py), so the package itself runs unchanged against it:

    POST /startup-report                                   at launch, once a @spaces.GPU function exists -> 200
    POST /schedule?cgroupPath&taskId&enableQueue&tokenVersion&durationSeconds[&gpuSize][&token]
         -> 200 JSON ScheduleResponse {idle, nvidiaIndex, nvidiaUUID, allowToken} (no queue, quota always left)
    POST /allow?allowToken&pid                             the forked worker, before it touches the GPU -> 200
    POST /release?allowToken&fail                          the call's end (fail=True after an error) -> 200
    GET  /queue-size                                       -> 200 JSON 0

It lends one pretend GPU (index 0) and records every call, so a test can check the durations asked for, which
process was let onto the GPU and that every reservation was released. `idle` is true when the last reservation was
released without a failure, which is when spaces reuses its kept worker (wrappers.py).

The GPU itself is the other stand-in (tests/zerogpu_worker/sitecustomize.py).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class DeviceApiLog:
    """What the stand-in was asked, in order."""

    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def of(self, path: str) -> list[dict[str, str]]:
        """The query parameters of every call to one path."""
        return [params for p, params in self.calls if p == path]


class DeviceApi:
    """The stand-in device API on 127.0.0.1, in a thread: `with DeviceApi() as api: api.url, api.log`."""

    def __init__(self):
        self.log = DeviceApiLog()
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._idle = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test reads api.log
                pass

            def _answer(self, status: int, body=None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlsplit(self.path)
                api.record(url.path, url.query)
                self._answer(200, 0) if url.path == "/queue-size" else self._answer(404, {"detail": "not found"})

            def do_POST(self):
                url = urlsplit(self.path)
                params = api.record(url.path, url.query)
                if url.path == "/startup-report":
                    self._answer(200)
                elif url.path == "/schedule":
                    self._answer(200, api.schedule(params))
                elif url.path == "/allow":
                    self._answer(200)
                elif url.path == "/release":
                    api.release(params)
                    self._answer(200)
                else:
                    self._answer(404, {"detail": "not found"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="device-api-standin", daemon=True)

    def record(self, path: str, query: str) -> dict[str, str]:
        """Note a call; its parameters as a plain dict."""
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        with self._lock:
            self.log.calls.append((path, params))
        return params

    def schedule(self, params: dict[str, str]) -> dict:
        """A GPU at once: index 0, a new allow token."""
        with self._lock:
            idle, self._idle = self._idle, False
            return {"idle": idle, "nvidiaIndex": 0, "nvidiaUUID": "GPU-standin-0",
                    "allowToken": f"token-{next(self._tokens)}"}

    def release(self, params: dict[str, str]) -> None:
        """The GPU is free again; spaces may reuse its worker unless the call failed."""
        with self._lock:
            self._idle = params.get("fail", "false").lower() != "true"

    def __enter__(self) -> "DeviceApi":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
