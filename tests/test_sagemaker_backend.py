"""SageMakerBackend against the real endpoint code (serving/server.py in this process) and against a
fault-injecting stand-in for AWS; then the app with --backend sagemaker through gradio_client."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend import (
    BackendUnavailable,
    Capabilities,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Settings,
    create_backend,
)
from backend.sagemaker import protocol
from backend.core.api import MODES
from backend.core.metadata import attach, parse_infotext, png_bytes, read_infotext
from helpers import free_port, run_app
from input_pictures import centred_mask, encoded, picture
from serving.handler import Handler
from serving.server import EndpointServer

REGION = "us-east-2"


@pytest.fixture(autouse=True)
def _aws(aws_env):
    """Every test here talks to stand-ins with throwaway credentials."""


@pytest.fixture(scope="module")
def endpoint(tiny_backend):
    """serving/server.py's EndpointServer on the tiny model, answering to the name sd-test."""
    handler = Handler(tiny_backend)
    server = EndpointServer(("127.0.0.1", free_port()), handler, endpoint_name="sd-test", region=REGION)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def sagemaker_backend(url: str, name: str = "sd-test", **settings):
    return create_backend(Settings(backend="sagemaker", endpoint_name=name, region=REGION, endpoint_url=url,
                                   **settings))


# ---- against the real endpoint code -------------------------------------------------------------

def test_generates_through_the_endpoint_with_its_capabilities_and_timings(endpoint):
    backend = sagemaker_backend(endpoint.url)
    caps = backend.capabilities()
    assert (caps.backend, caps.model, caps.precisions, caps.is_tiny) == ("sagemaker", "tiny", ("fp32", "bf16"), True)
    assert "endpoint sd-test" in caps.device and caps.notes  # the tiny-model warning travels too
    result = backend.generate(GenerationRequest("a lovely cat", steps=2, width=64, height=72, seed=7, num_images=2))
    assert [img.size for img in result.images] == [(64, 72), (64, 72)]
    assert result.seeds == [7, 8] and result.request.seed == 7 and result.backend == "sagemaker"
    assert [parse_infotext(t)["params"]["Seed"] for t in result.infotexts] == ["7", "8"]
    assert read_infotext(png_bytes(result.images[0])) == result.infotexts[0]  # the app's PNG keeps it
    t = result.timings
    assert len(t.step_ms) == 2 and 0 < t.denoise_ms < t.server_ms <= t.total_ms
    assert t.network_ms == pytest.approx(t.total_ms - t.server_ms)
    random_seed = backend.generate(GenerationRequest("cat", steps=1, width=64, height=64))
    assert random_seed.request.seed == random_seed.seeds[0] != -1
    backend.close()


def test_requests_are_validated_here_before_anything_is_sent(endpoint, monkeypatch):
    backend = sagemaker_backend(endpoint.url)
    sent = []
    original = endpoint.handler.handle
    monkeypatch.setattr(endpoint.handler, "handle", lambda body, headers: sent.append(body) or original(body, headers))
    with pytest.raises(InvalidRequest, match="steps: 1000 is out of range"):
        backend.generate(GenerationRequest("cat", steps=1000))
    with pytest.raises(InvalidRequest, match="precision: 'fp16' is not available"):
        backend.generate(GenerationRequest("cat", precision="fp16"))
    with pytest.raises(InvalidRequest, match="6 MB"):
        backend.generate(GenerationRequest("cat", width=1024, height=1024, num_images=4))
    assert sent == []


def test_client_never_lets_botocore_retry_and_waits_past_sagemakers_60_s(endpoint):
    backend = sagemaker_backend(endpoint.url)
    config = backend._client.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert config.read_timeout >= 70 and config.connect_timeout <= 10


@pytest.mark.parametrize("settings, expected", [
    (dict(endpoint_name="other"), "endpoint other at .* does not exist"),
    (dict(endpoint_url="http://127.0.0.1:{free}"), "cannot reach endpoint sd-test"),
    (dict(endpoint_name=None), "--endpoint-name is required"),
])
def test_an_endpoint_that_cannot_be_used_is_unavailable_at_start(endpoint, settings, expected):
    values = dict(backend="sagemaker", endpoint_name="sd-test", region=REGION, endpoint_url=endpoint.url,
                  retry_backoff=0.01)
    values.update(settings)
    values["endpoint_url"] = values["endpoint_url"].format(free=free_port())
    with pytest.raises(BackendUnavailable, match=expected):
        create_backend(Settings(**values))


def test_missing_credentials_are_unavailable_with_a_hint(endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BackendUnavailable, match="no usable AWS credentials .*aws configure"):
        sagemaker_backend(endpoint.url)


# ---- against a stand-in for AWS that injects faults ---------------------------------------------

STANDIN_CAPS = Capabilities(backend="neuron", model="stand-in", device="inf2", precisions=("bf16",),
                            fixed_sizes=((64, 64),), default_size=(64, 64), max_images=2)


def model_error(status: int, kind: str, text: str) -> tuple[int, dict, dict]:
    """AWS's 424 for the endpoint code's error answer."""
    return container_error(status, protocol.error_body(kind, text).decode())


# TorchServe's own 503 when its job queue is full, as tests/test_torchserve.py gets it from the real
# server (pytorch/serve v0.11.0: ApiUtils.getStreamingInferenceErrorResponseMessage, ErrorResponse).
TORCHSERVE_BUSY = json.dumps({
    "code": 503, "type": "ServiceUnavailableException",
    "message": 'Model "model" has no worker to serve inference request. Please use scale workers API to add workers. '
               "If this is a sequence inference, please check if it is closed, or expired; or exceeds "
               "maxSequenceJobQueueSize"}, indent=2)


def container_error(status: int, original: str) -> tuple[int, dict, dict]:
    """AWS's 424 for any container's 4xx/5xx answer: its status and body ride in OriginalStatusCode/OriginalMessage."""
    side = "client" if status < 500 else "server"
    return 424, {"x-amzn-ErrorType": "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"}, {
        "ErrorCode": f"{side.upper()}_ERROR_FROM_MODEL", "OriginalStatusCode": status, "OriginalMessage": original,
        "LogStreamArn": "arn:aws:logs:us-east-2:000000000000:log-group:/aws/sagemaker/Endpoints/sd-standin",
        "Message": f"Received {side} error ({status}) from primary with message \"{original}\"."}


def aws_error(status: int, code: str, message: str) -> tuple[int, dict, dict]:
    return status, {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.coral.service/"}, {
        "message": message}


FAULTS = {
    "validation": aws_error(400, "ValidationError",
                            "1 validation error detected: Value at 'body' failed to satisfy "
                            "constraint: Member must have length less than or equal to 6291456"),
    "model-400": model_error(400, "InvalidRequest", "steps: 1000 is out of range; use a whole number from 1 to 100."),
    "model-500": model_error(500, "GenerationFailed",
                             "generation failed on neuron: RuntimeError: NRT execution failed"),
    "internal": aws_error(500, "InternalFailure", "An internal error occurred."),
    "unavailable": aws_error(503, "ServiceUnavailable", "The service is unavailable."),
    "throttle": aws_error(429, "ThrottlingException", "Rate exceeded"),
    "torchserve-busy": container_error(503, TORCHSERVE_BUSY),
}
RETRIED = {"throttle", "torchserve-busy"}  # answers that say the model did not run


class StandIn:
    """Stands in for the SageMaker runtime in front of an endpoint, since AWS cannot be reached from
    tests. It answers describe and generation with canned content, or with the next queued fault,
    shaped as AWS sends it; "slow" answers late, "not-json" and "not-png" answer 200 with a body
    that is not the endpoint's."""

    def __init__(self, slow_s: float = 2.5, caps: Capabilities = STANDIN_CAPS):
        self.faults: deque[str] = deque()
        self.invocations = 0
        self.caps = caps
        self.payloads: list[dict] = []  # what each invocation sent
        self.slow_s = slow_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _StandInHandler)
        self.server.daemon_threads = True
        self.server.standin = self
        self.server.handle_error = lambda request, address: None  # a late answer to a client that left
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, payload: dict) -> tuple[int, dict, bytes]:
        if payload.get("describe"):
            return 200, {"Content-Type": "application/json"}, json.dumps(self.caps.to_dict()).encode()
        self.invocations += 1
        self.payloads.append(payload)
        fault = self.faults.popleft() if self.faults else None
        if fault in FAULTS:
            status, headers, data = FAULTS[fault]
            return status, {"Content-Type": "application/json", **headers}, json.dumps(data).encode()
        if fault == "slow":
            time.sleep(self.slow_s)
        if fault == "not-json":
            return 200, {"Content-Type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
        seed = payload.get("parameters", {}).get("seed", 1)
        image = attach(Image.new("RGB", (64, 64), (200, 120, 40)),
                       f"{payload['prompt']}\nSteps: 1, Seed: {seed}, Size: 64x64")
        png = b"GIF89a not a png" if fault == "not-png" else png_bytes(image)
        answer = {"images": [base64.b64encode(png).decode()], "seeds": [seed], "info": image.info["parameters"],
                  "timings": {"total_ms": 5.0, "step_ms": [4.0]}, "server": {"handler_ms": 6.0}, "warnings": []}
        return 200, {"Content-Type": "application/json", protocol.CUSTOM_ATTRIBUTES: "handler_ms=6.0"}, \
            json.dumps(answer).encode()


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, headers, data = self.server.standin.answer(payload)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        # One connection per request, so a stopped stand-in refuses the next one.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def standin():
    s = StandIn()
    yield s
    s.stop()


@pytest.mark.parametrize("faults, error, text, invocations", [
    (["validation"], InvalidRequest, "the endpoint refused the request: 1 validation error detected", 1),
    (["model-400"], InvalidRequest, "the endpoint refused the request: steps: 1000 is out of range", 1),
    (["model-500"], GenerationFailed, "the endpoint failed \\(status 500\\): generation failed on neuron", 1),
    (["internal"], GenerationFailed, "InternalFailure: An internal error occurred", 1),
    (["unavailable"], BackendUnavailable, "is unavailable \\(ServiceUnavailable", 1),
    (["throttle"] * 3, BackendUnavailable, "is throttling requests", 3),
    (["torchserve-busy"] * 3, BackendUnavailable, "is busy: the model server's queue is full, or its worker is "
                                                   "restarting; the request did not run", 3),
    (["slow"], GenerationFailed, "did not answer within 1 s; the request was not retried", 1),
    (["not-json"], GenerationFailed, "answered with something that is not this project's JSON", 1),
    (["not-png"], GenerationFailed, "not this project's JSON with PNG images", 1),
])
def test_each_endpoint_failure_maps_to_its_error_and_the_next_request_works(standin, faults, error, text, invocations):
    backend = sagemaker_backend(standin.url, name="sd-standin", read_timeout=1, retry_backoff=0.01)
    assert backend.capabilities().precisions == ("bf16",)
    assert backend.capabilities().fixed_sizes == ((64, 64),)
    standin.faults.extend(faults)
    with pytest.raises(error, match=text):
        backend.generate(GenerationRequest("cat", steps=1, seed=3))
    assert standin.invocations == invocations
    result = backend.generate(GenerationRequest("cat", steps=1, seed=4))
    assert result.seeds == [4] and result.timings.server_ms == 6.0
    assert read_infotext(png_bytes(result.images[0])).startswith("cat\n")


def test_throttling_is_retried_and_a_refused_connection_is_unavailable(standin):
    backend = sagemaker_backend(standin.url, name="sd-standin", retry_backoff=0.01)
    standin.faults.extend(["throttle", "throttle"])
    assert backend.generate(GenerationRequest("cat", steps=1, seed=4)).seeds == [4]
    assert standin.invocations == 3
    standin.stop()
    with pytest.raises(BackendUnavailable, match="cannot reach endpoint sd-standin"):
        backend.generate(GenerationRequest("cat", steps=1))
    standin.start()
    assert backend.generate(GenerationRequest("cat", steps=1, seed=5)).seeds == [5]


# ---- image to image and inpainting: what the client sends ---------------------------------------

def test_the_modes_come_from_the_endpoints_describe_and_an_image_goes_as_png_at_the_generation_size():
    caps = dataclasses.replace(STANDIN_CAPS, modes=MODES)
    standin = StandIn(caps=caps)
    try:
        backend = sagemaker_backend(standin.url, name="sd-standin")
        assert backend.capabilities().modes == MODES and backend.capabilities().previews is False
        source = picture(96, 64)
        backend.generate(GenerationRequest("cat", steps=10, seed=4, image=encoded(source, "JPEG"),
                                           mask=centred_mask(96, 64), strength=0.5, mode="inpaint"))
        sent, = standin.payloads
        assert set(sent) == {"prompt", "negative_prompt", "image", "mask", "parameters"}
        assert {k: sent["parameters"][k] for k in ("mode", "strength", "mask_blur", "resize_mode")} == \
            {"mode": "inpaint", "strength": 0.5, "mask_blur": 4, "resize_mode": "crop"}
        image, mask = (Image.open(io.BytesIO(base64.b64decode(sent[k]))) for k in ("image", "mask"))
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")  # fitted here, sent lossless
        assert (mask.format, mask.size, mask.mode) == ("PNG", (64, 64), "L")
        expected = GenerationRequest("cat", mode="inpaint", image=encoded(source, "JPEG"), mask=centred_mask(96, 64),
                                     width=64, height=64).validated(caps)
        assert image.tobytes() == expected.image.tobytes() and mask.tobytes() == expected.mask.tobytes()
    finally:
        standin.stop()


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_modes_through_the_endpoint_equal_the_backend_behind_it(endpoint, tiny_backend, mode):
    """SageMakerBackend -> serving/server.py -> the tiny backend: the same pixels as the backend run directly."""
    backend = sagemaker_backend(endpoint.url)
    assert backend.capabilities().modes == tiny_backend.capabilities().modes == MODES
    pictures = {"image": encoded(picture(96, 64), "JPEG")}
    if mode == "inpaint":
        pictures["mask"] = centred_mask(96, 64)
    request = GenerationRequest("a lovely cat", steps=6, strength=0.5, width=64, height=64, seed=7, mode=mode,
                                **pictures)
    steps = []
    result = backend.generate(request, on_step=lambda step, total: steps.append((step, total)))
    direct = tiny_backend.generate(request)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(direct.images[0]))
    assert result.seeds == [7] and steps == [(0, 3)]  # the denoising steps that strength 0.5 of 6 runs
    assert len(result.timings.step_ms) == 3 and result.timings.vae_encode_ms > 0
    assert result.request.mode == mode and result.details()["denoising_steps"] == 3
    assert parse_infotext(result.infotexts[0])["params"]["Mode"] == mode
    backend.close()


def test_an_image_mode_the_endpoint_does_not_offer_is_refused_before_sending(standin):
    backend = sagemaker_backend(standin.url, name="sd-standin")
    assert backend.capabilities().modes == ("txt2img",)  # an endpoint whose describe lists no image modes
    with pytest.raises(InvalidRequest, match=r"^mode: Image to image \(img2img\) is not available on this backend"):
        backend.generate(GenerationRequest("cat", steps=2, image=encoded(picture()), mode="img2img"))
    assert standin.invocations == 0


def test_a_request_over_sagemakers_6_mb_is_refused_before_sending_naming_the_image():
    """An endpoint compiled for 1152x1152 (its answer, one PNG of that size, stays within 6 MB): a detailed input
    image and a soft, grey-level mask, as PNGs at that size, are more than 6 MB once base64-encoded, so the client
    says so instead of sending them (SageMaker would refuse the request)."""
    size = 1152
    caps = dataclasses.replace(STANDIN_CAPS, modes=MODES, fixed_sizes=((size, size),), default_size=(size, size))
    standin = StandIn(caps=caps)
    try:
        backend = sagemaker_backend(standin.url, name="sd-standin")
        soft_mask = Image.fromarray(np.random.default_rng(1).integers(1, 256, (size, size), dtype=np.uint8), "L")
        with pytest.raises(InvalidRequest, match=r"^image: the request would be [67]\.\d MB; SageMaker accepts at "
                                                 r"most 6 MB per request\.") as err:
            backend.generate(GenerationRequest("cat", steps=2, image=picture(size, size), mask=soft_mask,
                                               mode="inpaint"))
        assert err.value.field == "image"
        assert standin.invocations == 0
        # The same size with pictures that compress goes through.
        backend.generate(GenerationRequest("cat", steps=2, image=Image.new("RGB", (size, size), "teal"),
                                           mask=centred_mask(size, size), mode="inpaint"))
        assert standin.invocations == 1 and standin.payloads[0]["parameters"]["mode"] == "inpaint"
    finally:
        standin.stop()


# ---- the app with --backend sagemaker, through gradio_client ------------------------------------

def test_app_generates_through_the_endpoint(endpoint, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    args = ["--backend", "sagemaker", "--endpoint-name", "sd-test", "--endpoint-url", endpoint.url, "--region", REGION]
    with run_app(args, tmp_path) as app:
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        files, details = client.predict(prompt="a lovely cat", steps=2, width=64, height=64, seed=11,
                                        precision="fp32", api_name="/generate")
        assert details["backend"] == "sagemaker" and details["seeds"] == [11]
        assert details["timings"]["server_ms"] > 0 and details["timings"]["network_ms"] >= 0
        path = files[0]["image"] if isinstance(files[0], dict) else files[0]
        with Image.open(path) as image:
            assert image.size == (64, 64)
        assert "Seed: 11" in read_infotext(path)
        with pytest.raises(AppError, match="precision: 'fp16' is not available"):
            client.predict(prompt="cat", steps=2, width=64, height=64, precision="fp16", api_name="/generate")


def test_app_shows_each_endpoint_failure_and_keeps_working(standin, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    args = ["--backend", "sagemaker", "--endpoint-name", "sd-standin", "--endpoint-url", standin.url,
            "--region", REGION]
    env = {"SD_READ_TIMEOUT": "1.5", "SD_RETRY_BACKOFF": "0.01"}
    expected = {
        "validation": "Member must have length",
        "model-400": "steps: 1000 is out of range",
        "model-500": r"Generation failed: the endpoint failed \(status 500\): generation failed on neuron",
        "internal": "Generation failed: .*InternalFailure",
        "unavailable": "The backend is unavailable: .*ServiceUnavailable",
        "throttle": "The backend is unavailable: .*is throttling requests",
        "torchserve-busy": "The backend is unavailable: .*is busy: the model server's queue is full",
        "slow": "did not answer within 1.5 s; the request was not retried",
        "not-json": "not this project's JSON",
        "not-png": "not this project's JSON with PNG images",
    }
    with run_app(args, tmp_path, env=env) as app:
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))

        def generate(seed):
            return client.predict(prompt="cat", steps=1, seed=seed, api_name="/generate")

        for fault, message in expected.items():
            standin.faults.extend([fault] * (3 if fault in RETRIED else 1))
            before = standin.invocations
            with pytest.raises(AppError, match=message):
                generate(1)
            assert standin.invocations - before == (3 if fault in RETRIED else 1), fault
            _, details = generate(2)
            assert details["seeds"] == [2], fault
        standin.stop()
        with pytest.raises(AppError, match="The backend is unavailable: cannot reach endpoint sd-standin"):
            generate(3)
        standin.start()
        assert generate(4)[1]["seeds"] == [4]
