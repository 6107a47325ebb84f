"""The endpoint's core: request bytes and headers in, status, headers and bytes out.

No transport here: serving/inference.py (the SageMaker inference toolkit under TorchServe, what the
deployed endpoint runs) and serving/server.py (plain HTTP, for local use and tests) both call
`Handler.handle`, so the endpoint answers the same way under either. The wire format itself
lives in backend/sagemaker/protocol.py, shared with the client (backend/sagemaker/client.py).

Under TorchServe one worker hands this handler one request at a time, and requests wait in
TorchServe's own bounded queue (compile_scripts/container.py); the queue here bounds the
concurrent requests of serving/server.py.

Each request is parsed (`parse`: everything a bad request can be refused for, before it queues),
run (`Handler._run`: its turn, then the backend) and encoded (`encode`); an error at any step becomes
an answer in `error_answer`, its kind and HTTP status from backend/sagemaker/protocol.py's one table, ERRORS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from backend import (
    Backend,
    BackendError,
    BackendUnavailable,
    Capabilities,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Settings,
    create_backend,
)
from backend.sagemaker import protocol
from backend.core.api import new_request_id
from backend.core.metadata import png_bytes

log = logging.getLogger(__name__)

# SageMaker gives a real-time invocation 60 s; a request still queued after this long would
# time out there anyway, so it is refused while a retry can still help.
DEFAULT_QUEUE_TIMEOUT_S = 50.0
DEFAULT_MAX_WAITING = 8
# zlib level of the PNGs answered. 0 (stored) is far faster to write than level 1 and only larger:
# right on loopback or a LAN. A deployed endpoint answers across the internet, where level 1's smaller
# files win; its archive sets that (package.py --png-level). docs/benchmarks.md has the figures.
DEFAULT_PNG_LEVEL = 0
_JSON_LIKE = ("application/json", "text/json")
# What SageMaker and HTTP clients send when the caller set no content type.
_UNSPECIFIED = ("", "application/octet-stream", "application/x-www-form-urlencoded")


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


@dataclass
class Invocation:
    """A parsed request: what to generate (None for a describe) and the answer type asked for."""

    request: GenerationRequest | None
    answer_type: str


class Handler:
    """One backend, as many generations at once as it runs (Capabilities.concurrency), a bounded queue in front."""

    def __init__(self, backend: Backend, max_waiting: int = DEFAULT_MAX_WAITING,
                 queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S, png_level: int = DEFAULT_PNG_LEVEL):
        self.backend = backend
        self.png_level = png_level
        self.capabilities = backend.capabilities()
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self._describe = json.dumps(self.capabilities.to_dict()).encode("utf-8")
        # A turn per generation the backend runs at once: 1, or one per NeuronCore with --neuron-parallel pipeline.
        self._turns = threading.BoundedSemaphore(self.capabilities.concurrency)
        self._count_lock = threading.Lock()
        self._waiting = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> "Handler":
        """Create the backend the settings name and wrap it."""
        return cls(create_backend(settings), **kwargs)

    def handle(self, body: bytes | bytearray | None, headers: Mapping[str, str]) -> Response:
        """Answer one invocation; never raises. A generation (its start and its answer) and an error are logged
        under a short request id; a describe is not logged."""
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            invocation = parse(bytes(body or b""), headers, self.capabilities)
            if invocation.request is None:
                return Response(200, {"Content-Type": protocol.JSON}, self._describe)
            result, queue_ms = self._run(invocation.request, request_id)
            answer = encode(result, invocation.answer_type, self.png_level, started, queue_ms)
        except Exception as exc:  # noqa: BLE001 - every error becomes an answer; see error_answer
            return error_answer(exc, request_id)
        log.info("request %s: %d %s in %.0f ms (%.0f ms queued)", request_id, answer.status, answer.content_type,
                 (time.perf_counter() - started) * 1000.0, queue_ms)
        return answer

    def _run(self, request: GenerationRequest, request_id: str) -> tuple[GenerationResult, float]:
        """Wait for a turn, then generate; returns the result and the wait in ms."""
        with self._turn() as queue_ms:
            log.info("request %s: generating %d image(s), %s steps at %sx%s%s", request_id, request.num_images,
                     request.steps, request.width, request.height, _mode_note(request))
            return self.backend.generate(request), queue_ms

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
            got = self._turns.acquire(timeout=self.queue_timeout_s)
        finally:
            with self._count_lock:
                self._waiting -= 1
        if not got:
            raise BackendUnavailable(f"the endpoint is busy: no turn within {self.queue_timeout_s:g} s; "
                                     f"try again shortly.")
        try:
            yield (time.perf_counter() - waited_from) * 1000.0
        finally:
            self._turns.release()

    def close(self) -> None:
        """Free the backend."""
        self.backend.close()


def _mode_note(request: GenerationRequest) -> str:
    """What a log line adds for image to image and inpainting: the mode, strength and the steps that run."""
    if request.hires:
        width, height = request.output_size
        return (f" (hires {request.hr_scale:g} to {width}x{height}, {request.hr_upscaler}, "
                f"{request.hires_steps_run} steps)")
    if request.mode == "txt2img":
        return ""
    return f" ({request.mode}, strength {request.strength:g}: {request.denoising_steps} denoising steps)"


def parse(body: bytes, headers: Mapping[str, str], capabilities: Capabilities) -> Invocation:
    """Check and read a request, before it queues: a bad one is answered at once, even when the endpoint is busy."""
    protocol.check_request_size(len(body))
    _check_content_type(header(headers, "Content-Type"))
    answer_type = choose_answer_type(header(headers, "Accept"))
    payload = protocol.parse_json(body)
    protocol.check_text_request_size(len(body), payload)
    if protocol.is_describe(payload):
        return Invocation(None, answer_type)
    request = protocol.request_from_json(payload).validated(capabilities)
    protocol.check_response_size(request, answer_type == protocol.JSON)
    return Invocation(request, answer_type)


def encode(result: GenerationResult, answer_type: str, png_level: int, started: float, queue_ms: float) -> Response:
    """The answer for a generation: the first PNG or the JSON of all, and the server's times in a header."""
    encode_start = time.perf_counter()
    images = result.images[:1] if answer_type == protocol.PNG else result.images
    pngs = [png_bytes(image, png_level) for image in images]
    t = result.timings
    server = {
        "handler_ms": (time.perf_counter() - started) * 1000.0 - queue_ms,
        "queue_ms": queue_ms,
        "encode_ms": (time.perf_counter() - encode_start) * 1000.0,
    }
    attributes = protocol.format_attributes({
        **server, "total_ms": t.total_ms, "text_encoder_ms": t.text_encoder_ms, "denoise_ms": t.denoise_ms,
        "vae_ms": t.vae_ms, "vae_encode_ms": t.vae_encode_ms, "steps": len(t.step_ms),
        **({"hires_upscale_ms": t.hires_upscale_ms, "hires_denoise_ms": t.hires_denoise_ms,
            "hires_steps": len(t.hires_step_ms)} if t.hires_step_ms else {}),
        "seeds": ",".join(map(str, result.seeds)),
    })
    headers = {"Content-Type": answer_type, protocol.CUSTOM_ATTRIBUTES: attributes}
    if answer_type == protocol.PNG:
        return Response(200, headers, pngs[0])
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
    return Response(200, headers, json.dumps(answer).encode("utf-8"))


def error_answer(error: Exception, request_id: str) -> Response:
    """The answer for an error, and its one log line: a bad request names its field, an unexpected error
    keeps its traceback in the log and gives the client the request id to find it by."""
    kind, status = protocol.kind_of(error), protocol.status_of(error)
    if isinstance(error, InvalidRequest):
        log.info("request %s: %d %s (field %s): %s", request_id, status, kind, error.field or "-", error)
    elif isinstance(error, BackendError):
        # A backend that failed has logged its own traceback (backend.inprocess.pipeline.run); down or busy has none.
        level = logging.ERROR if isinstance(error, GenerationFailed) else logging.WARNING
        log.log(level, "request %s: %d %s: %s", request_id, status, kind, error)
    else:
        log.error("request %s: %d unexpected %s", request_id, status, type(error).__name__, exc_info=error)
        return error_response(GenerationFailed(
            f"the endpoint failed unexpectedly ({type(error).__name__}); its log has the details under request "
            f"{request_id}."))
    return error_response(error)


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
    raise protocol.NotAcceptable(f"Accept: {accept!r} is not offered; ask for image/png (the first image) or "
                                 f"application/json (all images, seeds and timings).", "accept")


def _check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _JSON_LIKE or media in _UNSPECIFIED:
        return
    raise protocol.UnsupportedMediaType(
        f"Content-Type: {content_type!r} is not accepted; send a JSON body as application/json.", "content_type")


def error_response(error: BaseException) -> Response:
    """A JSON error answer of the wire format's shape, its kind and status from protocol.ERRORS."""
    status = protocol.status_of(error)
    return Response(status, {"Content-Type": protocol.JSON}, protocol.error_body(protocol.kind_of(error), str(error),
                                                                                 status))
