"""The run-time adapters that put compiled parts back in a diffusers pipeline (assemble.py fits them).

BySize runs the part compiled for the input's size; NeuronUNet and NeuronTextEncoder give the pipeline the
.config, .device and .dtype it reads; StaticBatch and CastDtype feed a part exactly the batch and dtype it was
compiled for; NeuronVaeEncoder answers vae.encode; and on a CPU, ShapeGuard refuses other shapes and dtypes as
the Neuron runtime does, and CpuDataParallel stands in for torch_neuronx.DataParallel.

Nothing here imports torch_neuronx: the same adapters run CPU-traced parts in the tests.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .specs import TIMESTEP_DTYPE, InputSpec


class StaticShapeError(RuntimeError):
    """A compiled part was called with inputs of another shape or dtype than it was compiled for."""


class ShapeGuard(nn.Module):
    """Refuses inputs of another shape or dtype than the compiled ones, as the Neuron runtime does.

    A CPU TorchScript graph runs at any shape, a Neuron one only at the shapes it was traced with;
    with this guard around the CPU artifacts a shape bug fails here as it would on inf2.
    """

    def __init__(self, module: nn.Module, name: str, specs: Sequence[InputSpec]):
        super().__init__()
        self.module = module
        self.name = name
        self.specs = list(specs)

    def check(self, *inputs: torch.Tensor) -> None:
        """Raise StaticShapeError unless every input has its compiled shape and dtype."""
        if len(inputs) != len(self.specs):
            raise StaticShapeError(f"{self.name}: called with {len(inputs)} inputs; it was compiled for "
                                   f"{len(self.specs)}")
        for i, (value, spec) in enumerate(zip(inputs, self.specs)):
            if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
                raise StaticShapeError(
                    f"{self.name}: input {i} is {_describe(value.shape, value.dtype)} but the part was compiled "
                    f"for {_describe(spec.shape, spec.dtype)}; a compiled Neuron graph runs only at the shapes "
                    f"and dtypes it was traced with"
                )

    def forward(self, *inputs: torch.Tensor):
        """Check, then run the part."""
        self.check(*inputs)
        return self.module(*inputs)


class CpuDataParallel(nn.Module):
    """A CPU stand-in for torch_neuronx.DataParallel(model, device_ids, set_dynamic_batching=False).

    Like the real one it splits dim 0 into one equal slice per core and requires each slice to be
    exactly what the part was compiled for (input.shape[0] / len(device_ids) == compiled batch).
    The cores of a real DataParallel run their slices at the same time; on a CPU, whose traced graph
    takes any batch, the nearest equivalent is one call on the checked batch. Two calls in a row
    pay each small op's thread fork/join twice and were no faster than eager diffusers; one call is
    faster per step (docs/benchmarks.md), with the same bf16 results.
    """

    def __init__(self, guard: ShapeGuard, device_ids: Sequence[int], batch_per_core: int):
        super().__init__()
        self.guard = guard
        self.device_ids = list(device_ids)
        self.batch_per_core = batch_per_core

    def forward(self, *inputs: torch.Tensor):
        """Check each core's slice of the batch, then run the batch."""
        cores = len(self.device_ids)
        batch = inputs[0].shape[0]
        if batch != cores * self.batch_per_core:
            raise StaticShapeError(
                f"DataParallel over {cores} cores with dynamic batching off needs a batch of "
                f"{cores} x {self.batch_per_core} (the compiled batch per core); got {batch}"
            )
        for core_inputs in zip(*(x.split(self.batch_per_core) for x in inputs)):
            self.guard.check(*core_inputs)
        return self.guard.module(*inputs)


class StaticBatch(nn.Module):
    """Runs a part compiled for a fixed batch on any batch: in chunks of that size, the last padded."""

    def __init__(self, module: nn.Module, batch: int):
        super().__init__()
        self.module = module
        self.batch = batch

    def forward(self, *inputs: torch.Tensor):
        """Chunk dim 0, pad the last chunk by repeating its last row, run, join, drop the padding."""
        total = inputs[0].shape[0]
        if total == self.batch:
            return self.module(*inputs)
        outputs = []
        for start in range(0, total, self.batch):
            chunk = [x[start:start + self.batch] for x in inputs]
            short = self.batch - chunk[0].shape[0]
            if short:
                chunk = [torch.cat([x, x[-1:].expand(short, *x.shape[1:])]) for x in chunk]
            outputs.append(self.module(*chunk))
        return slice_outputs(concat_outputs(outputs), total)


class CastDtype(nn.Module):
    """Calls a VAE part in its compiled dtype and returns what the part computed, in that dtype.

    So a pipeline of one precision can use VAE parts compiled in another and a part never sees a
    dtype its graph was not compiled for. An fp32 VAE behind a bf16 UNet (AWS's SD2.1 notebook and
    compile.py's default) gets the bf16 latents cast up once: post_quant_conv hands fp32 to the fp32
    decoder, whose fp32 image diffusers' postprocessing reads as any tensor, as the notebook's
    NeuronTypeConversionWrapper does. Casting back to bf16 in between would round away what fp32 is for.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, sample: torch.Tensor, *args: Any) -> torch.Tensor:
        """Cast in and run (extra arguments, such as the decoder's latent_embeds=None, must be None)."""
        if any(a is not None for a in args):
            raise ValueError("a compiled VAE part takes one tensor; conditional inputs were not compiled")
        return first_tensor(self.module(sample.to(self.dtype)))


class NeuronVaeEncoder(nn.Module):
    """Stands in for the VAE's encoder and quant_conv together: the compiled moments, in the input's dtype.

    install() puts it in an AutoencoderKL as its `encoder` and drops `quant_conv` (traced in), so the
    pipeline's `vae.encode(x)` is diffusers' own code around it: it builds the DiagonalGaussianDistribution
    from the moments and returns an AutoencoderKLOutput, which img2img's `retrieve_latents` and inpaint's
    `_encode_vae_image` sample with each image's generator. The part runs in its compiled dtype (fp32 in
    a bf16 root, as the other VAE parts) at its compiled batch (StaticBatch: the pipelines encode one
    image per generator, or the whole batch); the moments come back in the dtype the pipeline gave, so
    the latents, and the noise the distribution draws, have the pipeline's dtype as with an eager VAE.
    """

    def __init__(self, runner: nn.Module, dtype: torch.dtype, batch: int = 1):
        super().__init__()
        self.module = StaticBatch(runner, batch)
        self.dtype = dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Moments (mean and log-variance on dim 1) of a batch of images in [-1, 1]."""
        return first_tensor(self.module(image.to(self.dtype))).to(image.dtype)

    def install(self, vae: nn.Module) -> None:
        """Make this the encoder of a diffusers AutoencoderKL (its quant_conv is part of the compiled graph).

        A diffusers model reads its .device and .dtype from its first parameter or buffer, and compiled parts
        hold none (their weights are constants); with the encoder gone too, the VAE would have nothing to read
        them from, so this keeps an empty buffer of the VAE's device and dtype in its place."""
        anchor = torch.empty(0, dtype=vae.dtype, device=vae.device)
        vae.encoder = self
        vae.quant_conv = None
        self.register_buffer("host", anchor, persistent=False)


class BySize(nn.Module):
    """Runs the part compiled for the input's size: one compiled runner per image size of the root.

    The key is the spatial shape (height, width) of the first input: the latent's for the UNet and the
    VAE decoder parts, the image's for the VAE encoder. A shape no part was compiled for is refused
    as the Neuron runtime would refuse it, naming the compiled ones.
    """

    def __init__(self, name: str, runners: dict[tuple[int, int], nn.Module]):
        super().__init__()
        self.name = name
        self.shapes = list(runners)
        self.runners = nn.ModuleDict({f"{h}x{w}": runner for (h, w), runner in runners.items()})

    def forward(self, *inputs: Any) -> Any:
        """Dispatch on the first input's last two dimensions."""
        height, width = (int(d) for d in inputs[0].shape[-2:])
        if (height, width) not in self.shapes:
            compiled = ", ".join(f"{w}x{h}" for h, w in self.shapes)
            raise StaticShapeError(f"{self.name}: no part was compiled for inputs of {width}x{height} (width x "
                                   f"height); compiled: {compiled}")
        return self.runner((height, width))(*inputs)

    def runner(self, shape: tuple[int, int]) -> nn.Module:
        """The runner of one (height, width)."""
        return self.runners[f"{shape[0]}x{shape[1]}"]


class NeuronUNet(nn.Module):
    """Stands in the pipeline for UNet2DConditionModel: what the pipeline reads, around the compiled UNet.

    `runner` takes (sample, timestep[batch], encoder_hidden_states) at the compiled batch and returns
    the sample, alone or as the first item of a tuple (the walk-through traced UNetWrap returning
    the tuple of `return_dict=False`).
    """

    def __init__(self, runner: nn.Module, config: Any, dtype: torch.dtype, chunk: int,
                 timestep_dtype: torch.dtype = TIMESTEP_DTYPE):
        super().__init__()
        self.unetwrap = StaticBatch(runner, chunk)
        self.config = config
        self.in_channels = config.in_channels
        self.dtype = dtype
        self.device = torch.device("cpu")  # the Neuron runtime takes and returns host tensors
        self.timestep_dtype = timestep_dtype

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                added_cond_kwargs: dict | None = None, return_dict: bool = True, **kwargs: Any):
        """UNet2DConditionModel's call signature; what was not compiled in must be left unset."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs:
            raise ValueError("the compiled UNet takes no timestep_cond, cross_attention_kwargs or "
                             "added_cond_kwargs (LoRA scales and adapters were not compiled in)")
        batch = sample.shape[0]
        # Expanded to the batch so that DataParallel hands each core its own slice of timesteps.
        t = torch.as_tensor(timestep).to(self.timestep_dtype).reshape(-1).expand(batch)
        out = first_tensor(self.unetwrap(sample.to(self.dtype), t, encoder_hidden_states.to(self.dtype)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class NeuronTextEncoder(nn.Module):
    """Stands in the pipeline for CLIPTextModel: returns (last_hidden_state,) from the compiled encoder."""

    def __init__(self, runner: nn.Module, config: Any, dtype: torch.dtype, batch: int = 1):
        super().__init__()
        self.neuron_text_encoder = StaticBatch(runner, batch)
        self.config = config
        self.dtype = dtype
        self.device = torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Indexable like the model's output: [0] is last_hidden_state (no mask: CLIP does not use one)."""
        if kwargs.get("output_hidden_states"):
            raise ValueError("the compiled text encoder returns only the last hidden state (clip_skip "
                             "is not available)")
        out = self.neuron_text_encoder(input_ids)
        if isinstance(out, dict):  # the walk-through traced CLIPTextModel itself, which returns a dict
            out = out["last_hidden_state"]
        return (first_tensor(out).to(self.dtype),)


# --- helpers ---------------------------------------------------------------------------------


def first_tensor(out: Any) -> torch.Tensor:
    """A traced part's main output: the tensor itself, or the first of a tuple/list."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def concat_outputs(outputs: list[Any]) -> Any:
    """Join per-chunk outputs along dim 0: tensors, tuples/lists of tensors or dicts of tensors."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {k: torch.cat([o[k] for o in outputs]) for k in first}
    return type(first)(torch.cat(items) for items in zip(*outputs))


def slice_outputs(out: Any, n: int) -> Any:
    """The first n rows of each tensor in a part's output."""
    if isinstance(out, torch.Tensor):
        return out[:n]
    if isinstance(out, dict):
        return {k: v[:n] for k, v in out.items()}
    return type(out)(v[:n] for v in out)


def _describe(shape: Sequence[int], dtype: torch.dtype) -> str:
    return f"{'x'.join(str(s) for s in shape)} {str(dtype).removeprefix('torch.')}"
