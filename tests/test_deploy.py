"""model.tar.gz (compile_scripts/package.py) and deploy / status / delete (compile_scripts/deploy.py)
against moto's server, which stands in for AWS here."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from compile_scripts import deploy, package
from conftest import ROOT, free_port

REGION = "us-east-2"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


# ---- package ------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_is_reproducible_and_holds_what_djl_needs(tmp_path):
    first, second = tmp_path / "a" / "model.tar.gz", tmp_path / "b" / "model.tar.gz"
    args = ["--backend", "local", "--model", "tiny"]
    assert package.main(["--out", str(first), *args]) == 0
    assert package.main(["--out", str(second), *args]) == 0
    assert sha256(first) == sha256(second)
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert names == sorted(names)
        assert {"serving.properties", "model.py", "requirements.txt", "backend/__init__.py", "backend/protocol.py",
                "serving/handler.py", "serving/model.py"} <= set(names)
        assert "serving/server.py" not in names
        properties = tar.extractfile("serving.properties").read().decode()
        requirements = tar.extractfile("requirements.txt").read().decode()
        assert tar.extractfile("model.py").read() == (ROOT / "serving" / "model.py").read_bytes()
    lines = dict(line.split("=", 1) for line in properties.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["engine"] == "Python" and lines["option.entryPoint"] == "model.py"
    assert (lines["minWorkers"], lines["maxWorkers"]) == ("1", "1")
    assert int(lines["option.model_loading_timeout"]) >= 600 and int(lines["option.predict_timeout"]) == 60
    assert (lines["option.sd_backend"], lines["option.sd_model"], lines["option.sd_png_level"]) == ("local", "tiny", "1")
    assert "diffusers==" in requirements
    assert not any(line.startswith(("torch", "numpy", "gradio", "boto")) for line in requirements.splitlines())


def test_archive_with_a_compiled_root_unpacks_and_serves_through_model_py(tmp_path, tiny_dir):
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
        assert "option.sd_artifacts=root\n" in tar.extractfile("serving.properties").read().decode()
        unpacked = tmp_path / "unpacked"
        tar.extractall(unpacked, filter="data")
    # What DJL does: import model.py from the model directory, warm up with the model's
    # properties, then hand it a request. djl_python is the stand-in (DJL exists only in its image).
    script = f"""
import json, sys
sys.path[:0] = [{str(unpacked)!r}, {str(ROOT / "tests")!r}]
import djl_standin
sys.modules["djl_python"] = djl_standin
import model, backend
assert backend.__file__.startswith({str(unpacked)!r}), backend.__file__
props = {{"model_dir": {str(unpacked)!r}, "sd_artifacts": "root", "sd_backend": "local", "sd_device": "cpu"}}
assert model.handle(djl_standin.Input(props)) is None
out = model.handle(djl_standin.Input({{"Content-Type": "application/json", "Accept": "application/json"}},
    json.dumps({{"prompt": "cat", "parameters": {{"num_inference_steps": 1, "width": 64, "height": 64, "seed": 5}}}}).encode()))
caps = model._handler.capabilities
print(out.code, json.loads(out.body())["seeds"], caps.model, caps.is_tiny)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "200 [5] root True"


def test_package_refuses_what_cannot_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        package.main(["--out", str(tmp_path / "m.tar.gz")])  # neuron without a compiled root
    assert "--artifacts ROOT or --model-s3-uri" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        package.main(["--out", str(tmp_path / "m.tar.gz"), "--artifacts", str(tmp_path)])
    assert "no model_index.json" in capsys.readouterr().err
    assert package.main(["--out", str(tmp_path / "m.tar.gz"), "--model-s3-uri", "s3://b/sd2_512_root/"]) == 0
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        properties = tar.extractfile("serving.properties").read().decode()
    assert "option.model_id=s3://b/sd2_512_root/\n" in properties and "option.sd_backend=neuron\n" in properties


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


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "model.tar.gz"
    path.write_bytes(b"archive one")
    return path


def run(aws, *argv: str) -> int:
    return deploy.main([*argv, "--endpoint-url", aws["url"], "--region", REGION, "--poll", "0.01"])


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
        f"763104351884.dkr.ecr.{REGION}.amazonaws.com/djl-inference:0.30.0-neuronx-sdk2.20.1"
    data = model["PrimaryContainer"]["ModelDataUrl"]
    bucket, key = data.removeprefix("s3://").split("/", 1)
    assert clients["s3"].get_object(Bucket=bucket, Key=key)["Body"].read() == b"archive one"
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
    archive.write_bytes(b"archive two")
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
    assert run(aws, *deploy_args("sd21", archive, "--no-wait", "--max-instances", "2")) == 0
    out = capsys.readouterr().out
    assert "not waiting" in out and "autoscaling is set once the endpoint is InService" in out
    with pytest.raises(SystemExit):
        deploy.main(["deploy", "--help"])
    assert "djl-inference:0.30.0-neuronx-sdk2.20.1" in capsys.readouterr().out
    assert deploy.default_image("eu-west-1") == \
        "763104351884.dkr.ecr.eu-west-1.amazonaws.com/djl-inference:0.30.0-neuronx-sdk2.20.1"
