"""NeuronBackend: compiled artifacts -> a diffusers pipeline, on Inferentia2 (or on a CPU for testing).

A compiled root is a diffusers model folder plus compiled_models/ (see DESIGN.md):

    ROOT/model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/ ...
    ROOT/compiled_models/source.json                 which model the diffusers files are
    ROOT/compiled_models/<dtype>/{text_encoder,unet,vae_decoder,vae_post_quant_conv}.pt
    ROOT/compiled_models/<dtype>/manifest.json       how they were compiled

`python -m compile_scripts.compile` writes it. The flat layout of AWS's walk-through
(ROOT/compiled_models/unet.pt and friends, no manifest) loads too, each part in the dtype it was traced
with (backend/archive.py reads it from the file). For each dtype the pipeline is
built from the real diffusers modules, then the compiled parts are swapped in (the pipeline reads
.config, .device and .dtype of its modules). On inf2 the UNet runs through torch_neuronx.DataParallel
over the chip's NeuronCores; parts traced with --target cpu run the same code on a CPU, through a
stand-in for DataParallel and a guard that enforces the compiled shapes as the Neuron runtime does.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import pickle
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import archive
from . import neuron_stack
from . import pipeline as sdpipe
from .api import (
    DEFAULT_SCHEDULER,
    BackendUnavailable,
    Capabilities,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    StepCallback,
)
from .neuron_modules import (
    DTYPE_NAMES,
    PARTS,
    VAE_PARTS,
    CastDtype,
    CpuDataParallel,
    InputSpec,
    NeuronTextEncoder,
    NeuronUNet,
    ShapeGuard,
    StaticBatch,
    part_input_specs,
)
from .sd21_random import SD21_RANDOM_ID
from .settings import DEFAULT_ARTIFACTS, DEFAULT_MODEL, Settings
from .tiny import TINY_MODEL_ID

log = logging.getLogger(__name__)

COMPILED_DIR = "compiled_models"
MANIFEST = "manifest.json"
SOURCE = "source.json"
MANIFEST_FORMAT = 1
PRECISION_ORDER = ("bf16", "fp32")  # preferred first: bf16 is the faster on Inferentia2
SDK_PACKAGES = ("torch-neuronx", "neuronx-cc")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", *SDK_PACKAGES)
# What AWS's walk-through compiled, which its flat layout does not record. Its dtypes are read from
# the parts themselves (AWS's notebook keeps the VAE parts in fp32 beside a bf16 UNet).
FLAT_LAYOUT = dict(height=512, width=512, batch_per_core=1)
NEURON_SDK_HINT = (
    f"Install the supported Neuron stack ({neuron_stack.describe()}) in its own virtual environment: "
    "pip install -r requirements-neuron.txt (torch-neuronx and neuronx-cc come from pip.repos.neuron.amazonaws.com), "
    f"or work inside the endpoint's container {neuron_stack.DLC_IMAGE}; see docs/neuron.md. "
    "To try the Neuron code path on this machine instead, compile CPU parts with --target cpu."
)
TINY_NOTE = (
    "Compiled from the built-in tiny model: random weights, SD2.1-shaped, so images are noise. "
    "It is not Stable Diffusion 2.1. To serve the real model, compile it: python -m compile_scripts.compile "
    f"--model {DEFAULT_MODEL} --out ROOT (on inf2; see docs/neuron.md)."
)
RANDOM_NOTE = ("Compiled from sd21-random: the SD2.1-base architecture with random weights, for measuring "
               "real-size latency. Images are noise; it is not Stable Diffusion 2.1.")
CPU_NOTE = ("These parts were traced for the CPU (--target cpu): the Neuron code path runs here with a "
            "stand-in for the NeuronCores. It is for testing the plumbing, not for speed.")


# --- artifacts --------------------------------------------------------------------------------


def installed_versions() -> dict[str, str | None]:
    """Versions of the packages a compiled part depends on; None for those not installed."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_architecture(root: Path) -> dict[str, Any]:
    """The config values a compiled part bakes in, read from the diffusers files of a root."""
    def config(sub: str) -> dict[str, Any]:
        path = root / sub / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(f"{path}: cannot be read ({exc.__class__.__name__}); the root's diffusers "
                                     f"files are incomplete: compile again into a fresh --out folder.") from None

    unet, text, vae = config("unet"), config("text_encoder"), config("vae")
    return {
        "unet_in_channels": unet.get("in_channels"),
        "unet_out_channels": unet.get("out_channels"),
        "unet_cross_attention_dim": unet.get("cross_attention_dim"),
        "unet_block_out_channels": unet.get("block_out_channels"),
        "text_hidden_size": text.get("hidden_size"),
        "text_max_positions": text.get("max_position_embeddings"),
        "vae_latent_channels": vae.get("latent_channels"),
        "vae_scale_factor": 2 ** (len(vae.get("block_out_channels") or [0]) - 1),
    }


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or BackendUnavailable naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"{path}: cannot be read ({exc.__class__.__name__}: {exc}); compile that dtype "
                                 f"again with --force.") from None
    if not isinstance(data, dict):
        raise BackendUnavailable(f"{path}: is not a JSON object; compile that dtype again with --force.")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (a crash leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def is_neuron_archive(path: Path) -> bool:
    """True when a TorchScript file holds a Neuron-compiled graph; BackendUnavailable if it is no TorchScript file.

    Read from the archive's code without loading it: loading a Neuron graph needs torch_neuronx.
    """
    try:
        return archive.is_neuron_archive(path)
    except archive.ArchiveError as exc:
        raise BackendUnavailable(f"{exc}; compile it again.") from None


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32' for a torch dtype this backend runs; BackendUnavailable names any other."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    raise BackendUnavailable(f"a part takes {str(dtype).removeprefix('torch.')} inputs; this backend runs "
                             f"{' and '.join(DTYPE_NAMES)} parts: compile with compile_scripts/compile.py --dtype bf16.")


@dataclass
class ArtifactSet:
    """The compiled parts of one dtype and what they were compiled for."""

    dtype: str
    directory: Path
    layout: str  # "manifest" or "flat" (AWS's walk-through)
    target: str  # "neuron" or "cpu"
    model: str
    height: int
    width: int
    batch_per_core: int
    tokens: int
    text_hidden: int
    latent_channels: int
    vae_scale_factor: int
    manifest: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    # Flat layout: each part's input dtypes as read from its file; a part missing here could not be
    # read without the device and is probed at load (NeuronBackend._probe_flat_dtypes).
    flat_dtypes: dict[str, list[torch.dtype]] = field(default_factory=dict)

    def path(self, part: str) -> Path:
        """The .pt file of a part."""
        return self.directory / f"{part}.pt"

    def part_dtype(self, part: str) -> str:
        """The dtype a part computes in ('bf16' or 'fp32'): a bf16 root keeps its VAE parts in fp32 by default."""
        if self.manifest is not None:
            return self.manifest["parts"][part].get("dtype") or self.dtype
        if part == "text_encoder":  # takes token ids; it runs beside the UNet, in its dtype
            return self.dtype
        return dtype_name(self.input_specs(part)[0].dtype)

    def input_specs(self, part: str) -> list[InputSpec]:
        """The shapes and dtypes a part was traced with (recorded, or the walk-through's shapes with the dtypes read
        from its file)."""
        if self.manifest is not None:
            return [InputSpec.from_json(s) for s in self.manifest["parts"][part]["inputs"]]
        # The walk-through traced everything at batch 1, the UNet with its timestep in the UNet's dtype.
        specs = part_input_specs(part, DTYPE_NAMES[self.dtype], 1, self.height // self.vae_scale_factor,
                                 self.width // self.vae_scale_factor, self.tokens, self.text_hidden,
                                 self.latent_channels, timestep_dtype=DTYPE_NAMES[self.dtype])
        dtypes = self.flat_dtypes.get(part)
        if dtypes is None:
            return specs
        return [InputSpec(spec.shape, dtype) for spec, dtype in zip(specs, dtypes)]


def compile_hint(root: Path, model: str | None, dtype: str, parts: str = "", force: bool = False) -> str:
    """The command that (re)compiles what is missing or stale."""
    cmd = f"python -m compile_scripts.compile --model {model or 'MODEL'} --out {root} --dtype {dtype}"
    if parts:
        cmd += f" --parts {parts}"
    return cmd + (" --force" if force else "")


def find_artifacts(root: Path, wanted_model: str | None = None) -> list[ArtifactSet]:
    """Every dtype compiled in a root, checked against its diffusers files; BackendUnavailable if unusable."""
    if not root.is_dir():
        raise BackendUnavailable(
            f"--artifacts {root}: no such folder. Compile one on inf2 with: python -m compile_scripts.compile "
            f"--model {DEFAULT_MODEL} --out {root} (or --model tiny --target cpu to try it here)."
        )
    if not (root / "model_index.json").is_file():
        raise BackendUnavailable(f"--artifacts {root}: no model_index.json, so it is not a compiled root (a diffusers "
                                 f"model folder plus {COMPILED_DIR}/). Compile one with python -m compile_scripts.compile.")
    compiled = root / COMPILED_DIR
    source = read_json(compiled / SOURCE).get("model") if (compiled / SOURCE).is_file() else None
    architecture = model_architecture(root)
    sets = []
    if compiled.is_dir():
        for directory in sorted(p for p in compiled.iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
            sets.append(_manifest_set(root, directory, source, architecture, wanted_model))
        if not sets and (compiled / "unet.pt").is_file():
            sets.append(_flat_set(root, compiled, source, architecture))
    if not sets:
        raise BackendUnavailable(
            f"--artifacts {root}: nothing compiled in {compiled} (neither <dtype>/manifest.json nor the walk-through's "
            f"unet.pt). Compile with: {compile_hint(root, wanted_model or source, 'bf16')}"
        )
    sizes = {(s.width, s.height, s.batch_per_core) for s in sets}
    if len(sizes) > 1:
        found = ", ".join(f"{s.dtype}: {s.width}x{s.height} (batch {s.batch_per_core} per core)" for s in sets)
        raise BackendUnavailable(f"--artifacts {root}: the dtypes were compiled for different sizes ({found}); a root "
                                 f"serves one size. Recompile one of them with the other's --height/--width and --force.")
    targets = {s.target for s in sets}
    if len(targets) > 1:
        raise BackendUnavailable(f"--artifacts {root}: some dtypes were compiled for Neuron and some for the CPU; "
                                 f"recompile them all with one --target.")
    return sorted(sets, key=lambda s: PRECISION_ORDER.index(s.dtype) if s.dtype in PRECISION_ORDER else 99)


def _manifest_set(root: Path, directory: Path, source: str | None, architecture: dict[str, Any],
                  wanted_model: str | None) -> ArtifactSet:
    path = directory / MANIFEST
    manifest = read_json(path)
    dtype = directory.name
    where = f"{COMPILED_DIR}/{dtype}/{MANIFEST}"
    if manifest.get("format") != MANIFEST_FORMAT:
        raise BackendUnavailable(f"{path}: manifest format {manifest.get('format')!r}, this app reads format "
                                 f"{MANIFEST_FORMAT}; recompile: {compile_hint(root, source, dtype, force=True)}")
    if manifest.get("dtype") != dtype:
        raise BackendUnavailable(f"{path}: this manifest is for dtype {manifest.get('dtype')!r}, not the folder's "
                                 f"{dtype!r}; recompile: {compile_hint(root, source, dtype, force=True)}")
    if dtype not in DTYPE_NAMES:
        raise BackendUnavailable(f"{path}: dtype {dtype!r} is not one this backend runs ({', '.join(DTYPE_NAMES)}).")
    model = manifest.get("model")
    if source is not None and model != source:
        raise BackendUnavailable(f"{where}: compiled from model {model!r}, but the root holds the files of {source!r}; "
                                 f"recompile: {compile_hint(root, source, dtype, force=True)}")
    if wanted_model and model != wanted_model:
        raise BackendUnavailable(f"--model {wanted_model}: {root} was compiled from {model!r}; drop --model or "
                                 f"point --artifacts at a root compiled from {wanted_model}.")
    recorded = manifest.get("architecture") or {}
    differs = [k for k, v in architecture.items() if recorded.get(k) != v]
    if differs:
        detail = ", ".join(f"{k}: compiled {recorded.get(k)!r}, root {architecture[k]!r}" for k in differs)
        raise BackendUnavailable(f"{where}: compiled for another model than the root's files ({detail}); "
                                 f"recompile: {compile_hint(root, source or model, dtype, force=True)}")
    target = manifest.get("target")
    if target not in ("neuron", "cpu"):
        raise BackendUnavailable(f"{path}: unknown target {target!r}; recompile with --target neuron or cpu.")
    parts = manifest.get("parts") or {}
    missing = [p for p in PARTS if p not in parts or not (directory / f"{p}.pt").is_file()]
    if missing:
        raise BackendUnavailable(
            f"--artifacts {root}: {dtype} is missing {', '.join(f'{COMPILED_DIR}/{dtype}/{p}.pt' for p in missing)}; "
            f"compile it: {compile_hint(root, model, dtype, parts=' '.join(missing))}"
        )
    try:
        art = ArtifactSet(
            dtype=dtype, directory=directory, layout="manifest", target=target, model=str(model),
            height=int(manifest["height"]), width=int(manifest["width"]),
            batch_per_core=int(manifest["batch_per_core"]), tokens=int(manifest["tokens"]),
            text_hidden=int(architecture["text_hidden_size"]),
            latent_channels=int(architecture["vae_latent_channels"]),
            vae_scale_factor=int(architecture["vae_scale_factor"]), manifest=manifest,
        )
        for part in PARTS:
            art.input_specs(part)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackendUnavailable(f"{path}: incomplete ({exc.__class__.__name__}: {exc}); recompile: "
                                 f"{compile_hint(root, model, dtype, force=True)}") from None
    for part in PARTS:
        if part != "text_encoder" and dtype_name(art.input_specs(part)[0].dtype) != art.part_dtype(part):
            raise BackendUnavailable(f"{path}: {part} is recorded as {art.part_dtype(part)} but its inputs as "
                                     f"{art.input_specs(part)[0].dtype}; recompile: "
                                     f"{compile_hint(root, model, dtype, part, force=True)}")
    errors, warnings = version_problems(manifest.get("versions") or {}, installed_versions(), target)
    if errors:
        raise BackendUnavailable(f"{where}: " + " ".join(errors))
    art.warnings.extend(f"{dtype}: {w}" for w in warnings)
    return art


def _flat_set(root: Path, compiled: Path, source: str | None, architecture: dict[str, Any]) -> ArtifactSet:
    missing = [p for p in PARTS if not (compiled / f"{p}.pt").is_file()]
    if missing:
        raise BackendUnavailable(f"--artifacts {root}: the walk-through layout is missing "
                                 f"{', '.join(f'{COMPILED_DIR}/{p}.pt' for p in missing)}; copy them from the compile "
                                 f"folder (sd2_compile_dir_512/<part>/model.pt) or compile with compile_scripts.")
    target = "neuron" if is_neuron_archive(compiled / "unet.pt") else "cpu"
    tokens = int(architecture.get("text_max_positions") or 77)
    art = ArtifactSet(
        dtype="bf16", directory=compiled, layout="flat", target=target,
        model=source or root.resolve().name, height=FLAT_LAYOUT["height"], width=FLAT_LAYOUT["width"],
        batch_per_core=FLAT_LAYOUT["batch_per_core"], tokens=tokens,
        text_hidden=int(architecture["text_hidden_size"]), latent_channels=int(architecture["vae_latent_channels"]),
        vae_scale_factor=int(architecture["vae_scale_factor"]),
    )
    for part in PARTS:
        dtypes = flat_input_dtypes(art.path(part), part, len(art.input_specs(part)), target)
        if dtypes is not None:
            art.flat_dtypes[part] = dtypes
    if "unet" in art.flat_dtypes:  # the pipeline's precision is the UNet's
        art.dtype = dtype_name(art.flat_dtypes["unet"][0])
    art.warnings.append(f"walk-through layout (no manifest): assumed 512x512, batch 1 per core; {flat_dtype_note(art)}"
                        + (", compiled under the installed Neuron SDK" if target == "neuron" else ""))
    return art


def flat_input_dtypes(path: Path, part: str, count: int, target: str) -> list[torch.dtype] | None:
    """A walk-through part's input dtypes, read from its file; None when only running it can tell.

    First the example inputs that torch.jit.trace stored (CPU parts, and Neuron parts traced under torch
    2.x); else, for a CPU part, the dtype of its weights (the walk-through casts every input to it). A
    Neuron part of torch 1.13 records its input types only inside the compiled model's metadata, which
    torch_neuronx alone can read; the loader then tries the dtypes on the device.
    """
    try:
        dtypes = archive.traced_input_dtypes(path)
        if dtypes is None and target == "cpu":
            weights = archive.weight_dtype(path)
            dtypes = [torch.int64 if part == "text_encoder" else weights] * count if weights else None
    except (archive.ArchiveError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise BackendUnavailable(f"{path}: cannot be read ({exc.__class__.__name__}: {exc}); copy it again from the "
                                 f"compile folder or recompile it.") from None
    if dtypes is not None and len(dtypes) != count:
        raise BackendUnavailable(f"{path}: was traced with {len(dtypes)} inputs, the walk-through's {part} takes "
                                 f"{count}; it is not a part of AWS's SD2.1 walk-through. Compile with compile_scripts.")
    if dtypes is not None and part != "text_encoder":
        for dtype in dtypes:
            dtype_name(dtype)  # only bf16 and fp32 parts run here
    return dtypes


def flat_dtype_note(art: ArtifactSet) -> str:
    """'dtypes read from the files: unet bf16, ...' for the flat layout's note."""
    known = ", ".join(f"{p} {art.part_dtype(p)}" for p in PARTS if p in art.flat_dtypes)
    unknown = [p for p in PARTS if p not in art.flat_dtypes]
    note = f"dtypes read from the files: {known}" if known else ""
    if unknown:
        note += ("; " if note else "") + f"{', '.join(unknown)} probed on the device at load"
    return note


def version_problems(recorded: dict[str, Any], installed: dict[str, str | None],
                     target: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) comparing the versions a part was compiled with against those installed.

    A Neuron part is a TorchScript module that calls torch-neuronx's ops on a NEFF from neuronx-cc:
    it loads only under the torch that torch-neuronx was built for, so a different torch line is an
    error; another Neuron SDK release usually loads, but is not what was tested, so it is a warning
    that names both releases.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if target == "neuron":
        rec, inst = recorded.get("torch-neuronx"), installed.get("torch-neuronx")
        line = neuron_stack.torch_line
        if rec and inst and line(rec) != line(inst):
            errors.append(f"compiled with torch-neuronx {rec} (torch {line(rec)}), but torch-neuronx {inst} "
                          f"(torch {line(inst)}) is installed; compiled parts run only under the torch line "
                          f"they were compiled with. Install the stack the parts were compiled with, or recompile "
                          f"with --force under the supported one ({neuron_stack.describe()}).")
        compiled_sdk, installed_sdk = neuron_stack.sdk_release(recorded), neuron_stack.sdk_release(installed)
        differs = [n for n in SDK_PACKAGES if recorded.get(n) and installed.get(n)
                   and neuron_stack.public_version(recorded[n]) != neuron_stack.public_version(installed[n])]
        if differs and not errors:
            if compiled_sdk and installed_sdk and compiled_sdk != installed_sdk:
                warnings.append(
                    f"compiled under Neuron SDK {compiled_sdk} ({_packages(recorded)}), this machine has Neuron SDK "
                    f"{installed_sdk} ({_packages(installed)}); parts usually load across releases, but only the "
                    f"compiling one was tested: if loading fails or images look wrong, recompile with --force under "
                    f"the supported SDK {neuron_stack.NEURON_SDK}.")
            else:
                warnings.extend(f"compiled with {n} {recorded[n]}, {installed[n]} is installed; if loading fails or "
                                f"images look wrong, recompile with --force under this Neuron SDK." for n in differs)
    rec, inst = recorded.get("torch"), installed.get("torch")
    if target == "cpu" and rec and inst and rec != inst:
        warnings.append(f"traced with torch {rec}, torch {inst} is installed; recompile with --force if loading fails.")
    return errors, warnings


def _packages(versions: dict[str, Any]) -> str:
    return ", ".join(f"{n} {versions[n]}" for n in SDK_PACKAGES if versions.get(n))



def neuron_core_ids(requested: int | None = None, env: dict[str, str] | None = None) -> list[int]:
    """NeuronCores the UNet runs data-parallel on: one chip's two, as AWS's sample, or fewer if fewer are visible.

    `requested` (--neuron-cores) overrides the count. NEURON_RT_VISIBLE_CORES ('0-1', '2,3') and
    NEURON_RT_NUM_CORES are the Neuron runtime's own variables, not this project's settings: they limit
    what this process can see, so they are read here, where the cores are counted.
    """
    if requested:
        return list(range(max(1, requested)))
    env = os.environ if env is None else env
    visible = 2
    if env.get("NEURON_RT_NUM_CORES"):
        visible = int(env["NEURON_RT_NUM_CORES"])
    elif env.get("NEURON_RT_VISIBLE_CORES"):
        count = 0
        for item in env["NEURON_RT_VISIBLE_CORES"].split(","):  # int() refuses what the runtime would
            first, _, last = item.strip().partition("-")
            count += (int(last) if last else int(first)) - int(first) + 1
        visible = count
    return list(range(max(1, min(2, visible))))


# --- the backend ------------------------------------------------------------------------------


class NeuronBackend:
    """Stable Diffusion from compiled parts: one pipeline per compiled dtype, run one request at a time."""

    name = "neuron"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.artifacts or DEFAULT_ARTIFACTS).expanduser()
        self._lock = threading.Lock()
        self._device = sdpipe.device_thread()  # all torch work on one thread
        self.sets = find_artifacts(self.root, settings.model)
        first = self.sets[0]
        self.target = first.target
        # A folder's name, not its path on the compile machine; Hub ids and 'tiny' as recorded.
        self.model = Path(first.model).name if os.path.isabs(first.model) else first.model
        self.width, self.height = first.width, first.height
        self._neuronx = _import_torch_neuronx(self.root) if self.target == "neuron" else None
        self.device_ids = neuron_core_ids(settings.neuron_cores)
        self.notes: list[str] = []
        for art in self.sets:
            for warning in art.warnings:
                log.warning("%s", warning)
                self.notes.append(warning)
        random_weights = None
        if self.model == TINY_MODEL_ID or sdpipe.is_tiny_folder(str(self.root)):
            random_weights = TINY_NOTE
        elif self.model == SD21_RANDOM_ID:
            random_weights = RANDOM_NOTE
        if random_weights:
            log.warning(random_weights)
            self.notes.insert(0, random_weights)
        if self.target == "cpu":
            self.notes.append(CPU_NOTE)
        self._pipelines: dict[str, Any] = {}
        self._schedulers: dict[str, sdpipe.SchedulerCache] = {}
        for art in self.sets:
            started = time.perf_counter()
            pipe = self._device.run(self._build_pipeline, art)
            self._pipelines[art.dtype] = pipe
            self._schedulers[art.dtype] = sdpipe.SchedulerCache(pipe.scheduler.config)
            log.info("loaded %s parts (%s, %s) from %s in %.1f s", art.dtype, art.layout, art.target, art.directory,
                     time.perf_counter() - started)
        cores = len(self.device_ids)
        device = (f"neuron ({cores} NeuronCore{'s' if cores > 1 else ''})" if self.target == "neuron"
                  else f"cpu (Neuron stand-in, {cores} simulated cores)")
        self._caps = Capabilities(
            backend=self.name,
            model=self.model,
            device=device,
            precisions=tuple(self._pipelines),
            fixed_sizes=((self.width, self.height),),
            default_size=(self.width, self.height),
            max_images=settings.max_images,
            is_tiny=random_weights is not None,  # the app's warning banner
            notes=tuple(self.notes),
        )
        for dtype in self._pipelines:
            self._device.run(self._warm_up, dtype)

    # Loading -----------------------------------------------------------------------------------

    def _load_part(self, art: ArtifactSet, part: str) -> torch.nn.Module:
        path = art.path(part)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say which and what to do
            raise BackendUnavailable(f"{path}: cannot be loaded ({exc.__class__.__name__}: "
                                     f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                                     f"recompile: {compile_hint(self.root, art.model, art.dtype, part, True)}") from None
        return module.eval()

    def _build_pipeline(self, art: ArtifactSet):
        """The diffusers pipeline with real modules, then the compiled parts swapped in."""
        parts = {part: self._load_part(art, part) for part in PARTS}
        if art.layout == "flat" and art.target == "neuron" and any(p not in art.flat_dtypes for p in PARTS):
            self._probe_flat_dtypes(art, parts)
        dtype = DTYPE_NAMES[art.dtype]
        try:
            pipe = sdpipe.load_pipeline(str(self.root), dtype, "cpu", local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"--artifacts {self.root}: the diffusers files cannot be loaded "
                                     f"({exc.__class__.__name__}: {exc}); compile into a fresh --out folder.") from None
        specs = {part: art.input_specs(part) for part in PARTS}
        cores = len(self.device_ids)
        if art.target == "neuron":
            # One copy of the UNet per core; dynamic batching off, so each core gets exactly its
            # compiled batch (StaticBatch in NeuronUNet pads the last chunk to that).
            unet_runner = self._neuronx.DataParallel(parts["unet"], self.device_ids, set_dynamic_batching=False)
            runners = {p: parts[p] for p in ("text_encoder", "vae_decoder", "vae_post_quant_conv")}
        else:
            unet_runner = CpuDataParallel(ShapeGuard(parts["unet"], "unet", specs["unet"]), self.device_ids,
                                          art.batch_per_core)
            runners = {p: ShapeGuard(parts[p], p, specs[p]) for p in ("text_encoder", "vae_decoder",
                                                                       "vae_post_quant_conv")}
        unet_config, text_config = pipe.unet.config, pipe.text_encoder.config
        pipe.unet = NeuronUNet(unet_runner, unet_config, specs["unet"][0].dtype, chunk=art.batch_per_core * cores,
                               timestep_dtype=specs["unet"][1].dtype)
        pipe.text_encoder = NeuronTextEncoder(runners["text_encoder"], text_config, dtype,
                                              batch=specs["text_encoder"][0].shape[0])
        for part, attr in (("vae_decoder", "decoder"), ("vae_post_quant_conv", "post_quant_conv")):
            spec = specs[part][0]
            setattr(pipe.vae, attr, CastDtype(StaticBatch(runners[part], spec.shape[0]), spec.dtype))
        gc.collect()  # the eager UNet and text encoder just let go can be gigabytes
        return pipe

    def _probe_flat_dtypes(self, art: ArtifactSet, parts: dict[str, torch.nn.Module]) -> None:
        """Find the input dtypes of walk-through Neuron parts that their files do not record (torch 1.13 archives).

        The Neuron runtime checks every input's dtype against the compiled model's metadata and refuses
        another (torch_neuronx's trace.py builds that metadata "to validate input tensor shapes, names, and
        types"), so one call with zeros per candidate dtype tells which one the part was compiled for. It
        costs one run of each part at load, which the warm-up pays anyway.
        """
        art.flat_dtypes.setdefault("text_encoder", [torch.int64])
        for part in ("unet", *VAE_PARTS):
            if part in art.flat_dtypes:
                continue
            for candidate in (torch.bfloat16, torch.float32):  # the walk-through's bf16 first, then AWS's fp32 VAE
                specs = art.input_specs(part)
                inputs = [torch.zeros(s.shape, dtype=s.dtype if s.dtype == torch.int64 else candidate) for s in specs]
                try:
                    parts[part](*inputs)
                except Exception:  # noqa: BLE001 - the runtime's refusal of a dtype is the answer we look for
                    continue
                art.flat_dtypes[part] = [i.dtype for i in inputs]
                break
            else:
                raise BackendUnavailable(f"{art.path(part)}: runs with neither bf16 nor fp32 inputs of the walk-through's "
                                         f"shapes; recompile it with compile_scripts/compile.py.")
        art.dtype = dtype_name(art.flat_dtypes["unet"][0])
        log.info("walk-through Neuron parts probed: %s", flat_dtype_note(art))

    def _warm_up(self, precision: str) -> None:
        """One 1-step generation, so the first person does not wait for lazy loading (and broken parts fail now)."""
        started = time.perf_counter()
        request = GenerationRequest(prompt="warm-up", steps=1, seed=0, precision=precision,
                                    scheduler=DEFAULT_SCHEDULER).validated(self._caps)
        pipe = self._pipelines[precision]
        try:
            sdpipe.run(pipe, request, [0], scheduler=self._schedulers[precision].get(request.scheduler))
        except Exception as exc:  # noqa: BLE001
            log.exception("warm-up failed")
            raise BackendUnavailable(f"--artifacts {self.root}: the {precision} parts failed their first run "
                                     f"({exc.__class__.__name__}: {str(exc)[:300]}); recompile them with --force.") \
                from None
        log.info("warmed up %s in %.1f s", precision, time.perf_counter() - started)

    # The contract ------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        """The compiled dtypes, the one compiled size, all schedulers."""
        return self._caps

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        """Validate and run one request on the pipeline of its precision."""
        wanted = request.precision
        if wanted in DTYPE_NAMES and wanted not in self._caps.precisions:  # compilable, just not compiled
            raise InvalidRequest(
                f"precision: {wanted} was not compiled in {self.root}; compiled: {', '.join(self._caps.precisions)}. "
                f"Compile it with: {compile_hint(self.root, self.model, wanted)}",
                "precision",
            )
        return sdpipe.generate_locked(request.validated(self._caps), on_step, lock=self._lock, device=self._device,
                                      pipeline_for=self._pipelines.__getitem__, schedulers=self._schedulers,
                                      model=self.model, backend=self.name, where=self._caps.device)

    def close(self) -> None:
        """Drop the pipelines (and with them the parts loaded on the NeuronCores)."""
        self._pipelines.clear()
        self._schedulers.clear()
        gc.collect()


def _import_torch_neuronx(root: Path):
    """torch_neuronx, or BackendUnavailable saying how to get it and a Neuron device."""
    try:
        import torch_neuronx
    except Exception as exc:  # noqa: BLE001 - missing or broken: either way it cannot run here
        raise BackendUnavailable(f"--artifacts {root}: these parts were compiled for Neuron, and torch-neuronx cannot "
                                 f"be imported here ({exc.__class__.__name__}). {NEURON_SDK_HINT}") from None
    from .preflight import neuron_devices

    if not neuron_devices():
        raise BackendUnavailable(f"--artifacts {root}: these parts were compiled for Neuron, and this machine has no "
                                 f"Neuron device (/dev/neuron*). Run on an inf2 instance, or compile CPU parts with "
                                 f"--target cpu to try the backend here.")
    return torch_neuronx
