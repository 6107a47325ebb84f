"""Preflight for the neuron backend: can this machine serve a compiled root, and what to do if not.

`check(root)` returns findings, each with a level (ok, warning, error), what was found, and what to
do about it. `python -m compile_scripts.doctor --artifacts ROOT` prints them; an endpoint can call
check() at start and refuse to serve on an error. The checks, in order:

1. Python and the packages against the supported Neuron stack (backend/stack.py) and
   against the versions each manifest recorded (Neuron parts only; CPU parts need neither).
2. NeuronCores: a Neuron device (/dev/neuron*) and the cores NEURON_RT_VISIBLE_CORES leaves visible.
3. Host memory, for compiling the UNet here.
4. Each compiled part of each size: present, a readable archive, its input shapes and dtypes, its bytes;
   and what each size costs in device memory (estimated from the part files, as the backend checks).
5. One smoke generation (1 step) per compiled precision and size, with its timings.

This module imports nothing heavy at import time (compile.py imports its host helpers).
"""

from __future__ import annotations

import os
import platform
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..core.api import GenerationRequest
from ..core.errors import BackendError, BackendUnavailable
from ..core.settings import NeuronSettings
from . import stack
from .host import MIN_UNET_MEMORY_GB, host_memory_gb, neuron_core_ids, neuron_devices
from .parts import SHARED_PARTS, SIZE_PARTS, size_key
from .root_format import common_sizes, compile_hint, dtype_name, memory_estimate, read_root

LEVELS = ("ok", "warning", "error")
SMOKE_PROMPT = "a lovely cat"


@dataclass(frozen=True)
class Finding:
    """One result of a check: its level, what was found, and what to do (empty when nothing is to be done)."""

    level: str
    what: str
    fix: str = ""

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r}: use one of {', '.join(LEVELS)}")


def failed(findings: list[Finding]) -> bool:
    """True when any finding is an error."""
    return any(f.level == "error" for f in findings)


def check(root: Path | str, *, smoke: bool = True, neuron_cores: int | None = None) -> list[Finding]:
    """Every check against a compiled root, in order; the smoke generation runs only when nothing failed before it.

    neuron_cores: the backend's --neuron-cores (None: as many as the runtime shows, at most two)."""
    root = Path(root).expanduser()
    findings: list[Finding] = []
    try:
        sets = read_root(root)
    except BackendUnavailable as exc:
        sets = []
        findings.append(Finding("error", f"compiled root {root}: {exc}", "Fix the root as the message says, then run "
                                "the doctor again."))
    target = sets[0].target if sets else None
    findings += check_python(target)
    findings += check_packages(target)
    if target == "neuron":
        findings += check_neuron_cores(neuron_cores=neuron_cores)
    findings += check_memory()
    for art in sets:
        findings += [Finding("warning", w) for w in art.warnings]  # each says what to do, if anything
        findings += check_parts(root, art)
    if sets:
        findings += check_sizes(sets)
    if smoke and sets and not failed(findings):
        findings += smoke_generation(root, neuron_cores)
    return findings


# --- versions ------------------------------------------------------------------------------------


def check_python(target: str | None) -> list[Finding]:
    """The Python version against the Neuron wheels' (3.11-3.13)."""
    version = ".".join(platform.python_version_tuple()[:2])
    supported = stack.PYTHONS
    if version in supported:
        return [Finding("ok", f"Python {platform.python_version()} (the Neuron wheels support {', '.join(supported)})")]
    if target == "neuron":
        return [Finding("error", f"Python {platform.python_version()}: torch-neuronx and neuronx-cc have wheels for "
                        f"Python {', '.join(supported)} only",
                        "Create the environment with python3.12 (the endpoint container's Python): python3.12 -m venv "
                        ".venv-neuron && . .venv-neuron/bin/activate && pip install -r requirements-neuron.txt")]
    return [Finding("warning", f"Python {platform.python_version()}: fine for CPU parts, but the Neuron wheels support "
                    f"Python {', '.join(supported)} only", "Use Python 3.12 on inf2 (requirements-neuron.txt).")]


def installed(name: str) -> str | None:
    """The installed version of a distribution without its local label, None if absent."""
    try:
        return stack.public_version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def check_packages(target: str | None) -> list[Finding]:
    """torch, torch-neuronx, neuronx-cc and numpy against the supported stack (Neuron parts only)."""
    if target != "neuron":
        return [Finding("ok", f"packages: CPU parts need only this project's requirements (torch "
                        f"{installed('torch')}); Neuron parts need {stack.describe()}")]
    findings = []
    install = "pip install -r requirements-neuron.txt in a fresh virtual environment (docs/neuron.md)"
    for name, pinned in stack.PACKAGES.items():
        have = installed(name)
        if have == pinned:
            findings.append(Finding("ok", f"{name} {have} (Neuron SDK {stack.NEURON_SDK})"))
        elif have is None:
            findings.append(Finding("error", f"{name} is not installed; the supported stack has {name} {pinned}",
                                    install))
        elif name in ("torch", "torch-neuronx") and stack.torch_line(have) != stack.torch_line(pinned):
            findings.append(Finding("error", f"{name} {have} is of the torch {stack.torch_line(have)} line; the "
                            f"supported stack has {name} {pinned} (torch {stack.torch_line(pinned)})", install))
        else:
            findings.append(Finding("warning", f"{name} {have}; the supported stack (Neuron SDK "
                            f"{stack.NEURON_SDK}) has {name} {pinned}", install))
    return findings


# --- the machine ---------------------------------------------------------------------------------


def check_neuron_cores(env: dict[str, str] | None = None, neuron_cores: int | None = None) -> list[Finding]:
    """A Neuron device, and the NeuronCores the UNet will run on (env: the Neuron runtime's variables)."""
    devices = neuron_devices()
    if not devices:
        return [Finding("error", "no Neuron device (/dev/neuron*) on this machine, and the parts were compiled for "
                        "Neuron",
                        "Run on an inf2 instance with the Neuron driver (aws-neuronx-dkms, docs/neuron.md); in a "
                        "container, pass the device: docker run --device=/dev/neuron0 ...")]
    env = os.environ if env is None else env
    try:
        cores = neuron_core_ids(neuron_cores, env)
    except ValueError:
        return [Finding("error", f"NEURON_RT_VISIBLE_CORES={env.get('NEURON_RT_VISIBLE_CORES')!r} or "
                        f"NEURON_RT_NUM_CORES={env.get('NEURON_RT_NUM_CORES')!r} is not a core list",
                        "Set NEURON_RT_VISIBLE_CORES to a range or list such as 0-1 or 0,1 (or unset it).")]
    what = (f"{len(devices)} Neuron device(s) ({', '.join(d.name for d in devices)}); the UNet runs on NeuronCores "
            f"{cores}")
    if len(cores) < 2:
        return [Finding("warning", what + ": one core, so classifier-free guidance's two samples run one after the "
                        "other",
                        "Let the process see two cores (NEURON_RT_VISIBLE_CORES=0-1) to run them side by side.")]
    return [Finding("ok", what)]


def check_memory() -> list[Finding]:
    """Host memory against what compiling the SD2.1 UNet needs (serving needs far less)."""
    memory = host_memory_gb()
    if memory is None:
        return [Finding("warning", "host memory: unknown (no psutil, no /proc/meminfo)",
                        f"Compiling the SD2.1 UNet needs about {MIN_UNET_MEMORY_GB} GB; serving needs far less.")]
    if memory < MIN_UNET_MEMORY_GB:
        return [Finding("warning", f"host memory {memory:.0f} GB: enough to serve, not to compile the SD2.1 UNet "
                        f"(about {MIN_UNET_MEMORY_GB} GB)",
                        "Compile on inf2.8xlarge (128 GB) or a CPU instance with 64 GB or more, then copy the root "
                        "here.")]
    return [Finding("ok", f"host memory {memory:.0f} GB (compiling the SD2.1 UNet needs about "
                    f"{MIN_UNET_MEMORY_GB} GB)")]


# --- the parts -----------------------------------------------------------------------------------


def check_sizes(sets) -> list[Finding]:
    """The sizes every dtype serves, what each costs in device memory (the backend's estimate), and whether the
    image modes' VAE encoder is there."""
    sizes, notes = common_sizes(sets)
    findings = [Finding("warning", note) for note in notes]
    estimate = memory_estimate(sets, sizes, 2, SIZE_PARTS)
    costs = ", ".join(f"{size_key(s)} {c / 2**20:.1f} MiB" for s, c in estimate.per_size.items())
    findings.append(Finding("ok", f"sizes {', '.join(map(size_key, sizes))}: device memory per NeuronCore, from the "
                            f"part files: {costs}; text encoder {estimate.shared / 2**20:.1f} MiB (an inf2 core has "
                            f"16 GiB; the backend checks before loading)"))
    lacking = [f"{a.dtype} {size_key(s)}" for a in sets for s in sizes if a.image_parts_missing(s)]
    if lacking:
        findings.append(Finding("warning", f"no VAE encoder for {', '.join(lacking)}: the root serves text to image "
                                f"only", "Add it with compile.py --parts vae_encoder (the backend's note gives the "
                                "exact command); the other parts stay."))
    return findings


def check_parts(root: Path, art) -> list[Finding]:
    """Each part of one compiled dtype and size: a readable archive whose recorded dtype matches its weights (CPU
    parts)."""
    from . import part_archive as archive  # torch: loaded only when a part's archive is read

    findings = []
    present = [(p, None) for p in SHARED_PARTS] + [(p, s) for s in art.sizes for p in SIZE_PARTS if art.has(p, s)]
    for part, size in present:
        path = art.path(part, size)
        hint = compile_hint(root, art.model, art.dtype, part, True, [size] if size else None, art.target)
        fix = f"Recompile it: {hint}"
        where = f"{art.dtype} {part}{f' {size_key(size)}' if size else ''} ({path})"
        try:
            with zipfile.ZipFile(path) as opened:
                opened.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            findings.append(Finding("error", f"{where}: not a readable TorchScript archive ({exc.__class__.__name__})",
                                    fix))
            continue
        specs = art.input_specs(part, size)
        shapes = ", ".join(f"{'x'.join(str(d) for d in s.shape)} {str(s.dtype).removeprefix('torch.')}" for s in specs)
        if art.target == "cpu" and art.layout == "manifest":  # the flat layout's dtypes were read from the files
            try:
                weights = archive.weight_dtype(path)
            except Exception as exc:  # noqa: BLE001 - a damaged pickle: say which file
                findings.append(Finding("error", f"{where}: its pickles cannot be read ({exc.__class__.__name__})",
                                        fix))
                continue
            recorded = art.part_dtype(part, size)
            if weights is not None and dtype_name(weights) != recorded:
                findings.append(Finding("error", f"{where}: holds {dtype_name(weights)} weights, but it is recorded "
                                        f"as {recorded}", fix))
                continue
        known = art.layout == "manifest" or part in art.flat_dtypes
        dtype_note = "" if known else "; its dtype is probed on the device at load"
        megabytes = path.stat().st_size / 1e6
        findings.append(Finding("ok", f"{where.split(' (')[0]}: {art.part_dtype(part, size)}, inputs {shapes}, "
                                f"{megabytes:.1f} MB{dtype_note}"))
    return findings


def smoke_generation(root: Path, neuron_cores: int | None = None) -> list[Finding]:
    """Load the backend as the app does and generate one 1-step image per precision and size, with its timings."""
    from .backend import NeuronBackend  # torch and diffusers: only for the smoke generation

    started = time.perf_counter()
    try:
        backend = NeuronBackend(NeuronSettings(artifacts=str(root), neuron_cores=neuron_cores))
    except BackendError as exc:
        return [Finding("error", f"loading the parts failed: {exc}", "Fix what the message names, then run the "
                        "doctor again.")]
    findings = [Finding("ok", f"loaded {', '.join(backend.capabilities().precisions)} in "
                        f"{time.perf_counter() - started:.1f} s (with one warm-up generation each) on "
                        f"{backend.capabilities().device}")]
    try:
        caps = backend.capabilities()
        for precision, (width, height) in [(p, s) for p in caps.precisions for s in caps.fixed_sizes]:
            request = GenerationRequest(prompt=SMOKE_PROMPT, steps=1, seed=0, precision=precision, width=width,
                                        height=height)
            try:
                result = backend.generate(request)
            except BackendError as exc:
                findings.append(Finding("error", f"smoke generation {precision} {width}x{height} failed: {exc}",
                                        "Recompile the parts of that precision and size with --force."))
                continue
            t = result.timings
            width, height = result.images[0].size
            findings.append(Finding("ok", f"smoke generation {precision}, {width}x{height}, 1 step: "
                                    f"{t.total_ms:.0f} ms "
                                    f"(text encoder {t.text_encoder_ms:.0f} ms, UNet {t.denoise_ms:.0f} ms, "
                                    f"VAE decode {t.vae_ms:.0f} ms)"))
    finally:
        backend.close()
    return findings
