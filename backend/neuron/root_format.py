"""The compiled-root format: where the parts are, what a manifest records, and whether a root can run here.

A compiled root is a diffusers model folder plus compiled_models/ (docs/architecture.md). Format 2
holds several image sizes: the text encoder does not depend on the size and is compiled once per
dtype; the UNet and the VAE parts are compiled once per size, each size in its own folder named as
the infotext writes sizes, width x height:

    ROOT/model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/ ...
    ROOT/compiled_models/source.json                     which model the diffusers files are
    ROOT/compiled_models/<dtype>/manifest.json           how everything of that dtype was compiled
    ROOT/compiled_models/<dtype>/text_encoder.pt         one for every size
    ROOT/compiled_models/<dtype>/<W>x<H>/{unet,vae_decoder,vae_post_quant_conv,vae_encoder}.pt

The manifest (format 2) records the settings every part of the dtype shares, `parts` (the text
encoder's entry) and `sizes`, one entry per "<W>x<H>" with its width, height, latent size and
`parts`. Each part's entry gives its `file` relative to the dtype folder, its dtype, input shapes
and dtypes, compiler arguments, attention kernel, versions, bytes and seconds. `vae_encoder` (image to
image and inpainting) is optional: a size without it serves text to image only.

Older roots still load: a format 1 manifest (one size: height and width at the top, every part's
file beside it in <dtype>/) is read as format 2 with that one size, and compile.py adds sizes and
parts to it without moving its files (each entry's `file` says where the part is). The flat layout of
AWS's walk-through (ROOT/compiled_models/unet.pt and friends, no manifest) is read as 512x512, each
part in the dtype it was traced with (backend/neuron/part_archive.py reads it from the file).

The one owner of the format: compile_scripts/compile.py writes manifests with new_manifest, size_entry and
carry_over; the backend reads them with read_root (root_plan.py decides what to serve); the file index
(compiled_models/files.json) is built and checked here too, and root_store.py moves roots by it. Light at
import (no torch): the manifests are JSON, and torch loads only when a part's input specs are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator

from . import stack
from ..core.errors import BackendUnavailable
from ..core.settings import DEFAULT_MODEL
from ..models.catalog import split_model_revision
from .parts import (
    IMAGE_PARTS,
    NEURON_DTYPES,
    SHARED_PARTS,
    SIZE_PARTS,
    TXT2IMG_PARTS,
    Size,
    size_key,
)

if TYPE_CHECKING:
    import torch

    from .specs import InputSpec

log = logging.getLogger(__name__)

COMPILED_DIR = "compiled_models"
MANIFEST = "manifest.json"
SOURCE = "source.json"
INDEX_PATH = f"{COMPILED_DIR}/files.json"  # the file index, relative to the root; also the S3 key under the prefix
INDEX_FORMAT = 1
CODE_DIR = "code"  # deploy.py puts the endpoint's code package beside an uploaded root; never part of a root
BLOCK = 1 << 20
MANIFEST_FORMAT = 2
READABLE_FORMATS = (1, 2)
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
        # Format 2 records these too (the VAE encoder's input, the sizes' range); a format 1 manifest
        # lacks them, and is checked on the keys it has.
        "unet_sample_size": unet.get("sample_size"),
        "vae_in_channels": vae.get("in_channels"),
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
    from . import part_archive as archive  # torch: loaded only when a part's archive is read

    try:
        return archive.is_neuron_archive(path)
    except archive.ArchiveError as exc:
        raise BackendUnavailable(f"{exc}; compile it again.") from None


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32' for a torch dtype this backend runs; BackendUnavailable names any other."""
    from ..inprocess.pipeline import DTYPES  # torch: only where a part's dtype is named

    for name in NEURON_DTYPES:
        if DTYPES[name] == dtype:
            return name
    raise BackendUnavailable(f"a part takes {str(dtype).removeprefix('torch.')} inputs; this backend runs "
                             f"{' and '.join(NEURON_DTYPES)} parts: compile with compile_scripts/compile.py "
                             f"--dtype bf16.")


@dataclass
class CompiledDtype:
    """The compiled parts of one dtype, for each of its sizes, and what they were compiled for."""

    dtype: str
    directory: Path
    layout: str  # "manifest" or "flat" (AWS's walk-through)
    target: str  # "neuron" or "cpu"
    model: str
    sizes: list[Size]  # (width, height), in the manifest's order
    batch_per_core: int
    tokens: int
    text_hidden: int
    latent_channels: int
    vae_scale_factor: int
    unet_in_channels: int = 4
    image_channels: int = 3
    guidance: bool = True  # False: compiled with --no-cfg (the manifest's "guidance"); older roots are CFG ones
    manifest: dict[str, Any] | None = None  # as format 2, whatever the format on disk
    format: int | None = None  # the manifest's format on disk; None for the flat layout
    warnings: list[str] = field(default_factory=list)
    # Flat layout: each part's input dtypes as read from its file; a part missing here could not be
    # read without the device and is probed at load (assemble.probe_flat_dtypes).
    flat_dtypes: dict[str, list[torch.dtype]] = field(default_factory=dict)

    def _size(self, part: str, size: Size | None) -> Size:
        if size is None:
            if part not in SHARED_PARTS and len(self.sizes) > 1:
                raise ValueError(f"{part} is compiled per size; say which of {', '.join(map(size_key, self.sizes))}")
            return self.sizes[0]
        return size

    def entry(self, part: str, size: Size | None = None) -> dict[str, Any] | None:
        """A part's manifest entry (None: not compiled, or the flat layout)."""
        if self.manifest is None:
            return None
        if part in SHARED_PARTS:
            return (self.manifest.get("parts") or {}).get(part)
        compiled = (self.manifest.get("sizes") or {}).get(size_key(self._size(part, size))) or {}
        return (compiled.get("parts") or {}).get(part)

    def path(self, part: str, size: Size | None = None) -> Path:
        """The .pt file of a part (of a size, for the size-dependent parts)."""
        if self.manifest is None:
            return self.directory / f"{part}.pt"
        entry = self.entry(part, size)
        if entry is None:
            where = "" if part in SHARED_PARTS else f"{size_key(self._size(part, size))}/"
            return self.directory / f"{where}{part}.pt"
        return self.directory / entry["file"]

    def has(self, part: str, size: Size | None = None) -> bool:
        """Whether a part is compiled (recorded, where there is a manifest) and its file is there."""
        if self.manifest is not None and self.entry(part, size) is None:
            return False
        if self.manifest is None and part not in TXT2IMG_PARTS:
            return False  # the walk-through compiled no VAE encoder
        return self.path(part, size).is_file()

    def part_dtype(self, part: str, size: Size | None = None) -> str:
        """The dtype a part computes in ('bf16' or 'fp32'): a bf16 root keeps its VAE parts in fp32 by default."""
        if self.manifest is not None:
            return self.entry(part, size).get("dtype") or self.dtype
        if part == "text_encoder":  # takes token ids; it runs beside the UNet, in its dtype
            return self.dtype
        return dtype_name(self.input_specs(part, size)[0].dtype)

    def input_specs(self, part: str, size: Size | None = None) -> list[InputSpec]:
        """The shapes and dtypes a part was traced with (recorded, or the walk-through's shapes with the dtypes read
        from its file)."""
        from ..inprocess.pipeline import DTYPES  # torch: only where a part's input specs are read
        from .specs import InputSpec, part_input_specs  # torch

        if self.manifest is not None:
            return [InputSpec.from_json(s) for s in self.entry(part, size)["inputs"]]
        # The walk-through traced everything at batch 1, the UNet with its timestep in the UNet's dtype.
        width, height = self._size(part, size)
        specs = part_input_specs(part, DTYPES[self.dtype], 1, height // self.vae_scale_factor,
                                 width // self.vae_scale_factor, self.tokens, self.text_hidden,
                                 self.latent_channels, timestep_dtype=DTYPES[self.dtype])
        dtypes = self.flat_dtypes.get(part)
        if dtypes is None:
            return specs
        return [InputSpec(spec.shape, dtype) for spec, dtype in zip(specs, dtypes)]

    def part_bytes(self, part: str, size: Size | None = None) -> int:
        """The size of a part's file: what the device memory estimate starts from."""
        return self.path(part, size).stat().st_size

    def image_parts_missing(self, size: Size) -> list[str]:
        """The parts image to image and inpainting need that this size lacks."""
        return [p for p in IMAGE_PARTS if not self.has(p, size)]


def compile_hint(root: Path, model: str | None, dtype: str, parts: str = "", force: bool = False,
                 sizes: list[Size] | None = None, target: str | None = None) -> str:
    """The command that (re)compiles what is missing or stale (target: the root's, where known)."""
    cmd = f"python -m compile_scripts.compile --model {model or 'MODEL'} --out {root} --dtype {dtype}"
    if sizes:
        cmd += f" --sizes {','.join(map(size_key, sizes))}"
    if parts:
        cmd += f" --parts {parts}"
    if force:
        cmd += " --force"
    return cmd + (" --target cpu" if target == "cpu" else "")


def upgrade_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as format 2: a format 1 one (one size, its fields at the top) becomes its one size."""
    if manifest.get("format") != 1:
        return manifest
    width, height = int(manifest["width"]), int(manifest["height"])
    parts = manifest.get("parts") or {}
    top = ("height", "width", "latent_height", "latent_width", "parts")
    upgraded = {k: v for k, v in manifest.items() if k not in top}
    upgraded["parts"] = {p: e for p, e in parts.items() if p in SHARED_PARTS}
    upgraded["sizes"] = {size_key((width, height)): {
        "width": width, "height": height, "latent_height": manifest.get("latent_height"),
        "latent_width": manifest.get("latent_width"),
        "parts": {p: e for p, e in parts.items() if p in SIZE_PARTS},
    }}
    return upgraded


def architecture_differences(recorded: dict[str, Any], architecture: dict[str, Any],
                             manifest_format: int) -> list[str]:
    """The architecture keys a manifest recorded otherwise than the root's files say (format 1 manifests
    predate some keys and are checked on those they have)."""
    return [k for k, v in architecture.items() if (k in recorded or manifest_format > 1) and recorded.get(k) != v]


def read_root(root: Path, wanted_model: str | None = None,
                   wanted_sizes: list[Size] | None = None) -> list[CompiledDtype]:
    """Every dtype compiled in a root, checked against its diffusers files; BackendUnavailable if unusable.

    wanted_sizes (--sizes): only those sizes are checked and kept, and each must be compiled; None: all."""
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
    if len({s.batch_per_core for s in sets}) > 1:
        found = ", ".join(f"{s.dtype}: {s.batch_per_core}" for s in sets)
        raise BackendUnavailable(f"--artifacts {root}: the dtypes were compiled for different batches per core "
                                 f"({found}); recompile one of them with --force.")
    targets = {s.target for s in sets}
    if len(targets) > 1:
        raise BackendUnavailable(f"--artifacts {root}: some dtypes were compiled for Neuron and some for the CPU; "
                                 f"recompile them all with one --target.")
    if wanted_sizes:
        for art in sets:
            absent = [s for s in wanted_sizes if s not in art.sizes]
            if absent:
                raise BackendUnavailable(
                    f"--sizes {','.join(map(size_key, wanted_sizes))}: {art.dtype} in {root} has no "
                    f"{', '.join(map(size_key, absent))}; it was compiled for {', '.join(map(size_key, art.sizes))}. "
                    f"Choose among those, or compile the others: "
                    f"{compile_hint(root, art.model, art.dtype, sizes=absent, target=art.target)}")
            art.sizes = [s for s in art.sizes if s in wanted_sizes]
    for art in sets:
        _check_size_parts(root, art, [s for other in sets for s in other.sizes])
    return sorted(sets, key=lambda s: NEURON_DTYPES.index(s.dtype) if s.dtype in NEURON_DTYPES else 99)


def _check_size_parts(root: Path, art: CompiledDtype, all_sizes: list[Size]) -> None:
    """Every size of a set has the parts text to image needs; the message names the file and the way out."""
    for size in art.sizes:
        missing = [p for p in TXT2IMG_PARTS if p not in SHARED_PARTS and not art.has(p, size)]
        if not missing:
            continue
        others = [s for s in dict.fromkeys(all_sizes) if s != size]
        leave_out = (f", or serve the other sizes without it: --sizes {','.join(map(size_key, others))}"
                     if others else "")
        files = ", ".join(str(art.path(p, size).relative_to(root)) for p in missing)
        hint = compile_hint(root, art.model, art.dtype, " ".join(missing), sizes=[size], target=art.target)
        raise BackendUnavailable(f"--artifacts {root}: {art.dtype} {size_key(size)} is missing {files}; compile it: "
                                 f"{hint}{leave_out}")


def _manifest_set(root: Path, directory: Path, source: str | None, architecture: dict[str, Any],
                  wanted_model: str | None) -> CompiledDtype:
    path = directory / MANIFEST
    on_disk = read_json(path)
    dtype = directory.name
    where = f"{COMPILED_DIR}/{dtype}/{MANIFEST}"
    if on_disk.get("format") not in READABLE_FORMATS:
        raise BackendUnavailable(f"{path}: manifest format {on_disk.get('format')!r}, this app reads formats "
                                 f"{' and '.join(map(str, READABLE_FORMATS))}; recompile: "
                                 f"{compile_hint(root, source, dtype, force=True)}")
    if on_disk.get("dtype") != dtype:
        raise BackendUnavailable(f"{path}: this manifest is for dtype {on_disk.get('dtype')!r}, not the folder's "
                                 f"{dtype!r}; recompile: {compile_hint(root, source, dtype, force=True)}")
    if dtype not in NEURON_DTYPES:
        raise BackendUnavailable(f"{path}: dtype {dtype!r} is not one this backend runs ({', '.join(NEURON_DTYPES)}).")
    model = on_disk.get("model")
    if source is not None and model != source:
        raise BackendUnavailable(f"{where}: compiled from model {model!r}, but the root holds the files of {source!r}; "
                                 f"recompile: {compile_hint(root, source, dtype, force=True)}")
    if wanted_model:
        # --model ID@REVISION (models.catalog reads the '@'): the id must be the manifest's, and a revision asked for
        # must be the one compile.py recorded (None: compiled before revisions were recorded, so unknown).
        wanted_id, wanted_revision = split_model_revision(wanted_model)
        if model != wanted_id:
            raise BackendUnavailable(f"--model {wanted_model}: {root} was compiled from {model!r}; drop --model or "
                                     f"point --artifacts at a root compiled from {wanted_model}.")
        compiled_at = on_disk.get("revision")
        if wanted_revision and compiled_at != wanted_revision:
            at = f"revision {compiled_at}" if compiled_at else "a revision it did not record"
            raise BackendUnavailable(f"--model {wanted_model}: {root} was compiled from {model} at {at}; drop "
                                     f"@{wanted_revision}, or compile that revision: "
                                     f"{compile_hint(root, wanted_model, dtype, force=True)}")
    recorded = on_disk.get("architecture") or {}
    differs = architecture_differences(recorded, architecture, on_disk["format"])
    if differs:
        detail = ", ".join(f"{k}: compiled {recorded.get(k)!r}, root {architecture[k]!r}" for k in differs)
        raise BackendUnavailable(f"{where}: compiled for another model than the root's files ({detail}); "
                                 f"recompile: {compile_hint(root, source or model, dtype, force=True)}")
    target = on_disk.get("target")
    if target not in ("neuron", "cpu"):
        raise BackendUnavailable(f"{path}: unknown target {target!r}; recompile with --target neuron or cpu.")
    try:
        manifest = upgrade_manifest(on_disk)
        sizes = [(int(e["width"]), int(e["height"])) for e in manifest["sizes"].values()]
        if not sizes:
            raise KeyError("sizes")
        art = CompiledDtype(
            dtype=dtype, directory=directory, layout="manifest", target=target, model=str(model), sizes=sizes,
            batch_per_core=int(manifest["batch_per_core"]), tokens=int(manifest["tokens"]),
            text_hidden=int(architecture["text_hidden_size"]),
            latent_channels=int(architecture["vae_latent_channels"]),
            vae_scale_factor=int(architecture["vae_scale_factor"]),
            unet_in_channels=int(architecture.get("unet_in_channels") or 4),
            image_channels=int(architecture.get("vae_in_channels") or 3),
            manifest=manifest, format=int(on_disk["format"]), guidance=bool(manifest.get("guidance", True)),
        )
        present = [(p, None) for p in SHARED_PARTS if art.entry(p)]
        present += [(p, s) for s in sizes for p in SIZE_PARTS if art.entry(p, s)]
        for part, size in present:
            art.input_specs(part, size)
            art.entry(part, size)["file"]  # noqa: B018 - every entry names its file
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackendUnavailable(f"{path}: incomplete ({exc.__class__.__name__}: {exc}); recompile: "
                                 f"{compile_hint(root, model, dtype, force=True)}") from None
    missing = [p for p in SHARED_PARTS if not art.has(p)]
    if missing:
        raise BackendUnavailable(
            f"--artifacts {root}: {dtype} is missing {', '.join(f'{COMPILED_DIR}/{dtype}/{p}.pt' for p in missing)}; "
            f"compile it: {compile_hint(root, model, dtype, parts=' '.join(missing), target=target)}"
        )
    for part, size in present:
        if part != "text_encoder" and dtype_name(art.input_specs(part, size)[0].dtype) != art.part_dtype(part, size):
            hint = compile_hint(root, model, dtype, part, True, [size] if size else None, target)
            raise BackendUnavailable(f"{path}: {part} is recorded as {art.part_dtype(part, size)} but its inputs as "
                                     f"{art.input_specs(part, size)[0].dtype}; recompile: {hint}")
    errors, warnings = version_problems(manifest.get("versions") or {}, installed_versions(), target)
    if errors:
        raise BackendUnavailable(f"{where}: " + " ".join(errors))
    art.warnings.extend(f"{dtype}: {w}" for w in warnings)
    return art


def _flat_set(root: Path, compiled: Path, source: str | None, architecture: dict[str, Any]) -> CompiledDtype:
    missing = [p for p in TXT2IMG_PARTS if not (compiled / f"{p}.pt").is_file()]
    if missing:
        raise BackendUnavailable(f"--artifacts {root}: the walk-through layout is missing "
                                 f"{', '.join(f'{COMPILED_DIR}/{p}.pt' for p in missing)}; copy them from the compile "
                                 f"folder (sd2_compile_dir_512/<part>/model.pt) or compile with compile_scripts.")
    target = "neuron" if is_neuron_archive(compiled / "unet.pt") else "cpu"
    tokens = int(architecture.get("text_max_positions") or 77)
    art = CompiledDtype(
        dtype="bf16", directory=compiled, layout="flat", target=target,
        model=source or root.resolve().name, sizes=[(FLAT_LAYOUT["width"], FLAT_LAYOUT["height"])],
        batch_per_core=FLAT_LAYOUT["batch_per_core"], tokens=tokens,
        text_hidden=int(architecture["text_hidden_size"]), latent_channels=int(architecture["vae_latent_channels"]),
        vae_scale_factor=int(architecture["vae_scale_factor"]),
    )
    for part in TXT2IMG_PARTS:
        dtypes = flat_input_dtypes(art.path(part), part, len(art.input_specs(part)), target)
        if dtypes is not None:
            art.flat_dtypes[part] = dtypes
    if "unet" in art.flat_dtypes:  # the pipeline's precision is the UNet's
        art.dtype = dtype_name(art.flat_dtypes["unet"][0])
    art.warnings.append(f"walk-through layout (no manifest): assumed 512x512, batch 1 per core; {flat_dtype_note(art)}"
                        + (", compiled under the installed Neuron SDK" if target == "neuron" else ""))
    return art


def common_sizes(sets: list[CompiledDtype]) -> tuple[list[Size], list[str]]:
    """The sizes every dtype has, in the first dtype's order, and a note for each size some dtype lacks."""
    common = [s for s in sets[0].sizes if all(s in other.sizes for other in sets)]
    notes = []
    for art in sets:
        for size in art.sizes:
            if size not in common:
                lacking = [o.dtype for o in sets if size not in o.sizes]
                hint = compile_hint(art.directory.parent.parent, art.model, " ".join(lacking), sizes=[size],
                                    target=art.target)
                notes.append(f"{size_key(size)} is compiled in {art.dtype} only, so it is not offered; compile it in "
                             f"{', '.join(lacking)} too: {hint}")
    return common, notes


@dataclass(frozen=True)
class MemoryEstimate:
    """What the loaded parts take in the device memory of the fullest NeuronCore, estimated from their files."""

    per_size: dict[Size, int]  # bytes on the fullest core that each size adds (all dtypes)
    shared: int  # bytes of the size-independent parts (all dtypes)
    cores: int

    @property
    def total(self) -> int:
        """Bytes on the fullest core."""
        return self.shared + sum(self.per_size.values())


def memory_estimate(sets: list[CompiledDtype], sizes: list[Size], cores: int,
                    size_parts: tuple[str, ...] = SIZE_PARTS) -> MemoryEstimate:
    """The device memory a set of sizes needs on the fullest NeuronCore, from the bytes of the part files.

    A compiled Neuron part's file is its NEFF and its weights, which is what the runtime places in
    device memory; activations and the runtime's scratch come on top (see DEVICE_MEMORY_HEADROOM in
    host.py). The UNet runs data-parallel, so each core holds a copy of every size's UNet; the text
    encoder and the VAE parts load on one core, which is therefore the fullest: the estimate is that
    core's, the UNet counted once per size and everything else once. size_parts: those that will be loaded.
    """
    per_size = {size: sum(art.part_bytes(p, size) for art in sets for p in size_parts if art.has(p, size))
                for size in sizes}
    shared = sum(art.part_bytes(p) for art in sets for p in SHARED_PARTS)
    return MemoryEstimate(per_size=per_size, shared=shared, cores=cores)


def flat_input_dtypes(path: Path, part: str, count: int, target: str) -> list[torch.dtype] | None:
    """A walk-through part's input dtypes, read from its file; None when only running it can tell.

    First the example inputs that torch.jit.trace stored (CPU parts, and Neuron parts traced under torch
    2.x); else, for a CPU part, the dtype of its weights (the walk-through casts every input to it). A
    Neuron part of torch 1.13 records its input types only inside the compiled model's metadata, which
    torch_neuronx alone can read; the loader then tries the dtypes on the device.
    """
    import torch  # only for a walk-through root's parts

    from . import part_archive as archive  # torch: loaded only when a part's archive is read

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


def flat_dtype_note(art: CompiledDtype) -> str:
    """'dtypes read from the files: unet bf16, ...' for the flat layout's note."""
    known = ", ".join(f"{p} {art.part_dtype(p)}" for p in TXT2IMG_PARTS if p in art.flat_dtypes)
    unknown = [p for p in TXT2IMG_PARTS if p not in art.flat_dtypes]
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
        line = stack.torch_line
        if rec and inst and line(rec) != line(inst):
            errors.append(f"compiled with torch-neuronx {rec} (torch {line(rec)}), but torch-neuronx {inst} "
                          f"(torch {line(inst)}) is installed; compiled parts run only under the torch line "
                          f"they were compiled with. Install the stack the parts were compiled with, or recompile "
                          f"with --force under the supported one ({stack.describe()}).")
        compiled_sdk, installed_sdk = stack.sdk_release(recorded), stack.sdk_release(installed)
        differs = [n for n in SDK_PACKAGES if recorded.get(n) and installed.get(n)
                   and stack.public_version(recorded[n]) != stack.public_version(installed[n])]
        if differs and not errors:
            if compiled_sdk and installed_sdk and compiled_sdk != installed_sdk:
                warnings.append(
                    f"compiled under Neuron SDK {compiled_sdk} ({_packages(recorded)}), this machine has Neuron SDK "
                    f"{installed_sdk} ({_packages(installed)}); parts usually load across releases, but only the "
                    f"compiling one was tested: if loading fails or images look wrong, recompile with --force under "
                    f"the supported SDK {stack.NEURON_SDK}.")
            else:
                warnings.extend(f"compiled with {n} {recorded[n]}, {installed[n]} is installed; if loading fails or "
                                f"images look wrong, recompile with --force under this Neuron SDK." for n in differs)
    rec, inst = recorded.get("torch"), installed.get("torch")
    if target == "cpu" and rec and inst and rec != inst:
        warnings.append(f"traced with torch {rec}, torch {inst} is installed; recompile with --force if loading fails.")
    return errors, warnings


def _packages(versions: dict[str, Any]) -> str:
    return ", ".join(f"{n} {versions[n]}" for n in SDK_PACKAGES if versions.get(n))


# --- writing manifests (compile.py) ------------------------------------------------------------------


def new_manifest(*, model: str, dtype: str, batch_per_core: int, guidance: bool, tokens: int, target: str,
                 architecture: dict[str, Any], versions: dict[str, str | None], lora: dict | None) -> dict[str, Any]:
    """A format 2 manifest with no parts yet: the settings every part of a dtype shares (a change to any of them
    but guidance makes every part stale; see carry_over)."""
    return {
        "format": MANIFEST_FORMAT,
        "model": model,
        "dtype": dtype,
        "batch_per_core": batch_per_core,
        "guidance": guidance,  # False: compiled with --no-cfg
        "tokens": tokens,
        "target": target,
        "architecture": architecture,
        "versions": versions,
        # The release whose compiler built the parts (None for CPU parts), and the stack this project supports,
        # which the loader and the doctor compare against what is installed.
        "neuron_sdk": stack.sdk_release(versions),
        "supported_stack": stack.record(),
        "lora": lora,  # {"source", "sha256"} of the LoRA fused into the weights, or None
        "parts": {},  # the size-independent parts (the text encoder)
        "sizes": {},  # "<W>x<H>" -> the size and its parts
    }


def size_entry(manifest: dict[str, Any], size: Size) -> dict[str, Any]:
    """A size's manifest entry, made empty if the manifest has none yet."""
    factor = manifest["architecture"]["vae_scale_factor"]
    width, height = size
    return manifest["sizes"].setdefault(size_key(size), {
        "width": width, "height": height, "latent_height": height // factor, "latent_width": width // factor,
        "parts": {},
    })


def carry_over(path: Path, fresh: dict[str, Any], echo) -> dict[str, Any]:
    """The manifest to write at `path`: `fresh` with the earlier manifest's parts and sizes where its shared settings
    still hold (a format 1 manifest is upgraded, its parts kept where they are), else `fresh` as it is; `echo` says
    which and why."""
    dtype = fresh["dtype"]
    old = read_json(path) if path.is_file() else None
    if old is None:
        return fresh
    if old.get("format") not in READABLE_FORMATS:
        echo(f"{dtype}: manifest format {old.get('format')!r} is unknown; its earlier parts are stale")
        return fresh
    fmt = old["format"]
    old = upgrade_manifest(old)
    # guidance: how the root is served, not how its parts were traced (the same batch-1 UNet), so a change
    # is recorded without making the parts stale.
    keys = [k for k in fresh if k not in ("format", "parts", "sizes", "versions", "neuron_sdk",
                                          "supported_stack", "architecture", "guidance")]
    if old.get("guidance", True) != fresh["guidance"]:
        echo(f"{dtype}: guidance {'on' if fresh['guidance'] else 'off (--no-cfg)'} from now on (the "
             f"parts stay: the UNet is traced for one sample per core either way)")
    changed = [k for k in keys if old.get(k) != fresh[k]]
    if architecture_differences(old.get("architecture") or {}, fresh["architecture"], fmt):
        changed.append("architecture")
    if changed:
        echo(f"{dtype}: settings changed ({', '.join(changed)}); its earlier parts are stale")
        return fresh
    if fmt == 1:
        echo(f"{dtype}: upgrading the format 1 manifest to format {fresh['format']} (its parts stay "
             f"where they are)")
    return {**fresh, "parts": dict(old.get("parts") or {}), "sizes": dict(old.get("sizes") or {})}


# --- the file index ------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def root_files(root: Path) -> Iterator[str]:
    """The root's files as posix paths: everything but the index, hidden names, code/ and unfinished writes."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        relative_folder = Path(folder).relative_to(root)
        if relative_folder.parts[:1] == (CODE_DIR,):
            dirs[:] = []
            continue
        for name in sorted(files):
            rel = (relative_folder / name).as_posix()
            if name.startswith(".") or name.endswith((".partial", ".tmp", ".lock", ".pyc")) or rel == INDEX_PATH:
                continue
            yield rel


def build_index(root: Path) -> dict[str, Any]:
    """The file index of a local root: every file's size and sha256, and what each dtype was compiled for."""
    if not (root / "model_index.json").is_file() or not (root / COMPILED_DIR).is_dir():
        raise BackendUnavailable(f"{root}: not a compiled root (model_index.json and {COMPILED_DIR}/); compile one "
                                 f"with python -m compile_scripts.compile.")
    compiled: dict[str, dict[str, Any]] = {}
    for manifest_path in sorted((root / COMPILED_DIR).glob(f"*/{MANIFEST}")):
        manifest = read_json(manifest_path)
        versions = manifest.get("versions") or {}
        compiled[manifest_path.parent.name] = {
            "target": manifest.get("target"),
            "neuron_sdk": stack.sdk_release(versions) or manifest.get("neuron_sdk"),
            "torch-neuronx": versions.get("torch-neuronx"),
            "neuronx-cc": versions.get("neuronx-cc"),
        }
    if not compiled and (root / COMPILED_DIR / "unet.pt").is_file():  # the walk-through's flat layout
        target = "neuron" if is_neuron_archive(root / COMPILED_DIR / "unet.pt") else "cpu"
        compiled["flat"] = {"target": target, "neuron_sdk": None, "torch-neuronx": None, "neuronx-cc": None}
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)} for rel in root_files(root)}
    return {"format": INDEX_FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "compiled": compiled, "files": files}


def write_index(root: Path) -> dict[str, Any]:
    """Write ROOT/compiled_models/files.json (what a download verifies against); returns it."""
    started = time.perf_counter()
    index = build_index(root)
    write_json(root / INDEX_PATH, index)
    size = sum(entry["size"] for entry in index["files"].values())
    log.info("%s: indexed %d files, %.1f MB, in %.1f s", root / INDEX_PATH, len(index["files"]), size / 1e6,
             time.perf_counter() - started)
    return index


def parse_index(raw: bytes, where: str) -> dict[str, Any]:
    """A downloaded index, checked: its format and file entries (paths that stay inside the root)."""
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise BackendUnavailable(f"{where}: the root's index is not JSON ({exc}); publish the root again with "
                                 f"compile.py --upload.") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise BackendUnavailable(f"{where}: index format {found!r}, this app reads format {INDEX_FORMAT}; publish the "
                                 f"root again with this version's compile.py --upload.")
    files = index.get("files")
    if not isinstance(files, dict) or not files:
        raise BackendUnavailable(f"{where}: the index lists no files; publish the root again with compile.py --upload.")
    for rel, entry in files.items():
        path = PurePosixPath(rel)
        if (not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or rel == INDEX_PATH
                or path.parts[0] == CODE_DIR or not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            raise BackendUnavailable(f"{where}: the index's entry {rel!r} is not a file of a root; refusing it.")
    return index
