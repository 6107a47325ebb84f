"""SageMakerBackend: generation on a SageMaker real-time endpoint, through boto3's sagemaker-runtime.

Credentials and region are found the standard AWS way (environment, profile, instance role);
`--endpoint-url` (or AWS_ENDPOINT_URL) points the client at a local serving/server.py instead.

An invocation is not idempotent: it runs the model. So botocore's own retries are off, and the
only retries here are for answers that say the model did not run (throttling, a full queue, a
connection that was refused). A full queue is the endpoint's 429, or TorchServe's own 503 when its
job queue is full or its worker is restarting, which SageMaker hands back as a ModelError with
OriginalStatusCode 503 (backend/sagemaker/protocol.py, parse_error). A read timeout is reported, never retried:
the endpoint may still be generating, and sending it again would run the model twice.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import time
from typing import Any

from . import protocol
from ..core.api import Capabilities, GenerationRequest, GenerationResult, PreviewCallback, StepCallback, Timings
from ..core.errors import BackendError, BackendUnavailable, GenerationFailed, InvalidRequest
from ..core.metadata import KEY, attach
from ..core.settings import SageMakerSettings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 3  # for answers that say the model did not run (each waits settings.retry_backoff, doubled)
_THROTTLING = {"ThrottlingException", "Throttling", "TooManyRequestsException", "ModelNotReadyException"}
_CREDENTIALS = {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
                "AccessDeniedException", "IncompleteSignature", "InvalidClientTokenId"}


class _Retry(Exception):
    """The model did not run; the same request may be sent again."""

    def __init__(self, error: BackendError):
        super().__init__(str(error))
        self.error = error


class SageMakerBackend:
    """One SageMaker endpoint; capabilities come from the endpoint itself (`{"describe": true}`)."""

    name = "sagemaker"

    def __init__(self, settings: SageMakerSettings):
        if not settings.endpoint_name:
            raise BackendUnavailable("--endpoint-name is required for --backend sagemaker "
                                     "(compile_scripts/deploy.py prints it after a deploy).")
        self.endpoint_name = settings.endpoint_name
        self.read_timeout_s = float(settings.read_timeout)  # why 75 s by default: settings.READ_TIMEOUT_S
        self.backoff_s = float(settings.retry_backoff)
        self._client = self._make_client(settings)
        where = _without_credentials(self._client.meta.endpoint_url)
        self._where = f"endpoint {self.endpoint_name} at {where}"
        try:
            data, _ = self._invoke(json.dumps({"describe": True}).encode("utf-8"), purpose="describe")
        except BackendUnavailable:
            raise
        except BackendError as exc:
            raise BackendUnavailable(f"{self._where} could not describe itself: {exc}") from None
        try:
            remote = Capabilities.from_dict(json.loads(data))
        except (ValueError, TypeError) as exc:
            raise BackendUnavailable(f"{self._where} did not describe itself ({type(exc).__name__}); "
                                     f"is it running this project's serving code?") from None
        self.remote = remote
        # previews=False: the endpoint answers once per request, so nothing shows while it denoises.
        self._caps = dataclasses.replace(
            remote, backend=self.name, previews=False,
            device=f"{remote.device} ({remote.backend} backend) via endpoint {self.endpoint_name}")
        log.info("endpoint %s: %s on %s, precisions %s, modes %s", self.endpoint_name, remote.model, remote.device,
                 ", ".join(remote.precisions), ", ".join(remote.modes))

    def _make_client(self, settings: SageMakerSettings):
        import boto3
        import botocore.exceptions
        from botocore.config import Config

        config = Config(
            read_timeout=self.read_timeout_s,
            connect_timeout=CONNECT_TIMEOUT_S,
            # One attempt: botocore would retry a read timeout, running the model again.
            retries={"total_max_attempts": 1, "mode": "standard"},
            tcp_keepalive=True,
        )
        try:
            session = boto3.session.Session(region_name=settings.region)
            return session.client("sagemaker-runtime", endpoint_url=settings.endpoint_url, config=config)
        except botocore.exceptions.NoRegionError:
            raise BackendUnavailable("no AWS region: pass --region (or set AWS_REGION) for the endpoint "
                                     f"{settings.endpoint_name}.") from None

    def capabilities(self) -> Capabilities:
        """The endpoint's own capabilities, under this backend's name."""
        return self._caps

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Validate here, send, and decode the endpoint's JSON answer into PIL images (no previews: one
        answer per request). An input image and mask go as PNG at the generation size (validated() fitted
        them), within SageMaker's 6 MB per request, which is checked here before anything is sent."""
        request = request.validated(self._caps)
        protocol.check_response_size(request, as_json=True)
        payload = protocol.request_to_json(request)
        body = json.dumps(payload).encode("utf-8")
        protocol.check_body_to_send(body, payload)
        if on_step is not None:
            # No per-step progress comes back; this lets a stop pressed before sending take effect.
            on_step(0, request.denoising_steps)
        started = time.perf_counter()
        data, attributes = self._invoke(body, purpose="generate")
        try:
            answer = json.loads(data)
            pngs = protocol.decode_png_list(answer["images"])
            images = [_open_png(png) for png in pngs]
            seeds = [int(s) for s in answer["seeds"]]
            timings = Timings.from_dict(answer.get("timings") or {})
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise GenerationFailed(f"{self._where} answered with something that is not this project's JSON "
                                   f"with PNG images ({type(exc).__name__}: {str(exc)[:200]}).") from None
        if len(seeds) != len(images):
            raise GenerationFailed(f"{self._where} answered {len(images)} image(s) but {len(seeds)} seed(s).")
        timings.total_ms = (time.perf_counter() - started) * 1000.0
        server = answer.get("server") or {}
        server_ms = attributes.get("handler_ms") or server.get("handler_ms")
        timings.server_ms = float(server_ms) if server_ms is not None else None
        done = dataclasses.replace(request, seed=seeds[0])
        return GenerationResult(images=images, seeds=seeds, timings=timings, request=done, backend=self.name,
                                model=self._caps.model, warnings=[str(w) for w in answer.get("warnings") or []])

    def _invoke(self, body: bytes, purpose: str) -> tuple[bytes, dict[str, str]]:
        """Send one invocation, retrying only what did not run; returns the body and custom attributes."""
        delay, attempt = self.backoff_s, 1
        while True:
            try:
                return self._invoke_once(body)
            except _Retry as retry:
                if attempt == MAX_ATTEMPTS:
                    raise retry.error from None
                attempt += 1
                log.info("%s: %s; retrying in %.1f s (attempt %d of %d)", purpose, retry.error, delay,
                         attempt, MAX_ATTEMPTS)
                time.sleep(delay)
                delay *= 2

    def _invoke_once(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        import botocore.exceptions as bx

        try:
            response = self._client.invoke_endpoint(EndpointName=self.endpoint_name, Body=body,
                                                    ContentType=protocol.JSON, Accept=protocol.JSON)
            data = response["Body"].read()
        except bx.ReadTimeoutError:
            raise GenerationFailed(f"{self._where} did not answer within {self.read_timeout_s:g} s; the request "
                                   f"was not retried, since the endpoint may still be running it.") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError) as exc:
            # The request never reached the endpoint, so it cannot have run.
            raise _Retry(BackendUnavailable(f"cannot reach {self._where} ({type(exc).__name__}); "
                                            f"is it running, and is the URL right?")) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as exc:
            raise BackendUnavailable(
                f"no usable AWS credentials ({type(exc).__name__}): run `aws configure`, set AWS_PROFILE or "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or use an instance role. For a local "
                f"serving/server.py any values do (AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test).") from None
        except bx.ClientError as exc:
            raise self._client_error(exc) from None
        except (bx.ConnectionClosedError, bx.ResponseStreamingError) as exc:
            raise GenerationFailed(f"{self._where} closed the connection before answering "
                                   f"({type(exc).__name__}); not retried, since it may have run.") from None
        except bx.BotoCoreError as exc:
            raise BackendUnavailable(f"cannot call {self._where} ({type(exc).__name__}: "
                                     f"{_without_credentials(str(exc))}).") from None
        return data, protocol.parse_attributes(response.get("CustomAttributes"))

    def _client_error(self, exc: Any) -> Exception:
        """Map a botocore ClientError to a backend error (or a retry, for throttling)."""
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "") or str(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "ModelError":
            original_status = int(exc.response.get("OriginalStatusCode") or 0)
            kind, text = protocol.parse_error(exc.response.get("OriginalMessage") or message)
            mapped = protocol.error_for(kind, original_status, text or message)
            if isinstance(mapped, protocol.Busy):
                return _Retry(BackendUnavailable(f"{self._where} is busy: {text}"))
            if isinstance(mapped, InvalidRequest):
                return InvalidRequest(f"the endpoint refused the request: {text}")
            if isinstance(mapped, BackendUnavailable):
                return BackendUnavailable(f"{self._where}: {text}")
            return GenerationFailed(f"the endpoint failed (status {original_status or 'unknown'}): {text}")
        if code in _THROTTLING or status == 429:
            return _Retry(BackendUnavailable(f"{self._where} is throttling requests ({code}: {message}); "
                                             f"try again shortly."))
        if code == "ValidationError" and "not found" in message.lower():
            return BackendUnavailable(f"{self._where} does not exist ({message}); check --endpoint-name and "
                                      f"--region, or run `python -m compile_scripts.deploy status --name "
                                      f"{self.endpoint_name}`.")
        if code == "ValidationError":
            return InvalidRequest(f"the endpoint refused the request: {message}")
        if code in _CREDENTIALS or status in (401, 403):
            return BackendUnavailable(f"AWS refused the credentials for {self._where} ({code}: {message}).")
        if code == "ServiceUnavailable" or status == 503:
            return BackendUnavailable(f"{self._where} is unavailable ({code}: {message}).")
        if 400 <= status < 500:
            return InvalidRequest(f"the endpoint refused the request ({code}: {message}).")
        return GenerationFailed(f"{self._where} failed ({code or status}: {message}).")

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def _open_png(data: bytes):
    """A loaded PIL image that keeps its infotext in .info."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.format != "PNG":
        raise ValueError(f"an image is {image.format}, not PNG")
    return attach(image, image.info.get(KEY, ""))


def _without_credentials(text: str) -> str:
    """Text with any URL's user:password@ taken out: messages reach people, an --endpoint-url through
    an authenticating proxy (http://user:secret@host) must not."""
    return re.sub(r"(?<=//)[^/@\s]+@", "", text)
