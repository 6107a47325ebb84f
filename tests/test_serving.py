"""The endpoint: serving/handler.py directly, serving/inference.py's toolkit functions with TorchServe's
own context objects (tests/test_torchserve.py runs them under the real toolkit and TorchServe), and
serving/server.py as a real process called by the walk-through's own boto3 code."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import re
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend import BackendUnavailable, GenerationFailed, GenerationRequest

from backend.sagemaker import protocol
from backend.core.metadata import parse_infotext, read_infotext
from helpers import NarrowedBackend
from input_pictures import b64, centred_mask, encoded, picture
from serving import server as endpoint_server
from serving.handler import Handler, choose_answer_type

JSON_HEADERS = {"Content-Type": "application/json"}
SMALL = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 42}


def body(payload) -> bytes:
    return json.dumps(payload).encode()


@pytest.fixture
def handler(tiny_backend):
    return Handler(tiny_backend)


# ---- handler ------------------------------------------------------------------------------------

def test_default_answer_is_the_first_png_with_its_infotext_and_server_times(handler):
    answer = handler.handle(body({"prompt": "a lovely cat", "parameters": SMALL}), JSON_HEADERS)
    assert answer.status == 200 and answer.content_type == "image/png"
    image = Image.open(io.BytesIO(answer.body))
    assert image.size == (64, 64)
    params = parse_infotext(read_infotext(answer.body))
    assert params["prompt"] == "a lovely cat"
    assert (params["params"]["Seed"], params["params"]["Steps"]) == ("42", "2")
    attributes = protocol.parse_attributes(answer.headers[protocol.CUSTOM_ATTRIBUTES])
    assert attributes["seeds"] == "42" and attributes["steps"] == "2"
    assert 0 < float(attributes["total_ms"]) <= float(attributes["handler_ms"])


def test_json_answer_has_every_image_seed_and_timing(handler):
    answer = handler.handle(body({"prompt": "cat", "negative_prompt": "dog",
                                  "parameters": {**SMALL, "num_images_per_prompt": 2}}),
                            {**JSON_HEADERS, "Accept": "application/json"})
    assert answer.status == 200 and answer.content_type == "application/json"
    data = json.loads(answer.body)
    assert data["seeds"] == [42, 43]
    pngs = [base64.b64decode(i) for i in data["images"]]
    assert [parse_infotext(read_infotext(p))["params"]["Seed"] for p in pngs] == ["42", "43"]
    assert data["info"] == read_infotext(pngs[0])
    assert parse_infotext(data["info"])["negative_prompt"] == "dog"
    assert len(data["timings"]["step_ms"]) == 2
    assert data["server"]["handler_ms"] >= data["timings"]["total_ms"]
    assert (data["model"], data["backend"]) == ("tiny", "local")


def test_describe_returns_the_capabilities(handler, tiny_backend):
    answer = handler.handle(body({"describe": True}), JSON_HEADERS)
    assert answer.status == 200
    assert json.loads(answer.body) == tiny_backend.capabilities().to_dict()


@pytest.mark.parametrize("raw, headers, status, expected", [
    (b'{"prompt": "cat"', JSON_HEADERS, 400, "body: not valid JSON"),
    (body({"prompt": "cat", "parameters": {"num_inference_steps": "many"}}), JSON_HEADERS, 400,
     "parameters.num_inference_steps: must be a number"),
    (body({"prompt": "cat", "parameters": {"num_inference_steps": 500}}), JSON_HEADERS, 400,
     "steps: 500 is out of range"),
    (body({"prompt": "cat", "parameters": {"width": 1 << 20}}), JSON_HEADERS, 400, "width: 1048576 is out of range"),
    (body({"prompt": "c" * 2001}), JSON_HEADERS, 400, "prompt: 2001 characters; at most 2000"),
    (body({"prompt": "cat", "parameters": {"num_images_per_prompt": 5}}), JSON_HEADERS, 400, "num_images: 5 is out"),
    (body({"prompt": "cat", "strength": 0.5}), JSON_HEADERS, 400, "strength: not a known field"),
    (b" " * (protocol.MAX_REQUEST_BYTES + 1), JSON_HEADERS, 413,
     "body: 6.0 MB (6291457 bytes); SageMaker accepts at most 6 MB (6291456 bytes) per request: send a smaller image"),
    (body({"prompt": "cat", "negative_prompt": " " * 70_000}), JSON_HEADERS, 413,
     "body: 70040 bytes; a request without an image is at most 65536 bytes."),
    (body({"prompt": "cat"}), {"Content-Type": "text/plain"}, 415, "Content-Type: 'text/plain' is not accepted"),
    (body({"prompt": "cat"}), {**JSON_HEADERS, "Accept": "image/jpeg"}, 406, "Accept: 'image/jpeg' is not offered"),
])
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(handler, raw, headers, status, expected):
    answer = handler.handle(raw, headers)
    assert answer.status == status and answer.content_type == "application/json"
    error = json.loads(answer.body)
    assert (error["code"], error["message"]) == (status, "InvalidRequest")
    assert error["error"].startswith(expected)


def test_a_failure_inside_generation_is_a_500_told_apart_from_a_bad_request(handler, monkeypatch):
    import backend.inprocess.pipeline

    def broken_run(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(backend.inprocess.pipeline, "run", broken_run)
    answer = handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)
    error = json.loads(answer.body)
    assert (answer.status, error["message"]) == (500, "GenerationFailed")
    assert "RuntimeError: device lost" in error["error"]


@pytest.mark.parametrize("raised, status, kind, text", [
    (BackendUnavailable("the Neuron device is gone"), 503, "BackendUnavailable", "the Neuron device is gone"),
    (GenerationFailed("out of memory"), 500, "GenerationFailed", "out of memory"),
    (KeyError("/home/secret/path"), 500, "GenerationFailed", "the endpoint failed unexpectedly (KeyError)"),
])
def test_backend_errors_keep_their_kind(handler, monkeypatch, raised, status, kind, text):
    def fail(request, on_step=None):
        raise raised

    monkeypatch.setattr(handler.backend, "generate", fail)
    answer = handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)
    error = json.loads(answer.body)
    assert (answer.status, error["message"]) == (status, kind)
    assert error["error"].startswith(text) and "secret" not in error["error"]


def handler_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "serving.handler"]


def test_a_bad_request_is_one_log_line_naming_the_field(handler, caplog):
    with caplog.at_level(logging.INFO, logger="serving.handler"):
        answer = handler.handle(body({"prompt": "cat", "parameters": {"num_inference_steps": 500}}), JSON_HEADERS)
    assert answer.status == 400
    [record] = handler_records(caplog)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert re.fullmatch(r"request [0-9a-f]{8}: 400 InvalidRequest \(field steps\): steps: 500 is out of range; .*",
                        record.getMessage()), record.getMessage()


def test_an_unexpected_error_logs_its_traceback_under_the_id_the_client_is_given(handler, monkeypatch, caplog):
    def fail(request, on_step=None):
        raise KeyError("/home/secret/path")

    monkeypatch.setattr(handler.backend, "generate", fail)
    with caplog.at_level(logging.INFO, logger="serving.handler"):
        answer = handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)
    error = json.loads(answer.body)["error"]
    request_id = re.fullmatch(r"the endpoint failed unexpectedly \(KeyError\); its log has the details under "
                              r"request ([0-9a-f]{8})\.", error).group(1)
    failures = [r for r in handler_records(caplog) if r.levelno == logging.ERROR]
    assert len(failures) == 1 and failures[0].getMessage() == f"request {request_id}: 500 unexpected KeyError"
    assert failures[0].exc_info[0] is KeyError  # the traceback goes to the log, and only there
    assert "secret" not in error


def test_each_generation_logs_its_start_and_its_answer_under_one_id(handler, caplog):
    with caplog.at_level(logging.INFO, logger="serving.handler"):
        assert handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS).status == 200
    started, answered = [r.getMessage() for r in handler_records(caplog)]
    request_id = started.split(":")[0]
    assert started == f"{request_id}: generating 1 image(s), 2 steps at 64x64"
    assert answered.startswith(f"{request_id}: 200 image/png in ")


def test_requests_queue_one_at_a_time_and_too_many_get_a_429(tiny_backend):
    handler = Handler(tiny_backend, max_waiting=1, queue_timeout_s=30)
    answers = []
    handler._turns.acquire()  # a generation is running
    try:
        waiter = threading.Thread(target=lambda: answers.append(
            handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)))
        waiter.start()
        deadline = time.monotonic() + 10
        while handler._waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)
        assert refused.status == 429 and json.loads(refused.body)["message"] == "Busy"
        # A bad request is answered at once, even while the queue is full.
        assert handler.handle(body({"prompt": ""}), JSON_HEADERS).status == 400
    finally:
        handler._turns.release()
    waiter.join(30)
    assert answers[0].status == 200
    assert float(protocol.parse_attributes(answers[0].headers[protocol.CUSTOM_ATTRIBUTES])["queue_ms"]) > 0


def test_a_request_that_waits_too_long_gets_a_503(tiny_backend):
    handler = Handler(tiny_backend, queue_timeout_s=0.2)
    with handler._turns:
        answer = handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS)
    assert answer.status == 503 and "no turn within 0.2 s" in json.loads(answer.body)["error"]


# ---- image to image and inpainting through the handler -----------------------------------------

def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_modes_answer_what_the_backend_makes_of_the_same_pictures(handler, tiny_backend, mode):
    """The pictures cross the wire losslessly: the endpoint's images equal the backend's own for the same request."""
    pictures = {"image": picture(80, 64)} if mode == "img2img" else {"image": picture(), "mask": centred_mask()}
    parameters = {**SMALL, "num_inference_steps": 4, "strength": 0.5, "mask_blur": 0}
    answer = handler.handle(body({"prompt": "cat", **{k: b64(v) for k, v in pictures.items()},
                                  "parameters": parameters}), {**JSON_HEADERS, "Accept": "application/json"})
    assert answer.status == 200, answer.body
    data = json.loads(answer.body)
    served = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    direct = tiny_backend.generate(GenerationRequest("cat", steps=4, strength=0.5, mask_blur=0, seed=42, width=64,
                                                     height=64, mode=mode, **pictures))
    assert np.array_equal(pixels(served), pixels(direct.images[0]))
    assert data["seeds"] == [42] and len(data["timings"]["step_ms"]) == 2  # int(4 x 0.5) steps ran
    assert data["timings"]["vae_encode_ms"] > 0
    assert f"Mode: {mode}, Denoising strength: 0.5" in data["info"]
    attributes = protocol.parse_attributes(answer.headers[protocol.CUSTOM_ATTRIBUTES])
    assert attributes["steps"] == "2" and float(attributes["vae_encode_ms"]) > 0
    if mode == "inpaint":
        keep = pixels(centred_mask()) == 0
        assert np.array_equal(pixels(served)[keep], pixels(picture())[keep])  # outside the mask: the input


BAD_PICTURES = [  # (wire fields, the field named, the start of the message)
    ({"image": "not base64!"}, "image", "image: is not base64 text of a PNG or JPEG file"),
    ({"image": base64.b64encode(b"GIF89a, or anything that is not a picture").decode()}, "image",
     "image: is not a PNG, JPEG or WebP image"),
    ({"image": base64.b64encode(encoded(picture())[:700]).decode()}, "image",
     "image: the image file is corrupt or truncated"),
    ({"image": b64(Image.new("L", (5000, 4000)))}, "image", "image: 5000x4000 is too large"),
    ({"image": b64(picture()), "mask": b64(centred_mask(32, 48))}, "mask",
     "mask: 32x48 does not match the image's 64x64"),
    ({"image": b64(picture()), "mask": b64(Image.new("L", (64, 64)))}, "mask", "mask: is empty (all black)"),
    ({"image": b64(picture()), "parameters": {"strength": 1.5}}, "strength", "strength: 1.5 is out of range"),
    ({"mask": b64(centred_mask())}, "mask", "mask: a mask needs the image it belongs to"),
]


@pytest.mark.parametrize("fields, field, expected", BAD_PICTURES)
def test_bad_pictures_are_a_400_naming_the_field_and_the_next_request_works(handler, caplog, fields, field,
                                                                            expected):
    payload = {"prompt": "cat", **fields, "parameters": {**SMALL, **fields.get("parameters", {})}}
    with caplog.at_level(logging.INFO, logger="serving.handler"):
        answer = handler.handle(body(payload), JSON_HEADERS)
    error = json.loads(answer.body)
    assert (answer.status, error["message"]) == (400, "InvalidRequest")
    assert error["error"].startswith(expected), error["error"]
    assert f"400 InvalidRequest (field {field})" in handler_records(caplog)[-1].getMessage()
    after = handler.handle(body({"prompt": "cat", "image": b64(picture()), "parameters": {**SMALL, "strength": 1}}),
                           JSON_HEADERS)
    assert after.status == 200 and after.body.startswith(b"\x89PNG")


def test_an_image_on_a_backend_that_cannot_take_one_is_a_400_naming_the_mode(tiny_backend):
    # The real tiny backend offering text to image only, as a compiled Neuron root without the VAE encoder does.
    handler = Handler(NarrowedBackend(tiny_backend, modes=("txt2img",)))
    assert json.loads(handler.handle(body({"describe": True}), JSON_HEADERS).body)["modes"] == ["txt2img"]
    answer = handler.handle(body({"prompt": "cat", "image": b64(picture()), "parameters": SMALL}), JSON_HEADERS)
    error = json.loads(answer.body)
    assert (answer.status, error["message"]) == (400, "InvalidRequest")
    assert error["error"] == ("mode: Image to image (img2img) is not available on this backend; it offers Text to "
                              "image (txt2img).")
    assert handler.handle(body({"prompt": "cat", "parameters": SMALL}), JSON_HEADERS).status == 200


@pytest.mark.parametrize("accept, expected", [
    (None, "image/png"), ("*/*", "image/png"), ("image/*", "image/png"), ("application/json", "application/json"),
    ("image/png;q=0.5, application/json", "application/json"), ("application/json;q=0, */*", "image/png"),
    ("text/html,application/xhtml+xml,*/*;q=0.8", "image/png"),
])
def test_accept_negotiation(accept, expected):
    assert choose_answer_type(accept) == expected


# ---- serving/inference.py, the toolkit's entry point, with TorchServe's own context objects ------

def toolkit_context(headers: dict):
    """TorchServe's Context for one request, as its worker builds it (ts/service.py)."""
    from ts.context import Context, RequestProcessor

    context = Context("model", "/opt/ml/model", None, 1, None, "0.11.0")
    # The worker adds the body's own entry beside the HTTP headers.
    context.request_processor = [RequestProcessor({**headers, "body": {"content-type": headers.get("Content-Type")}})]
    return context


def toolkit_call(handler, raw: bytes, headers: dict, toolkit_accept: str = "application/json"):
    """input_fn -> predict_fn -> output_fn as the toolkit's Transformer calls them.

    Returns (status, headers, body, content type)."""
    from serving import inference

    context = toolkit_context(headers)
    # The toolkit decodes JSON bodies to str, and turns a missing Accept into application/json.
    data = raw.decode("utf-8") if headers.get("Content-Type") == "application/json" else raw
    invocation = inference.input_fn(data, headers.get("Content-Type"), context)
    answer, content_type = inference.output_fn(inference.predict_fn(invocation, handler), toolkit_accept, context)
    code, _ = context.get_response_status(0)
    return code, context.get_response_headers(0), answer, content_type


def test_toolkit_functions_answer_as_the_handler_does(handler):
    pytest.importorskip("ts.context", reason="requirements-dev.txt installs torchserve")
    payload = body({"prompt": "a lovely cat", "parameters": SMALL})
    code, headers, answer, content_type = toolkit_call(handler, payload, JSON_HEADERS)
    # No Accept from the caller: a PNG, whatever default the toolkit filled in.
    assert (code, content_type) == (200, "image/png") and answer.startswith(b"\x89PNG")
    assert "handler_ms=" in headers[protocol.CUSTOM_ATTRIBUTES]
    code, _, answer, content_type = toolkit_call(handler, payload, {**JSON_HEADERS, "Accept": "application/json"})
    assert (code, content_type, json.loads(answer)["seeds"]) == (200, "application/json", [42])

    code, _, answer, content_type = toolkit_call(handler, body({"prompt": "cat", "steps": 3}), JSON_HEADERS)
    assert (code, content_type) == (400, "application/json")
    assert protocol.parse_error(answer) == ("InvalidRequest", json.loads(answer)["error"])
    assert json.loads(answer)["error"].startswith("steps: not a known field")
    code, _, answer, _ = toolkit_call(handler, b"prompt=cat", {"Content-Type": "text/plain"})
    assert code == 415 and "Content-Type: 'text/plain'" in json.loads(answer)["error"]


def test_toolkit_model_fn_reads_the_archive_config_then_the_environment(tmp_path, monkeypatch):
    from serving.inference import read_config, settings_from_config

    (tmp_path / "code").mkdir()
    config_path = tmp_path / "code" / "endpoint.json"
    root = tmp_path / "sd2_512_root"
    (root / "compiled_models").mkdir(parents=True)
    config_path.write_text(json.dumps({"backend": "neuron", "artifacts": "sd2_512_root", "png_level": 1}))
    settings = settings_from_config(tmp_path, read_config(config_path), env={})
    assert (settings.backend, settings.artifacts) == ("neuron", str(root))
    assert settings.neuron_cores is None
    assert settings_from_config(tmp_path, read_config(config_path), env={"SD_NEURON_CORES": "1"}).neuron_cores == 1
    assert settings.png_level == 1  # endpoint.json's
    assert settings_from_config(tmp_path, read_config(config_path), env={"SD_PNG_LEVEL": "0"}).png_level == 0

    config_path.write_text(json.dumps({"backend": "local", "model": "tiny"}))
    settings = settings_from_config(tmp_path, read_config(config_path), env={"SD_DEVICE": "cpu", "SD_MAX_IMAGES": "2"})
    assert (settings.backend, settings.model, settings.device, settings.max_images) == ("local", "tiny", "cpu", 2)

    (tmp_path / "model_index.json").write_text("{}")
    settings = settings_from_config(tmp_path, read_config(tmp_path / "missing.json"), env={})
    assert (settings.backend, settings.model) == ("local", str(tmp_path))

    config_path.write_text(json.dumps({"backend": "local", "option.entryPoint": "model.py"}))
    with pytest.raises(ValueError, match="unknown key.*option.entryPoint"):
        read_config(config_path)


def test_toolkit_model_fn_runs_the_preflight_on_a_compiled_root(compiled_root, tmp_path, caplog):
    """At endpoint start the doctor's checks go to the log, and a broken root fails model_fn with what to do."""
    import logging

    import neuron_helpers
    from serving.inference import model_fn

    root = neuron_helpers.copy_root(compiled_root, tmp_path / "sd2_512_root")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "endpoint.json").write_text(json.dumps({"backend": "neuron", "artifacts": root.name}))
    with caplog.at_level(logging.INFO, logger="serving.inference"):
        handler = model_fn(str(tmp_path))
    assert handler.capabilities.backend == "neuron"
    assert any("preflight ok" in r.getMessage() and "unet" in r.getMessage() for r in caplog.records)
    handler.backend.close()

    size = f"{neuron_helpers.SIZE}x{neuron_helpers.SIZE}"
    (root / "compiled_models" / "fp32" / size / "unet.pt").write_bytes(b"not a TorchScript archive")
    with pytest.raises(BackendUnavailable, match="preflight failed: .*fp32.*unet"):
        model_fn(str(tmp_path))


# ---- serving/server.py as a real process --------------------------------------------------------

@pytest.fixture
def runtime(tiny_endpoint, aws_env):
    """boto3's sagemaker-runtime client pointed at the endpoint, with throwaway credentials."""
    import boto3

    return boto3.client("sagemaker-runtime", endpoint_url=tiny_endpoint)


def test_the_walkthroughs_client_code_gets_an_image(runtime):
    # The walk-through's invoke cell, as written there (the tiny model at its 512x512 default).
    response_model = runtime.invoke_endpoint(
        EndpointName="sd-test",
        Body=json.dumps({"prompt": "a lovely cat"}),
        ContentType="application/json",
    )
    resp = response_model["Body"].read()
    image = Image.open(io.BytesIO(resp))
    assert image.size == (512, 512)
    assert response_model["ContentType"] == "image/png"
    assert "handler_ms=" in response_model["CustomAttributes"]
    assert read_infotext(resp).startswith("a lovely cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7.5")


def test_boto3_json_answer_and_errors_look_as_they_do_on_aws(runtime):
    from botocore.exceptions import ClientError

    response = runtime.invoke_endpoint(EndpointName="sd-test", ContentType="application/json",
                                       Accept="application/json", Body=body({"prompt": "cat", "parameters": SMALL}))
    assert json.loads(response["Body"].read())["seeds"] == [42]
    assert response["InvokedProductionVariant"] == "AllTraffic"

    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="sd-test", ContentType="application/json",
                                Body=body({"prompt": "cat", "parameters": {"num_inference_steps": 1000}}))
    assert err.value.response["Error"]["Code"] == "ModelError"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert err.value.response["OriginalStatusCode"] == 400
    assert protocol.parse_error(err.value.response["OriginalMessage"]) == (
        "InvalidRequest", "steps: 1000 is out of range; use a whole number from 1 to 100.")
    assert "/aws/sagemaker/Endpoints/sd-test" in err.value.response["LogStreamArn"]
    assert "Received client error (400) from primary" in err.value.response["Error"]["Message"]

    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="no-such-endpoint", ContentType="application/json", Body=b"{}")
    assert err.value.response["Error"]["Code"] == "ValidationError"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "Endpoint no-such-endpoint of account" in err.value.response["Error"]["Message"]


def test_accepted_connections_have_nagle_off(handler, monkeypatch):
    """Nagle + the client's delayed ACK would hold back each small answer on a kept-alive connection:
    every socket the server accepts has TCP_NODELAY set (read on the server's side of it)."""
    nodelay = []
    setup = endpoint_server._RequestHandler.setup

    def setup_and_look(self):
        setup(self)
        nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(endpoint_server._RequestHandler, "setup", setup_and_look)
    server = endpoint_server.EndpointServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for _ in range(2):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            conn.request("POST", "/invocations", body=body({"describe": True}), headers=JSON_HEADERS)
            assert conn.getresponse().status == 200
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert len(nodelay) == 2 and all(nodelay), nodelay


def test_a_client_that_left_is_one_log_line_and_other_connection_errors_keep_their_traceback(handler, caplog):
    server = endpoint_server.EndpointServer(("127.0.0.1", 0), handler)
    try:
        with caplog.at_level(logging.INFO, logger="serving.server"):
            for error in (BrokenPipeError(32, "Broken pipe"), ValueError("bug")):
                try:
                    raise error
                except Exception:  # noqa: BLE001 - as socketserver calls handle_error
                    server.handle_error(None, ("127.0.0.1", 5555))
    finally:
        server.server_close()
    left, bug = [r for r in caplog.records if r.name == "serving.server"]
    assert left.getMessage() == "127.0.0.1:5555 left before its answer was sent (BrokenPipeError)"
    assert left.levelno == logging.INFO and left.exc_info is None
    assert bug.levelno == logging.ERROR and bug.exc_info[0] is ValueError


def test_container_route_answers_raw_statuses_and_keeps_connections_alive(tiny_endpoint):
    conn = http.client.HTTPConnection(tiny_endpoint.removeprefix("http://"), timeout=30)
    conn.request("GET", "/ping")
    ping = conn.getresponse()
    assert ping.status == 200 and json.loads(ping.read()) == {"status": "Healthy"}
    sock = conn.sock

    conn.request("POST", "/invocations", body=b"{oops", headers=JSON_HEADERS)
    bad = conn.getresponse()
    assert bad.status == 400 and json.loads(bad.read())["error"].startswith("body: not valid JSON")

    conn.request("POST", "/nowhere", body=b"{}", headers=JSON_HEADERS)
    missing = conn.getresponse()
    assert missing.status == 404 and b"/ping" in missing.read()

    for _ in range(3):
        conn.request("POST", "/invocations", body=body({"describe": True}), headers=JSON_HEADERS)
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["model"] == "tiny"
        assert answer.getheader("Connection") != "close"
    assert conn.sock is sock, "the connection was not kept alive"
    conn.close()


def test_requests_without_length_or_too_large_are_refused_before_reading(tiny_endpoint):
    host, port = tiny_endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/invocations")
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 411 and answer.getheader("Connection") == "close"
    conn.close()

    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "10485760 bytes" in json.loads(answer.read())["error"]
    conn.close()


def test_a_body_over_sagemakers_limit_is_a_413_and_the_connection_serves_the_next_request(tiny_endpoint):
    """An input image too big for SageMaker's 6 MB: the endpoint reads and drops the body, answers 413 (kind
    InvalidRequest, naming the limit and what to send instead) and keeps the connection for the next request."""
    conn = http.client.HTTPConnection(tiny_endpoint.removeprefix("http://"), timeout=60)
    too_big = body({"prompt": "cat", "image": "A" * (protocol.MAX_REQUEST_BYTES + 100_000)})
    conn.request("POST", "/invocations", body=too_big, headers=JSON_HEADERS)
    answer = conn.getresponse()
    error = json.loads(answer.read())
    assert (answer.status, error["code"], error["message"]) == (413, 413, "InvalidRequest")
    assert error["error"].startswith(f"body: 6.1 MB ({len(too_big)} bytes); SageMaker accepts at most 6 MB "
                                     f"(6291456 bytes) per request: send a smaller image or mask")
    sock = conn.sock
    conn.request("POST", "/invocations", body=body({"prompt": "cat", "parameters": SMALL}), headers=JSON_HEADERS)
    after = conn.getresponse()
    assert after.status == 200 and after.read().startswith(b"\x89PNG") and conn.sock is sock
    conn.close()


def test_boto3_runs_image_to_image_and_inpaint_and_a_bad_picture_names_its_field(runtime, tmp_path):
    """The README's image-to-image call, as written there (at 64x64), then inpaint with the PNG answer."""
    from botocore.exceptions import ClientError

    picture(64, 64).save(tmp_path / "cat.png")
    with open(tmp_path / "cat.png", "rb") as f:
        image = base64.b64encode(f.read()).decode("ascii")
    response = runtime.invoke_endpoint(
        EndpointName="sd-test", ContentType="application/json", Accept="application/json",
        Body=json.dumps({"prompt": "a lovely cat, oil painting", "image": image,
                         "parameters": {"strength": 0.75, "num_inference_steps": 8, "seed": 42,
                                        "height": 64, "width": 64}}))
    answer = json.loads(response["Body"].read())
    assert answer["seeds"] == [42] and len(answer["timings"]["step_ms"]) == 6 and answer["timings"]["vae_encode_ms"] > 0
    assert "Mode: img2img, Denoising strength: 0.75" in answer["info"]
    assert Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).size == (64, 64)

    inpaint = runtime.invoke_endpoint(
        EndpointName="sd-test", ContentType="application/json",
        Body=json.dumps({"prompt": "a hat", "image": image, "mask": b64(centred_mask()),
                         "parameters": {"num_inference_steps": 4, "mask_blur": 0, "height": 64, "width": 64}}))
    png = inpaint["Body"].read()
    assert inpaint["ContentType"] == "image/png" and "Mode: inpaint" in read_infotext(png)
    keep = np.asarray(centred_mask()) == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[keep], np.asarray(picture())[keep])

    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="sd-test", ContentType="application/json",
                                Body=json.dumps({"prompt": "cat", "image": image[: len(image) // 2]}))
    assert err.value.response["OriginalStatusCode"] == 400
    kind, text = protocol.parse_error(err.value.response["OriginalMessage"])
    assert kind == "InvalidRequest" and text.startswith("image: ")
