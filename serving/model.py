"""DJL-Serving entry point (serving.properties: engine=Python, option.entryPoint=model.py).

compile_scripts/package.py puts this file at the top of model.tar.gz as `model.py`, beside the
`backend` and `serving` packages; DJL imports it from the model directory and calls
`handle(inputs)` for every request. Its first call is a warm-up with an empty input that carries
the model's properties: that call builds the backend (so the endpoint is healthy only once the
model is loaded) and returns None.

Settings come from serving.properties options (`option.sd_backend=neuron` arrives here as
`sd_backend`), falling back to the SD_* environment variables the app reads:
  sd_backend    neuron | local (default: neuron when the model root has compiled_models/, else local)
  sd_artifacts  the compiled root, relative to the model directory (package.py --artifacts puts it
                there under its own folder name); `option.model_id=s3://...` instead is downloaded
                by DJL, which then passes the local folder as `model_id`
  sd_model      local backend: a diffusers folder, Hub id or `tiny`
  sd_device, sd_max_images, sd_max_queue, sd_png_level
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("serving.model")

_handler = None  # one per DJL worker process, built by the warm-up call


def handle(inputs: Any) -> Any:
    """DJL's entry point: warm-up (empty input) loads the model and returns None; else one answer."""
    global _handler
    if _handler is None:
        _handler = load(inputs.get_properties())
    if inputs.is_empty():
        return None
    return answer(_handler, inputs)


def load(properties: Mapping[str, str], env: Mapping[str, str] | None = None):
    """Build the Handler the model properties ask for."""
    from serving.handler import DEFAULT_MAX_WAITING, DEFAULT_PNG_LEVEL, Handler

    settings = settings_from_properties(properties, env)
    log.info("loading backend %s (model %s, artifacts %s)", settings.backend, settings.model, settings.artifacts)
    max_waiting = int(_option(properties, env, "max_queue") or DEFAULT_MAX_WAITING)
    png_level = int(_option(properties, env, "png_level") or DEFAULT_PNG_LEVEL)
    return Handler.from_settings(settings, max_waiting=max_waiting, png_level=png_level)


def answer(handler, inputs: Any) -> Any:
    """Run one request through the handler and wrap its answer in a djl_python Output."""
    from djl_python import Output

    from backend import protocol

    properties = inputs.get_properties()
    response = handler.handle(inputs.get_as_bytes(), properties)
    out = Output()
    if response.status >= 400:
        kind, text = protocol.parse_error(response.body)
        # Output.error writes {"code", "message", "error"}: the wire format's error shape.
        return out.error(text, code=response.status, message=kind or "Error")
    for key, value in response.headers.items():
        # DJL copies Output properties into the HTTP response headers.
        out.add_property(key.lower() if key == "Content-Type" else key, value)
    out.add(response.body)
    return out


def settings_from_properties(properties: Mapping[str, str], env: Mapping[str, str] | None = None):
    """Settings for the backend from DJL model properties, then SD_* variables."""
    from backend import BackendUnavailable, Settings

    model_dir = Path(properties.get("model_dir") or ".")
    model_id = properties.get("model_id") or ""
    artifacts = _option(properties, env, "artifacts")
    if model_id.startswith("s3://"):
        raise BackendUnavailable(f"option.model_id={model_id} was not downloaded by DJL-Serving; "
                                 f"check the endpoint role's S3 read access and the DJL image version.")
    if model_id and Path(model_id).is_dir():
        root = Path(model_id)
    elif artifacts:
        root = model_dir / artifacts
    else:
        root = model_dir
    backend = _option(properties, env, "backend") or ("neuron" if (root / "compiled_models").is_dir() else "local")
    model = _option(properties, env, "model")
    if backend == "local" and not model and (root / "model_index.json").is_file():
        model = str(root)
    return Settings(
        backend=backend,
        model=model,
        artifacts=str(root) if backend == "neuron" else None,
        device=_option(properties, env, "device") or "auto",
        max_images=int(_option(properties, env, "max_images") or 4),
    )


def _option(properties: Mapping[str, str], env: Mapping[str, str] | None, name: str) -> str | None:
    env = os.environ if env is None else env
    return properties.get(f"sd_{name}") or env.get(f"SD_{name.upper()}") or None
