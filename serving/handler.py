"""The endpoint's core: request bytes and headers in, status, headers and bytes out.

No transport here: serving/inference.py (the SageMaker inference toolkit under TorchServe, what the
deployed endpoint runs) and serving/server.py (plain HTTP, for local use and tests) both call
`Handler.handle`, so the endpoint answers the same way under either. The wire format itself
lives in backend/protocol.py, shared with the client (backend/sagemaker.py).

Under TorchServe one worker hands this handler one request at a time, and requests wait in
TorchServe's own bounded queue (compile_scripts/container.py); the queue here bounds the
concurrent requests of serving/server.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from backend import Backend, BackendError, BackendUnavailable, InvalidRequest, Settings, create_backend
from backend import protocol
from backend.metadata import png_bytes

log = logging.getLogger(__name__)

# SageMaker gives a real-time invocation 60 s; a request still queued after this long would
# time out there anyway, so it is refused while a retry can still help.
DEFAULT_QUEUE_TIMEOUT_S = 50.0
DEFAULT_MAX_WAITING = 8
# zlib level of the PNGs answered. 0 (stored) takes ~1 ms at 512x512 where level 1 takes ~30 ms: right
# on loopback or a LAN. A deployed endpoint answers across the internet, where level 1's smaller
# files (~40% smaller for real images) win; its archive sets that (package.py --png-level).
DEFAULT_PNG_LEVEL = 0
_JSON_LIKE = ("application/json", "text/json")
# What SageMaker and HTTP clients send when the caller set no content type.
_UNSPECIFIED = ("", "application/octet-stream", "application/x-www-form-urlencoded")


class Refused(InvalidRequest):
    """A bad request with a more precise HTTP status than 400 (413, 415, 406)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message, field)
        self.status = status


@dataclass
class Response:
    """One answer: HTTP status, headers, body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def content_type(self) -> str:
        """The Content-Type header, whatever the case of its name."""
        return header(self.headers, "Content-Type") or ""


class Handler:
    """One backend, one generation at a time, a bounded queue in front of it."""

    def __init__(self, backend: Backend, max_waiting: int = DEFAULT_MAX_WAITING,
                 queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S, png_level: int = DEFAULT_PNG_LEVEL):
        self.backend = backend
        self.png_level = png_level
        self.capabilities = backend.capabilities()
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self._describe = json.dumps(self.capabilities.to_dict()).encode("utf-8")
        self._turn_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._waiting = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> "Handler":
        """Create the backend the settings name and wrap it."""
        return cls(create_backend(settings), **kwargs)

    def handle(self, body: bytes | bytearray | None, headers: Mapping[str, str]) -> Response:
        """Answer one invocation; never raises."""
        started = time.perf_counter()
        try:
            return self._handle(bytes(body or b""), headers, started)
        except BackendError as exc:
            kind = protocol.kind_of(exc)
            status = exc.status if isinstance(exc, Refused) else protocol.STATUS_OF_KIND[kind]
            log.info("%d %s: %s", status, kind, exc)
            return error_response(kind, str(exc), status)
        except Exception as exc:  # noqa: BLE001 - the client gets a kind and a message, the log the traceback
            log.exception("unexpected error while handling an invocation")
            return error_response("GenerationFailed",
                          f"the endpoint failed unexpectedly ({type(exc).__name__}); its log has the details.")

    def _handle(self, body: bytes, headers: Mapping[str, str], started: float) -> Response:
        try:
            protocol.check_request_size(len(body))
        except InvalidRequest as exc:
            raise Refused(413, str(exc), "body") from None
        _check_content_type(header(headers, "Content-Type"))
        answer_type = choose_answer_type(header(headers, "Accept"))
        payload = protocol.parse_json(body)
        if protocol.is_describe(payload):
            return Response(200, {"Content-Type": protocol.JSON}, self._describe)
        # Checked before queueing, so a bad request is answered at once even when the endpoint is busy.
        request = protocol.request_from_json(payload).validated(self.capabilities)
        protocol.check_response_size(request, answer_type == protocol.JSON)
        with self._turn() as queue_ms:
            result = self.backend.generate(request)
        encode_start = time.perf_counter()
        if answer_type == protocol.PNG:
            pngs = [png_bytes(result.images[0], self.png_level)]
        else:
            pngs = [png_bytes(image, self.png_level) for image in result.images]
        t = result.timings
        server = {
            "handler_ms": (time.perf_counter() - started) * 1000.0 - queue_ms,
            "queue_ms": queue_ms,
            "encode_ms": (time.perf_counter() - encode_start) * 1000.0,
        }
        attributes = protocol.format_attributes({
            **server, "total_ms": t.total_ms, "text_encoder_ms": t.text_encoder_ms, "denoise_ms": t.denoise_ms,
            "vae_ms": t.vae_ms, "steps": len(t.step_ms), "seeds": ",".join(map(str, result.seeds)),
        })
        if answer_type == protocol.PNG:
            return Response(200, {"Content-Type": protocol.PNG, protocol.CUSTOM_ATTRIBUTES: attributes}, pngs[0])
        answer = {
            "images": protocol.encode_png_list(pngs),
            "seeds": result.seeds,
            "timings": t.to_dict(),
            "server": {k: round(v, 1) for k, v in server.items()},
            "info": result.infotexts[0] if result.images else "",
            "warnings": result.warnings,
            "model": result.model,
            "backend": result.backend,
        }
        return Response(200, {"Content-Type": protocol.JSON, protocol.CUSTOM_ATTRIBUTES: attributes},
                        json.dumps(answer).encode("utf-8"))

    @contextlib.contextmanager
    def _turn(self) -> Iterator[float]:
        """Wait for the backend (bounded in count and time); yields the wait in ms."""
        with self._count_lock:
            if self._waiting >= self.max_waiting:
                raise protocol.Busy(f"the endpoint is busy: {self._waiting} request(s) are already waiting; "
                                    f"try again shortly.")
            self._waiting += 1
        waited_from = time.perf_counter()
        try:
            got = self._turn_lock.acquire(timeout=self.queue_timeout_s)
        finally:
            with self._count_lock:
                self._waiting -= 1
        if not got:
            raise BackendUnavailable(f"the endpoint is busy: no turn within {self.queue_timeout_s:g} s; "
                                     f"try again shortly.")
        try:
            yield (time.perf_counter() - waited_from) * 1000.0
        finally:
            self._turn_lock.release()

    def close(self) -> None:
        """Free the backend."""
        self.backend.close()


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def choose_answer_type(accept: str | None) -> str:
    """image/png or application/json from an Accept header (PNG when it allows anything)."""
    if not accept or not accept.strip():
        return protocol.PNG
    ranges = []
    for index, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            if param.replace(" ", "").lower().startswith("q="):
                try:
                    quality = float(param.split("=", 1)[1])
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranges.append((-quality, index, media.lower()))
    for _, _, media in sorted(ranges):
        if media == protocol.JSON:
            return protocol.JSON
        if media in (protocol.PNG, "image/*", "*/*"):
            return protocol.PNG
    raise Refused(406, f"Accept: {accept!r} is not offered; ask for image/png (the first image) or "
                       f"application/json (all images, seeds and timings).", "accept")


def _check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _JSON_LIKE or media in _UNSPECIFIED:
        return
    raise Refused(415, f"Content-Type: {content_type!r} is not accepted; send a JSON body as application/json.",
                  "content_type")


def error_response(kind: str, text: str, status: int | None = None) -> Response:
    """A JSON error answer of the wire format's shape."""
    status = status or protocol.STATUS_OF_KIND[kind]
    return Response(status, {"Content-Type": protocol.JSON}, protocol.error_body(kind, text, status))
