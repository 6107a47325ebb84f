"""NeuronBackend: a compiled root -> one diffusers pipeline per compiled dtype, on Inferentia2 (or a CPU for testing).

The root's format (manifest, source.json, the walk-through's flat layout, version checks) is
backend/artifacts.py's. For each dtype the pipeline is built from the real diffusers modules, then the
compiled parts are swapped in (the pipeline reads .config, .device and .dtype of its modules). On inf2
the UNet runs through torch_neuronx.DataParallel over the chip's NeuronCores; parts traced with
--target cpu run the same code on a CPU, through a stand-in for DataParallel and a guard that enforces
the compiled shapes as the Neuron runtime does.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import torch

from . import pipeline, root_store
from .api import BackendUnavailable, Capabilities, GenerationRequest, InvalidRequest
from .artifacts import (
    NEURON_DTYPES,
    PARTS,
    VAE_PARTS,
    ArtifactSet,
    compile_hint,
    dtype_name,
    find_artifacts,
    flat_dtype_note,
)
from .inprocess import InProcessBackend
from .models import random_weights_of
from .neuron_modules import (
    CastDtype,
    CpuDataParallel,
    NeuronTextEncoder,
    NeuronUNet,
    ShapeGuard,
    StaticBatch,
)
from .neuron_stack import NEURON_SDK_HINT
from .schedulers import DEFAULT_SCHEDULER
from .settings import DEFAULT_ARTIFACTS, DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

REAL_MODEL_ADVICE = (f"To serve the real model, compile it: python -m compile_scripts.compile --model {DEFAULT_MODEL} "
                     f"--out ROOT (on inf2; see docs/neuron.md).")
CPU_NOTE = ("These parts were traced for the CPU (--target cpu): the Neuron code path runs here with a "
            "stand-in for the NeuronCores. It is for testing the plumbing, not for speed.")


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


class NeuronBackend(InProcessBackend):
    """Stable Diffusion from compiled parts: one pipeline per compiled dtype, run one request at a time."""

    name = "neuron"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.root = root_store.resolve(settings.artifacts or DEFAULT_ARTIFACTS, settings.cache_dir)
        self.sets = find_artifacts(self.root, settings.model)
        first = self.sets[0]
        self.target = first.target
        # A folder's name, not its path on the compile machine; Hub ids and 'tiny' as recorded.
        self.model = Path(first.model).name if os.path.isabs(first.model) else first.model
        self.width, self.height = first.width, first.height
        self._neuronx = _import_torch_neuronx(self.root) if self.target == "neuron" else None
        self.device_ids = neuron_core_ids(settings.neuron_cores)
        self.note_random_weights(random_weights_of(self.model, str(self.root)), "Compiled from", REAL_MODEL_ADVICE)
        for art in self.sets:
            for warning in art.warnings:
                log.warning("%s", warning)
                self.notes.append(warning)
        if self.target == "cpu":
            self.notes.append(CPU_NOTE)
        for art in self.sets:
            started = time.perf_counter()
            self._pipelines[art.dtype] = self._device.run(self._build_pipeline, art)
            log.info("loaded %s parts (%s, %s) from %s in %.1f s", art.dtype, art.layout, art.target, art.directory,
                     time.perf_counter() - started)
        self.use_schedulers_of(next(iter(self._pipelines.values())))
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
            is_tiny=self.is_tiny,  # the app's warning banner
            previews=self.previews,
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
                                     f"recompile: {compile_hint(self.root, art.model, art.dtype, part, True)}"
                                     ) from None
        return module.eval()

    def _build_pipeline(self, art: ArtifactSet):
        """The diffusers pipeline with real modules, then the compiled parts swapped in."""
        parts = {part: self._load_part(art, part) for part in PARTS}
        if art.layout == "flat" and art.target == "neuron" and any(p not in art.flat_dtypes for p in PARTS):
            self._probe_flat_dtypes(art, parts)
        dtype = pipeline.DTYPES[art.dtype]
        try:
            pipe = pipeline.load_pipeline(str(self.root), dtype, "cpu", local_files_only=True)
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
                raise BackendUnavailable(f"{art.path(part)}: runs with neither bf16 nor fp32 inputs of the "
                                         f"walk-through's shapes; recompile it with compile_scripts/compile.py.")
        art.dtype = dtype_name(art.flat_dtypes["unet"][0])
        log.info("walk-through Neuron parts probed: %s", flat_dtype_note(art))

    def _warm_up(self, precision: str) -> None:
        """One 1-step generation, so the first person does not wait for lazy loading (and broken parts fail now)."""
        started = time.perf_counter()
        request = GenerationRequest(prompt="warm-up", steps=1, seed=0, precision=precision,
                                    scheduler=DEFAULT_SCHEDULER).validated(self._caps)
        pipe = self._pipelines[precision]
        try:
            pipeline.run(pipe, request, [0], scheduler=self._schedulers.get(request.scheduler))
        except Exception as exc:  # noqa: BLE001
            log.exception("warm-up failed")
            raise BackendUnavailable(f"--artifacts {self.root}: the {precision} parts failed their first run "
                                     f"({exc.__class__.__name__}: {str(exc)[:300]}); recompile them with --force.") \
                from None
        log.info("warmed up %s in %.1f s", precision, time.perf_counter() - started)

    # The contract ------------------------------------------------------------------------------

    def pipeline_for(self, precision: str):
        """The pipeline of a compiled precision (all are loaded at start)."""
        return self._pipelines[precision]

    def check_request(self, request: GenerationRequest) -> None:
        """A precision Neuron runs but this root did not compile: say how to compile it."""
        wanted = request.precision
        if wanted in NEURON_DTYPES and wanted not in self._caps.precisions:  # compilable, just not compiled
            raise InvalidRequest(
                f"precision: {wanted} was not compiled in {self.root}; compiled: {', '.join(self._caps.precisions)}. "
                f"Compile it with: {compile_hint(self.root, self.model, wanted)}",
                "precision",
            )

    def close(self) -> None:
        """Drop the pipelines (and with them the parts loaded on the NeuronCores)."""
        super().close()
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
