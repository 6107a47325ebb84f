"""The endpoint's entry point under the SageMaker PyTorch inference toolkit: `code/inference.py`.

AWS's PyTorch Neuron inference container (compile_scripts/deploy.py names it) starts TorchServe
through the toolkit (sagemaker-pytorch-inference). TorchServe's one worker imports this module from
/opt/ml/model/code, calls `model_fn` once, then for each request `input_fn`, `predict_fn` and
`output_fn` (sagemaker_inference/transformer.py, `Transformer._default_transform_fn`). The work is
all serving/handler.py's `Handler.handle`, which serves serving/server.py too, so the endpoint
answers alike under both; these functions only carry bytes and headers in and out:

  model_fn    builds the Handler from code/endpoint.json (package.py writes it) and SD_* variables
  input_fn    keeps the body and the request's own headers: the toolkit's `accept` argument has
              already turned a missing Accept into application/json, where the wire format's
              default is a PNG
  predict_fn  Handler.handle, which never raises
  output_fn   puts the answer's status and headers on TorchServe's context

None of them raises for a bad or failed request: the toolkit answers an exception with its
message followed by the traceback (`Transformer.handle_error`), which is neither the wire
format's error shape nor fit to show a caller.

endpoint.json keys (any of Settings' fields, backend/core/settings.py, and model_s3_uri), read through Settings
as the app's flags are, each overridden by its SD_* variable (SD_BACKEND, SD_MODEL, ...):
  backend       neuron | local (default: neuron when the compiled root has compiled_models/)
  artifacts     the compiled root's folder, beside code/ in model.tar.gz (or an s3:// / hf:// root)
  model_s3_uri  an s3:// folder holding the compiled root instead (read as artifacts; SD_ARTIFACTS overrides it),
                downloaded here at start and verified against its file index (backend/neuron/root_store.py);
                none of the two: the root is the model folder itself (an uncompressed deploy,
                compile_scripts/deploy.py --model-data)
  model         local backend: a diffusers folder beside code/, a Hub id, or `tiny`
  png_level     zlib level of the PNGs answered
  sizes         neuron: the compiled sizes to load ("512x512,768x512"; default every size in the root)
  device_memory_gib  neuron: one Inferentia2 chip's memory the sizes are checked against (default 32)
  neuron_parallel  neuron: unet (default) or pipeline; container.environment sets SD_NEURON_PARALLEL=pipeline
                with one TorchServe worker per NeuronCore (deploy.py --neuron-parallel pipeline)
"""

from __future__ import annotations

import dataclasses
import http
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if not __package__:
    # Imported as the toolkit's top-level `inference`, from code/. TorchServe puts the handler's own
    # folder first on the worker's PYTHONPATH (EnvironmentUtils.java in pytorch/serve), and the
    # toolkit's folder holds a serving.py that would shadow this project's serving package.
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import backend  # noqa: E402 - after the path fix above
from backend.neuron import preflight  # noqa: E402
from backend.neuron.root_store import fetch, is_remote  # noqa: E402
from serving.handler import DEFAULT_PNG_LEVEL, Handler, Response  # noqa: E402

log = logging.getLogger("serving.inference")

CONFIG_FILE = "endpoint.json"  # in code/, beside this file
SETTINGS_KEYS = tuple(f.name for f in dataclasses.fields(backend.Settings))
CONFIG_KEYS = ("model_s3_uri", *SETTINGS_KEYS)  # endpoint.json: any setting, and the root as an S3 folder


@dataclass
class Invocation:
    """One request as the toolkit hands it over: the body and the caller's headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def model_fn(model_dir: str) -> Handler:
    """Build the Handler (the toolkit's "model") once per worker."""
    model_dir_path = Path(model_dir)
    config = read_config(model_dir_path / "code" / CONFIG_FILE)
    settings = settings_from_config(model_dir_path, config, os.environ)
    log.info("loading backend %s (model %s, artifacts %s) with the code in %s", settings.backend, settings.model,
             settings.artifacts, Path(backend.__file__).parent.parent)
    if settings.backend == "neuron":
        preflight_at_start(Path(settings.artifacts), settings.neuron_cores)
    return Handler.from_settings(settings, png_level=settings.png_level)


def preflight_at_start(root: Path, neuron_cores: int | None = None) -> None:
    """The doctor's checks (compile_scripts/doctor.py) in the endpoint's log, each problem with what to do;
    BackendUnavailable on an error, so the endpoint fails at start with that message instead of at the
    first request. No smoke generation here: the backend warms up each precision as it loads."""
    findings = preflight.check(root, smoke=False, neuron_cores=neuron_cores)
    levels = {"ok": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
    for finding in findings:
        log.log(levels[finding.level], "preflight %s: %s%s", finding.level, finding.what,
                f" -> {finding.fix}" if finding.fix else "")
    if preflight.failed(findings):
        errors = [f"{f.what} ({f.fix})" if f.fix else f.what for f in findings if f.level == "error"]
        raise backend.BackendUnavailable("preflight failed: " + "; ".join(errors))


def input_fn(input_data: bytes | str, content_type: str | None, context: Any = None) -> Invocation:
    """Keep the body as bytes and the request's headers as the caller sent them."""
    # The toolkit decodes application/json bodies to str; this gives back the bytes it decoded.
    body = input_data.encode("utf-8") if isinstance(input_data, str) else bytes(input_data or b"")
    headers: dict[str, str] = {}
    if context is not None:
        # TorchServe's RequestProcessor: the HTTP headers, plus the body's own entry (a dict).
        properties = context.request_processor[0].get_request_properties()
        headers = {key: value for key, value in properties.items() if isinstance(value, str)}
    if content_type and not any(key.lower() == "content-type" for key in headers):
        headers["Content-Type"] = content_type
    return Invocation(body, headers)


def predict_fn(invocation: Invocation, handler: Handler) -> Response:
    """Answer the request: generation, describe or an error, as the wire format says."""
    return handler.handle(invocation.body, invocation.headers)


def output_fn(response: Response, accept: str | None, context: Any = None) -> tuple[bytes, str]:
    """Set the answer's status and headers on TorchServe's context; return (body, content type)."""
    if context is not None:
        context.set_response_status(code=response.status, phrase=http.HTTPStatus(response.status).phrase)
        for key, value in response.headers.items():
            if key.lower() != "content-type":  # the toolkit sets it from the tuple returned here
                context.set_response_header(0, key, value)
    return response.body, response.content_type


def read_config(path: Path) -> dict[str, Any]:
    """endpoint.json's values (package.py writes it; none when it is absent); ValueError naming an unknown key."""
    config = json.loads(path.read_text()) if path.is_file() else {}
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(CONFIG_KEYS)}")
    return config


def settings_from_config(model_dir: Path, config: Mapping[str, Any], env: Mapping[str, str] | None = None
                         ) -> backend.Settings:
    """Settings for the backend, through Settings like every other entry point: endpoint.json's values stand where
    the app's defaults do, and SD_* variables (the container's environment) win over them. Then the paths are made
    the endpoint's: the compiled root beside code/, downloaded from S3 or the Hub, or the model dir itself."""
    env = os.environ if env is None else env
    # model_s3_uri is the compiled root as a published one: Settings reads it as --artifacts (SD_ARTIFACTS wins).
    values = {**config, "artifacts": config.get("model_s3_uri") or config.get("artifacts")}
    values.setdefault("png_level", DEFAULT_PNG_LEVEL)
    layered = {f"SD_{key.upper()}": str(value) for key, value in values.items()
               if key in SETTINGS_KEYS and value is not None}
    settings = backend.Settings.from_args([], env={**layered, **env}, prog="serving/inference.py")
    if is_remote(settings.artifacts):
        # Beside code/, named after the root, verified against its index (backend/neuron/root_store.py); an hf://
        # root stays in the Hub's cache.
        uri = str(settings.artifacts)
        root = fetch(uri, model_dir / Path(uri.rstrip("/")).name.partition("@")[0])
    elif settings.artifacts:
        root = model_dir / settings.artifacts
    else:
        root = model_dir
    backend_name = settings.backend if settings.backend != "auto" else (
        "neuron" if (root / "compiled_models").is_dir() else "local")
    model = settings.model
    if backend_name == "local" and not model and (root / "model_index.json").is_file():
        model = str(root)
    elif backend_name == "local" and model and (model_dir / model).is_dir():
        model = str(model_dir / model)  # a diffusers folder inside the archive
    return settings.replace(backend=backend_name, model=model,
                            artifacts=str(root) if backend_name == "neuron" else None)
