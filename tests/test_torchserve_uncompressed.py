"""An uncompressed deploy (compile_scripts/deploy.py --model-data) as AWS's PyTorch Neuron container runs it: a
tiny root published to moto's S3 with `compile.py --upload`, deploy's code package put beside it, the prefix
copied into /opt/ml/model the way SageMaker copies S3Prefix model data (each key, the prefix trimmed, as a
path), then the SageMaker PyTorch inference toolkit and TorchServe serving it (tests/dlc.py says what is real
and what differs).

Its own module: the toolkit refuses to start while another TorchServe runs, and test_torchserve.py keeps one
running for its whole module. What only SageMaker does cannot run here: its copy of the prefix (done below
with boto3, following the API reference's rule), and its checks of the role's access to the prefix.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import urllib.request

import neuron_helpers
import pytest
from PIL import Image

from compile_scripts import container as endpoint_container
from compile_scripts import deploy
from helpers import free_port

pytest.importorskip("sagemaker_pytorch_serving_container", reason="requirements-dev.txt installs the toolkit")
if shutil.which("java") is None:
    pytest.skip("TorchServe needs Java (apt-get install openjdk-17-jre-headless; .ci/run installs it)",
                allow_module_level=True)

from dlc import run_container  # noqa: E402 - after the skips: it imports the toolkit's deps

REGION = "us-east-2"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
SIZE = neuron_helpers.SMALL_SIZE


def test_the_toolkit_serves_a_published_root_copied_from_its_s3_prefix(small_root, aws_env, tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    from compile_scripts.compile import main as compile_main

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", method="POST"))
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
        uri = "s3://models/roots/sd_tiny_root/"
        # The run's small root, compiled with the same arguments: compile.py finds every part up to date and publishes.
        root = neuron_helpers.copy_root(small_root, tmp_path / "sd_tiny_root")
        assert compile_main([*neuron_helpers.small_root_args(root), "--upload", uri]) == 0
        deployer = deploy.Deployer(REGION, url, out=lambda line: None)
        deployer.upload_code(deploy.Plan(name="sd", role=ROLE, bucket=None, model_tar=None, model_data=uri))
        prefix_copy = tmp_path / "prefix"
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="models", Prefix="roots/sd_tiny_root/"):
            for item in page["Contents"]:
                target = prefix_copy / item["Key"][len("roots/sd_tiny_root/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file("models", item["Key"], str(target))
    finally:
        server.stop()

    environment = endpoint_container.environment(max_queue=2, response_timeout_s=120)
    with run_container(prefix_copy, tmp_path / "container", environment) as running:
        answer = running.invoke(json.dumps({"prompt": "a lovely cat", "parameters": {"num_inference_steps": 2}})
                                .encode(), {"Content-Type": "application/json", "Accept": "application/json"})
        assert answer.status == 200, answer.body[:500]
        image = Image.open(io.BytesIO(base64.b64decode(json.loads(answer.body)["images"][0])))
        assert image.size == (SIZE, SIZE)
        log = running.log()
    # The root is the model folder itself (TorchServe's copy of /opt/ml/model), the code the package deploy put there.
    assert re.search(r"loading backend neuron \(model None, artifacts \S+/model\) with the code in "
                     + re.escape(str(running.model_dir / "code")), log), log[-3000:]
