"""The one definition of what is traced for Neuron and of the adapters that put it back in a pipeline.

compile_scripts/compile.py traces the wrappers below; backend/neuron.py loads what it saved and fits
it into a diffusers StableDiffusionPipeline with the adapters below. Both sides import this module,
so a traced graph and the code that calls it cannot drift apart.

Four parts are traced, as in AWS's SD2.1 walk-through: the CLIP text encoder, the UNet, the VAE
decoder and the VAE's post_quant_conv; a fifth, the VAE encoder (with quant_conv), turns an input
image into latents for image to image and inpainting. The UNet runs data-parallel over the
NeuronCores of a chip: with classifier-free guidance its batch of 2 runs one sample per core. A root
may hold the size-dependent parts for several image sizes; BySize runs the one of the input's size.

Nothing here imports torch_neuronx: the same modules trace with torch.jit.trace on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .artifacts import PARTS, VAE_PARTS

# The timestep goes into the UNet as float32 whatever the model's dtype: bf16 holds integers above
# 256 only to a multiple of 2..8 (999 -> 1000), while eager diffusers embeds the exact timestep.
TIMESTEP_DTYPE = torch.float32


class StaticShapeError(RuntimeError):
    """A compiled part was called with inputs of another shape or dtype than it was compiled for."""


# --- attention -------------------------------------------------------------------------------


class NeuronAttnProcessor:
    """Attention as explicit matmuls and a softmax, scaled by attn.scale, for neuronx-cc to trace.

    Why not the walk-through's patch: it replaced `Attention.get_attention_scores` with a version that
    scales by a hard-coded 0.125. With torch 2.x diffusers runs `AttnProcessor2_0`, which calls
    F.scaled_dot_product_attention and never calls get_attention_scores, so that patch changes
    nothing; and 0.125 = 1/sqrt(64) is right only for head_dim 64 (SD2.1's UNet), not for other
    head sizes (the tiny model's is 16, the VAE's 512). This processor is installed with
    `set_processor`, so it is really what runs, and it scales by `attn.scale` (1/sqrt(head_dim)).

    Explicit bmm + softmax rather than SDPA: the Neuron compiler maps batched matmuls straight onto
    its matmul engine, while SDPA reaches it as a decomposition it cannot schedule as well. For
    self-attention (query and key of one shape) the scores are computed transposed, K @ Q^T with
    the softmax over dim 1, as AWS's SD2 samples do: the same numbers, in the layout that the
    compiler handles best for the large square score matrices of the 64x64 latent level.

    kernel="sdpa" computes the same attention (same processor, same scale) with PyTorch's fused
    kernel instead. It is what --target cpu traces by default: on a CPU the fused kernel is 1.5-2x
    faster than materialised score matrices, and the CPU artifacts should be as fast as eager
    diffusers. The bmm kernel traces on a CPU too (compile.py --attention bmm), which is how it is
    tested here.

    kernel="nki" runs self-attention through neuronx-cc's flash attention kernel, as AWS's current
    SD2.1 sample does (aws-neuron-samples torch-neuronx/inference/hf_pretrained_sd2_512_inference.ipynb,
    `KernelizedAttnProcessor2_0`): only where the kernel fits (no mask, head_dim <= 128 and no larger
    than the token count); cross-attention, with its 77 text tokens, and the VAE's single 512-wide
    head take the bmm path. The kernel exists only inside the Neuron compiler, so `flash` is loaded
    from neuronx-cc (load_nki_flash_attention) unless given.
    """

    KERNELS = ("bmm", "sdpa", "nki")

    def __init__(self, kernel: str = "bmm", flash: Any = None):
        if kernel not in self.KERNELS:
            raise ValueError(f"attention kernel {kernel!r}: use one of {', '.join(self.KERNELS)}")
        self.kernel = kernel
        self.flash = (flash or load_nki_flash_attention()) if kernel == "nki" else None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        """Same contract as diffusers' AttnProcessor; returns the attention block's output."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        self_attention = encoder_hidden_states is None
        if self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if self.kernel == "sdpa":
            hidden_states = _sdpa(attn, query, key, value, attention_mask, batch_size)
        elif self.kernel == "nki" and self_attention and attention_mask is None and nki_fits(query, attn.heads):
            hidden_states = _nki_attention(self.flash, attn, query, key, value, batch_size)
        else:
            query = attn.head_to_batch_dim(query)
            key = attn.head_to_batch_dim(key)
            value = attn.head_to_batch_dim(value)
            probs = attention_probs(query, key, attention_mask, attn.scale, attn.upcast_attention,
                                    attn.upcast_softmax)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _sdpa(attn, query, key, value, mask, batch_size: int) -> torch.Tensor:
    """The same attention through F.scaled_dot_product_attention, at attn.scale (AttnProcessor2_0 uses
    SDPA's default, which equals attn.scale only when scale_qk is on)."""
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query, key, value = (x.view(batch_size, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if mask is not None:
        mask = mask.view(batch_size, heads, -1, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    upcast_attention: bool = False, upcast_softmax: bool = False) -> torch.Tensor:
    """softmax(scale * Q K^T) for (batch*heads, tokens, head_dim) inputs, in the query's dtype."""
    dtype = query.dtype
    if upcast_attention:
        query, key = query.float(), key.float()
    if mask is None and query.shape == key.shape:
        scores = torch.bmm(key, query.transpose(-1, -2)) * scale
        if upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=1).permute(0, 2, 1)
    else:
        scores = torch.bmm(query, key.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        if upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1)
    return probs.to(dtype)


# --- NKI flash attention (Neuron only) ------------------------------------------------------------

# AWS's SD2.1 sample calls attention_isa_kernel with this kernel_name: Q and K come in as
# (batch*heads, head_dim, tokens), V as (batch*heads, tokens, head_dim), and the kernel writes the
# (batch*heads, tokens, head_dim) output into a buffer it is handed.
NKI_KERNEL_NAME = "AttentionMMSoftmaxMMWithoutSwap"
NKI_MAX_HEAD_DIM = 128  # the sample's bound: a head must fit the 128 partitions of a NeuronCore's SBUF


class NkiUnavailable(ImportError):
    """The NKI attention kernel cannot be imported here (it ships inside neuronx-cc)."""


def load_nki_flash_attention():
    """neuronx-cc's flash attention kernel, made traceable by torch_neuronx, imported as AWS's SD2.1 sample does.

    neuronx-cc keeps the kernel in `neuronxcc.nki._private_kernels.attention`; older compilers had it in
    `neuronxcc.nki.kernels.attention` (the sample tries both, so do we). `nki_jit` comes from
    `torch_neuronx.xla_impl.ops` (the top-level torch_neuronx.nki_jit was removed in Neuron 2.24).
    """
    try:
        try:
            from neuronxcc.nki._private_kernels.attention import attention_isa_kernel
        except ImportError:
            from neuronxcc.nki.kernels.attention import attention_isa_kernel
        from torch_neuronx.xla_impl.ops import nki_jit
    except ImportError as exc:
        raise NkiUnavailable(
            f"attention kernel 'nki' needs neuronx-cc's NKI flash attention and torch-neuronx, which cannot be "
            f"imported here ({exc.__class__.__name__}: {exc}). It exists only for --target neuron, on a machine with "
            f"the Neuron SDK (pip install -r requirements-neuron.txt); use --attention bmm or sdpa otherwise."
        ) from None
    return nki_jit()(attention_isa_kernel)


def nki_fits(query: torch.Tensor, heads: int) -> bool:
    """Whether the flash kernel takes this attention: AWS's sample runs it only where head_dim <= 128 and
    head_dim <= the number of query tokens, and SDPA elsewhere (here: bmm)."""
    head_dim = query.shape[-1] // heads
    return head_dim <= NKI_MAX_HEAD_DIM and head_dim <= query.shape[1]


def _nki_attention(flash, attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   batch_size: int) -> torch.Tensor:
    """Self-attention through the NKI kernel, in the layouts of the sample's attention_wrapper_without_swap,
    at attn.scale (the sample's 1/sqrt(head_dim), which equals it for SD2.1)."""
    heads = attn.heads
    head_dim = query.shape[-1] // heads
    q_len, k_len = query.shape[1], key.shape[1]
    q = query.view(batch_size, q_len, heads, head_dim).permute(0, 2, 3, 1).reshape(batch_size * heads, head_dim, q_len)
    k = key.view(batch_size, k_len, heads, head_dim).permute(0, 2, 3, 1).reshape(batch_size * heads, head_dim, k_len)
    v = value.view(batch_size, k_len, heads, head_dim).transpose(1, 2).reshape(batch_size * heads, k_len, head_dim)
    out = torch.zeros((batch_size * heads, q_len, head_dim), dtype=query.dtype, device=query.device)
    flash(q, k, v, attn.scale, out, kernel_name=NKI_KERNEL_NAME)
    return out.view(batch_size, heads, q_len, head_dim).transpose(1, 2).reshape(batch_size, q_len, heads * head_dim)


def install_neuron_attention(module: nn.Module, kernel: str = "bmm", flash: Any = None) -> int:
    """Give every diffusers Attention inside module a NeuronAttnProcessor; returns how many."""
    from diffusers.models.attention_processor import Attention

    processor = NeuronAttnProcessor(kernel, flash)
    count = 0
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.set_processor(processor)
            count += 1
    return count


# --- what is traced --------------------------------------------------------------------------


class UNetWrap(nn.Module):
    """The traced UNet: (sample, timestep[batch], encoder_hidden_states) -> the predicted sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """A plain tensor out: traced graphs cannot return UNet2DConditionOutput."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeEncoderWrap(nn.Module):
    """The traced VAE encoder: an image (batch, 3, H, W) in [-1, 1] -> the moments (batch, 2 x latent channels,
    H/8, W/8), the encoder followed by quant_conv, as AutoencoderKL._encode computes them (diffusers 0.42)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The mean and log-variance, stacked on dim 1, which DiagonalGaussianDistribution splits."""
        moments = self.encoder(image)
        return moments if self.quant_conv is None else self.quant_conv(moments)


class TextEncoderWrap(nn.Module):
    """The traced text encoder: input_ids (1, 77) -> last_hidden_state (1, 77, hidden)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Only last_hidden_state: the pipeline uses nothing else and a tensor traces most simply."""
        return self.text_encoder(input_ids, return_dict=False)[0]


@dataclass(frozen=True)
class InputSpec:
    """The shape and dtype one input of a compiled part was traced with."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_json(self) -> dict[str, Any]:
        """{"shape": [...], "dtype": "bfloat16"} for the manifest."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InputSpec":
        """Inverse of to_json."""
        return cls(tuple(int(v) for v in data["shape"]), getattr(torch, data["dtype"]))


def part_input_specs(part: str, dtype: torch.dtype, batch: int, latent_height: int, latent_width: int,
                     tokens: int, text_hidden: int, latent_channels: int = 4,
                     timestep_dtype: torch.dtype = TIMESTEP_DTYPE, unet_in_channels: int | None = None,
                     image_channels: int = 3, vae_scale_factor: int = 8) -> list[InputSpec]:
    """The inputs a part is traced with: `batch` is per NeuronCore for the UNet, else per call.

    unet_in_channels: the UNet's sample channels when they are not the latent's (9 for a dedicated
    inpainting UNet, which takes the latents, the mask and the masked image's latents)."""
    latent = (batch, latent_channels, latent_height, latent_width)
    if part == "text_encoder":
        return [InputSpec((batch, tokens), torch.int64)]
    if part == "unet":
        sample = (batch, unet_in_channels or latent_channels, latent_height, latent_width)
        return [InputSpec(sample, dtype), InputSpec((batch,), timestep_dtype),
                InputSpec((batch, tokens, text_hidden), dtype)]
    if part == "vae_encoder":
        return [InputSpec((batch, image_channels, latent_height * vae_scale_factor,
                           latent_width * vae_scale_factor), dtype)]
    if part in VAE_PARTS:
        return [InputSpec(latent, dtype)]
    raise KeyError(f"unknown part {part!r}; parts are {', '.join(PARTS)}")


# --- what runs the traced parts --------------------------------------------------------------


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

