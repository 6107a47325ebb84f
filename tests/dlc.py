"""model.tar.gz served here the way AWS's PyTorch Neuron inference container serves it.

The real thing: the archive from compile_scripts/package.py, unpacked as SageMaker unpacks it into
/opt/ml/model (under a test folder, through the toolkit's SAGEMAKER_BASE_DIR); the SageMaker
PyTorch inference toolkit and TorchServe at the image's versions (requirements-dev.txt), started
as the image's entrypoint starts them for SageMaker's `serve` (aws-neuron/deep-learning-containers,
common/neuron-entrypoint.py: `sagemaker_pytorch_serving_container.serving.main()`); and the
environment compile_scripts/deploy.py gives the container (compile_scripts/container.py).

What differs, and why:
- the toolkit writes TorchServe's config to /etc/sagemaker-ts.properties, a constant of
  sagemaker_pytorch_serving_container/torchserve.py that no variable moves; the launcher below sets
  that constant to a file in the test's folder, so a test writes nothing outside its folder;
- TorchServe's metrics and gRPC listeners (fixed 8082, 7070 and 7071 by default) move to free ports
  through its TS_* variables, and TMPDIR keeps its pid file private, so runs do not collide;
- the Python is this environment's, and the compiled root is traced for the CPU, not for Neuron.
One at a time per machine: the toolkit looks for TorchServe among all processes and gives up when it
finds two ("multiple ts model servers are not supported").

SageMakerFrontEnd stands in for SageMaker's runtime in front of the container, which cannot exist
here: serving/server.py's runtime route (POST /endpoints/NAME/invocations, AWS's ModelError shape
for a container's 4xx/5xx) with each invocation sent on to the container's POST /invocations,
keeping only the headers InvokeEndpoint carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import psutil

from benchmarks.procs import free_port
from serving.handler import Response, header
from serving.server import EndpointServer

TS_NAMESPACE = "org.pytorch.serve.ModelServer"  # what the toolkit looks for in the Java process's command line
LAUNCHER = """
import sys
from sagemaker_pytorch_serving_container import serving, torchserve
torchserve.TS_CONFIG_FILE = sys.argv[1]  # instead of /etc/sagemaker-ts.properties (see tests/dlc.py)
serving.main()
"""
# What InvokeEndpoint sends on to the container, and what it gives back (botocore's sagemaker-runtime model).
REQUEST_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
RESPONSE_HEADERS = ("content-type", "x-amzn-sagemaker-custom-attributes")


@dataclasses.dataclass
class Container:
    """A running toolkit + TorchServe: its URL, the model folder, the log, and the processes."""

    url: str
    model_dir: Path
    log_path: Path
    launcher: subprocess.Popen
    java_pid: int

    def log(self) -> str:
        """Everything the launcher, TorchServe and its worker have printed so far."""
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str):
        """GET a JSON answer (TorchServe's management API shares the inference port here, as on SageMaker)."""
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def invoke(self, body: bytes, headers: Mapping[str, str] | None = None, timeout: float = 120) -> Response:
        """POST /invocations as SageMaker does; returns status, headers and body."""
        host, port = urlsplit(self.url).hostname, urlsplit(self.url).port
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("POST", "/invocations", body=body, headers=dict(headers or {}))
            answer = conn.getresponse()
            data = answer.read()
            return Response(answer.status, {k: v for k, v in answer.getheaders()}, data)
        finally:
            conn.close()


@contextlib.contextmanager
def run_container(model_tar: Path, workdir: Path, environment: Mapping[str, str],
                  timeout: float = 240.0) -> Iterator[Container]:
    """Unpack model_tar as SageMaker does (or copy a folder holding an S3 prefix's files, as SageMaker copies
    uncompressed model data), start the toolkit, wait until the model answers; stop it all after."""
    model_dir = workdir / "ml" / "model"
    if model_tar.is_dir():
        shutil.copytree(model_tar, model_dir)
    else:
        model_dir.mkdir(parents=True)
        with tarfile.open(model_tar) as tar:
            tar.extractall(model_dir, filter="data")
    (workdir / "tmp").mkdir()
    (workdir / "logs").mkdir()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update({
        # `torchserve` is a script beside this Python, as on the image's PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "SAGEMAKER_BASE_DIR": str(workdir / "ml"),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{free_port()}",
        "TS_GRPC_INFERENCE_PORT": str(free_port()),
        "TS_GRPC_MANAGEMENT_PORT": str(free_port()),
        "TMPDIR": str(workdir / "tmp"),
        "TEMP": str(workdir / "tmp"),  # the image sets TEMP; torchserve gives it to Java as java.io.tmpdir
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        "PYTHONUNBUFFERED": "1",
        **environment,
    })
    log_path = workdir / "container.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(workdir / "sagemaker-ts.properties")],
                                    cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        java_pid = None
        try:
            java_pid = _wait_for_java(workdir, launcher, timeout)
            _wait_for_model(url, launcher, log_path, timeout)
            yield Container(url, model_dir, log_path, launcher, java_pid)
        finally:
            _stop(launcher, java_pid if java_pid is not None else _find_java(workdir))


def _wait_for_java(workdir: Path, launcher: subprocess.Popen, timeout: float) -> int:
    """TorchServe's Java frontend's pid, from the pid file `torchserve --start` writes in TMPDIR."""
    pid_file = workdir / "tmp" / ".model_server.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_file.is_file() and pid_file.read_text().strip():
            return int(pid_file.read_text().split()[0])
        if launcher.poll() is not None:
            raise RuntimeError(f"the toolkit exited with {launcher.returncode} before TorchServe started; "
                               f"see {workdir / 'container.log'}")
        time.sleep(0.2)
    raise TimeoutError(f"TorchServe did not start within {timeout} s; see {workdir / 'container.log'}")


def _wait_for_model(url: str, launcher: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Wait until a describe request is answered. TorchServe 0.11 answers /ping before its worker has
    loaded the model; a request sent meanwhile waits in its queue until the model is up."""
    deadline = time.monotonic() + timeout
    describe = json.dumps({"describe": True}).encode()
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"the toolkit exited with {launcher.returncode}; see {log_path}")
        request = urllib.request.Request(url + "/invocations", data=describe, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:  # 503: no worker yet
                raise RuntimeError(f"describe answered {exc.code}: {exc.read()[:500]!r}; see {log_path}") from None
        except OSError:
            pass  # not listening yet
        time.sleep(0.3)
    raise TimeoutError(f"the model did not answer within {timeout} s; see {log_path}")


def _find_java(workdir: Path) -> int | None:
    """The TorchServe frontend started in workdir, if any (when the pid file was not written)."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if TS_NAMESPACE in (process.info["cmdline"] or []) and process.info["cwd"] == str(workdir):
            return process.pid
    return None


def _stop(launcher: subprocess.Popen, java_pid: int | None) -> None:
    """Stop TorchServe's Java frontend (it outlives the launcher), its workers and the launcher; check none is left."""
    left: list[psutil.Process] = []
    if java_pid is not None and psutil.pid_exists(java_pid):
        java = psutil.Process(java_pid)
        workers = java.children(recursive=True)
        java.send_signal(signal.SIGTERM)  # TorchServe's shutdown hook stops its workers
        _, alive = psutil.wait_procs([java, *workers], timeout=20)
        for process in alive:
            process.kill()
        _, left = psutil.wait_procs(alive, timeout=5)
    # The launcher waits on the Java process and returns when it is gone.
    try:
        launcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
    if left:
        raise RuntimeError(f"processes left after stopping TorchServe: {[p.pid for p in left]}")


class _Forward:
    """Sends an invocation on to the container's POST /invocations, as SageMaker's front end does."""

    def __init__(self, container_url: str):
        self.container_url = container_url

    def handle(self, body: bytes, headers: Mapping[str, str]) -> Response:
        """The container's answer, with the headers InvokeEndpoint returns."""
        kept = {name: header(headers, name) for name in REQUEST_HEADERS if header(headers, name) is not None}
        parts = urlsplit(self.container_url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            conn.request("POST", "/invocations", body=body, headers=kept)
            answer = conn.getresponse()
            data = answer.read()
            returned = {name: value for name, value in answer.getheaders() if name.lower() in RESPONSE_HEADERS}
            return Response(answer.status, returned, data)
        finally:
            conn.close()


@contextlib.contextmanager
def sagemaker_front_end(container_url: str, endpoint_name: str, region: str) -> Iterator[str]:
    """The stand-in for SageMaker's runtime API in front of the container; yields its URL for boto3."""
    server = EndpointServer(("127.0.0.1", free_port()), _Forward(container_url), endpoint_name, region)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
