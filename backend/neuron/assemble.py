"""Assembling the neuron backend's pipelines from a RootPlan: load each part file (onto its NeuronCore in pipeline
mode), build the diffusers pipeline with the real modules, then swap the compiled parts in through the run-time
adapters (adapters.py). Free functions of the plan: the backend calls them once per lane, on the lane's thread.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..core.errors import BackendUnavailable
from ..inprocess import pipeline
from ..inprocess.base import Lane
from .adapters import (
    BySize,
    CastDtype,
    CpuDataParallel,
    NeuronTextEncoder,
    NeuronUNet,
    NeuronVaeEncoder,
    ShapeGuard,
    StaticBatch,
)
from .host import neuron_devices
from .parts import SHARED_PARTS, TXT2IMG_PARTS, Size, size_key
from .root_format import CompiledDtype, compile_hint, dtype_name, flat_dtype_note, installed_versions
from .root_plan import RootPlan
from .stack import NEURON_SDK_HINT, public_version

log = logging.getLogger(__name__)


def load_lane(plan: RootPlan, lane: Lane, neuronx: Any = None) -> None:
    """A lane's parts and pipelines: in unet mode the one lane's (its UNet across the cores), in pipeline mode
    those of the lane's own NeuronCore."""
    core = None if plan.parallel == "unet" else plan.cores[lane.index]
    where = "" if core is None else f" for NeuronCore {core}"
    size_parts = plan.size_parts
    steps = [(art, part, None) for art in plan.sets for part in SHARED_PARTS]
    steps += [(art, part, size) for art in plan.sets for size in plan.sizes for part in size_parts]
    steps.sort(key=lambda step: plan.sets.index(step[0]))  # one dtype after the other
    loaded: dict[tuple[str, str, Size | None], torch.nn.Module] = {}
    started = time.perf_counter()
    for index, (art, part, size) in enumerate(steps, 1):
        what = f"{art.dtype} {part} " + (size_key(size) if size else "for every size") + where
        log.info("loading %d/%d: %s (%s, %.1f MB) ...", index, len(steps), what, art.part_dtype(part, size),
                 art.part_bytes(part, size) / 1e6)
        part_started = time.perf_counter()
        loaded[art.dtype, part, size] = load_part(plan, neuronx, art, part, size, core)
        log.info("loaded %d/%d: %s in %.2f s", index, len(steps), what, time.perf_counter() - part_started)
    for art in plan.sets:
        part_started = time.perf_counter()
        lane.pipelines[art.dtype] = lane.device.run(build_pipeline, plan, neuronx, art, loaded, size_parts, core)
        log.info("built the %s pipeline%s (%s, %s) from %s in %.2f s", art.dtype, where, art.layout, art.target,
                 art.directory, time.perf_counter() - part_started)
    log.info("loaded %d parts in %.1f s", len(steps), time.perf_counter() - started)


def load_part(plan: RootPlan, neuronx: Any, art: CompiledDtype, part: str, size: Size | None = None,
              core: int | None = None) -> torch.nn.Module:
    """One part file; `core`: the NeuronCore it is loaded onto (pipeline mode), else where the runtime puts it."""
    path = art.path(part, size)
    # Before the try below: a torch-neuronx without the placement API is the stack's fault, not the file's.
    placement = core_placement(neuronx, core) if core is not None and art.target == "neuron" else None
    try:
        if placement is not None:
            with placement:  # torch.jit.load inside it: the part is loaded straight onto its core
                module = torch.jit.load(str(path), map_location="cpu")
        else:  # a CPU part: a separate instance per lane is the stand-in for a copy on each core
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say which and what to do
        hint = compile_hint(plan.root, art.model, art.dtype, part, True, [size] if size else None, art.target)
        raise BackendUnavailable(f"{path}: cannot be loaded ({exc.__class__.__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                                 f"recompile: {hint}") from None
    return module.eval()


def core_placement(neuronx: Any, core: int):
    """The context inside which torch.jit.load puts a Neuron part on NeuronCore `core` alone; BackendUnavailable
    when this torch-neuronx has no such API.

    torch_neuronx.neuron_cores_context(start_nc=-1, nc_count=-1) is the public placement API since Neuron 2.25: the
    models torch.jit.load creates inside it are loaded onto nc_count cores from start_nc, counted among the cores
    this process sees (aws-neuron-sdk frameworks/torch/torch-neuronx/api-reference-guide/inference/
    api-torch-neuronx-core-placement.rst, as of the v2.31.1 tag). The same page notes that the context "is *not*
    threadsafe": load_lane loads every part on the one thread that builds the backend, lane after lane.

    No fallback to torch_neuronx.experimental.neuron_cores_context, the Beta form this loader used before: 2.25
    moved it to the top level and kept the old scope only with a warning that it "will be removed"
    (release-notes/prev/2.25.0/nx-pytorch.rst), and from 2.26 "The Beta versions of the PyTorch NeuronCore
    Placement APIs are no longer supported" (release-notes/prev/2.26.0/index.rst). The project supports one stack,
    Neuron SDK 2.31.1 (stack.py), which has the public API; a torch-neuronx without it predates 2.25 and is no
    stack this loader is tested against, so it is told to install the supported one instead.
    """
    place = getattr(neuronx, "neuron_cores_context", None)
    if place is None:
        have = public_version(installed_versions().get("torch-neuronx")) or "(version unknown)"
        raise BackendUnavailable(
            f"--neuron-parallel pipeline: torch-neuronx {have} has no torch_neuronx.neuron_cores_context, the "
            f"NeuronCore placement API (public since Neuron 2.25) that loads each part onto its lane's core. "
            f"{NEURON_SDK_HINT} Or serve with --neuron-parallel unet, which places no part by hand.")
    return place(start_nc=core, nc_count=1)


def build_pipeline(plan: RootPlan, neuronx: Any, art: CompiledDtype, loaded: dict, size_parts: tuple[str, ...],
                   core: int | None = None):
    """The diffusers pipeline with real modules, then the compiled parts swapped in (BySize picks each
    size's part by the shape it is called with). `core`: pipeline mode, every part on that one NeuronCore
    (the UNet at its compiled batch per core); None: the UNet data-parallel over all of them."""
    def part(name: str, size: Size | None = None) -> torch.nn.Module:
        return loaded[art.dtype, name, size]

    if art.layout == "flat" and art.target == "neuron" and any(p not in art.flat_dtypes for p in TXT2IMG_PARTS):
        probe_flat_dtypes(art, {p: part(p, None if p in SHARED_PARTS else art.sizes[0])
                                      for p in TXT2IMG_PARTS})
    dtype = pipeline.DTYPES[art.dtype]
    try:
        pipe = pipeline.load_pipeline(str(plan.root), dtype, "cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailable(f"--artifacts {plan.root}: the diffusers files cannot be loaded "
                                 f"({exc.__class__.__name__}: {exc}); compile into a fresh --out folder.") from None
    cores = len(plan.cores)
    text_spec = art.input_specs("text_encoder")
    text_runner = part("text_encoder")
    if art.target != "neuron":
        text_runner = ShapeGuard(text_runner, "text_encoder", text_spec)
    runners: dict[str, dict[tuple[int, int], torch.nn.Module]] = {p: {} for p in size_parts}
    specs = {p: art.input_specs(p, plan.sizes[0]) for p in size_parts}
    for size in plan.sizes:
        for name in size_parts:
            spec = art.input_specs(name, size)
            shape = tuple(spec[0].shape[-2:])  # what BySize dispatches on: the input's height x width
            module = part(name, size)
            if name == "unet" and core is not None:
                # One core, one request: the UNet runs at its compiled batch per core (StaticBatch below feeds
                # it exactly that), and the guard refuses any other batch as that core's runtime would.
                runner = module if art.target == "neuron" else ShapeGuard(module, name, spec)
            elif name == "unet":
                if art.target == "neuron":
                    # One copy of the UNet per core; dynamic batching off, so each core gets exactly its
                    # compiled batch (StaticBatch in NeuronUNet pads the last chunk to that).
                    runner = neuronx.DataParallel(module, plan.cores, set_dynamic_batching=False)
                else:
                    runner = CpuDataParallel(ShapeGuard(module, name, spec), plan.cores, art.batch_per_core)
            else:
                runner = module if art.target == "neuron" else ShapeGuard(module, name, spec)
                if name != "vae_encoder":
                    runner = CastDtype(StaticBatch(runner, spec[0].shape[0]), spec[0].dtype)
            runners[name][shape] = runner
    unet_config, text_config = pipe.unet.config, pipe.text_encoder.config
    pipe.unet = NeuronUNet(BySize("unet", runners["unet"]), unet_config, specs["unet"][0].dtype,
                           chunk=art.batch_per_core * (1 if core is not None else cores),
                           timestep_dtype=specs["unet"][1].dtype)
    pipe.text_encoder = NeuronTextEncoder(text_runner, text_config, dtype, batch=text_spec[0].shape[0])
    pipe.vae.decoder = BySize("vae_decoder", runners["vae_decoder"])
    pipe.vae.post_quant_conv = BySize("vae_post_quant_conv", runners["vae_post_quant_conv"])
    if "vae_encoder" in size_parts:
        spec = specs["vae_encoder"][0]
        NeuronVaeEncoder(BySize("vae_encoder", runners["vae_encoder"]), spec.dtype, spec.shape[0]).install(pipe.vae)
    gc.collect()  # the eager UNet and text encoder just let go can be gigabytes
    return pipe


def probe_flat_dtypes(art: CompiledDtype, parts: dict[str, torch.nn.Module]) -> None:
    """Find the input dtypes of walk-through Neuron parts that their files do not record (torch 1.13 archives).

    The Neuron runtime checks every input's dtype against the compiled model's metadata and refuses
    another (torch_neuronx's trace.py builds that metadata "to validate input tensor shapes, names, and
    types"), so one call with zeros per candidate dtype tells which one the part was compiled for. It
    costs one run of each part at load, which the warm-up pays anyway.
    """
    art.flat_dtypes.setdefault("text_encoder", [torch.int64])
    for part in [p for p in TXT2IMG_PARTS if p not in SHARED_PARTS]:  # the walk-through has no encoder
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
            raise BackendUnavailable(f"{art.path(part)}: runs with neither bf16 nor fp32 inputs of the "
                                     f"walk-through's shapes; recompile it with compile_scripts/compile.py.")
    art.dtype = dtype_name(art.flat_dtypes["unet"][0])
    log.info("walk-through Neuron parts probed: %s", flat_dtype_note(art))


def import_torch_neuronx(root: Path):
    """torch_neuronx, or BackendUnavailable saying how to get it and a Neuron device."""
    try:
        import torch_neuronx
    except Exception as exc:  # noqa: BLE001 - missing or broken: either way it cannot run here
        raise BackendUnavailable(f"--artifacts {root}: these parts were compiled for Neuron, and torch-neuronx cannot "
                                 f"be imported here ({exc.__class__.__name__}). {NEURON_SDK_HINT}") from None
    if not neuron_devices():
        raise BackendUnavailable(f"--artifacts {root}: these parts were compiled for Neuron, and this machine has no "
                                 f"Neuron device (/dev/neuron*). Run on an inf2 instance, or compile CPU parts with "
                                 f"--target cpu to try the backend here.")
    return torch_neuronx
