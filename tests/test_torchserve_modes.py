"""Image to image and inpainting through the endpoint as AWS's container runs it: model.tar.gz from
compile_scripts/package.py under the SageMaker PyTorch inference toolkit and TorchServe (tests/dlc.py),
called as SageMaker calls it and, through the stand-in for SageMaker's runtime, with boto3.

The archive runs the local backend on the tiny model (`package.py --backend local --model tiny`), which
offers every mode; tests/test_torchserve.py serves a compiled (neuron) root. One container for the module,
one test, so TorchServe starts once; it runs in its own module because only one TorchServe may run at a time.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from input_pictures import b64, centred_mask, picture
from PIL import Image

from backend import GenerationRequest

from backend.sagemaker import protocol
from backend.core.metadata import read_infotext
from compile_scripts import container as endpoint_container
from compile_scripts import package

pytest.importorskip("sagemaker_pytorch_serving_container", reason="requirements-dev.txt installs the toolkit")
if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java (apt-get install openjdk-17-jre-headless; .ci/run installs it)",
                allow_module_level=True)

from dlc import run_container, sagemaker_front_end  # noqa: E402 - after the skips: it imports the toolkit's deps

NAME = "sd-torchserve-modes"
REGION = "us-east-2"
JSON_HEADERS = {"Content-Type": "application/json"}
SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    """The toolkit and TorchServe serving `package.py --backend local --model tiny`, with the deployed environment."""
    work = tmp_path_factory.mktemp("torchserve-modes")
    archive = work / "model.tar.gz"
    assert package.main(["--out", str(archive), "--backend", "local", "--model", "tiny"]) == 0
    environment = endpoint_container.environment(max_queue=2, response_timeout_s=120)
    with run_container(archive, work / "run", environment) as running:
        yield running


def test_image_to_image_and_inpaint_through_the_toolkit_and_torchserve(container, tiny_backend, aws_env):
    caps = json.loads(container.invoke(json.dumps({"describe": True}).encode(), JSON_HEADERS).body)
    assert caps["modes"] == ["txt2img", "img2img", "inpaint"] and caps["backend"] == "local"

    # Image to image, as SageMaker sends it to the container: the same pixels as the tiny backend here makes.
    source = picture(96, 64)
    payload = {"prompt": "a lovely cat", "image": b64(source),
               "parameters": {**SIZE, "num_inference_steps": 6, "strength": 0.5, "seed": 5}}
    answer = container.invoke(json.dumps(payload).encode(), {**JSON_HEADERS, "Accept": "application/json"})
    assert answer.status == 200, answer.body[:500]
    data = json.loads(answer.body)
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0]))))
    direct = tiny_backend.generate(GenerationRequest("a lovely cat", image=source, steps=6, strength=0.5, seed=5,
                                                     mode="img2img", **SIZE))
    assert np.array_equal(served, np.asarray(direct.images[0]))
    assert len(data["timings"]["step_ms"]) == 3 and data["timings"]["vae_encode_ms"] > 0
    assert "Mode: img2img, Denoising strength: 0.5" in data["info"]

    # Inpaint through the stand-in for SageMaker's runtime, with boto3 as the README calls it: the PNG answer
    # keeps the input's pixels outside the mask.
    import boto3

    with sagemaker_front_end(container.url, NAME, REGION) as url:
        runtime = boto3.client("sagemaker-runtime", endpoint_url=url)
        response = runtime.invoke_endpoint(
            EndpointName=NAME, ContentType="application/json",
            Body=json.dumps({"prompt": "a hat", "image": b64(picture()), "mask": b64(centred_mask()),
                             "parameters": {**SIZE, "num_inference_steps": 4, "mask_blur": 0}}))
        png = response["Body"].read()
    assert response["ContentType"] == "image/png" and "Mode: inpaint" in read_infotext(png)
    keep = np.asarray(centred_mask()) == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[keep], np.asarray(picture())[keep])

    # A body of nearly SageMaker's 6 MB (a large, detailed photo) passes TorchServe and is fitted to the size.
    large = b64(picture(1400, 1000, seed=2))
    body = json.dumps({"prompt": "cat", "image": large, "parameters": {**SIZE, "num_inference_steps": 2}}).encode()
    assert 5_000_000 < len(body) <= protocol.MAX_REQUEST_BYTES
    assert container.invoke(body, JSON_HEADERS).status == 200

    # Over SageMaker's limit, and over TorchServe's own default (6553500 bytes): the endpoint's own 413 answers,
    # so TS_MAX_REQUEST_SIZE reached TorchServe; then the next request works.
    too_big = json.dumps({"prompt": "cat", "image": "A" * 7_000_000}).encode()
    assert 6553500 < len(too_big) <= endpoint_container.MAX_REQUEST_SIZE
    refused = container.invoke(too_big, JSON_HEADERS)
    error = json.loads(refused.body)
    assert (refused.status, error["code"], error["message"]) == (413, 413, "InvalidRequest")
    assert error["error"].startswith(f"body: 6.7 MB ({len(too_big)} bytes); SageMaker accepts at most 6 MB")
    after = container.invoke(json.dumps({"prompt": "cat", "parameters": {**SIZE, "num_inference_steps": 1}}).encode(),
                             JSON_HEADERS)
    assert after.status == 200 and after.body.startswith(b"\x89PNG")
