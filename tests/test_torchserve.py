"""The endpoint as AWS's PyTorch Neuron container runs it: model.tar.gz from compile_scripts/package.py
under the SageMaker PyTorch inference toolkit and TorchServe (tests/dlc.py says what is real and what
differs), called the way SageMaker calls it and, through a stand-in for SageMaker's runtime, the way
the walk-through's boto3 code and the app's sagemaker backend call it.

One container for the module, on a tiny root traced for the CPU at 128x128 (fp32), with the
environment compile_scripts/deploy.py sets, its queue shortened to QUEUE.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import time

import psutil
import pytest
from PIL import Image

import neuron_helpers
from backend import BackendUnavailable, GenerationRequest, InvalidRequest, Settings, create_backend
from backend.sagemaker import protocol
from backend.core.metadata import read_infotext
from compile_scripts import container as endpoint_container
from compile_scripts import package

pytest.importorskip("sagemaker_pytorch_serving_container", reason="requirements-dev.txt installs the toolkit")
if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java (apt-get install openjdk-17-jre-headless; .ci/run installs it)",
                allow_module_level=True)

from dlc import run_container, sagemaker_front_end  # noqa: E402 - after the skips: it imports the toolkit's deps

NAME = "sd-torchserve"
REGION = "us-east-2"
SIZE = neuron_helpers.SMALL_SIZE
QUEUE = 2  # TorchServe's job queue here: one request runs, two wait, the rest are refused at once
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JSON_HEADERS = {"Content-Type": "application/json"}


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def model_tar(small_root, tmp_path_factory):
    """model.tar.gz holding the tiny model compiled with --target cpu, as package.py builds it for inf2."""
    out = tmp_path_factory.mktemp("torchserve-archive") / "model.tar.gz"
    assert package.main(["--out", str(out), "--artifacts", str(small_root)]) == 0
    return out


@pytest.fixture(scope="module")
def container(model_tar, tmp_path_factory):
    """The toolkit and TorchServe serving the archive; afterwards, no Java or worker process is left."""
    workdir = tmp_path_factory.mktemp("torchserve")
    environment = endpoint_container.environment(max_queue=QUEUE, response_timeout_s=120)
    with run_container(model_tar, workdir, environment) as running:
        yield running
        workers = psutil.Process(running.java_pid).children(recursive=True)
    assert running.launcher.poll() is not None
    for pid in [running.java_pid, *(w.pid for w in workers)]:
        assert not _alive(pid), f"process {pid} outlived the container"


@pytest.fixture(scope="module")
def front_end(container):
    """The stand-in for SageMaker's runtime in front of the container (tests/dlc.py)."""
    with sagemaker_front_end(container.url, NAME, REGION) as url:
        yield url


@pytest.fixture
def runtime(front_end, aws_env):
    """boto3's sagemaker-runtime client, through the front end, with throwaway credentials."""
    import boto3

    return boto3.client("sagemaker-runtime", endpoint_url=front_end)


def test_one_worker_owns_the_model_with_the_deployed_environment(container):
    model, = container.get_json("/models/model")
    assert (model["minWorkers"], model["maxWorkers"], len(model["workers"])) == (1, 1, 1)
    assert model["jobQueueStatus"]["remainingCapacity"] == QUEUE
    # TS_DEFAULT_RESPONSE_TIMEOUT reached TorchServe. The toolkit's own SAGEMAKER_MODEL_SERVER_TIMEOUT cannot:
    # 2.0.25 glues its setting onto the last line of its defaults, which has no newline.
    assert model["responseTimeout"] == 120
    toolkit_config = (container.model_dir.parent.parent / "sagemaker-ts.properties").read_text()
    assert "enable_model_api=truedefault_response_timeout=" in toolkit_config
    # The worker runs the archive's code, not this checkout's.
    assert f"with the code in {container.model_dir / 'code'}" in container.log()


@pytest.mark.parametrize("payload", [{"prompt": "a lovely cat"}, {"prompt": "a lovely cat", "parameters": {}}])
def test_the_walkthroughs_requests_answer_pngs_through_boto3(runtime, payload):
    # The walk-through's invoke cell, with its two request bodies.
    response_model = runtime.invoke_endpoint(EndpointName=NAME, Body=json.dumps(payload),
                                             ContentType="application/json")
    resp = response_model["Body"].read()
    assert resp.startswith(PNG_MAGIC) and response_model["ContentType"] == "image/png"
    assert Image.open(io.BytesIO(resp)).size == (SIZE, SIZE)
    assert read_infotext(resp).startswith("a lovely cat\nSteps: 20, Sampler: DPM++ 2M")
    attributes = protocol.parse_attributes(response_model["CustomAttributes"])
    assert attributes["steps"] == "20" and float(attributes["handler_ms"]) > 0


def test_json_answer_and_describe(container):
    answer = container.invoke(body({"prompt": "cat", "parameters": {"num_inference_steps": 2, "seed": 7}}),
                              {**JSON_HEADERS, "Accept": "application/json"})
    assert answer.status == 200 and answer.content_type == "application/json"
    data = json.loads(answer.body)
    assert data["seeds"] == [7] and (data["backend"], data["model"]) == ("neuron", "tiny")
    assert protocol.decode_png_list(data["images"])[0].startswith(PNG_MAGIC)
    caps = json.loads(container.invoke(body({"describe": True}), JSON_HEADERS).body)
    assert caps["fixed_sizes"] == [[SIZE, SIZE]] and caps["precisions"] == ["fp32"]


@pytest.mark.parametrize("raw, status, text", [
    (b'{"prompt": "cat"', 400, "body: not valid JSON"),
    (body({"prompt": "cat", "parameters": {"num_inference_steps": "many"}}), 400,
     "parameters.num_inference_steps: must be a number"),
    (body({"prompt": "cat", "steps": 3}), 400, "steps: not a known field"),
    (body({"prompt": "cat", "parameters": {"width": 64, "height": 64}}), 400, "width/height: 64x64 is not available"),
])
def test_a_bad_request_is_a_4xx_naming_the_field_and_the_next_one_works(container, raw, status, text):
    answer = container.invoke(raw, JSON_HEADERS)
    error = json.loads(answer.body)
    assert (answer.status, answer.content_type, error["code"], error["message"]) == \
        (status, "application/json", status, "InvalidRequest")
    assert error["error"].startswith(text), error["error"]
    after = container.invoke(body({"prompt": "cat", "parameters": {"num_inference_steps": 1}}), JSON_HEADERS)
    assert after.status == 200 and after.body.startswith(PNG_MAGIC)


def test_boto3_sees_a_bad_request_as_sagemaker_wraps_it(runtime):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName=NAME, ContentType="application/json",
                                Body=body({"prompt": "cat", "parameters": {"num_inference_steps": 1000}}))
    response = err.value.response
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) == ("ModelError", 424)
    assert response["OriginalStatusCode"] == 400
    assert protocol.parse_error(response["OriginalMessage"]) == (
        "InvalidRequest", "steps: 1000 is out of range; use a whole number from 1 to 100.")


def test_more_requests_than_the_queue_holds_are_refused_at_once(container):
    count, steps = 8, 20

    def call(seed):
        return container.invoke(body({"prompt": "cat", "parameters": {"num_inference_steps": steps, "seed": seed}}),
                                JSON_HEADERS)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(call, range(count)))
    done = [answer for answer in results if answer.status == 200]
    busy = [answer for answer in results if answer.status == 503]
    assert len(done) + len(busy) == count, [a.status for a in results]
    assert 1 <= len(done) and busy, "eight requests at once should overflow a queue of two"
    assert all(answer.body.startswith(PNG_MAGIC) for answer in done)
    for answer in busy:
        # At once: TorchServe's own answer for a full job queue, given as the request arrives, before it
        # is queued (ApiUtils.addRESTInferenceJob); not the handler's, nor a wait for a turn.
        assert json.loads(answer.body)["type"] == protocol.MODEL_SERVER_BUSY, answer.body
        kind, text = protocol.parse_error(answer.body)
        assert kind == protocol.BUSY and "queue is full" in text


def test_the_apps_sagemaker_backend_generates_and_reports_a_full_queue_as_busy(front_end, container, aws_env):
    backend = create_backend(Settings(backend="sagemaker", endpoint_name=NAME, region=REGION,
                                      endpoint_url=front_end, retry_backoff=0.01))
    caps = backend.capabilities()
    assert (caps.model, caps.fixed_sizes, backend.remote.backend) == ("tiny", ((SIZE, SIZE),), "neuron")
    result = backend.generate(GenerationRequest("a lovely cat", steps=2, seed=5))
    assert result.images[0].size == (SIZE, SIZE) and result.seeds == [5]
    assert 0 < result.timings.server_ms <= result.timings.total_ms
    with pytest.raises(InvalidRequest, match="precision: 'bf16' is not available"):
        backend.generate(GenerationRequest("cat", precision="bf16"))

    # Fill the worker and the queue, then ask: TorchServe's 503 comes back as a clear busy answer.
    # A filler may itself be refused while the worker has not yet taken the first one: send another.
    slow = body({"prompt": "cat", "parameters": {"num_inference_steps": 40}})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        fillers: list[concurrent.futures.Future] = []
        deadline = time.monotonic() + 60
        while container.get_json("/models/model")[0]["jobQueueStatus"]["pendingRequests"] < QUEUE:
            assert time.monotonic() < deadline, "the queue did not fill"
            if sum(not f.done() for f in fillers) < QUEUE + 1:
                fillers.append(pool.submit(container.invoke, slow, JSON_HEADERS))
            time.sleep(0.02)
        busy = f"endpoint {NAME} at .* is busy: the model server's queue is full"
        with pytest.raises(BackendUnavailable, match=busy):
            backend.generate(GenerationRequest("cat", steps=1))
        statuses = [f.result().status for f in fillers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= QUEUE + 1, statuses
    assert backend.generate(GenerationRequest("cat", steps=1, seed=9)).seeds == [9]
    backend.close()
