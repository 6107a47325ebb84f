"""Failed logins limited per client address: what an app behind --auth on the internet needs.

Gradio checks the password in its `POST /login` route (gradio/routes.py, `async def login`), and a
callable `auth=` there is given the username and password only, never the request: the client's
address is not to be had from it. So the limit is an ASGI middleware in front of the whole app,
installed through launch(app_kwargs={"middleware": [...]}), which Gradio passes on to FastAPI
(gradio/routes.py, `App.create_app` -> `App(**app_kwargs)`). It answers an address over the limit
with 429 before Gradio sees the request, so no password is checked for it.

The address is the ASGI client's: uvicorn (as Gradio starts it) replaces it with X-Forwarded-For
only when the connection comes from a trusted proxy (FORWARDED_ALLOW_IPS, default 127.0.0.1 and ::1:
uvicorn/config.py), so a client on the internet cannot pick its own address.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable

from starlette.responses import JSONResponse

log = logging.getLogger("app")

MAX_FAILURES = 5  # failed logins one address may make within WINDOW_S
WINDOW_S = 300.0
MAX_ADDRESSES = 10_000  # addresses remembered at once; the quietest go first beyond it


class LoginLimiter:
    """Failed logins per address in a sliding window; thread-safe, with an injectable clock."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_addresses: int = MAX_ADDRESSES):
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def try_login(self, address: str) -> float | None:
        """None if the address may try now, else the seconds until it may.

        The try counts as a failure from the start and succeeded() takes it back: many logins sent
        at once from one address cannot all pass before the first failures are counted.
        """
        with self._lock:
            now = self.clock()
            times = self._failures.setdefault(address, deque())
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) >= self.max_failures:
                return times[0] + self.window_s - now
            times.append(now)
            self._forget_quiet_addresses(now)
            return None

    def succeeded(self, address: str) -> None:
        """A login from the address worked: its failures are forgotten."""
        with self._lock:
            self._failures.pop(address, None)

    def _forget_quiet_addresses(self, now: float) -> None:
        if len(self._failures) <= self.max_addresses:
            return
        for address in [a for a, t in self._failures.items() if not t or t[-1] <= now - self.window_s]:
            del self._failures[address]
        while len(self._failures) > self.max_addresses:  # all recent: the oldest-seen go
            del self._failures[next(iter(self._failures))]


def is_login(scope: dict[str, Any]) -> bool:
    """POST /login or /login/: the one route where Gradio checks a password."""
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ("/login", "/login/")


class LoginRateLimit:
    """ASGI middleware: refuses logins from an address with too many recent failures (429, Retry-After)."""

    def __init__(self, app: Callable, limiter: LoginLimiter):
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        """Count the logins; pass everything else through untouched."""
        if not is_login(scope):
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown",))[0]
        wait_s = self.limiter.try_login(address)
        if wait_s is not None:
            seconds = max(1, math.ceil(wait_s))
            log.warning("login from %s refused: %d failed logins within %.0f s; next try in %d s", address,
                        self.limiter.max_failures, self.limiter.window_s, seconds)
            response = JSONResponse({"detail": f"Too many failed logins; try again in {seconds} s."},
                                    status_code=429, headers={"Retry-After": str(seconds)})
            return await response(scope, receive, send)
        status = None

        async def send_and_see_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_and_see_status)
        if status == 200:  # Gradio answers a good login with 200 and a bad one with 400
            self.limiter.succeeded(address)
        else:
            log.info("failed login from %s (status %s)", address, status)
