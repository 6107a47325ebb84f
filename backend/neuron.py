"""NeuronBackend: a compiled root -> one diffusers pipeline per compiled dtype, on Inferentia2 (or a CPU for testing).

The root's format (manifest, source.json, the walk-through's flat layout, version checks) is
backend/artifacts.py's. For each dtype the pipeline is built from the real diffusers modules, then the
compiled parts are swapped in (the pipeline reads .config, .device and .dtype of its modules). On inf2
the UNet runs through torch_neuronx.DataParallel over the chip's NeuronCores (--neuron-parallel unet, one request at
a time), or each core holds a whole pipeline of its own and runs its own request (--neuron-parallel pipeline, roots
compiled with --no-cfg); parts traced with --target cpu run the same code on a CPU, through a stand-in for
DataParallel (or separate module instances per simulated core) and a guard that enforces the compiled shapes as the
Neuron runtime does.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from pathlib import Path

import torch

from . import pipeline, root_store
from .api import MODE_LABELS, MODES, BackendUnavailable, Capabilities, GenerationRequest, InvalidRequest
from .artifacts import (
    NEURON_DTYPES,
    SHARED_PARTS,
    TXT2IMG_PARTS,
    VAE_PARTS,
    ArtifactSet,
    Size,
    common_sizes,
    compile_hint,
    default_size,
    dtype_name,
    find_artifacts,
    flat_dtype_note,
    memory_estimate,
    parse_sizes,
    size_key,
)
from .fewstep import capability_fields, few_step_kind
from .inprocess import InProcessBackend
from .models import random_weights_of
from .neuron_modules import (
    BySize,
    CastDtype,
    CpuDataParallel,
    NeuronTextEncoder,
    NeuronUNet,
    NeuronVaeEncoder,
    ShapeGuard,
    StaticBatch,
)
from .neuron_stack import NEURON_SDK_HINT
from .settings import DEFAULT_ARTIFACTS, DEFAULT_MODEL, NEURON_PARALLEL_MODES, Settings

log = logging.getLogger(__name__)

REAL_MODEL_ADVICE = (f"To serve the real model, compile it: python -m compile_scripts.compile --model {DEFAULT_MODEL} "
                     f"--out ROOT (on inf2; see docs/neuron.md).")
CPU_NOTE = ("These parts were traced for the CPU (--target cpu): the Neuron code path runs here with a "
            "stand-in for the NeuronCores. It is for testing the plumbing, not for speed.")
# Device memory: each Inferentia2 chip has two NeuronCore-v2 and 32 GiB of HBM "for storing model
# state" (aws-neuron-sdk about-neuron/arch/neuron-hardware/inferentia2.rst); inf2.xlarge and
# inf2.8xlarge have one chip. This backend uses one chip's cores, and counts half of the chip's memory
# for each core (--device-memory-gib sets the chip's memory, for other instance types and for tests).
CORES_PER_CHIP = 2
# The share of a core's memory the parts' files may fill: the rest is left for activations, input and
# output tensors and the runtime's own scratch, which the files do not show. An assumption, not a
# measurement (no inf2 here); docs/neuron.md says so.
DEVICE_MEMORY_HEADROOM = 0.9


def seconds_since_process_start() -> float | None:
    """How long this process has been running (from /proc on Linux; None where that cannot be read)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def neuron_core_ids(requested: int | None = None, env: dict[str, str] | None = None) -> list[int]:
    """NeuronCores the backend uses (the UNet data-parallel on them, or with --neuron-parallel pipeline a whole pipeline
    on each): one chip's two, as AWS's sample, or fewer if fewer are visible.

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


def check_lora(root, sets, wanted: str | None) -> dict | None:
    """The LoRA the root's weights hold (compile.py --lora records it); --lora must name that one or be left out:
    compiled Neuron graphs cannot load or swap a LoRA at run time."""
    recorded = [(art.manifest or {}).get("lora") for art in sets]
    fused = recorded[0]
    if wanted:
        from .lora import lora_sha256

        sha = lora_sha256(wanted)  # a local file's; None for a Hub id, which is compared by name
        same = fused is not None and (sha == fused["sha256"] if sha and fused["sha256"] else wanted == fused["source"])
        if not same:
            holds = f"LoRA {Path(fused['source']).name}" if fused else "no LoRA"
            raise BackendUnavailable(f"--lora {wanted}: a Neuron root's LoRA is fused at compile time and this root "
                                     f"holds {holds}; compile one with python -m compile_scripts.compile --lora "
                                     f"{wanted} ..., or leave --lora out.")
    return fused


# --- the backend ------------------------------------------------------------------------------


class NeuronBackend(InProcessBackend):
    """Stable Diffusion from compiled parts: one pipeline per compiled dtype, serving every loaded size, run one
    request at a time (--neuron-parallel unet) or one per NeuronCore at once (pipeline: a lane per core)."""

    name = "neuron"

    def __init__(self, settings: Settings):
        started = time.perf_counter()
        super().__init__(settings)
        self.root = root_store.resolve(settings.artifacts or DEFAULT_ARTIFACTS, settings.cache_dir)
        try:
            wanted_sizes = parse_sizes(settings.sizes) if settings.sizes else None
        except ValueError as exc:
            raise BackendUnavailable(f"--sizes {settings.sizes}: {exc}") from None
        self.sets = find_artifacts(self.root, settings.model, wanted_sizes)
        first = self.sets[0]
        self.lora = check_lora(self.root, self.sets, settings.lora)
        self.target = first.target
        # A folder's name, not its path on the compile machine; Hub ids and 'tiny' as recorded.
        self.model = Path(first.model).name if os.path.isabs(first.model) else first.model
        self.sizes, size_notes = common_sizes(self.sets)
        if not self.sizes:
            found = "; ".join(f"{a.dtype}: {', '.join(map(size_key, a.sizes))}" for a in self.sets)
            raise BackendUnavailable(f"--artifacts {self.root}: no size is compiled in every dtype ({found}); compile "
                                     f"the same --sizes for each --dtype.")
        self._neuronx = _import_torch_neuronx(self.root) if self.target == "neuron" else None
        self.device_ids = neuron_core_ids(settings.neuron_cores)
        self.parallel = self._parallel_mode(settings.neuron_parallel)
        self.guidance = all(art.guidance for art in self.sets)  # False: compiled with --no-cfg
        if self.parallel == "pipeline":
            self.use_lanes(len(self.device_ids))  # one lane (pipelines, torch thread) per NeuronCore
        self.note_random_weights(random_weights_of(self.model, str(self.root)), "Compiled from", REAL_MODEL_ADVICE)
        for warning in [w for art in self.sets for w in art.warnings] + size_notes:
            log.warning("%s", warning)
            self.notes.append(warning)
        if self.target == "cpu":
            self.notes.append(CPU_NOTE)
        self.modes_note = self._missing_encoder_note()
        if self.modes_note:
            log.warning("%s", self.modes_note)
            self.notes.append(self.modes_note)
        self.check_device_memory(settings.device_memory_gib)
        self._load_all()
        self.use_schedulers_of(next(iter(self._pipelines.values())))
        # A few-step root: its scheduler config says so (compile.py --few-step writes it), or --few-step.
        self.few_step = few_step_kind(settings.few_step, next(iter(self._pipelines.values())).scheduler.config)
        # Guidance is off for a few-step model whatever its manifest says, and for a root compiled with --no-cfg.
        self.guidance = self.guidance and self.few_step is None
        guidance_fields = {"guidance": self.guidance, **capability_fields(self.few_step)}
        cores = len(self.device_ids)
        placement = "the UNet across them" if self.parallel == "unet" else "a pipeline on each"
        device = (f"neuron ({cores} NeuronCore{'s' if cores > 1 else ''}, {placement})" if self.target == "neuron"
                  else f"cpu (Neuron stand-in, {cores} simulated cores, {placement})")
        self._caps = Capabilities(
            backend=self.name,
            model=self.model,
            device=device,
            precisions=tuple(self._pipelines),
            fixed_sizes=tuple(self.sizes),
            default_size=default_size(self.sizes),
            max_images=settings.max_images,
            is_tiny=self.is_tiny,  # the app's warning banner
            previews=self.previews,
            modes=self.modes(),
            concurrency=len(self._lanes),
            notes=tuple(self.notes),
            **guidance_fields,
        )
        for lane in self._lanes:
            for dtype in self._pipelines:
                for size in self.sizes:
                    lane.device.run(self._warm_up, dtype, size, lane)
        self._first_image_lock = threading.Lock()
        self._first_image_logged = False
        since_start = seconds_since_process_start()
        log.info("ready in %.1f s (loading and warm-up)%s: %s, sizes %s, modes %s, --neuron-parallel %s (%d at once)",
                 time.perf_counter() - started,
                 "" if since_start is None else f", {since_start:.1f} s after the process started",
                 " and ".join(self._pipelines), ", ".join(map(size_key, self.sizes)), ", ".join(self._caps.modes),
                 self.parallel, self._caps.concurrency)

    # What the root offers ----------------------------------------------------------------------

    def _parallel_mode(self, wanted: str) -> str:
        """--neuron-parallel, checked against the root: pipeline only where the UNet was compiled without CFG.

        A CFG step has two UNet samples: with the UNet across the cores they run at once, one per core; with a whole
        pipeline per core they would run one after the other on one core. Each image would take about twice as long
        for about the same images per second, so a CFG root is refused rather than served that way."""
        if wanted not in NEURON_PARALLEL_MODES:
            raise BackendUnavailable(f"--neuron-parallel {wanted}: use one of {', '.join(NEURON_PARALLEL_MODES)}.")
        if wanted == "pipeline" and not all(art.guidance is False for art in self.sets):
            raise BackendUnavailable(
                f"--neuron-parallel pipeline: {self.root} was compiled for classifier-free guidance, whose two UNet "
                f"samples per step run one per NeuronCore (--neuron-parallel unet); one pipeline per core would run "
                f"them one after the other, about doubling each image's time for no more images per second. Serve it "
                f"with --neuron-parallel unet, or compile a model meant to run without guidance (a few-step one) with "
                f"--no-cfg.")
        return wanted

    def modes(self) -> tuple[str, ...]:
        """What the UNet runs (InProcessBackend.modes), less image to image and inpainting where a loaded size
        lacks the VAE encoder."""
        offered = super().modes()
        if self.modes_note:
            offered = tuple(m for m in offered if m not in ("img2img", "inpaint"))
        if not offered:  # a 9-channel inpainting UNet runs only inpaint, which needs the encoder
            raise BackendUnavailable(f"--artifacts {self.root}: its UNet is an inpainting one, which runs only "
                                     f"Inpaint; {self.modes_note}")
        return offered

    def _missing_encoder_note(self) -> str:
        """'' when each loaded size of each dtype has the VAE encoder; else what lacks it and the command that adds
        the part (compile.py adds it without recompiling the rest)."""
        lacking = {art.dtype: [s for s in self.sizes if art.modes_parts_missing(s)] for art in self.sets}
        lacking = {dtype: sizes for dtype, sizes in lacking.items() if sizes}
        if not lacking:
            return ""
        image_modes = " and ".join(f"{MODE_LABELS[m]} ({m})" for m in MODES if m != "txt2img")
        if any(art.layout == "flat" for art in self.sets):
            return (f"{image_modes} need the VAE encoder, which AWS's walk-through layout does not have: compile a "
                    f"root with compile_scripts.compile (it compiles the VAE encoder too), e.g. python -m "
                    f"compile_scripts.compile --model {DEFAULT_MODEL} --out ROOT.")
        sizes = list(dict.fromkeys(s for dtype_sizes in lacking.values() for s in dtype_sizes))
        command = compile_hint(self.root, self.sets[0].model, " ".join(lacking), "vae_encoder", sizes=sizes,
                               target=self.target)
        missing = "; ".join(f"{dtype} {', '.join(map(size_key, s))}" for dtype, s in lacking.items())
        return (f"{image_modes} need the VAE encoder part, which this root lacks ({missing}). Add it (the other "
                f"parts stay as they are): {command}")

    def check_device_memory(self, device_memory_gib: float | None) -> None:
        """Refuse, before loading anything, sizes whose parts do not fit a NeuronCore's memory, naming what to drop.

        The estimate (artifacts.memory_estimate) is the bytes of the part files on the fullest core: every
        size's UNet (each core holds a copy) plus the text encoder and the VAE parts."""
        chip_gib = float(device_memory_gib) if device_memory_gib else 32.0
        budget = chip_gib * 2**30 / CORES_PER_CHIP * DEVICE_MEMORY_HEADROOM
        estimate = memory_estimate(self.sets, self.sizes, len(self.device_ids), self._loaded_size_parts())
        for size, cost in estimate.per_size.items():
            log.info("device memory for %s: about %s per NeuronCore (part files of every dtype)", size_key(size),
                     _gib(cost))
        log.info("device memory: about %s of %s usable on the fullest NeuronCore (%s per chip, %d%% of each "
                 "core's half; text encoder %s)", _gib(estimate.total), _gib(budget), _gib(chip_gib * 2**30),
                 DEVICE_MEMORY_HEADROOM * 100, _gib(estimate.shared))
        if estimate.total <= budget:
            return
        keep, used = [], estimate.shared
        for size in sorted(self.sizes, key=lambda s: s != default_size(self.sizes)):  # the default size first
            if used + estimate.per_size[size] <= budget:
                keep.append(size)
                used += estimate.per_size[size]
        keep = [s for s in self.sizes if s in keep]
        drop = [s for s in self.sizes if s not in keep]
        what = (f"--artifacts {self.root}: the sizes {', '.join(map(size_key, self.sizes))} need about "
                f"{_gib(estimate.total)} of device memory on the fullest NeuronCore (estimated from the part files: "
                f"{', '.join(f'{size_key(s)} {_gib(c)}' for s, c in estimate.per_size.items())}, text encoder "
                f"{_gib(estimate.shared)}); it has {_gib(budget)} usable ({chip_gib:g} GiB per Inferentia2 chip, half "
                f"per core, {DEVICE_MEMORY_HEADROOM:.0%} of it for the parts).")
        if keep:
            raise BackendUnavailable(f"{what} Drop {', '.join(map(size_key, drop))}: start with --sizes "
                                     f"{','.join(map(size_key, keep))} (or SD_SIZES).")
        raise BackendUnavailable(f"{what} Not even one size fits: compile fewer dtypes into the root (one --dtype), "
                                 f"or run on an instance with more device memory (--device-memory-gib).")

    def _loaded_size_parts(self) -> tuple[str, ...]:
        """The size-dependent parts this backend loads: the VAE encoder only where every size has it."""
        return tuple(p for p in ("unet", *VAE_PARTS) if p in TXT2IMG_PARTS or not self.modes_note)

    # Loading -----------------------------------------------------------------------------------

    def _load_all(self) -> None:
        """Every part of every dtype and size, once per lane (--neuron-parallel pipeline: each NeuronCore its own
        copy of every part), logged as it goes (part, size, dtype, bytes, seconds)."""
        for lane in self._lanes:
            self._load_lane(lane)

    def _load_lane(self, lane) -> None:
        """A lane's parts and pipelines: in unet mode the one lane's (its UNet across the cores), in pipeline mode
        those of the lane's own NeuronCore."""
        core = None if self.parallel == "unet" else self.device_ids[lane.index]
        where = "" if core is None else f" for NeuronCore {core}"
        size_parts = self._loaded_size_parts()
        steps = [(art, part, None) for art in self.sets for part in SHARED_PARTS]
        steps += [(art, part, size) for art in self.sets for size in self.sizes for part in size_parts]
        steps.sort(key=lambda step: self.sets.index(step[0]))  # one dtype after the other
        loaded: dict[tuple[str, str, Size | None], torch.nn.Module] = {}
        started = time.perf_counter()
        for index, (art, part, size) in enumerate(steps, 1):
            what = f"{art.dtype} {part} " + (size_key(size) if size else "for every size") + where
            log.info("loading %d/%d: %s (%s, %.1f MB) ...", index, len(steps), what, art.part_dtype(part, size),
                     art.part_bytes(part, size) / 1e6)
            part_started = time.perf_counter()
            loaded[art.dtype, part, size] = self._load_part(art, part, size, core)
            log.info("loaded %d/%d: %s in %.2f s", index, len(steps), what, time.perf_counter() - part_started)
        for art in self.sets:
            part_started = time.perf_counter()
            lane.pipelines[art.dtype] = lane.device.run(self._build_pipeline, art, loaded, size_parts, core)
            log.info("built the %s pipeline%s (%s, %s) from %s in %.2f s", art.dtype, where, art.layout, art.target,
                     art.directory, time.perf_counter() - part_started)
        log.info("loaded %d parts in %.1f s", len(steps), time.perf_counter() - started)

    def _load_part(self, art: ArtifactSet, part: str, size: Size | None = None, core: int | None = None
                   ) -> torch.nn.Module:
        """One part file; `core`: the NeuronCore it is loaded onto (pipeline mode), else where the runtime puts it."""
        path = art.path(part, size)
        try:
            if core is not None and art.target == "neuron":
                # Loaded straight onto its core: torch_neuronx.experimental.neuron_cores_context(start_nc, nc_count)
                # places the models torch.jit.load creates inside it (aws-neuron-sdk, torch-neuronx API reference,
                # "PyTorch NeuronX NeuronCore Placement APIs [Beta]"; api-torch-neuronx-core-placement.rst).
                with self._neuronx.experimental.neuron_cores_context(start_nc=core, nc_count=1):
                    module = torch.jit.load(str(path), map_location="cpu")
            else:  # a CPU part: a separate instance per lane is the stand-in for a copy on each core
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say which and what to do
            hint = compile_hint(self.root, art.model, art.dtype, part, True, [size] if size else None, art.target)
            raise BackendUnavailable(f"{path}: cannot be loaded ({exc.__class__.__name__}: "
                                     f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                                     f"recompile: {hint}") from None
        return module.eval()

    def _build_pipeline(self, art: ArtifactSet, loaded: dict, size_parts: tuple[str, ...], core: int | None = None):
        """The diffusers pipeline with real modules, then the compiled parts swapped in (BySize picks each
        size's part by the shape it is called with). `core`: pipeline mode, every part on that one NeuronCore
        (the UNet at its compiled batch per core); None: the UNet data-parallel over all of them."""
        def part(name: str, size: Size | None = None) -> torch.nn.Module:
            return loaded[art.dtype, name, size]

        if art.layout == "flat" and art.target == "neuron" and any(p not in art.flat_dtypes for p in TXT2IMG_PARTS):
            self._probe_flat_dtypes(art, {p: part(p, None if p in SHARED_PARTS else art.sizes[0])
                                          for p in TXT2IMG_PARTS})
        dtype = pipeline.DTYPES[art.dtype]
        try:
            pipe = pipeline.load_pipeline(str(self.root), dtype, "cpu", local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailable(f"--artifacts {self.root}: the diffusers files cannot be loaded "
                                     f"({exc.__class__.__name__}: {exc}); compile into a fresh --out folder.") from None
        cores = len(self.device_ids)
        text_spec = art.input_specs("text_encoder")
        text_runner = part("text_encoder")
        if art.target != "neuron":
            text_runner = ShapeGuard(text_runner, "text_encoder", text_spec)
        runners: dict[str, dict[tuple[int, int], torch.nn.Module]] = {p: {} for p in size_parts}
        specs = {p: art.input_specs(p, self.sizes[0]) for p in size_parts}
        for size in self.sizes:
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
                        runner = self._neuronx.DataParallel(module, self.device_ids, set_dynamic_batching=False)
                    else:
                        runner = CpuDataParallel(ShapeGuard(module, name, spec), self.device_ids, art.batch_per_core)
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

    def _probe_flat_dtypes(self, art: ArtifactSet, parts: dict[str, torch.nn.Module]) -> None:
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

    def _warm_up(self, precision: str, size: Size, lane) -> None:
        """One 1-step generation per precision and size, so the first person does not wait for lazy loading (on
        Neuron, a part reaches the NeuronCores at its first run) and broken parts fail now. From an image where
        the VAE encoder is loaded (a 1-step image to image runs every part), else from text."""
        from PIL import Image

        started = time.perf_counter()
        modes = self._caps.modes
        mode = "img2img" if "img2img" in modes else "inpaint" if "txt2img" not in modes else "txt2img"
        pictures = {} if mode == "txt2img" else {"image": Image.new("RGB", size, "gray"), "strength": 1.0}
        if mode == "inpaint":
            pictures.update(mask=Image.new("L", size, 255), mask_blur=0)
        request = GenerationRequest(prompt="warm-up", steps=1, seed=0, precision=precision, width=size[0],
                                    height=size[1], mode=mode,
                                    **pictures).validated(self._caps)
        if not self.guidance:
            request = dataclasses.replace(request, guidance_scale=1.0)  # what a --no-cfg root runs
        pipe = self.pipeline_for_mode(precision, mode, lane)
        try:
            pipeline.run(pipe, request, [0], scheduler=lane.schedulers.get(request.scheduler))
        except Exception as exc:  # noqa: BLE001
            log.exception("warm-up failed")
            raise BackendUnavailable(f"--artifacts {self.root}: the {precision} {size_key(size)} parts failed their "
                                     f"first run ({exc.__class__.__name__}: {str(exc)[:300]}); recompile them with "
                                     f"--force.") from None
        log.info("warmed up %s %s (%s)%s in %.2f s", precision, size_key(size), mode,
                 f" on lane {lane.index}" if len(self._lanes) > 1 else "", time.perf_counter() - started)

    # The contract ------------------------------------------------------------------------------

    def pipeline_for(self, precision: str):
        """The pipeline of a compiled precision (all are loaded at start)."""
        return self._pipelines[precision]

    def check_request(self, request: GenerationRequest) -> None:
        """A precision Neuron runs but this root did not compile, or an image mode without the VAE encoder: say how
        to compile it."""
        if request.mode in MODES and request.mode not in self._caps.modes:
            raise InvalidRequest(f"mode: {MODE_LABELS[request.mode]} ({request.mode}) is not available: "
                                 f"{self.modes_note}", "mode")
        # Before validation, for the message naming --no-cfg; None (the default: off here) and non-numbers are
        # left to validated(). diffusers runs CFG when guidance_scale > 1.
        scale = request.guidance_scale
        if not self.guidance and isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 1:
            raise InvalidRequest(f"guidance_scale: {request.guidance_scale:g} asks for classifier-free guidance, and "
                                 f"{self.model} was compiled without it (--no-cfg: one UNet sample per step); use a "
                                 f"guidance_scale of 1 or less (guidance off).", "guidance_scale")
        wanted = request.precision
        if wanted in NEURON_DTYPES and wanted not in self._caps.precisions:  # compilable, just not compiled
            raise InvalidRequest(
                f"precision: {wanted} was not compiled in {self.root}; compiled: {', '.join(self._caps.precisions)}. "
                f"Compile it with: {compile_hint(self.root, self.model, wanted, target=self.target)}",
                "precision",
            )

    def generate(self, request, on_step=None, on_preview=None):
        """As InProcessBackend.generate; the first image is logged with the time since the process started."""
        result = super().generate(request, on_step, on_preview)
        with self._first_image_lock:
            first, self._first_image_logged = not self._first_image_logged, True
        if first:
            since_start = seconds_since_process_start()
            log.info("first image in %s (%.0f ms for this request)",
                     "?" if since_start is None else f"{since_start:.1f} s from the process start",
                     result.timings.total_ms)
        return result

    def close(self) -> None:
        """Drop the pipelines (and with them the parts loaded on the NeuronCores)."""
        super().close()
        gc.collect()


def _gib(value: float) -> str:
    """Bytes as GiB, with enough digits for the tiny model's kilobytes too."""
    gib = value / 2**30
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{value / 2**20:.1f} MiB"


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
