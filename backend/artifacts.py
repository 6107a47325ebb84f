"""The compiled-root format: where the parts are, what a manifest records, and whether a root can run here.

A compiled root is a diffusers model folder plus compiled_models/ (docs/architecture.md):

    ROOT/model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/ ...
    ROOT/compiled_models/source.json                 which model the diffusers files are
    ROOT/compiled_models/<dtype>/{text_encoder,unet,vae_decoder,vae_post_quant_conv}.pt
    ROOT/compiled_models/<dtype>/manifest.json       how they were compiled

compile_scripts/compile.py writes it and backend/neuron.py loads it; both take the format from here.
The flat layout of AWS's walk-through (ROOT/compiled_models/unet.pt and friends, no manifest) is read
too, each part in the dtype it was traced with (backend/archive.py reads it from the file).

Light at import (no torch): the compile script's command line takes PARTS and NEURON_DTYPES from here.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import neuron_stack
from .api import BackendUnavailable
from .settings import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

    from .neuron_modules import InputSpec

PARTS = ("text_encoder", "unet", "vae_decoder", "vae_post_quant_conv")  # traced apart, one .pt file each
VAE_PARTS = ("vae_decoder", "vae_post_quant_conv")
NEURON_DTYPES = ("bf16", "fp32")  # the precisions a root can hold, preferred first: bf16 is the faster on Inferentia2
COMPILED_DIR = "compiled_models"
MANIFEST = "manifest.json"
SOURCE = "source.json"
MANIFEST_FORMAT = 1
SDK_PACKAGES = ("torch-neuronx", "neuronx-cc")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", *SDK_PACKAGES)
# What AWS's walk-through compiled, which its flat layout does not record. Its dtypes are read from
# the parts themselves (AWS's notebook keeps the VAE parts in fp32 beside a bf16 UNet).
FLAT_LAYOUT = dict(height=512, width=512, batch_per_core=1)


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
    from . import archive

    try:
        return archive.is_neuron_archive(path)
    except archive.ArchiveError as exc:
        raise BackendUnavailable(f"{exc}; compile it again.") from None


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32' for a torch dtype this backend runs; BackendUnavailable names any other."""
    from .pipeline import DTYPES

    for name in NEURON_DTYPES:
        if DTYPES[name] == dtype:
            return name
    raise BackendUnavailable(f"a part takes {str(dtype).removeprefix('torch.')} inputs; this backend runs "
                             f"{' and '.join(NEURON_DTYPES)} parts: compile with compile_scripts/compile.py "
                             f"--dtype bf16.")


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
        from .neuron_modules import InputSpec, part_input_specs
        from .pipeline import DTYPES

        if self.manifest is not None:
            return [InputSpec.from_json(s) for s in self.manifest["parts"][part]["inputs"]]
        # The walk-through traced everything at batch 1, the UNet with its timestep in the UNet's dtype.
        specs = part_input_specs(part, DTYPES[self.dtype], 1, self.height // self.vae_scale_factor,
                                 self.width // self.vae_scale_factor, self.tokens, self.text_hidden,
                                 self.latent_channels, timestep_dtype=DTYPES[self.dtype])
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
        raise BackendUnavailable(f"--artifacts {root}: no model_index.json, so it is not a compiled root (a "
                                 f"diffusers model folder plus {COMPILED_DIR}/). Compile one with python -m "
                                 f"compile_scripts.compile.")
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
        raise BackendUnavailable(f"--artifacts {root}: the dtypes were compiled for different sizes ({found}); a "
                                 f"root serves one size. Recompile one of them with the other's --height/--width "
                                 f"and --force.")
    targets = {s.target for s in sets}
    if len(targets) > 1:
        raise BackendUnavailable(f"--artifacts {root}: some dtypes were compiled for Neuron and some for the CPU; "
                                 f"recompile them all with one --target.")
    return sorted(sets, key=lambda s: NEURON_DTYPES.index(s.dtype) if s.dtype in NEURON_DTYPES else 99)


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
    if dtype not in NEURON_DTYPES:
        raise BackendUnavailable(f"{path}: dtype {dtype!r} is not one this backend runs ({', '.join(NEURON_DTYPES)}).")
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
    import torch

    from . import archive

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
                                 f"{count}; it is not a part of AWS's SD2.1 walk-through. Compile with "
                                 f"compile_scripts.")
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
