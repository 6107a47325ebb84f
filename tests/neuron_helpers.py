"""Shared by test_neuron.py and test_compile.py: the tiny model compiled once for the CPU, and
AWS's walk-through traced the walk-through's way.

Stand-ins, and why: the Neuron compiler and device cannot exist here, so the parts are traced with
`--target cpu` (torch.jit.trace) and run through the CPU stand-in for torch_neuronx.DataParallel.
Everything else is the real thing: the compile script, diffusers pipelines, the loader.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from helpers import build_once

# Smaller than the tiny model's native 512 so that the many generations of the tests stay fast;
# the walk-through layout below covers 512x512.
SIZE = 256
# A root of several sizes (width x height, as the infotext and --sizes write them): small ones, for speed.
SIZES = ((128, 128), (192, 128), (128, 192))
# The root the endpoint tests serve and publish: every part, fp32, one small size.
SMALL_SIZE = 128
_SMALL_ROOT = ("--dtype", "fp32", "--height", str(SMALL_SIZE), "--width", str(SMALL_SIZE))


def _compile_args(root: Path, *args: str) -> list[str]:
    """compile.py's arguments for the tiny model traced for the CPU into `root`, with `args` added."""
    return ["--model", "tiny", "--target", "cpu", "--out", str(root), *args]


def _compiled_once(tmp_path_factory, name: str, folder_name: str, *args: str) -> Path:
    """The tiny model compiled for the CPU with compile.py's `args` into FOLDER/folder_name, once per test run."""
    def build(folder: Path) -> Path:
        from compile_scripts.compile import main

        root = folder / folder_name
        assert main(_compile_args(root, *args)) == 0
        return root
    return build_once(tmp_path_factory, name, build)


def compiled_root(tmp_path_factory) -> Path:
    """The tiny model compiled for the CPU in bf16 and fp32 at SIZE x SIZE, once per test run."""
    return _compiled_once(tmp_path_factory, "neuron-root", "root",
                          "--dtype", "bf16", "fp32", "--height", str(SIZE), "--width", str(SIZE))


def sizes_root(tmp_path_factory) -> Path:
    """The tiny model compiled for the CPU in fp32 at the three SIZES, every part, once per test run."""
    return _compiled_once(tmp_path_factory, "neuron-sizes", "root",
                          "--dtype", "fp32", "--sizes", ",".join(f"{w}x{h}" for w, h in SIZES))


def small_root_args(root: Path) -> list[str]:
    """compile.py's arguments for the small fp32 root at `root` (again with --upload, it only publishes)."""
    return _compile_args(root, *_SMALL_ROOT)


def small_root(tmp_path_factory) -> Path:
    """The tiny model compiled for the CPU in fp32 at SMALL_SIZE x SMALL_SIZE, every part, once per test run."""
    return _compiled_once(tmp_path_factory, "small-root", "sd_tiny_root", *_SMALL_ROOT)


def downgrade_to_format_1(root: Path) -> Path:
    """Rewrite a one-size format 2 root as compile.py wrote roots before several sizes: every part beside a format 1
    manifest with the size at its top, and no VAE encoder (which that compile.py did not know)."""
    for directory in sorted((root / "compiled_models").iterdir()):
        path = directory / "manifest.json"
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        (key, compiled), = manifest.pop("sizes").items()
        parts = dict(manifest["parts"])
        for part, entry in compiled["parts"].items():
            if part == "vae_encoder":
                continue
            shutil.move(directory / entry["file"], directory / f"{part}.pt")
            parts[part] = {**entry, "file": f"{part}.pt"}
        shutil.rmtree(directory / key)
        for name in ("unet_sample_size", "vae_in_channels"):  # format 1 did not record these
            manifest["architecture"].pop(name)
        old = {"format": 1, **{k: v for k, v in manifest.items() if k not in ("format", "parts")},
               "height": compiled["height"], "width": compiled["width"], "latent_height": compiled["latent_height"],
               "latent_width": compiled["latent_width"], "parts": parts}
        path.write_text(json.dumps(old, indent=2))
    return root


def in_chunks(forward, chunk: int):
    """An eager UNet's forward, run on batches of exactly `chunk` rows (the last padded by repeating its
    last row, whose output is dropped): the batches a compiled UNet at that batch sees."""
    def run(sample, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        assert not return_dict  # what StableDiffusionPipeline asks for
        outs = []
        for start in range(0, sample.shape[0], chunk):
            rows = [x[start:start + chunk] for x in (sample, encoder_hidden_states)]
            short = chunk - rows[0].shape[0]
            rows = [torch.cat([x, x[-1:].expand(short, *x.shape[1:])]) for x in rows]
            outs.append(forward(rows[0], timestep, encoder_hidden_states=rows[1], return_dict=False, **kwargs)[0])
        return (torch.cat(outs)[:sample.shape[0]],)
    return run


def copy_root(root: Path, dest: Path) -> Path:
    """A private copy of a compiled root that a test may break."""
    return Path(shutil.copytree(root, dest))


# --- AWS's walk-through, as it wrote it (the blog's compile section), traced with torch.jit.trace ---


class WalkthroughUNetWrap(nn.Module):
    """The walk-through's UNetWrap: returns the tuple of return_dict=False."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        """As in the blog."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)


class WalkthroughNeuronUNet(nn.Module):
    """The walk-through's NeuronUNet, used by its loading code."""

    def __init__(self, unetwrap):
        super().__init__()
        self.unetwrap = unetwrap
        self.config = unetwrap.unet.config
        self.in_channels = unetwrap.unet.in_channels
        self.device = unetwrap.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None, **kwargs):
        """As in the blog (**kwargs: diffusers 0.42 passes a few more, all None)."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        sample = self.unetwrap(sample, timestep.float().expand((sample.shape[0],)).to(torch.bfloat16),
                               encoder_hidden_states)[0]
        return UNet2DConditionOutput(sample=sample)


class WalkthroughNeuronTextEncoder(nn.Module):
    """The walk-through's NeuronTextEncoder, used by its loading code."""

    def __init__(self, text_encoder):
        super().__init__()
        self.neuron_text_encoder = text_encoder
        self.config = text_encoder.config
        self.dtype = text_encoder.dtype
        self.device = text_encoder.device

    def forward(self, emb, attention_mask=None, **kwargs):
        """As in the blog."""
        return [self.neuron_text_encoder(emb)["last_hidden_state"]]


def trace_walkthrough(model_dir: Path, root: Path, vae_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Trace the tiny model as the walk-through traces SD2.1: bf16, 512x512 (64x64 latents), batch 1,
    the text encoder as the raw CLIPTextModel, the UNet through UNetWrap; flat compiled_models/*.pt.

    vae_dtype=torch.float32 traces the VAE decoder and post_quant_conv in fp32, as AWS's SD2.1 notebook
    (aws-neuron-samples torch-neuronx/inference/hf_pretrained_sd2_512_inference.ipynb) does.
    """
    from diffusers import StableDiffusionPipeline

    dtype = torch.bfloat16
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)  # the walk-through saves the bf16 pipeline as the root's model files
    compiled = root / "compiled_models"
    compiled.mkdir(parents=True)
    tok = pipe.tokenizer
    emb = torch.tensor([[tok.bos_token_id, *tok("a lovely cat", add_special_tokens=False).input_ids,
                         tok.eos_token_id]])
    emb = torch.cat([emb, torch.zeros(1, 77 - emb.shape[1], dtype=emb.dtype)], dim=1)
    hidden = pipe.text_encoder.config.hidden_size
    with torch.no_grad():
        text_encoder = copy.deepcopy(pipe.text_encoder)
        torch.jit.save(torch.jit.trace(text_encoder, emb, strict=False, check_trace=False),
                       str(compiled / "text_encoder.pt"))
        unet = copy.deepcopy(WalkthroughUNetWrap(pipe.unet))
        example = (torch.randn([1, 4, 64, 64]).to(dtype), torch.tensor(999).float().expand((1,)).to(dtype),
                   torch.randn([1, 77, hidden]).to(dtype))
        torch.jit.save(torch.jit.trace(unet, example, check_trace=False), str(compiled / "unet.pt"))
    _trace_walkthrough_vae(pipe.vae, compiled, vae_dtype)
    return root


def _trace_walkthrough_vae(vae, compiled: Path, vae_dtype: torch.dtype) -> None:
    """The walk-through's VAE decoder and post_quant_conv, from the bf16 pipeline's VAE, traced in vae_dtype."""
    with torch.no_grad():
        decoder = copy.deepcopy(vae.decoder).to(vae_dtype)
        torch.jit.save(torch.jit.trace(decoder, torch.randn([1, 4, 64, 64]).to(vae_dtype), check_trace=False),
                       str(compiled / "vae_decoder.pt"))
        post_quant_conv = copy.deepcopy(vae.post_quant_conv).to(vae_dtype)
        torch.jit.save(torch.jit.trace(post_quant_conv, torch.randn([1, 4, 64, 64]).to(vae_dtype), check_trace=False),
                       str(compiled / "vae_post_quant_conv.pt"))


def walkthrough_with_vae_dtype(root: Path, dest: Path, vae_dtype: torch.dtype) -> Path:
    """A copy of a trace_walkthrough root whose VAE parts are traced again in vae_dtype: what trace_walkthrough
    with that vae_dtype makes (the same bf16 model files, text encoder and UNet), without tracing the UNet twice."""
    from diffusers import AutoencoderKL

    copy_root(root, dest)
    vae = AutoencoderKL.from_pretrained(dest / "vae", dtype=torch.bfloat16)  # the bf16 weights the root saved
    _trace_walkthrough_vae(vae, dest / "compiled_models", vae_dtype)
    return dest


class WalkthroughTypeConversion(nn.Module):
    """AWS's notebook's NeuronTypeConversionWrapper: feeds an fp32 VAE part fp32, returns what it returns."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        """As in the notebook."""
        return self.network(x.float())


def walkthrough_pipeline(root: Path):
    """The walk-through's loading code on a CPU: its wrappers, jit.load, no DataParallel."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(root), dtype=torch.bfloat16, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    compiled = root / "compiled_models"
    pipe.unet = WalkthroughNeuronUNet(WalkthroughUNetWrap(pipe.unet))
    pipe.unet.unetwrap = torch.jit.load(str(compiled / "unet.pt"))
    pipe.text_encoder = WalkthroughNeuronTextEncoder(pipe.text_encoder)
    pipe.text_encoder.neuron_text_encoder = torch.jit.load(str(compiled / "text_encoder.pt"))
    for attr in ("decoder", "post_quant_conv"):
        part = torch.jit.load(str(compiled / f"vae_{attr}.pt"))
        fp32 = next(part.parameters()).dtype == torch.float32  # how the notebook's loading code knows: it traced it
        setattr(pipe.vae, attr, WalkthroughTypeConversion(part) if fp32 else part)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The hires fix's root (issue 27): a first size and the one 1.5 times it, fp32, every part.
HIRES_SIZES = ((64, 64), (96, 96))


def hires_root(tmp_path_factory) -> Path:
    """The tiny model compiled for the CPU in fp32 at HIRES_SIZES, every part, once per test run."""
    return _compiled_once(tmp_path_factory, "neuron-hires", "root",
                          "--dtype", "fp32", "--sizes", ",".join(f"{w}x{h}" for w, h in HIRES_SIZES))
