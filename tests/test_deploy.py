"""model.tar.gz (compile_scripts/package.py), deploy / status / delete (compile_scripts/deploy.py), the
uncompressed deploy of a published root (--model-data) and SageMaker's naming rules for it, and the endpoint's
download of a compiled root from S3 (backend/neuron/root_store.py), against moto's server, which stands in for
AWS's control plane and S3 here. moto's sagemaker-runtime answers every invocation with a fixed "body", so a
deploy here passes --no-wait-ready, except where the wait is the point: its loop with a fake clock, and one deploy
that waits on the real toolkit and TorchServe (tests/dlc.py) behind the stand-in for SageMaker's runtime."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from compile_scripts import container, deploy, package
from helpers import ROOT, free_port

REGION = "us-east-2"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


# ---- package ------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_is_reproducible_and_holds_what_the_toolkit_needs(tmp_path):
    first, second = tmp_path / "a" / "model.tar.gz", tmp_path / "b" / "model.tar.gz"
    args = ["--backend", "local", "--model", "tiny"]
    assert package.main(["--out", str(first), *args]) == 0
    assert package.main(["--out", str(second), *args]) == 0
    assert sha256(first) == sha256(second)
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert {"code/inference.py", "code/requirements.txt", "code/endpoint.json", "code/backend/__init__.py",
                "code/backend/sagemaker/protocol.py", "code/serving/handler.py",
                "code/backend/neuron/root_store.py"} <= set(names)
        assert all(name.startswith("code/") for name in names)  # the toolkit looks in /opt/ml/model/code
        assert "code/serving/server.py" not in names
        config = json.loads(tar.extractfile("code/endpoint.json").read())
        requirements = tar.extractfile("code/requirements.txt").read().decode()
        assert tar.extractfile("code/inference.py").read() == (ROOT / "serving" / "inference.py").read_bytes()
    assert config == {"backend": "local", "model": "tiny", "png_level": 1}
    pins = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    project = (ROOT / "requirements.txt").read_text().splitlines()
    assert sorted(pins) == sorted(line for line in project if line.split("==")[0] in package.ENDPOINT_PACKAGES)
    assert len(pins) == len(package.ENDPOINT_PACKAGES)
    # The image's own builds for its Neuron SDK must never be replaced.
    stack = ("torch", "torch-neuronx", "neuronx-cc", "numpy")
    assert not [line for line in pins if line.split("==")[0].lower() in stack]


def test_archive_with_a_compiled_root_holds_plain_files_beside_the_code(tmp_path, tiny_dir):
    # A copy of the tiny folder with a symlinked file, as Hub caches are made of.
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(tiny_dir), str(root)], check=True)
    (root / "scheduler" / "scheduler_config.json").rename(tmp_path / "blob.json")
    (root / "scheduler" / "scheduler_config.json").symlink_to(tmp_path / "blob.json")
    out = tmp_path / "model.tar.gz"
    assert package.main(["--out", str(out), "--backend", "local", "--artifacts", str(root)]) == 0
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        assert all(m.isreg() for m in members), "only regular files: no links, devices or directories"
        assert all(not m.name.startswith("/") and ".." not in m.name.split("/") for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 0)}
        assert "root/scheduler/scheduler_config.json" in tar.getnames()
        assert json.loads(tar.extractfile("code/endpoint.json").read())["artifacts"] == "root"
    # tests/test_torchserve.py serves such an archive under the real toolkit and TorchServe.


def test_package_refuses_what_cannot_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        package.main(["--out", str(tmp_path / "m.tar.gz")])  # neuron without a compiled root
    assert "--artifacts ROOT or --model-s3-uri" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        package.main(["--out", str(tmp_path / "m.tar.gz"), "--artifacts", str(tmp_path)])
    assert "no model_index.json" in capsys.readouterr().err
    own = tmp_path / "requirements.txt"
    own.write_text("diffusers==0.42.1\ntorch==2.9.0\nnumpy<2\n")
    with pytest.raises(SystemExit):
        package.main(["--out", str(tmp_path / "m.tar.gz"), "--backend", "local", "--requirements", str(own)])
    assert "list numpy, torch: AWS's image carries them" in capsys.readouterr().err
    assert package.main(["--out", str(tmp_path / "m.tar.gz"), "--model-s3-uri", "s3://b/sd2_512_root/"]) == 0
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        config = json.loads(tar.extractfile("code/endpoint.json").read())
    assert config == {"backend": "neuron", "model_s3_uri": "s3://b/sd2_512_root/", "png_level": 1}


# ---- deploy against moto -------------------------------------------------------------------------

@pytest.fixture
def aws(monkeypatch, aws_env):
    """A moto server standing in for AWS, with fake credentials; yields its URL."""
    from moto.sagemaker import models as sagemaker_models
    from moto.sagemaker import responses as sagemaker_responses
    from moto.server import ThreadedMotoServer

    # moto's list of endpoint instance types predates inf2; AWS accepts ml.inf2.*.
    validate = sagemaker_models.FakeEndpointConfig.validate_instance_type
    monkeypatch.setattr(sagemaker_models.FakeEndpointConfig, "validate_instance_type",
                        lambda self, kind: None if kind.startswith("ml.inf2.") else validate(self, kind))
    # moto has no UpdateEndpoint; this does what AWS does once an update has finished.
    calls = []

    def update_endpoint(self):
        name, config = self._get_param("EndpointName"), self._get_param("EndpointConfigName")
        calls.append((name, config))
        endpoint = self.sagemaker_backend.endpoints[name]
        endpoint.endpoint_config_name = config
        return sagemaker_responses.ActionResult({"EndpointArn": endpoint.arn})

    monkeypatch.setattr(sagemaker_responses.SageMakerResponse, "update_endpoint", update_endpoint, raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", method="POST"))
    try:
        yield {"url": url, "updates": calls}
    finally:
        server.stop()


@pytest.fixture
def clients(aws):
    import boto3

    return {name: boto3.client(name, region_name=REGION, endpoint_url=aws["url"])
            for name in ("sagemaker", "s3", "application-autoscaling")}


def build_archive(path: Path, png_level: int = 1) -> Path:
    """A real package.py archive (deploy checks for code/inference.py), small: the local backend on `tiny`."""
    assert package.main(["--out", str(path), "--backend", "local", "--model", "tiny", "--png-level",
                         str(png_level)]) == 0
    return path


@pytest.fixture
def archive(tmp_path):
    return build_archive(tmp_path / "model.tar.gz")


def run(aws, *argv: str, wait_ready: bool = False) -> int:
    """deploy.main against moto; a deploy stops at InService (moto has no runtime that answers a describe) unless
    wait_ready."""
    skip = ["--no-wait-ready"] if argv[0] == "deploy" and not wait_ready else []
    return deploy.main([*argv, "--endpoint-url", aws["url"], "--region", REGION, "--poll", "0.01", *skip])


def deploy_args(name: str, archive: Path, *extra: str) -> list[str]:
    return ["deploy", "--name", name, "--role", ROLE, "--bucket", "models", "--model-tar", str(archive), *extra]


def leftovers(clients, name: str) -> list[str]:
    sm = clients["sagemaker"]
    found = [m["ModelName"] for m in sm.list_models()["Models"] if m["ModelName"].startswith(name)]
    found += [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]
              if c["EndpointConfigName"].startswith(name)]
    found += [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"] if e["EndpointName"] == name]
    found += [t["ResourceId"] for t in clients["application-autoscaling"].describe_scalable_targets(
        ServiceNamespace="sagemaker")["ScalableTargets"]]
    return found


def test_deploy_status_delete_leaves_nothing_behind(aws, clients, archive, capsys):
    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    assert run(aws, *deploy_args("sd21", archive, "--min-instances", "1", "--max-instances", "3")) == 0
    out = capsys.readouterr().out
    assert "endpoint sd21 is InService" in out and "python app.py --backend sagemaker --endpoint-name sd21" in out

    sm = clients["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName="sd21")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.inf2.xlarge" and variant["InitialInstanceCount"] == 1
    assert variant["VolumeSizeInGB"] == 100 and variant["ContainerStartupHealthCheckTimeoutInSeconds"] >= 600
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == \
        f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"
    # One TorchServe worker owns both NeuronCores; a bounded queue; a worker timeout that covers the model load;
    # request bodies up to SageMaker's 6 MB (input images) and some room.
    assert model["PrimaryContainer"]["Environment"] == {
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "TS_JOB_QUEUE_SIZE": "8", "TS_DEFAULT_RESPONSE_TIMEOUT": "1800",
        "TS_MAX_REQUEST_SIZE": str(6 * 1024 * 1024 + 1024 * 1024)}
    data = model["PrimaryContainer"]["ModelDataUrl"]
    bucket, key = data.removeprefix("s3://").split("/", 1)
    assert clients["s3"].get_object(Bucket=bucket, Key=key)["Body"].read() == archive.read_bytes()
    scaling = clients["application-autoscaling"]
    target, = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == \
        ("endpoint/sd21/variant/AllTraffic", 1, 3)
    policy, = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"][
        "PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"

    # Running it again changes nothing.
    before = leftovers(clients, "sd21")
    assert run(aws, *deploy_args("sd21", archive, "--min-instances", "1", "--max-instances", "3")) == 0
    out = capsys.readouterr().out
    assert "already uploaded" in out and "nothing to change" in out
    assert leftovers(clients, "sd21") == before and aws["updates"] == []

    assert run(aws, "status", "--name", "sd21") == 0
    out = capsys.readouterr().out
    assert "InService" in out and "ml.inf2.xlarge" in out and "autoscaling: 1-3 instances" in out

    assert run(aws, "delete", "--name", "sd21", "--delete-model-data") == 0
    out = capsys.readouterr().out
    assert "deleted endpoint sd21" in out and f"deleted {data}" in out
    assert leftovers(clients, "sd21") == []
    assert clients["s3"].list_objects_v2(Bucket="models").get("KeyCount", 0) == 0
    assert run(aws, "status", "--name", "sd21") == 3
    assert run(aws, "delete", "--name", "sd21") == 0
    assert "nothing named sd21 to delete" in capsys.readouterr().out


def test_a_new_archive_updates_the_endpoint_in_place_and_removes_the_old_model(aws, clients, archive, capsys):
    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    assert run(aws, *deploy_args("sd21", archive)) == 0
    sm = clients["sagemaker"]
    old_config = sm.describe_endpoint(EndpointName="sd21")["EndpointConfigName"]
    build_archive(archive, png_level=0)
    assert run(aws, *deploy_args("sd21", archive)) == 0
    new_config = sm.describe_endpoint(EndpointName="sd21")["EndpointConfigName"]
    assert new_config != old_config and aws["updates"] == [("sd21", new_config)]
    assert f"deleted unused endpoint config {old_config}" in capsys.readouterr().out
    models = [m["ModelName"] for m in sm.list_models()["Models"]]
    configs = [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]]
    assert configs == [new_config]
    assert models == [sm.describe_endpoint_config(EndpointConfigName=new_config)["ProductionVariants"][0]["ModelName"]]


def test_delete_also_removes_what_a_failed_deploy_left(aws, clients, archive, monkeypatch, capsys):
    from moto.sagemaker import models as sagemaker_models
    from moto.sagemaker.exceptions import SagemakerClientError

    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})

    class ResourceLimitExceeded(SagemakerClientError):
        code = "ResourceLimitExceeded"

    def over_quota(self, *args, **kwargs):
        # AWS's answer on an account whose inf2 endpoint quota is 0 (the default on new accounts).
        raise ResourceLimitExceeded("The account-level service limit 'ml.inf2.xlarge for endpoint usage' is 0 "
                                    "Instances, with current utilization of 0 Instances and a request delta of 1 "
                                    "Instances. Please use AWS Service Quotas to request an increase for this quota.")

    monkeypatch.setattr(sagemaker_models.SageMakerModelBackend, "create_endpoint", over_quota)
    assert run(aws, *deploy_args("sd21", archive)) == 1
    err = capsys.readouterr().err
    assert "Request an increase of 'ml.inf2.xlarge for endpoint usage'" in err and "Service Quotas" in err
    assert len(leftovers(clients, "sd21")) == 2  # the model and the config
    assert run(aws, "status", "--name", "sd21") == 3
    assert "left from earlier deploys" in capsys.readouterr().out
    assert run(aws, "delete", "--name", "sd21") == 0
    assert leftovers(clients, "sd21") == []


def test_missing_bucket_role_and_credentials_get_clear_messages(aws, clients, archive, monkeypatch, capsys):
    from moto.sagemaker import models as sagemaker_models
    from moto.sagemaker.exceptions import ValidationError

    assert run(aws, *deploy_args("sd21", archive)) == 1
    assert "--bucket models: no such bucket" in capsys.readouterr().err

    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})

    def no_role(self, *args, **kwargs):
        # AWS's answer when the role does not exist or does not trust SageMaker.
        raise ValidationError(f"Could not assume role {ROLE}. Please ensure that the role exists and allows "
                              f"principal 'sagemaker.amazonaws.com' to assume the role.")

    monkeypatch.setattr(sagemaker_models.SageMakerModelBackend, "create_model", no_role)
    assert run(aws, *deploy_args("sd21", archive)) == 1
    err = capsys.readouterr().err
    assert "SageMaker cannot use the role" in err and "trusts sagemaker.amazonaws.com" in err

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert run(aws, "status", "--name", "sd21") == 1
    assert "no AWS credentials found" in capsys.readouterr().err

    assert run(aws, *deploy_args("bad_name!", archive)) == 1
    assert "--name 'bad_name!'" in capsys.readouterr().err


def test_no_wait_returns_while_creating_and_help_names_the_image(aws, clients, archive, capsys):
    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    assert run(aws, *deploy_args("sd21", archive, "--no-wait", "--max-instances", "2", "--max-queue", "4")) == 0
    out = capsys.readouterr().out
    assert "not waiting" in out and "autoscaling is set once the endpoint is InService" in out
    model = clients["sagemaker"].list_models()["Models"][0]["ModelName"]
    environment = clients["sagemaker"].describe_model(ModelName=model)["PrimaryContainer"]["Environment"]
    assert environment["TS_JOB_QUEUE_SIZE"] == "4"
    with pytest.raises(SystemExit):
        deploy.main(["deploy", "--help"])
    assert "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04" in capsys.readouterr().out


@pytest.mark.parametrize("region, image", [
    ("eu-west-1", "763104351884.dkr.ecr.eu-west-1.amazonaws.com/"),
    ("af-south-1", "626614931356.dkr.ecr.af-south-1.amazonaws.com/"),
    ("cn-north-1", "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/"),
])
def test_the_image_comes_from_the_regions_dlc_account(region, image):
    tag = "pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04"
    assert container.default_image(region) == image + tag


def test_a_region_without_a_known_account_asks_for_image_uri(aws, clients, archive, capsys):
    assert deploy.main([*deploy_args("sd21", archive), "--endpoint-url", aws["url"], "--region", "us-gov-west-1"]) == 1
    err = capsys.readouterr().err
    assert "no known Deep Learning Containers account for region 'us-gov-west-1'; pass --image-uri" in err
    assert leftovers(clients, "sd21") == []


def test_a_djl_image_is_refused_before_any_aws_call(aws_env, archive, capsys):
    # Nothing listens at the endpoint URL: any AWS call would fail with a connection error instead.
    argv = [*deploy_args("sd21", archive), "--region", REGION, "--endpoint-url", f"http://127.0.0.1:{free_port()}",
            "--image-uri", "763104351884.dkr.ecr.us-east-2.amazonaws.com/djl-inference:0.30.0-neuronx-sdk2.20.1"]
    assert deploy.main(argv) == 1
    err = capsys.readouterr().err
    assert "a DJL-Serving image cannot serve this endpoint. DJL-Serving dropped Neuron" in err
    assert "Python 3.10 and torch-neuronx for torch 2.1" in err and "Leave out --image-uri" in err


def test_an_archive_without_the_toolkits_entry_point_is_refused(aws, clients, tmp_path, capsys):
    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    old = tmp_path / "djl-model.tar.gz"  # what package.py built for DJL-Serving
    with tarfile.open(old, "w:gz") as tar:
        for name in ("model.py", "serving.properties"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    assert run(aws, *deploy_args("sd21", old)) == 1
    assert "no code/inference.py inside" in capsys.readouterr().err
    assert clients["s3"].list_objects_v2(Bucket="models").get("KeyCount", 0) == 0


# ---- the endpoint's download of a compiled root (package.py --model-s3-uri) ---------------------

def small_root(path: Path) -> Path:
    """A root's shape with small files (what a download and a deploy look at, not what the model loads),
    with its file index written as compile.py writes it."""
    from backend.neuron import root_store

    files = {"model_index.json": b"{}", "compiled_models/source.json": b'{"model": "tiny"}',
             "compiled_models/fp32/unet.pt": b"u" * 1000, "unet/config.json": b"{}"}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    root_store.write_index(path)
    return path


def test_the_endpoint_downloads_its_compiled_root_from_s3_verified(aws, clients, tmp_path, monkeypatch):
    from backend import BackendUnavailable
    from backend.neuron import root_store
    from serving.inference import settings_from_config

    s3 = clients["s3"]
    s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    source = small_root(tmp_path / "source")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["url"])  # boto3 inside root_store reads it
    root_store.upload(source, "s3://models/roots/sd2_512_root/", echo=lambda line: None)
    s3.put_object(Bucket="models", Key="roots/sd2_512_root_old/unet.pt", Body=b"not this one")

    # What model_fn does with endpoint.json's model_s3_uri (or an s3:// artifacts value).
    for key, name in (("model_s3_uri", "endpoint"), ("artifacts", "other")):
        model_dir = tmp_path / name
        settings = settings_from_config(model_dir, {key: "s3://models/roots/sd2_512_root/"}, env={})
        root = model_dir / "sd2_512_root"
        assert (settings.backend, settings.artifacts) == ("neuron", str(root))
        got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        assert got == {**{p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()},
                       root_store.MARKER: got[root_store.MARKER]}

    with pytest.raises(BackendUnavailable, match="no compiled root there \\(nothing under that prefix\\)"):
        settings_from_config(tmp_path / "missing", {"model_s3_uri": "s3://models/roots/missing/"}, env={})
    with pytest.raises(BackendUnavailable, match="no bucket 'no-such-bucket'"):
        settings_from_config(tmp_path / "missing", {"model_s3_uri": "s3://no-such-bucket/root/"}, env={})
    assert not (tmp_path / "missing").exists()


# ---- deploy --model-data: a published root as uncompressed model data ---------------------------

def test_deploy_points_the_model_at_an_uploaded_root_as_uncompressed_data(aws, clients, tmp_path, monkeypatch,
                                                                          capsys):
    from backend.neuron import root_store

    s3, sm = clients["s3"], clients["sagemaker"]
    s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["url"])
    source = small_root(tmp_path / "root")
    root_store.upload(source, "s3://models/roots/r1/", echo=lambda line: None)
    s3.put_object(Bucket="models", Key="roots/r1/code/backend/gone.py", Body=b"# from an older package")

    assert run(aws, "deploy", "--name", "sd21", "--role", ROLE, "--model-data", "s3://models/roots/r1") == 0
    out = capsys.readouterr().out
    assert "endpoint sd21 is InService" in out
    model, = sm.list_models()["Models"]
    container_ = sm.describe_model(ModelName=model["ModelName"])["PrimaryContainer"]
    assert container_["ModelDataSource"] == {"S3DataSource": {
        "S3Uri": "s3://models/roots/r1/", "S3DataType": "S3Prefix", "CompressionType": "None"}}
    assert "ModelDataUrl" not in container_ and container_["Image"] == container.default_image(REGION)
    # Under the prefix: the root, its index, and the code package, laid out as SageMaker copies it to /opt/ml/model.
    listed = s3.list_objects_v2(Bucket="models", Prefix="roots/r1/")["Contents"]
    keys = {item["Key"][len("roots/r1/"):] for item in listed}
    code = {key for key in keys if key.startswith("code/")}
    assert keys - code == {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    assert {"code/inference.py", "code/requirements.txt", "code/endpoint.json", "code/backend/neuron/root_store.py",
            "code/serving/handler.py"} <= code and "code/backend/gone.py" not in code
    endpoint_json = json.loads(s3.get_object(Bucket="models", Key="roots/r1/code/endpoint.json")["Body"].read())
    assert endpoint_json == {"backend": "neuron", "png_level": package.DEFAULT_PNG_LEVEL}  # the root is /opt/ml/model
    assert s3.list_objects_v2(Bucket="models", Prefix="stable-diffusion/").get("KeyCount", 0) == 0  # no archive

    # The same inputs again change nothing; delete leaves the published root where it is.
    assert run(aws, "deploy", "--name", "sd21", "--role", ROLE, "--model-data", "s3://models/roots/r1/") == 0
    assert "already runs" in capsys.readouterr().out
    assert run(aws, "delete", "--name", "sd21", "--delete-model-data") == 0
    assert "kept s3://models/roots/r1/: a published root" in capsys.readouterr().out
    assert leftovers(clients, "sd21") == [] and s3.head_object(Bucket="models", Key="roots/r1/model_index.json")


def test_deploy_model_data_refuses_what_sagemaker_would_copy_or_cannot_serve(aws, clients, tmp_path, monkeypatch,
                                                                             archive, capsys):
    from backend.neuron import root_store

    s3 = clients["s3"]
    s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["url"])
    root_store.upload(small_root(tmp_path / "root"), "s3://models/roots/r1/", echo=lambda line: None)

    def deploy_model_data(uri: str) -> str:
        assert run(aws, "deploy", "--name", "sd21", "--role", ROLE, "--model-data", uri) == 1
        return capsys.readouterr().err

    s3.put_object(Bucket="models", Key="roots/r1/notes.txt", Body=b"left here")
    assert "1 are no part of the root (roots/r1/notes.txt); remove them" in deploy_model_data("s3://models/roots/r1/")
    assert "holds files but no compiled_models/files.json" in deploy_model_data("s3://models/roots/")
    assert "no compiled root there" in deploy_model_data("s3://models/nothing/")
    assert "name the root's prefix in the bucket" in deploy_model_data("s3://models")
    assert clients["sagemaker"].list_models()["Models"] == []

    for argv, message in (([], "one of the arguments --model-tar --model-data is required"),
                          (["--model-tar", str(archive)], "--model-tar needs --bucket"),
                          (["--model-data", "s3://models/roots/r1/", "--bucket", "models"], "--bucket is for")):
        with pytest.raises(SystemExit):
            deploy.main(["deploy", "--name", "sd21", "--role", ROLE, *argv])
        assert message in capsys.readouterr().err


# SageMaker's file-name rules for uncompressed model data (API reference, S3ModelDataSource, CompressionType), each
# broken by one object under the prefix: (the key's rest after the prefix, what the refusal says).
BAD_NAMES = [
    ("", "a 0-byte folder object (an S3 console folder)"),
    ("unet/", "a 0-byte folder object (an S3 console folder)"),
    ("unet//weights.bin", "an empty directory name"),
    ("notes/ /a.txt", "a blank file or directory name"),
    ("nul\0l.bin", "a null byte in its name"),
    ("./model_index.json", "a '.' or '..' file or directory name"),
    ("unet/../evil.json", "a '.' or '..' file or directory name"),
    ("x" * 256 + ".bin", "a file or directory name of 260 bytes (at most 255)"),
    ("\u00e9" * 128, "a file or directory name of 256 bytes (at most 255)"),  # 128 characters, 256 bytes in UTF-8
    ("unet", "both a file and a folder"),  # beside unet/config.json, the root's own
    ("code", "both a file and a folder"),  # beside code/inference.py, which deploy is about to put there
]


def test_model_data_problems_follow_sagemakers_naming_rules():
    prefix = "roots/r1/"
    root = [prefix + rel for rel in ("model_index.json", "unet/config.json", "unet/a b.bin", "x" * 255, "code/x.py")]
    assert deploy.model_data_problems(root, prefix) == []
    for rel, why in BAD_NAMES:
        problems = deploy.model_data_problems([*root, prefix + rel], prefix)
        assert len(problems) == 1 and problems[0].startswith(repr(prefix + rel)) and why in problems[0], problems
    # A file that other keys continue is ambiguous whichever way round it is listed.
    assert deploy.model_data_problems([prefix + "w/part1", prefix + "w"], prefix) == [
        f"{prefix + 'w'!r}: both a file and a folder: other keys continue it ({prefix}w/...), an ambiguous file name"]


def test_deploy_model_data_refuses_keys_sagemaker_cannot_copy_before_any_model(aws, clients, tmp_path, monkeypatch,
                                                                              capsys):
    from backend.neuron import root_store

    s3, sm = clients["s3"], clients["sagemaker"]
    s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["url"])
    root_store.upload(small_root(tmp_path / "root"), "s3://models/roots/r1/", echo=lambda line: None)
    for rel, why in BAD_NAMES:
        key = "roots/r1/" + rel
        s3.put_object(Bucket="models", Key=key, Body=b"")
        assert run(aws, "deploy", "--name", "sd21", "--role", ROLE, "--model-data", "s3://models/roots/r1/") == 1
        err = capsys.readouterr().err
        assert "--model-data s3://models/roots/r1/: SageMaker copies every object under the prefix" in err, err
        assert f"{key!r}: {why}" in err and "rename or remove them (aws s3 mv / aws s3 rm)" in err, err
        s3.delete_object(Bucket="models", Key=key)
    assert sm.list_models()["Models"] == [] and sm.list_endpoint_configs()["EndpointConfigs"] == []
    # Nothing was put beside the root either: the code package goes only under a prefix that passes.
    assert s3.list_objects_v2(Bucket="models", Prefix="roots/r1/code/").get("KeyCount", 0) == 0


# ---- after InService: waiting until the model answers a describe ---------------------------------

class FakeClock:
    """Time that moves only when the wait sleeps or a probe takes time."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(clock: FakeClock, answers: list[tuple[bool, str]], takes_s: float = 0.0):
    """A probe that gives these answers in turn, each after takes_s seconds (a describe held while loading)."""
    remaining = list(answers)

    def probe() -> tuple[bool, str]:
        clock.now += takes_s
        return remaining.pop(0)

    return probe


def test_the_wait_prints_elapsed_and_each_new_answer_and_returns_when_answered():
    clock, lines = FakeClock(), []
    answers = [(False, "no connection"), (False, "the container answered 503: no worker"),
               (False, "the container answered 503: no worker"), (True, "model tiny on cpu")]
    got = deploy.wait_answering(scripted(clock, answers), "sd21", timeout_s=600, poll_s=5, out=lines.append,
                                clock=clock, sleep=clock.sleep)
    assert got == "model tiny on cpu"
    assert lines == ["  [    0 s] sd21: InService, not answering yet (no connection)",
                     "  [    5 s] sd21: InService, not answering yet (the container answered 503: no worker)",
                     "  [   15 s] sd21: answering: model tiny on cpu"]
    assert clock.sleeps == [5, 5, 5]


def test_the_wait_repeats_an_unchanged_answer_once_a_minute_and_stops_at_the_timeout():
    clock, lines = FakeClock(), []
    probe = scripted(clock, [(False, "no answer within 70 s")] * 100, takes_s=20)
    with pytest.raises(deploy.DeployError) as error:
        deploy.wait_answering(probe, "sd21", timeout_s=300, poll_s=10, out=lines.append, clock=clock,
                              sleep=clock.sleep)
    # A probe every 30 s (20 s held, 10 s apart); a line when the answer is new, then once 60 s have passed.
    assert [line.split("]")[0] for line in lines] == ["  [   20 s", "  [   80 s", "  [  140 s", "  [  200 s",
                                                      "  [  260 s", "  [  320 s"]
    assert all(line.endswith("InService, not answering yet (no answer within 70 s)") for line in lines)
    message = str(error.value)
    assert "endpoint sd21 is InService but did not answer a describe within 300 s (last: no answer within 70 s)" \
        in message and "--ready-timeout" in message and "log group /aws/sagemaker/Endpoints/sd21" in message
    assert 300 <= clock.now < 300 + 20 + 10  # bounded: at most one probe and one pause past the limit


def test_a_deploy_refuses_an_endpoint_that_answers_something_else(aws, clients, archive, capsys):
    # moto's sagemaker-runtime answers every invocation with the same bytes, not this project's describe.
    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    assert run(aws, *deploy_args("sd21", archive), wait_ready=True) == 1
    captured = capsys.readouterr()
    assert "waiting until the model answers" in captured.out
    assert "endpoint sd21 answered a describe with something that is not this project's (4 bytes starting " \
           "b'body')" in captured.err and "--no-wait-ready or --runtime-url" in captured.err
    assert run(aws, "status", "--name", "sd21") == 0
    assert "answers, but not with this project's describe" in capsys.readouterr().out


def test_deploy_waits_until_torchserve_has_loaded_the_model(aws, clients, archive, tmp_path, capsys):
    """A deploy whose endpoint is InService at once (moto) waits on describes sent through the stand-in for
    SageMaker's runtime to the toolkit and TorchServe (tests/dlc.py), started when the deploy starts; it says
    ready only once the model answers, which it did not yet when /ping first answered."""
    pytest.importorskip("sagemaker_pytorch_serving_container", reason="requirements-dev.txt installs the toolkit")
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (apt-get install openjdk-17-jre-headless; .ci/run installs it)")
    from dlc import run_container, sagemaker_front_end

    clients["s3"].create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    workdir = tmp_path / "container"
    stop, failures = threading.Event(), []

    def serve() -> None:
        try:
            with run_container(archive, workdir, container.environment(max_queue=8, response_timeout_s=120)):
                stop.wait(300)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        # The container's port, from the TorchServe config the toolkit writes first (tests/dlc.py's launcher).
        properties = workdir / "sagemaker-ts.properties"
        deadline = time.monotonic() + 120
        while not re.search(r"inference_address=\S+:(\d+)", properties.read_text() if properties.exists() else ""):
            assert time.monotonic() < deadline and not failures, failures
            time.sleep(0.05)
        port = int(re.search(r"inference_address=\S+:(\d+)", properties.read_text()).group(1))
        at_ping: list = []  # what a describe sent to the container got when its /ping first answered 200

        def watch_ping() -> None:
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    time.sleep(0.05)
            describe = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=b'{"describe": true}',
                                              headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(describe, timeout=2) as answer:
                    at_ping.append(answer.status)
            except urllib.error.HTTPError as exc:
                at_ping.append(exc.code)
            except OSError:
                at_ping.append("no answer within 2 s")

        watcher = threading.Thread(target=watch_ping, daemon=True)
        watcher.start()
        with sagemaker_front_end(f"http://127.0.0.1:{port}", "sd21", REGION) as runtime_url:
            assert run(aws, *deploy_args("sd21", archive, "--runtime-url", runtime_url, "--poll", "0.2"),
                       wait_ready=True) == 0
            out = capsys.readouterr().out
            assert run(aws, "status", "--name", "sd21", "--runtime-url", runtime_url) == 0
            status = capsys.readouterr().out
    finally:
        stop.set()
        server.join(60)
    assert not failures, failures
    waiting = [line for line in out.splitlines() if "InService, not answering yet" in line]
    assert waiting, out  # the deploy saw the endpoint InService and not answering
    assert re.search(r"\] sd21: answering: model tiny on cpu \(local backend\)", out), out
    assert out.index(waiting[-1]) < out.index("endpoint sd21 is InService and answering. Try it:")
    # InService means /ping answers (SageMaker's health check); TorchServe answered it before the model could answer.
    assert at_ping and at_ping[0] != 200, at_ping
    assert "  answering: model tiny on cpu (local backend)" in status, status


@pytest.mark.parametrize("script", ["package", "deploy"])
def test_scripts_run_as_files_too(script):
    """`python compile_scripts/X.py` works as `python -m compile_scripts.X` does (the docs show the module form)."""
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, f"compile_scripts/{script}.py", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "usage:" in done.stdout
