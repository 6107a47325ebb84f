"""The endpoint's container: AWS's PyTorch Neuron inference image per region, and its environment.

The image runs TorchServe 0.11.0 through the SageMaker PyTorch inference toolkit
(sagemaker-pytorch-inference 2.0.25) on Python 3.12, with torch-neuronx for torch 2.9 and Neuron
SDK 2.31.1: the newest build of torch-neuronx's XLA line, and the last SDK with this container (backend/neuron/
stack.py says why, with its sources). Compile with that SDK (requirements-neuron.txt, docs/neuron.md):
a Neuron graph loads only under the runtime line that compiled it. The image's name lives with the rest
of that stack, in backend/neuron/stack.py. Sources, in AWS's repositories:
- tag: aws/deep-learning-containers, docs/src/data/pytorch-inference-neuronx/2.9-neuronx-sdk2.31.1.yml;
- contents: aws-neuron/deep-learning-containers, pytorch/inference/2.9.0/Dockerfile.neuronx at tag
  2.31.1 (TORCHSERVE_VERSION, SM_TOOLKIT_VERSION, PYTHON_VERSION, NEURONX_FRAMEWORK_VERSION; its
  entrypoint, common/neuron-entrypoint.py, runs `sagemaker_pytorch_serving_container.serving.main()`
  for SageMaker's `serve`);
- ECR accounts: aws/deep-learning-containers, docs/reference/region_availability.md.
"""

from __future__ import annotations

from backend.neuron.stack import DLC_IMAGE
from backend.sagemaker.protocol import MAX_REQUEST_BYTES

REPOSITORY, TAG = DLC_IMAGE.split(":")  # pytorch-inference-neuronx, 2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04

# Deep Learning Containers' ECR account by region (docs/reference/region_availability.md above).
# A region missing here is refused rather than guessed: pass --image-uri there.
DLC_ACCOUNTS = {
    "us-east-1": "763104351884", "us-east-2": "763104351884", "us-west-1": "763104351884",
    "us-west-2": "763104351884", "af-south-1": "626614931356", "ap-east-1": "871362719292",
    "ap-east-2": "975050140332", "ap-south-1": "763104351884", "ap-south-2": "772153158452",
    "ap-southeast-1": "763104351884", "ap-southeast-2": "763104351884", "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322", "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437", "ap-northeast-1": "763104351884", "ap-northeast-2": "763104351884",
    "ap-northeast-3": "364406365360", "ca-central-1": "763104351884", "ca-west-1": "204538143572",
    "eu-central-1": "763104351884", "eu-central-2": "380420809688", "eu-west-1": "763104351884",
    "eu-west-2": "763104351884", "eu-west-3": "763104351884", "eu-south-1": "692866216735",
    "eu-south-2": "503227376785", "eu-north-1": "763104351884", "il-central-1": "780543022126",
    "mx-central-1": "637423239942", "me-south-1": "217643126080", "me-central-1": "914824155844",
    "sa-east-1": "763104351884", "cn-north-1": "727897471807", "cn-northwest-1": "727897471807",
}

# Requests that may wait in TorchServe's queue while one runs; more get its 503 at once. Nine 512x512
# images of 20 steps (about 1 s each on inf2.xlarge in bf16: the walk-through's figure, docs/neuron.md)
# stay well inside SageMaker's 60 s; so do nine of 50 steps.
DEFAULT_MAX_QUEUE = 8
# The largest request body TorchServe takes. Its own default (max_request_size 6553500 bytes in
# ConfigManager of TorchServe 0.11.0; neither the toolkit's default-ts.properties nor the image sets it)
# is only just above SageMaker's 6 MB (6291456 bytes, backend/sagemaker/protocol.py), and a body over it gets
# Netty's bare 413 before this project's code sees it. Set here explicitly, with room: SageMaker itself
# refuses anything over 6 MB, and a body over protocol.MAX_REQUEST_BYTES that does arrive (a local
# caller) gets the handler's own 413 naming the limit.
MAX_REQUEST_SIZE = MAX_REQUEST_BYTES + 1024 * 1024


class ImageError(ValueError):
    """An image that cannot serve this endpoint, or a region without a known image."""


def default_image(region: str) -> str:
    """AWS's PyTorch Neuron inference image in a region's ECR."""
    account = DLC_ACCOUNTS.get(region)
    if account is None:
        raise ImageError(f"no known Deep Learning Containers account for region {region!r}; pass --image-uri "
                         f"ACCOUNT.dkr.ecr.{region}.amazonaws.com/{REPOSITORY}:{TAG} with the account AWS lists for "
                         f"{region} (aws/deep-learning-containers, docs/reference/region_availability.md).")
    host = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{host}/{REPOSITORY}:{TAG}"


def check_image(image_uri: str) -> None:
    """Refuse an image known not to serve model.tar.gz from compile_scripts/package.py."""
    if "djl-inference" in image_uri:
        raise ImageError(
            f"--image-uri {image_uri}: a DJL-Serving image cannot serve this endpoint. DJL-Serving dropped Neuron "
            f"in late 2025; its last neuronx image (djl-inference:0.30.0-neuronx-sdk2.20.1) has Python 3.10 and "
            f"torch-neuronx for torch 2.1, and this code needs Python 3.11+ and the torch 2.9 line, packaged for "
            f"the SageMaker PyTorch inference toolkit. Leave out --image-uri to use {REPOSITORY}:{TAG}.")


# --neuron-parallel pipeline's workers: one per NeuronCore of inf2.xlarge / inf2.8xlarge's one chip.
PIPELINE_WORKERS = 2


def environment(max_queue: int = DEFAULT_MAX_QUEUE, response_timeout_s: int = 1800,
                neuron_parallel: str = "unet") -> dict[str, str]:
    """The container's environment: one TorchServe worker owning the whole chip (--neuron-parallel unet) or one
    worker per NeuronCore (pipeline), a bounded queue, and requests up to SageMaker's 6 MB."""
    env = {
        # unet: one worker process, which loads the UNet on both NeuronCores and runs it data-parallel.
        # Unset, TorchServe starts one worker per vCPU (ConfigManager.getDefaultWorkers in
        # pytorch/serve), each trying to claim the chip. The toolkit writes this as
        # default_workers_per_model (sagemaker_inference/environment.py, .../torchserve.py).
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        # TorchServe's job queue (default 100): a request beyond it gets a 503 at once instead of
        # SageMaker's 60 s timeout. The toolkit's default-ts.properties sets enable_envvars_config=true,
        # so TorchServe reads TS_<FIELD> variables over its config (ConfigManager.setSystemVars).
        "TS_JOB_QUEUE_SIZE": str(max_queue),
        # How long TorchServe 0.11 waits for the worker, for a request and also for the model load
        # (WorkerThread.run), which takes minutes for compiled graphs; past it, the worker is killed and
        # started again. The toolkit's SAGEMAKER_MODEL_SERVER_TIMEOUT cannot set it: 2.0.25 appends
        # default_response_timeout to default-ts.properties, whose last line has no newline, so the
        # setting becomes part of `enable_model_api`'s value and TorchServe keeps its 120 s.
        "TS_DEFAULT_RESPONSE_TIMEOUT": str(response_timeout_s),
        # Requests with an input image are up to SageMaker's 6 MB (MAX_REQUEST_SIZE above).
        "TS_MAX_REQUEST_SIZE": str(MAX_REQUEST_SIZE),
    }
    if neuron_parallel == "pipeline":
        # A TorchServe worker takes one request at a time, so two at once means two workers. Each is its own
        # process, and NEURON_RT_NUM_CORES=1 makes the runtime give each process one NeuronCore of its own:
        # aws-neuron-sdk's "NeuronCore Allocation and Model Placement for Inference (torch-neuronx)" advises, for
        # applications using multiple processes, default placement with NEURON_RT_NUM_CORES. Each worker then sees
        # one core and serves one whole pipeline on it (SD_NEURON_PARALLEL, read by serving/inference.py's
        # Settings). The root must be compiled with --no-cfg (the backend refuses pipeline mode otherwise).
        env.update({"SAGEMAKER_MODEL_SERVER_WORKERS": str(PIPELINE_WORKERS), "NEURON_RT_NUM_CORES": "1",
                    "SD_NEURON_PARALLEL": "pipeline"})
    return env
