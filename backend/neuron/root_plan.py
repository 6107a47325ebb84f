"""Opening a compiled root: what it holds and what this machine will serve of it, decided before anything loads.

`open_root(settings)` is the one call: it brings the root here (root_store), reads every dtype (root_format),
and settles the sizes, the modes (the VAE encoder is optional), the LoRA, the NeuronCores and how they are used,
and the notes the page shows. `check_device_memory(plan, ...)` then refuses sizes whose parts do not fit a
NeuronCore. The neuron backend does: plan, check, assemble (assemble.py); the doctor reads the same root
through root_format.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.api import MODE_LABELS, MODES
from ..core.errors import BackendUnavailable
from ..core.settings import DEFAULT_ARTIFACTS, DEFAULT_MODEL, NEURON_PARALLEL_MODES, NeuronSettings
from ..inprocess.lora import lora_sha256
from . import root_store
from .host import CORES_PER_CHIP, DEVICE_MEMORY_HEADROOM, neuron_core_ids
from .parts import TXT2IMG_PARTS, VAE_PARTS, Size, default_size, parse_sizes, size_key
from .root_format import CompiledDtype, common_sizes, compile_hint, memory_estimate, read_root

log = logging.getLogger(__name__)

CPU_NOTE = ("These parts were traced for the CPU (--target cpu): the Neuron code path runs here with a "
            "stand-in for the NeuronCores. It is for testing the plumbing, not for speed.")


@dataclass
class RootPlan:
    """A compiled root as this machine will serve it: the dtypes, sizes and parts to load, on which cores, and why
    anything is left out."""

    root: Path  # a local folder (a published root is downloaded first)
    sets: list[CompiledDtype]  # one per compiled dtype, bf16 first
    sizes: list[Size]  # compiled in every dtype (and asked for, with --sizes)
    model: str  # what the page and the infotext name: a folder's name, never a path of the compile machine
    target: str  # "neuron" or "cpu" (the CPU stand-in)
    lora: dict | None  # the LoRA fused at compile time ({"source", "sha256"}), or None
    cores: list[int]  # the NeuronCores used
    parallel: str  # --neuron-parallel: "unet" (the UNet across the cores) or "pipeline" (a pipeline per core)
    guidance: bool  # False: compiled with --no-cfg
    image_modes_note: str = ""  # '' when every size has the VAE encoder; else why image modes are off, and the fix
    notes: list[str] = field(default_factory=list)  # for the log and the page's banner, in order

    @property
    def size_parts(self) -> tuple[str, ...]:
        """The size-dependent parts to load: the VAE encoder only where every size has it."""
        return tuple(p for p in ("unet", *VAE_PARTS) if p in TXT2IMG_PARTS or not self.image_modes_note)

    @property
    def lanes(self) -> int:
        """Requests served at once: one per NeuronCore with a pipeline on each, else one."""
        return len(self.cores) if self.parallel == "pipeline" else 1


def open_root(settings: NeuronSettings) -> RootPlan:
    """Read the root --artifacts names (downloading a published one) and decide what to serve; BackendUnavailable
    naming what to change when it cannot be served."""
    root = root_store.resolve(settings.artifacts or DEFAULT_ARTIFACTS, settings.cache_dir)
    try:
        wanted_sizes = parse_sizes(settings.sizes) if settings.sizes else None
    except ValueError as exc:
        raise BackendUnavailable(f"--sizes {settings.sizes}: {exc}") from None
    sets = read_root(root, settings.model, wanted_sizes)
    first = sets[0]
    sizes, size_notes = common_sizes(sets)
    if not sizes:
        found = "; ".join(f"{a.dtype}: {', '.join(map(size_key, a.sizes))}" for a in sets)
        raise BackendUnavailable(f"--artifacts {root}: no size is compiled in every dtype ({found}); compile "
                                 f"the same --sizes for each --dtype.")
    plan = RootPlan(
        root=root, sets=sets, sizes=sizes,
        model=Path(first.model).name if os.path.isabs(first.model) else first.model,  # Hub ids and 'tiny' as recorded
        target=first.target, lora=check_lora(sets, settings.lora), cores=neuron_core_ids(settings.neuron_cores),
        parallel=parallel_mode(root, sets, settings.neuron_parallel), guidance=all(art.guidance for art in sets),
    )
    plan.notes += [w for art in sets for w in art.warnings] + size_notes
    if plan.target == "cpu":
        plan.notes.append(CPU_NOTE)
    plan.image_modes_note = missing_encoder_note(plan)
    if plan.image_modes_note:
        plan.notes.append(plan.image_modes_note)
    return plan


def check_lora(sets: list[CompiledDtype], wanted: str | None) -> dict | None:
    """The LoRA the root's weights hold (compile.py --lora records it); --lora must name that one or be left out:
    compiled Neuron graphs cannot load or swap a LoRA at run time."""
    fused = (sets[0].manifest or {}).get("lora")
    if wanted:
        sha = lora_sha256(wanted)  # a local file's; None for a Hub id, which is compared by name
        same = fused is not None and (sha == fused["sha256"] if sha and fused["sha256"] else wanted == fused["source"])
        if not same:
            holds = f"LoRA {Path(fused['source']).name}" if fused else "no LoRA"
            raise BackendUnavailable(f"--lora {wanted}: a Neuron root's LoRA is fused at compile time and this root "
                                     f"holds {holds}; compile one with python -m compile_scripts.compile --lora "
                                     f"{wanted} ..., or leave --lora out.")
    return fused


def parallel_mode(root: Path, sets: list[CompiledDtype], wanted: str) -> str:
    """--neuron-parallel, checked against the root: pipeline only where the UNet was compiled without CFG.

    A CFG step has two UNet samples: with the UNet across the cores they run at once, one per core; with a whole
    pipeline per core they would run one after the other on one core. Each image would take about twice as long
    for about the same images per second, so a CFG root is refused rather than served that way."""
    if wanted not in NEURON_PARALLEL_MODES:
        raise BackendUnavailable(f"--neuron-parallel {wanted}: use one of {', '.join(NEURON_PARALLEL_MODES)}.")
    if wanted == "pipeline" and not all(art.guidance is False for art in sets):
        raise BackendUnavailable(
            f"--neuron-parallel pipeline: {root} was compiled for classifier-free guidance, whose two UNet "
            f"samples per step run one per NeuronCore (--neuron-parallel unet); one pipeline per core would run "
            f"them one after the other, about doubling each image's time for no more images per second. Serve it "
            f"with --neuron-parallel unet, or compile a model meant to run without guidance (a few-step one) with "
            f"--no-cfg.")
    return wanted


def missing_encoder_note(plan: RootPlan) -> str:
    """'' when each served size of each dtype has the VAE encoder; else what lacks it and the command that adds
    the part (compile.py adds it without recompiling the rest)."""
    lacking = {art.dtype: [s for s in plan.sizes if art.image_parts_missing(s)] for art in plan.sets}
    lacking = {dtype: sizes for dtype, sizes in lacking.items() if sizes}
    if not lacking:
        return ""
    image_modes = " and ".join(f"{MODE_LABELS[m]} ({m})" for m in MODES if m != "txt2img")
    if any(art.layout == "flat" for art in plan.sets):
        return (f"{image_modes} need the VAE encoder, which AWS's walk-through layout does not have: compile a "
                f"root with compile_scripts.compile (it compiles the VAE encoder too), e.g. python -m "
                f"compile_scripts.compile --model {DEFAULT_MODEL} --out ROOT.")
    sizes = list(dict.fromkeys(s for dtype_sizes in lacking.values() for s in dtype_sizes))
    command = compile_hint(plan.root, plan.sets[0].model, " ".join(lacking), "vae_encoder", sizes=sizes,
                           target=plan.target)
    missing = "; ".join(f"{dtype} {', '.join(map(size_key, s))}" for dtype, s in lacking.items())
    return (f"{image_modes} need the VAE encoder part, which this root lacks ({missing}). Add it (the other "
            f"parts stay as they are): {command}")


def check_device_memory(plan: RootPlan, device_memory_gib: float | None) -> None:
    """Refuse, before loading anything, sizes whose parts do not fit a NeuronCore's memory, naming what to drop.

    The estimate (root_format.memory_estimate) is the bytes of the part files on the fullest core: every
    size's UNet (each core holds a copy) plus the text encoder and the VAE parts."""
    chip_gib = float(device_memory_gib) if device_memory_gib else 32.0
    budget = chip_gib * 2**30 / CORES_PER_CHIP * DEVICE_MEMORY_HEADROOM
    estimate = memory_estimate(plan.sets, plan.sizes, len(plan.cores), plan.size_parts)
    for size, cost in estimate.per_size.items():
        log.info("device memory for %s: about %s per NeuronCore (part files of every dtype)", size_key(size),
                 gib(cost))
    log.info("device memory: about %s of %s usable on the fullest NeuronCore (%s per chip, %d%% of each "
             "core's half; text encoder %s)", gib(estimate.total), gib(budget), gib(chip_gib * 2**30),
             DEVICE_MEMORY_HEADROOM * 100, gib(estimate.shared))
    if estimate.total <= budget:
        return
    keep, used = [], estimate.shared
    for size in sorted(plan.sizes, key=lambda s: s != default_size(plan.sizes)):  # the default size first
        if used + estimate.per_size[size] <= budget:
            keep.append(size)
            used += estimate.per_size[size]
    keep = [s for s in plan.sizes if s in keep]
    drop = [s for s in plan.sizes if s not in keep]
    what = (f"--artifacts {plan.root}: the sizes {', '.join(map(size_key, plan.sizes))} need about "
            f"{gib(estimate.total)} of device memory on the fullest NeuronCore (estimated from the part files: "
            f"{', '.join(f'{size_key(s)} {gib(c)}' for s, c in estimate.per_size.items())}, text encoder "
            f"{gib(estimate.shared)}); it has {gib(budget)} usable ({chip_gib:g} GiB per Inferentia2 chip, half "
            f"per core, {DEVICE_MEMORY_HEADROOM:.0%} of it for the parts).")
    if keep:
        raise BackendUnavailable(f"{what} Drop {', '.join(map(size_key, drop))}: start with --sizes "
                                 f"{','.join(map(size_key, keep))} (or SD_SIZES).")
    raise BackendUnavailable(f"{what} Not even one size fits: compile fewer dtypes into the root (one --dtype), "
                             f"or run on an instance with more device memory (--device-memory-gib).")


def gib(value: float) -> str:
    """Bytes as GiB, with enough digits for the tiny model's kilobytes too."""
    gib_ = value / 2**30
    return f"{gib_:.2f} GiB" if gib_ >= 0.1 else f"{value / 2**20:.1f} MiB"
