"""Deploy model.tar.gz as a SageMaker real-time endpoint, show its status, delete it.

    python -m compile_scripts.deploy deploy --name sd21 --role arn:aws:iam::123456789012:role/SageMakerRole \\
        --bucket my-bucket --model-tar model.tar.gz --region us-east-2
    python -m compile_scripts.deploy deploy --name sd21 --role arn:aws:iam::123456789012:role/SageMakerRole \\
        --model-data s3://my-bucket/roots/sd2_512_root/ --region us-east-2      # a root from compile.py --upload
    python -m compile_scripts.deploy status --name sd21 --region us-east-2
    python -m compile_scripts.deploy delete --name sd21 --region us-east-2 [--delete-model-data]

deploy uploads the archive to s3://BUCKET/PREFIX/NAME/model-<sha256>.tar.gz, creates a model and an
endpoint config whose names carry a hash of what they hold (NAME-m-<hash>, NAME-c-<hash>), and
creates the endpoint NAME, or points an existing one at the new config. Running it again with the
same inputs changes nothing; with new inputs it updates the endpoint in place and then removes the
models and configs it no longer uses. delete removes the endpoint, every NAME-m-/NAME-c- model and
config, and the autoscaling target, so nothing is left billing or cluttering the account.

With --model-data, no archive is built or uploaded: the model points at a root published with
`compile.py --upload s3://...` as uncompressed model data (ModelDataSource, S3DataType S3Prefix,
CompressionType None), and deploy puts the endpoint's code package (package.py's code/ folder) beside
the root, under PREFIX/code/. SageMaker copies every object under the prefix into /opt/ml/model, the
prefix trimmed from each key (API reference, S3ModelDataSource; "Deploying uncompressed models",
https://docs.aws.amazon.com/sagemaker/latest/dg/large-model-inference-uncompressed.html), so the
toolkit finds code/inference.py there and the root is /opt/ml/model itself. Objects under the prefix
that are neither the root's (its file index lists them) nor code/ are refused, since they would be
copied too, and so are keys SageMaker cannot turn into files (model_data_problems: its naming rules).
Every model made from a prefix runs the code last put there, at its next instance start.

InService is not ready: SageMaker marks the endpoint InService once the container's /ping answers, and
TorchServe answers /ping before its worker has loaded the model (docs/sagemaker.md, step 3). So deploy then
sends `{"describe": true}` (the wire format's describe, backend/sagemaker/protocol.py) until it is answered,
for at most --ready-timeout seconds, printing the elapsed time and the last answer, and only then says the
endpoint is ready; `status` says which of the two it is. --no-wait-ready skips that (a control plane with no
runtime behind it, such as moto's); --runtime-url sends the describe somewhere else than AWS's runtime.

The default image is AWS's PyTorch Neuron inference container (compile_scripts/container.py names it
and its sources), which runs model.tar.gz's code/inference.py under TorchServe. The model's
environment gives TorchServe one worker, which owns both NeuronCores, and a bounded queue (--max-queue),
so that overload is answered at once with a 503 instead of SageMaker's 60 s timeout.
An ml.inf2.xlarge endpoint bills by the hour while it exists, serving or not: delete it when done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # `python compile_scripts/deploy.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import BackendUnavailable  # noqa: E402 - after the path fix above
from backend.core.api import Capabilities  # noqa: E402
from backend.core.progress import TransferProgress, size_text  # noqa: E402
from backend.neuron import root_store  # noqa: E402
from backend.neuron.root_format import CODE_DIR, file_sha256  # noqa: E402
from backend.sagemaker import protocol  # noqa: E402
from compile_scripts import container, package  # noqa: E402

DEFAULT_INSTANCE = "ml.inf2.xlarge"
VARIANT = "AllTraffic"
DEFAULT_PREFIX = "stable-diffusion"
DEFAULT_VOLUME_GB = 100  # the walk-through's: model.tar.gz, its unpacked copy and the Neuron cache
# Download, the toolkit's pip install of code/requirements.txt and TorchServe's start, before /ping
# answers; the model then loads in the worker for some minutes more (docs/sagemaker.md).
DEFAULT_STARTUP_S = 1800
DEFAULT_TARGET_INVOCATIONS = 20  # per instance per minute: ~2.2 s an image leaves room for bursts
TAG_KEY = "sd-demo:deployment"
# SageMaker names: at most 63 characters of letters, digits and inner hyphens; 13 go to "-m-<hash>".
_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,49}")
_SETTLED = {"InService", "Failed", "OutOfService"}
# How long deploy waits, after InService, for the model to answer: loading the compiled graphs onto the NeuronCores
# takes minutes (docs/sagemaker.md, step 3), and the worker has --startup-timeout for it before TorchServe gives up.
DEFAULT_READY_TIMEOUT_S = 1200
# One describe's read timeout: SageMaker gives a container 60 s to answer an invocation, and its InvokeEndpoint
# documentation says "the SDK socket timeout should be set to be 70 seconds" (botocore's sagemaker-runtime model).
DESCRIBE_READ_TIMEOUT_S = 70.0
STATUS_READ_TIMEOUT_S = 10.0  # status asks once and does not wait for a model still loading
READY_LINE_EVERY_S = 60.0  # while waiting, a progress line at least this often even if nothing changed
_DESCRIBE = json.dumps({"describe": True}).encode("utf-8")
_CREDENTIALS = {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
                "AccessDeniedException", "IncompleteSignature", "InvalidClientTokenId", "AccessDenied"}

# SageMaker's rules for uncompressed model data (CompressionType None, S3DataType S3Prefix): each object's key, the
# prefix trimmed, becomes a path under /opt/ml/model, split at "/", and "Do not use any of the following as file
# names or directory names: an empty or blank string, a string which contains null bytes, a string longer than 255
# bytes, a single dot (.), a double dot (..)"; "Ambiguous file names will result in model deployment failure" (an
# object `weights` beside `weights/part1`); an S3 console folder is a 0-byte object whose key ends in "/", which
# "violates SageMaker restrictions on model artifact file names". The S3Uri of a prefix "always ends with a forward
# slash". Source: the SageMaker API reference, S3ModelDataSource (CompressionType, S3DataType),
# https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_S3ModelDataSource.html; the same text is in
# botocore's sagemaker service-2.json.
MAX_NAME_BYTES = 255


class DeployError(Exception):
    """A failure with a message that says what to do."""


def check_archive(path: Path) -> None:
    """Refuse an archive without code/inference.py (an older package.py's DJL layout cannot serve)."""
    wanted = f"{CODE_DIR}/inference.py"
    try:
        with tarfile.open(path) as tar:
            # Entries are sorted and a compiled root's folder name rarely sorts before "code": stop early.
            if any(member.name == wanted for member in tar):
                return
    except (tarfile.TarError, OSError) as exc:
        raise DeployError(f"--model-tar {path}: not a readable tar.gz ({exc}); build it with "
                          f"python -m compile_scripts.package.") from None
    raise DeployError(f"--model-tar {path}: no {wanted} inside, so the container has nothing to serve (an archive "
                      f"from before the move off DJL-Serving?); build it again with python -m compile_scripts.package.")


def short_hash(*parts: Any) -> str:
    """Ten hex digits naming a model or config by what it holds."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:10]


def model_data_problems(keys: Iterable[str], prefix: str) -> list[str]:
    """What SageMaker could not turn into files under /opt/ml/model, one line per object naming its key
    (the rules above MAX_NAME_BYTES); [] when every key makes a file."""
    rels = {key[len(prefix):]: key for key in keys if key.startswith(prefix)}
    folders = {"/".join(rel.split("/")[:i]) for rel in rels for i in range(1, rel.count("/") + 1)}
    problems = []
    for rel, key in sorted(rels.items()):
        names = rel.split("/")
        if rel == "" or rel.endswith("/"):
            why = "a 0-byte folder object (an S3 console folder): its key ends in '/', so its file name is empty"
        elif "" in names:
            why = "an empty directory name ('//' in the key)"
        elif any(not name.strip() for name in names):
            why = "a blank file or directory name"
        elif any("\0" in name for name in names):
            why = "a null byte in its name"
        elif any(name in (".", "..") for name in names):
            why = "a '.' or '..' file or directory name"
        elif any(len(name.encode("utf-8")) > MAX_NAME_BYTES for name in names):
            longest = max(len(name.encode("utf-8")) for name in names)
            why = f"a file or directory name of {longest} bytes (at most {MAX_NAME_BYTES})"
        elif rel in folders:
            why = f"both a file and a folder: other keys continue it ({key}/...), an ambiguous file name"
        else:
            continue
        problems.append(f"{key!r}: {why}")
    return problems


@dataclass
class Plan:
    """What a deploy asks for."""

    name: str
    role: str
    bucket: str | None  # for --model-tar
    model_tar: Path | None  # model.tar.gz to upload, or None with model_data
    prefix: str = DEFAULT_PREFIX
    instance_type: str = DEFAULT_INSTANCE
    image_uri: str | None = None
    min_instances: int = 1
    max_instances: int = 1
    target_invocations: int = DEFAULT_TARGET_INVOCATIONS
    volume_gb: int = DEFAULT_VOLUME_GB
    startup_timeout_s: int = DEFAULT_STARTUP_S
    max_queue: int = container.DEFAULT_MAX_QUEUE
    neuron_parallel: str = "unet"  # container.environment: one worker on both cores, or one per core
    wait: bool = True
    wait_ready: bool = True  # after InService, wait until a describe is answered
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    model_data: str | None = None  # s3://BUCKET/PREFIX/ of a published root: uncompressed model data

    def image(self, region: str) -> str:
        """The container image: --image-uri, else AWS's PyTorch Neuron inference image for the region."""
        try:
            if self.image_uri:
                container.check_image(self.image_uri)
                return self.image_uri
            return container.default_image(region)
        except container.ImageError as exc:
            raise DeployError(str(exc)) from None

    def environment(self) -> dict[str, str]:
        """The container's environment (container.environment)."""
        return container.environment(self.max_queue, self.startup_timeout_s, self.neuron_parallel)


class Deployer:
    """SageMaker, S3 and Application Auto Scaling calls for one region."""

    def __init__(self, region: str | None = None, endpoint_url: str | None = None,
                 out: Callable[[str], None] = print, poll_s: float = 30.0, timeout_s: float = 3600.0,
                 runtime_url: str | None = None):
        import boto3  # deferred: loaded only once AWS is called (--help and the argument checks do without)

        session = boto3.session.Session(region_name=region)
        if not session.region_name:
            raise DeployError("no AWS region: pass --region or set AWS_REGION (inf2 endpoints exist in "
                              "us-east-1, us-east-2, us-west-2 and others; see docs/sagemaker.md).")
        self.region = session.region_name
        self.sm = session.client("sagemaker", endpoint_url=endpoint_url)
        self.s3 = session.client("s3", endpoint_url=endpoint_url)
        self.scaling = session.client("application-autoscaling", endpoint_url=endpoint_url)
        self._session = session
        self.runtime_url = runtime_url or endpoint_url  # --endpoint-url sends every AWS call there, this one too
        self._runtimes: dict[float, Any] = {}  # sagemaker-runtime clients by read timeout (_runtime)
        self.out = out
        self.poll_s = poll_s
        self.timeout_s = timeout_s

    # ---- deploy ---------------------------------------------------------------------------------

    def deploy(self, plan: Plan) -> dict[str, Any]:
        """Upload, create or reuse model and config, create or update the endpoint; returns its description."""
        check_name(plan.name)
        if not 1 <= plan.min_instances <= plan.max_instances:
            raise DeployError("--min-instances must be at least 1 and at most --max-instances.")
        if plan.max_queue < 1:
            raise DeployError("--max-queue must be at least 1.")
        image = plan.image(self.region)
        if plan.model_data:
            model_data, code_digest = self.upload_code(plan)
            identity = f"{model_data}#code-{code_digest[:16]}"  # new code makes a new model, as a new archive does
        else:
            model_data = identity = self.upload(plan)
        environment = plan.environment()
        model = f"{plan.name}-m-{short_hash(image, identity, plan.role, sorted(environment.items()))}"
        config_hash = short_hash(model, plan.instance_type, plan.min_instances, plan.volume_gb, plan.startup_timeout_s)
        config = f"{plan.name}-c-{config_hash}"
        self._ensure_model(model, image, model_data, environment, plan)
        self._ensure_config(config, model, plan)
        endpoint = self._endpoint(plan.name)
        if endpoint and endpoint["EndpointStatus"] not in _SETTLED:
            self.out(f"endpoint {plan.name} is {endpoint['EndpointStatus']}; waiting for it to settle first")
            endpoint = self.wait_settled(plan.name)
        if endpoint and endpoint["EndpointStatus"] == "Failed":
            self.out(f"endpoint {plan.name} is Failed ({endpoint.get('FailureReason', 'no reason given')}); "
                     f"deleting it to create it again")
            self._delete_endpoint(plan.name, wait=True)
            endpoint = None
        if endpoint is None:
            self.sm.create_endpoint(EndpointName=plan.name, EndpointConfigName=config,
                                    Tags=[{"Key": TAG_KEY, "Value": plan.name}])
            self.out(f"creating endpoint {plan.name} ({plan.instance_type} x{plan.min_instances}); "
                     f"this takes about 10 minutes")
        elif endpoint["EndpointConfigName"] != config:
            # An endpoint under autoscaling cannot be updated; the target is registered again below.
            self._remove_autoscaling(plan.name)
            self.sm.update_endpoint(EndpointName=plan.name, EndpointConfigName=config)
            self.out(f"updating endpoint {plan.name}: {endpoint['EndpointConfigName']} -> {config}")
        else:
            self.out(f"endpoint {plan.name} already runs {config}; nothing to change")
        if not plan.wait:
            self.out(f"not waiting; follow it with: python -m compile_scripts.deploy status --name {plan.name} "
                     f"--region {self.region}")
            if plan.max_instances > plan.min_instances:
                self.out("autoscaling is set once the endpoint is InService: run this deploy again then.")
            return self.sm.describe_endpoint(EndpointName=plan.name)
        final = self.wait_settled(plan.name)
        if final["EndpointStatus"] != "InService":
            raise DeployError(f"endpoint {plan.name} is {final['EndpointStatus']}: "
                              f"{final.get('FailureReason', 'no reason given')}. Its container log is in CloudWatch, "
                              f"log group /aws/sagemaker/Endpoints/{plan.name}.")
        self._set_autoscaling(plan)
        self._remove_unused(plan.name, keep_model=model, keep_config=config)
        if plan.wait_ready:
            self.out(f"endpoint {plan.name} is InService; waiting until the model answers (it loads after the "
                     f"health check passes), at most {plan.ready_timeout_s:.0f} s")
            self.wait_ready(plan.name, plan.ready_timeout_s)
            ready = "is InService and answering"
        else:
            ready = "is InService (not checked that the model answers: --no-wait-ready)"
        self.out(f"endpoint {plan.name} {ready}. Try it:\n"
                 f"  python app.py --backend sagemaker --endpoint-name {plan.name} --region {self.region}\n"
                 f"It bills per instance-hour until deleted:\n"
                 f"  python -m compile_scripts.deploy delete --name {plan.name} --region {self.region}")
        return final

    def upload(self, plan: Plan) -> str:
        """Put the archive in S3 under a name made of its hash (skipped when already there)."""
        if not plan.model_tar.is_file():
            raise DeployError(f"--model-tar {plan.model_tar}: no such file; build it with "
                              f"python -m compile_scripts.package --out {plan.model_tar} ...")
        check_archive(plan.model_tar)
        self._check_bucket(plan.bucket)
        digest = file_sha256(plan.model_tar)
        key = f"{plan.prefix.strip('/')}/{plan.name}/model-{digest[:16]}.tar.gz"
        uri = f"s3://{plan.bucket}/{key}"
        if self._s3_exists(plan.bucket, key):
            self.out(f"{uri} is already uploaded")
        else:
            size = plan.model_tar.stat().st_size
            self.out(f"uploading {plan.model_tar} ({size_text(size)}) to {uri}")
            # boto3 calls Callback with the bytes sent since its last call (boto3/s3/inject.py, upload_file).
            with TransferProgress(f"  {plan.model_tar.name}", size, echo=self.out) as progress:
                self.s3.upload_file(str(plan.model_tar), plan.bucket, key, Callback=progress)
        return uri

    def upload_code(self, plan: Plan) -> tuple[str, str]:
        """Check the published root under --model-data and put the endpoint's code package beside it (PREFIX/code/);
        returns (the prefix's URI, the package's sha256)."""
        try:
            bucket, prefix = root_store.split_s3_uri(plan.model_data)
        except BackendUnavailable as exc:
            raise DeployError(f"--model-data {exc}") from None
        uri = f"s3://{bucket}/{prefix}"
        if not prefix:
            raise DeployError(f"--model-data {plan.model_data}: name the root's prefix in the bucket "
                              f"(s3://BUCKET/PREFIX/): SageMaker copies everything under it.")
        try:
            index = root_store.read_s3_index(uri, self.s3)
            root_store.check_stack(index, uri)
        except BackendUnavailable as exc:
            raise DeployError(f"--model-data {exc}") from None
        existing = root_store.listed_objects(self.s3, bucket, prefix)
        code_prefix = f"{prefix}{CODE_DIR}/"
        config = package.endpoint_config("neuron", None, None, None, package.DEFAULT_PNG_LEVEL)
        entries = sorted(package.members(None, config, package.endpoint_requirements()), key=lambda e: e[0])
        blobs = [(name, data if isinstance(data, bytes) else data.read_bytes()) for name, data in entries]
        wanted = {prefix + name for name, _ in blobs}
        # What the prefix will hold once the code package is in place (older code files are deleted below).
        after = wanted | {key for key in existing if not key.startswith(code_prefix)}
        problems = model_data_problems(after, prefix)
        if problems:
            raise DeployError(f"--model-data {uri}: SageMaker copies every object under the prefix into /opt/ml/model, "
                              f"and cannot make a file of {len(problems)} ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}). Its naming rules for uncompressed model "
                              f"data (API reference, S3ModelDataSource) would fail the deploy: rename or remove them "
                              f"(aws s3 mv / aws s3 rm), or publish the root under a prefix of its own with "
                              f"compile.py --upload.")
        stray = sorted(key for key in existing if key[len(prefix):] not in index["files"]
                       and key != prefix + root_store.INDEX_PATH and not key.startswith(code_prefix))
        if stray:
            raise DeployError(f"--model-data {uri}: SageMaker copies every object under the prefix into /opt/ml/model, "
                              f"and {len(stray)} are no part of the root ({', '.join(stray[:3])}"
                              f"{', ...' if len(stray) > 3 else ''}); remove them (aws s3 rm) or publish the root "
                              f"under a prefix of its own.")
        digest = hashlib.sha256(b"".join(name.encode() + b"\0" + hashlib.sha256(data).digest()
                                         for name, data in blobs)).hexdigest()
        self.out(f"putting the endpoint's code package ({len(blobs)} files) under s3://{bucket}/{code_prefix}")
        for name, data in blobs:
            self.s3.put_object(Bucket=bucket, Key=prefix + name, Body=data)
        for key in sorted(k for k in existing if k.startswith(code_prefix) and k not in wanted):
            self.s3.delete_object(Bucket=bucket, Key=key)  # an older package's file, e.g. a module since removed
        return uri, digest

    def _check_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status == 404 or code in ("404", "NoSuchBucket"):
                raise DeployError(f"--bucket {bucket}: no such bucket. Create it in {self.region} first: "
                                  f"aws s3 mb s3://{bucket} --region {self.region}") from None
            if status == 403 or code in ("403", "AccessDenied"):
                raise DeployError(f"--bucket {bucket}: access denied; these credentials cannot use that "
                                  f"bucket (it may belong to another account).") from None
            raise

    def _s3_exists(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def _ensure_model(self, model: str, image: str, model_data: str, environment: dict[str, str],
                      plan: Plan) -> None:
        if self._exists(self.sm.describe_model, ModelName=model):
            self.out(f"model {model} exists; reusing it")
            return
        primary: dict[str, Any] = {"Image": image, "Environment": environment}
        if plan.model_data:
            # The field names and values are botocore's (sagemaker service-2.json, S3ModelDataSource).
            primary["ModelDataSource"] = {"S3DataSource": {"S3Uri": model_data, "S3DataType": "S3Prefix",
                                                           "CompressionType": "None"}}
        else:
            primary["ModelDataUrl"] = model_data
        self.sm.create_model(ModelName=model, ExecutionRoleArn=plan.role, PrimaryContainer=primary,
                             Tags=[{"Key": TAG_KEY, "Value": plan.name}])
        self.out(f"created model {model} ({image}, {'uncompressed ' if plan.model_data else ''}{model_data})")

    def _ensure_config(self, config: str, model: str, plan: Plan) -> None:
        if self._exists(self.sm.describe_endpoint_config, EndpointConfigName=config):
            self.out(f"endpoint config {config} exists; reusing it")
            return
        self.sm.create_endpoint_config(
            EndpointConfigName=config,
            ProductionVariants=[{
                "VariantName": VARIANT,
                "ModelName": model,
                "InstanceType": plan.instance_type,
                "InitialInstanceCount": plan.min_instances,
                "VolumeSizeInGB": plan.volume_gb,
                "ContainerStartupHealthCheckTimeoutInSeconds": plan.startup_timeout_s,
                "ModelDataDownloadTimeoutInSeconds": plan.startup_timeout_s,
            }],
            Tags=[{"Key": TAG_KEY, "Value": plan.name}],
        )
        self.out(f"created endpoint config {config} ({plan.instance_type} x{plan.min_instances}, "
                 f"{plan.volume_gb} GB volume)")

    def _set_autoscaling(self, plan: Plan) -> None:
        resource = _resource_id(plan.name)
        if plan.max_instances == plan.min_instances:
            if self._remove_autoscaling(plan.name):
                self.out("autoscaling removed (--max-instances equals --min-instances)")
            return
        self.scaling.register_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=_DIMENSION,
            MinCapacity=plan.min_instances, MaxCapacity=plan.max_instances)
        self.scaling.put_scaling_policy(
            PolicyName=_policy_name(plan.name), ServiceNamespace="sagemaker", ResourceId=resource,
            ScalableDimension=_DIMENSION, PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration={
                "TargetValue": float(plan.target_invocations),
                "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                # Scale out fast (a queue forms in seconds), in slowly (a new inf2 takes ~10 minutes).
                "ScaleOutCooldown": 60,
                "ScaleInCooldown": 600,
            })
        self.out(f"autoscaling: {plan.min_instances}-{plan.max_instances} instances, target "
                 f"{plan.target_invocations} invocations per instance per minute")

    def _remove_autoscaling(self, name: str) -> bool:
        """Remove the scaling policy and target, if any; True when there was one."""
        targets = self.scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[_resource_id(name)], ScalableDimension=_DIMENSION,
        )["ScalableTargets"]
        if not targets:
            return False
        policies = self.scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=_resource_id(name), ScalableDimension=_DIMENSION,
        )["ScalingPolicies"]
        for policy in policies:
            self.scaling.delete_scaling_policy(PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker",
                                               ResourceId=_resource_id(name), ScalableDimension=_DIMENSION)
        self.scaling.deregister_scalable_target(ServiceNamespace="sagemaker", ResourceId=_resource_id(name),
                                                ScalableDimension=_DIMENSION)
        return True

    def _remove_unused(self, name: str, keep_model: str, keep_config: str) -> None:
        """Delete this deployment's earlier configs and models, now that the endpoint uses new ones."""
        for config in self._own_configs(name):
            if config != keep_config:
                self.sm.delete_endpoint_config(EndpointConfigName=config)
                self.out(f"deleted unused endpoint config {config}")
        for model in self._own_models(name):
            if model != keep_model:
                self.sm.delete_model(ModelName=model)
                self.out(f"deleted unused model {model}")

    # ---- waiting --------------------------------------------------------------------------------

    def wait_settled(self, name: str) -> dict[str, Any]:
        """Poll until the endpoint is InService, Failed or OutOfService, printing each change."""
        started = time.monotonic()
        last = None
        while True:
            endpoint = self._endpoint(name)
            if endpoint is None:
                raise DeployError(f"endpoint {name} disappeared while waiting for it (deleted elsewhere?)")
            status = endpoint["EndpointStatus"]
            if status != last:
                self.out(f"  [{time.monotonic() - started:5.0f} s] {name}: {status}")
                last = status
            if status in _SETTLED:
                return endpoint
            if time.monotonic() - started > self.timeout_s:
                raise DeployError(f"endpoint {name} still {status} after {self.timeout_s:.0f} s; it keeps going "
                                  f"on AWS's side: check it with `status`, or delete it.")
            time.sleep(self.poll_s)

    def wait_ready(self, name: str, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> str:
        """After InService: send describes until one is answered (at most timeout_s), printing progress; returns
        what the endpoint serves. DeployError when it never answers, or answers something not this project's."""
        def probe() -> tuple[bool, str]:
            state, text = self.probe(name, DESCRIBE_READ_TIMEOUT_S)
            if state == "foreign":
                raise DeployError(f"endpoint {name} answered a describe with something that is not this project's "
                                  f"({text}); is its image running this project's code (compile_scripts/package.py)? "
                                  f"Against a control plane with no runtime of this project's behind it, pass "
                                  f"--no-wait-ready or --runtime-url.")
            return state == "answering", text

        return wait_answering(probe, name, timeout_s, self.poll_s, self.out)

    def probe(self, name: str, read_timeout_s: float) -> tuple[str, str]:
        """One describe invocation: ("answering", what it serves), ("not yet", why not) or ("foreign", what came
        back instead of this project's describe). DeployError when the runtime refuses these credentials."""
        import botocore.exceptions as bx  # deferred with boto3 (see __init__)

        try:
            answer = self._runtime(read_timeout_s).invoke_endpoint(
                EndpointName=name, Body=_DESCRIBE, ContentType=protocol.JSON, Accept=protocol.JSON)
            data = answer["Body"].read()
        except bx.ReadTimeoutError:
            return "not yet", f"no answer within {read_timeout_s:g} s"
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                bx.ResponseStreamingError) as exc:
            return "not yet", f"no connection to the runtime at {self._runtime(read_timeout_s).meta.endpoint_url} " \
                              f"({type(exc).__name__})"
        except bx.ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = error.get("Code", ""), error.get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CREDENTIALS or status in (401, 403):
                raise DeployError(f"InvokeEndpoint: AWS refused these credentials ({code}: {message}); checking that "
                                  f"the endpoint answers needs sagemaker:InvokeEndpoint on it (or pass "
                                  f"--no-wait-ready).") from None
            if code == "ModelError":
                # The container answered with an error: SageMaker passes on its status and body (botocore's
                # sagemaker-runtime model, ModelError: OriginalStatusCode, OriginalMessage).
                _, text = protocol.parse_error(exc.response.get("OriginalMessage") or message)
                return "not yet", f"the container answered {exc.response.get('OriginalStatusCode', '?')}: {text[:200]}"
            return "not yet", f"{code or status}: {message[:200]}"
        try:
            caps = Capabilities.from_dict(json.loads(data))
        except (ValueError, TypeError, AttributeError):
            return "foreign", f"{len(data)} bytes starting {data[:60]!r}"
        sizes = ", ".join(f"{w}x{h}" for w, h in caps.fixed_sizes) or "any size"
        return "answering", (f"model {caps.model} on {caps.device} ({caps.backend} backend), {sizes}, "
                             f"{', '.join(caps.precisions)}")

    def _runtime(self, read_timeout_s: float):
        """A sagemaker-runtime client for describes: one attempt each (botocore would retry a read timeout and
        hide the wait), the given read timeout; made once per timeout."""
        clients = self._runtimes
        if read_timeout_s not in clients:
            from botocore.config import Config  # deferred with boto3 (see __init__)

            config = Config(read_timeout=read_timeout_s, connect_timeout=5.0,
                            retries={"total_max_attempts": 1, "mode": "standard"})
            clients[read_timeout_s] = self._session.client("sagemaker-runtime", endpoint_url=self.runtime_url,
                                                           config=config)
        return clients[read_timeout_s]

    def _wait_deleted(self, name: str) -> None:
        started = time.monotonic()
        while self._endpoint(name) is not None:
            if time.monotonic() - started > self.timeout_s:
                raise DeployError(f"endpoint {name} still exists after {self.timeout_s:.0f} s of deleting.")
            time.sleep(self.poll_s)

    # ---- status and delete ----------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any] | None:
        """Print the endpoint's state (and, when InService, whether the model answers a describe), instances,
        autoscaling and leftovers; returns its description."""
        endpoint = self._endpoint(name)
        models, configs = self._own_models(name), self._own_configs(name)
        if endpoint is None:
            self.out(f"no endpoint {name} in {self.region}")
            if models or configs:
                self.out(f"  left from earlier deploys: {', '.join(configs + models)} "
                         f"(python -m compile_scripts.deploy delete --name {name} removes them)")
            return None
        self.out(f"endpoint {name} ({self.region}): {endpoint['EndpointStatus']}")
        if endpoint.get("FailureReason"):
            self.out(f"  failure: {endpoint['FailureReason']}")
        if endpoint["EndpointStatus"] == "InService":
            # InService only says /ping answers; TorchServe answers it before the model has loaded.
            try:
                state, text = self.probe(name, STATUS_READ_TIMEOUT_S)
            except DeployError as exc:  # credentials that may describe but not invoke: the rest is still worth showing
                state, text = "unknown", str(exc)
            if state == "answering":
                self.out(f"  answering: {text}")
            elif state == "not yet":
                self.out(f"  not answering yet ({text}): the model loads for some minutes after InService; if this "
                         f"lasts, its log is in CloudWatch, log group /aws/sagemaker/Endpoints/{name}")
            elif state == "foreign":
                self.out(f"  answers, but not with this project's describe ({text})")
            else:
                self.out(f"  answering: unknown ({text})")
        self.out(f"  config: {endpoint['EndpointConfigName']}")
        for variant in endpoint.get("ProductionVariants", []):
            self.out(f"  variant {variant.get('VariantName')}: {variant.get('CurrentInstanceCount', '?')} "
                     f"instance(s) running, {variant.get('DesiredInstanceCount', '?')} wanted")
        config = self._describe_config(endpoint["EndpointConfigName"])
        for variant in (config or {}).get("ProductionVariants", []):
            self.out(f"  instance type: {variant.get('InstanceType')}, model: {variant.get('ModelName')}")
        targets = self.scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[_resource_id(name)], ScalableDimension=_DIMENSION,
        )["ScalableTargets"]
        for target in targets:
            self.out(f"  autoscaling: {target['MinCapacity']}-{target['MaxCapacity']} instances")
        if not targets:
            self.out("  autoscaling: off")
        return endpoint

    def delete(self, name: str, delete_model_data: bool = False, wait: bool = True) -> list[str]:
        """Remove the autoscaling target, endpoint, configs and models (and the S3 archives); returns what went."""
        check_name(name)
        removed: list[str] = []

        def gone(item: str) -> None:
            removed.append(item)
            self.out(f"deleted {item}")

        if self._remove_autoscaling(name):
            gone(f"autoscaling target {_resource_id(name)}")
        endpoint = self._endpoint(name)
        configs = self._own_configs(name)
        if endpoint is not None:
            if endpoint["EndpointConfigName"] not in configs:
                configs.append(endpoint["EndpointConfigName"])
            if wait:
                self.out(f"deleting endpoint {name}; waiting until it is gone")
            self._delete_endpoint(name, wait)
            gone(f"endpoint {name}")
        models = self._own_models(name)
        for config in configs:
            described = self._describe_config(config)
            for variant in (described or {}).get("ProductionVariants", []):
                if variant.get("ModelName") and variant["ModelName"] not in models:
                    models.append(variant["ModelName"])
            if described is not None:
                self.sm.delete_endpoint_config(EndpointConfigName=config)
                gone(f"endpoint config {config}")
        archives = []
        for model in models:
            described = self._describe(self.sm.describe_model, ModelName=model)
            if described is None:
                continue
            archives.append(described.get("PrimaryContainer", {}).get("ModelDataUrl", ""))
            source = described.get("PrimaryContainer", {}).get("ModelDataSource", {}).get("S3DataSource", {})
            if delete_model_data and source.get("S3Uri"):
                self.out(f"kept {source['S3Uri']}: a published root, which other deploys may use "
                         f"(aws s3 rm --recursive removes it)")
            self.sm.delete_model(ModelName=model)
            gone(f"model {model}")
        if delete_model_data:
            for uri in sorted({a for a in archives if a.startswith("s3://")}):
                bucket, _, key = uri[len("s3://"):].partition("/")
                self.s3.delete_object(Bucket=bucket, Key=key)
                gone(uri)
        if not removed:
            self.out(f"nothing named {name} to delete in {self.region}")
        return removed

    def _delete_endpoint(self, name: str, wait: bool) -> None:
        self.sm.delete_endpoint(EndpointName=name)
        if wait:
            self._wait_deleted(name)

    # ---- lookups --------------------------------------------------------------------------------

    def _endpoint(self, name: str) -> dict[str, Any] | None:
        return self._describe(self.sm.describe_endpoint, EndpointName=name)

    def _describe_config(self, config: str) -> dict[str, Any] | None:
        return self._describe(self.sm.describe_endpoint_config, EndpointConfigName=config)

    def _exists(self, call: Callable[..., Any], **kwargs: Any) -> bool:
        return self._describe(call, **kwargs) is not None

    @staticmethod
    def _describe(call: Callable[..., Any], **kwargs: Any) -> dict[str, Any] | None:
        """call(**kwargs), or None when SageMaker says the thing does not exist."""
        from botocore.exceptions import ClientError

        try:
            return call(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in ("ValidationException", "ValidationError") and \
                    re.search(r"could not find|does not exist|not found", error.get("Message", ""), re.I):
                return None
            raise

    def _own_models(self, name: str) -> list[str]:
        pattern = re.compile(re.escape(name) + r"-m-[0-9a-f]{10}")
        found = []
        for page in self.sm.get_paginator("list_models").paginate(NameContains=f"{name}-m-"):
            found += [m["ModelName"] for m in page["Models"] if pattern.fullmatch(m["ModelName"])]
        return sorted(found)

    def _own_configs(self, name: str) -> list[str]:
        pattern = re.compile(re.escape(name) + r"-c-[0-9a-f]{10}")
        found = []
        for page in self.sm.get_paginator("list_endpoint_configs").paginate(NameContains=f"{name}-c-"):
            found += [c["EndpointConfigName"] for c in page["EndpointConfigs"]
                      if pattern.fullmatch(c["EndpointConfigName"])]
        return sorted(found)


def wait_answering(probe: Callable[[], tuple[bool, str]], name: str, timeout_s: float, poll_s: float,
                   out: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep, every_s: float = READY_LINE_EVERY_S) -> str:
    """Call probe() -> (answered, text) until it answers, poll_s apart, for at most timeout_s; print a line with the
    elapsed time and the last answer when the answer changes and at least every every_s. Returns the answer's text;
    DeployError at the timeout."""
    started = clock()
    last_text, last_line = None, None
    while True:
        answered, text = probe()
        now = clock()
        elapsed = now - started
        if answered:
            out(f"  [{elapsed:5.0f} s] {name}: answering: {text}")
            return text
        if text != last_text or now - last_line >= every_s:
            out(f"  [{elapsed:5.0f} s] {name}: InService, not answering yet ({text})")
            last_text, last_line = text, now
        if elapsed >= timeout_s:
            raise DeployError(f"endpoint {name} is InService but did not answer a describe within {timeout_s:.0f} s "
                              f"(last: {text}). The model may still be loading: check again with `python -m "
                              f"compile_scripts.deploy status --name {name}`, or wait longer with --ready-timeout. "
                              f"If it never answers, the reason is in its log in CloudWatch, log group "
                              f"/aws/sagemaker/Endpoints/{name}.")
        sleep(min(poll_s, max(0.0, timeout_s - elapsed)))


_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _resource_id(name: str) -> str:
    return f"endpoint/{name}/variant/{VARIANT}"


def _policy_name(name: str) -> str:
    return f"{name}-invocations-per-instance"


def check_name(name: str) -> None:
    """Refuse a name SageMaker would refuse, before anything is created."""
    if not _NAME.fullmatch(name or ""):
        raise DeployError(f"--name {name!r}: use 1-50 letters, digits and inner hyphens (SageMaker's rule, "
                          f"less the 13 characters of the -m-/-c- suffixes).")


def explain(exc: Exception, region: str | None) -> str:
    """A message that says what went wrong and what to do, for the errors people meet."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ("no AWS credentials found: run `aws configure` (or `aws sso login`), set AWS_PROFILE, or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    if not isinstance(exc, ClientError):
        return f"{type(exc).__name__}: {exc}"
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    operation = getattr(exc, "operation_name", "the call")
    if code == "ResourceLimitExceeded":
        return (f"{operation}: the account's quota does not allow this ({message}). Request an increase of "
                f"'ml.inf2.xlarge for endpoint usage' (or the instance type you chose) for Amazon SageMaker in "
                f"Service Quotas, region {region}; new accounts start at 0. Then run deploy again.")
    if code in ("ValidationException", "ValidationError") and "model data" in message.lower():
        return (f"{operation}: SageMaker cannot read the model archive ({message}); give the role s3:GetObject "
                f"on it, and keep bucket and endpoint in the same region.")
    if code in ("ValidationException", "ValidationError") and re.search(r"\brole\b|assume", message, re.I):
        return (f"{operation}: SageMaker cannot use the role ({message}). --role must be the ARN of an IAM role "
                f"that exists, trusts sagemaker.amazonaws.com, and may read the model archive in S3 and pull "
                f"from ECR; see docs/sagemaker.md, step 0.")
    if code == "NoSuchBucket":
        return f"{operation}: the bucket does not exist ({message}); create it with `aws s3 mb`."
    if code in ("AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
                "ExpiredTokenException"):
        return f"{operation}: AWS refused these credentials ({code}: {message})."
    return f"{operation} failed: {code}: {message}"


_IMAGE_HELP = (f"Default image:\n  ACCOUNT.dkr.ecr.<region>.amazonaws.com/{container.REPOSITORY}:{container.TAG}\n"
               f"AWS's PyTorch Neuron inference container (TorchServe + the SageMaker PyTorch inference toolkit),\n"
               f"with the account AWS lists for the region.")


def build_parser() -> argparse.ArgumentParser:
    """Subcommands deploy, status and delete."""
    parser = argparse.ArgumentParser(prog="python -m compile_scripts.deploy",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n")[0], epilog=_IMAGE_HELP)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="endpoint name (also prefixes its model and config names)")
    common.add_argument("--region", help="AWS region (default: AWS_REGION or the AWS config's)")
    common.add_argument("--endpoint-url", help="send every AWS call here (a moto server in tests); "
                                               "AWS_ENDPOINT_URL also works")
    common.add_argument("--poll", type=float, default=30.0, help="seconds between status checks (default 30)")
    common.add_argument("--timeout", type=float, default=3600.0, help="most seconds to wait (default 3600)")
    runtime = argparse.ArgumentParser(add_help=False)
    runtime.add_argument("--runtime-url", help="send the describe that checks the model answers here (the app's "
                                               "--endpoint-url: a local serving/server.py, a test's stand-in; default: "
                                               "--endpoint-url, else AWS's sagemaker-runtime)")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", parents=[common, runtime], help="upload and create or update the endpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Upload model.tar.gz and create (or update) the endpoint.", epilog=_IMAGE_HELP)
    d.add_argument("--role", required=True, help="ARN of the IAM role SageMaker runs the endpoint as")
    data = d.add_mutually_exclusive_group(required=True)
    data.add_argument("--model-tar", type=Path, help="archive from compile_scripts/package.py, uploaded to --bucket")
    data.add_argument("--model-data", metavar="s3://BUCKET/PREFIX/",
                      help="a root published with compile.py --upload, served as uncompressed model data (no archive; "
                           "the code package goes beside it, under PREFIX/code/)")
    d.add_argument("--bucket", help="S3 bucket for model.tar.gz, in the same region (with --model-tar)")
    d.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help=f"S3 key prefix for model.tar.gz (default {DEFAULT_PREFIX})")
    d.add_argument("--instance-type", default=DEFAULT_INSTANCE, help=f"default {DEFAULT_INSTANCE}")
    d.add_argument("--image-uri", help="container image (default: AWS's PyTorch Neuron inference image for the region)")
    d.add_argument("--min-instances", type=int, default=1, help="instances at start and at least (default 1)")
    d.add_argument("--max-instances", type=int, help="more than --min-instances turns on autoscaling")
    d.add_argument("--target-invocations", type=int, default=DEFAULT_TARGET_INVOCATIONS,
                   help=f"autoscaling target per instance per minute (default {DEFAULT_TARGET_INVOCATIONS})")
    d.add_argument("--volume-size", type=int, default=DEFAULT_VOLUME_GB, help=f"GB (default {DEFAULT_VOLUME_GB})")
    d.add_argument("--startup-timeout", type=int, default=DEFAULT_STARTUP_S,
                   help=f"seconds for download and start before the health check must pass, and for the model "
                        f"to load (default {DEFAULT_STARTUP_S})")
    d.add_argument("--max-queue", type=int, default=container.DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait while one runs; more are answered 503 at once "
                        f"(default {container.DEFAULT_MAX_QUEUE})")
    d.add_argument("--neuron-parallel", choices=("unet", "pipeline"), default="unet",
                   help="unet: one TorchServe worker runs the UNet across both NeuronCores (CFG roots); pipeline: "
                        "one worker per NeuronCore, two requests at once (roots compiled with --no-cfg)")
    d.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")
    d.add_argument("--no-wait-ready", action="store_true",
                   help="stop at InService, without waiting until the model answers a describe (for a control plane "
                        "with no runtime behind it, such as moto's)")
    d.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S,
                   help=f"most seconds to wait, after InService, until the model answers (default "
                        f"{DEFAULT_READY_TIMEOUT_S})")
    sub.add_parser("status", parents=[common, runtime],
                   help="show the endpoint's state, and whether its model answers yet")
    x = sub.add_parser("delete", parents=[common], help="delete the endpoint, its configs, models and autoscaling")
    x.add_argument("--delete-model-data", action="store_true", help="also delete the uploaded model.tar.gz files")
    x.add_argument("--no-wait", action="store_true", help="do not wait for the endpoint to be gone")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit status 0 on success, 1 on an AWS or usage error, 3 for status of nothing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "deploy" and args.model_tar is not None and not args.bucket:
        parser.error("--model-tar needs --bucket: the S3 bucket the archive is uploaded to")
    if args.command == "deploy" and args.model_data and args.bucket:
        parser.error("--bucket is for --model-tar; --model-data names its bucket itself")
    region = args.region
    try:
        if args.command == "deploy" and args.image_uri:
            container.check_image(args.image_uri)  # before any AWS call
        deployer = Deployer(args.region, args.endpoint_url, poll_s=args.poll, timeout_s=args.timeout,
                            runtime_url=getattr(args, "runtime_url", None))
        region = deployer.region
        if args.command == "deploy":
            plan = Plan(name=args.name, role=args.role, bucket=args.bucket, model_tar=args.model_tar,
                        model_data=args.model_data, prefix=args.prefix, instance_type=args.instance_type,
                        image_uri=args.image_uri,
                        min_instances=args.min_instances,
                        max_instances=args.max_instances if args.max_instances is not None else args.min_instances,
                        target_invocations=args.target_invocations, volume_gb=args.volume_size,
                        startup_timeout_s=args.startup_timeout, max_queue=args.max_queue,
                        neuron_parallel=args.neuron_parallel, wait=not args.no_wait,
                        wait_ready=not args.no_wait_ready, ready_timeout_s=args.ready_timeout)
            deployer.deploy(plan)
        elif args.command == "status":
            return 0 if deployer.status(args.name) is not None else 3
        else:
            deployer.delete(args.name, args.delete_model_data, wait=not args.no_wait)
    except (DeployError, container.ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - botocore errors become one readable line
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, (BotoCoreError, ClientError)):
            raise
        print(f"error: {explain(exc, region)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
