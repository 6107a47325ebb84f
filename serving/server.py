"""A local SageMaker endpoint over plain HTTP, for development, tests and benchmarks.

    python -m serving.server --model tiny --port 8080
    python -m serving.server --backend neuron --artifacts sd2_512_root --host 0.0.0.0

It speaks two dialects on one port:
- the container contract SageMaker uses inside an endpoint: `GET /ping`, `POST /invocations`,
  answering the handler's own status codes;
- the runtime API that boto3's `sagemaker-runtime` client calls, `POST /endpoints/{name}/invocations`,
  answering the way AWS does: a container error comes back as a 424 `ModelError` carrying
  `OriginalStatusCode` and `OriginalMessage`, and (with --name) an unknown endpoint name as a
  400 `ValidationError`. So `boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8080")`
  behaves here as it does against a deployed endpoint (any credentials will do; none are checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from backend import BackendUnavailable, Settings

from backend.sagemaker import protocol
from backend.core.settings import add_arguments

from .handler import (
    DEFAULT_MAX_WAITING,
    DEFAULT_PNG_LEVEL,
    DEFAULT_QUEUE_TIMEOUT_S,
    Handler,
    Response,
    error_response,
)

log = logging.getLogger("serving.server")

DEFAULT_PORT = 8080  # the port SageMaker sends container traffic to
ACCOUNT = "000000000000"  # stands in for the AWS account in ARNs and messages
_RUNTIME_ROUTE = re.compile(r"/endpoints/([^/]+)/invocations")
# A body over protocol.MAX_REQUEST_BYTES but within this is read before the 413 (see _read_body).
DRAINED_BYTES = protocol.MAX_REQUEST_BYTES + 1024 * 1024


class EndpointServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the handler and the endpoint name the runtime route answers to
    (None: any name, as a stand-in for whichever endpoint the caller names)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Handler, endpoint_name: str | None = None,
                 region: str = "us-east-1"):
        super().__init__(address, _RequestHandler)
        self.handler = handler
        self.endpoint_name = endpoint_name
        self.region = region

    def handle_error(self, request, client_address) -> None:
        """A client that left before its answer is one log line; anything else keeps its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.info("%s:%s left before its answer was sent (%s)", *client_address[:2], type(error).__name__)
        else:
            log.exception("unexpected error on the connection from %s:%s", *client_address[:2])

    @property
    def url(self) -> str:
        """http://host:port of this server."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses its connections
    # Without this (TCP_NODELAY on each accepted socket), a response written as headers + body waits for the
    # client's delayed ACK.
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection is dropped after this long
    server_version = "sd-endpoint"
    server: EndpointServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """Health check."""
        if urlsplit(self.path).path == "/ping":
            self._send(Response(200, {"Content-Type": protocol.JSON}, b'{"status": "Healthy"}'))
        else:
            self._send(_not_found(self.path))

    def do_POST(self) -> None:  # noqa: N802
        """Invocations, raw (container) or wrapped the way the SageMaker runtime wraps them."""
        path = urlsplit(self.path).path
        runtime = _RUNTIME_ROUTE.fullmatch(path)
        if path != "/invocations" and not runtime:
            self._discard_body()
            self._send(_not_found(self.path))
            return
        name = unquote(runtime.group(1)) if runtime else None
        if runtime and self.server.endpoint_name not in (None, name):
            self._discard_body()
            self._send(self._validation_error(name))
            return
        body = self._read_body()
        if body is None:
            return
        answer = self.server.handler.handle(body, dict(self.headers.items()))
        if runtime:
            answer = self._as_runtime(answer, name)
        self._send(answer)

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            self._send(error_response(protocol.LengthRequired("Content-Length is required.", "Content-Length")))
            return None
        try:
            protocol.check_request_size(int(length))
        except protocol.TooLarge as exc:
            # A body a little over the limit (an input image too big) is read and dropped, so that the client,
            # still sending, gets this answer rather than a connection reset; a larger one is not read at all.
            self._discard_body(limit=DRAINED_BYTES)
            self._send(error_response(exc))
            return None
        return self.rfile.read(int(length))

    def _discard_body(self, limit: int = protocol.MAX_REQUEST_BYTES) -> None:
        length = self.headers.get("Content-Length", "0").strip()
        if length.isdigit() and int(length) <= limit:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _as_runtime(self, answer: Response, name: str) -> Response:
        """What the SageMaker runtime returns for the container's answer."""
        request_id = str(uuid.uuid4())
        if 200 <= answer.status < 300:
            headers = {**answer.headers, "x-Amzn-Invoked-Production-Variant": "AllTraffic",
                       "x-amzn-RequestId": request_id}
            return Response(answer.status, headers, answer.body)
        region = self.server.region
        original = answer.body.decode("utf-8", "replace")
        side = "client" if 400 <= answer.status < 500 else "server"
        body = {
            "__type": "ModelError",
            "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL",
            "LogStreamArn": f"arn:aws:logs:{region}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{name}",
            "message": (f"Received {side} error ({answer.status}) from primary with message \"{original}\". "
                        f"See https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
                        f"#logEventViewer:group=/aws/sagemaker/Endpoints/{name} in account {ACCOUNT} "
                        f"for more information."),
            "OriginalMessage": original,
            "OriginalStatusCode": answer.status,
        }
        return Response(424, {"Content-Type": protocol.JSON, "x-amzn-RequestId": request_id,
                              "x-amzn-ErrorType": "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"},
                        json.dumps(body).encode("utf-8"))

    def _validation_error(self, name: str) -> Response:
        """AWS's answer for an endpoint that does not exist."""
        body = {"__type": "ValidationError", "message": f"Endpoint {name} of account {ACCOUNT} not found."}
        return Response(400, {"Content-Type": protocol.JSON, "x-amzn-RequestId": str(uuid.uuid4()),
                              "x-amzn-ErrorType": "ValidationError:http://internal.amazon.com/coral/com.amazon.coral.validate/"},
                        json.dumps(body).encode("utf-8"))

    def _send(self, answer: Response) -> None:
        self.send_response(answer.status)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


def _not_found(path: str) -> Response:
    return error_response(protocol.NotFound(f"{path}: not found; use GET /ping, POST /invocations or "
                                            f"POST /endpoints/NAME/invocations.", "path"))


def build_parser() -> argparse.ArgumentParser:
    """The backend flags of the app plus the endpoint's own."""
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    add_arguments(parser, server_flags=False)
    g = parser.add_argument_group("endpoint")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 inside a container)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, SageMaker's)")
    g.add_argument("--name", default=None,
                   help="endpoint name that POST /endpoints/NAME/invocations answers to; other names then get "
                        "AWS's 'not found' ValidationError (default: any name)")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_WAITING,
                   help=f"requests that may wait for the model; more get a 429 (default {DEFAULT_MAX_WAITING})")
    g.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S,
                   help=f"seconds a request may wait for its turn before a 503 (default {DEFAULT_QUEUE_TIMEOUT_S:g})")
    g.add_argument("--png-level", type=int, choices=range(10), metavar="0-9", default=DEFAULT_PNG_LEVEL,
                   help=f"zlib level of the PNGs answered (default {DEFAULT_PNG_LEVEL}: fastest, largest, right on "
                        f"loopback or a LAN; deployed archives use 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Start the backend, then serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    settings = Settings.from_namespace(ns)
    try:
        handler = Handler.from_settings(settings, max_waiting=ns.max_queue, queue_timeout_s=ns.queue_timeout,
                                        png_level=ns.png_level)
    except BackendUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    server = EndpointServer((ns.host, ns.port), handler, ns.name, region)
    log.info("serving %s (%s) at %s; runtime route /endpoints/%s/invocations", handler.capabilities.model,
             handler.capabilities.backend, server.url, ns.name or "{any name}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        handler.close()


if __name__ == "__main__":
    main()
