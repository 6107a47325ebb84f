"""Attention as compile.py traces it for Neuron: explicit bmm (the default), SDPA, or neuronx-cc's NKI flash kernel.

Compile-time only: compile_scripts/compile.py installs NeuronAttnProcessor in the UNet and the VAE before
tracing; the loaded graphs already hold it. Nothing here imports torch_neuronx at import time (the NKI kernel
is loaded from the Neuron SDK only when asked for, and refused by the Neuron SDKs from 2.30 on: see NKI_REFUSED_FROM).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .stack import COMPILER_RELEASES, NEURON_SDK, public_version, sdk_release


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
    from neuronx-cc (load_nki_flash_attention) unless given; from Neuron 2.30 on, the supported 2.31.1
    included, that compiler refuses the kernel, and load_nki_flash_attention says so before anything
    compiles. Never compiled on inf2 by this project: the layouts are checked on a CPU stand-in only.
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
    """The NKI attention kernel cannot be used here: no neuronx-cc, or one that refuses the kernel (Neuron 2.30 on)."""


# From Neuron 2.30 neuronx-cc refuses the kernel below: "Usage of the deprecated ``neuronxcc.nki.*`` namespace inside
# NKI kernels now raises a compilation error instead of a warning" (aws-neuron-sdk release-notes/components/nki.rst,
# "NKI [0.4.0] (Neuron 2.30.0 Release)", Breaking Changes; nki/migration/index.rst says the same). The sample's
# kernel lives in that namespace, so on the supported stack (2.31.1, stack.py) neuronx-cc would stop the UNet's
# compile, 20 minutes in, at its end. Its successor is not wired in: the NKI Library's attention_cte (nkilib, bundled
# with neuronx-cc: nki/library/quickstart-nkl.rst; nki/library/api/attention-cte.rst) is a prefill kernel whose page
# names no instance type, and no page at v2.31.1 shows an nki.* kernel inside a torch_neuronx.trace graph for inf2
# (the NKI quickstart traces a lone kernel on Trn2/Trn3: nki/get-started/quickstart-implement-run-kernel.rst).
# Without an inf2 here to compile it and compare it with bmm, load_nki_flash_attention refuses such a compiler before
# anything compiles.
NKI_REFUSED_FROM = "2.30"  # the Neuron SDK release whose compiler refuses the neuronxcc.nki.* namespace
# Its neuronx-cc, from stack.COMPILER_RELEASES (aws-neuron-sdk src/helperscripts/n2-manifest.json).
NKI_REFUSING_COMPILER = next(v for v, release in COMPILER_RELEASES.items() if release == NKI_REFUSED_FROM)


def load_nki_flash_attention():
    """neuronx-cc's flash attention kernel, made traceable by torch_neuronx, imported as AWS's SD2.1 sample does;
    NkiUnavailable where neuronx-cc is missing or refuses it (Neuron 2.30 on, the supported 2.31.1 included).

    Older compilers: the kernel is `neuronxcc.nki._private_kernels.attention` (before that
    `neuronxcc.nki.kernels.attention`; the sample tries both, so do we), and `nki_jit` comes from
    `torch_neuronx.xla_impl.ops` (the top-level torch_neuronx.nki_jit was removed in Neuron 2.24).
    """
    try:
        import neuronxcc  # the Neuron compiler: only on a machine with the Neuron SDK, so imported on use
    except ImportError as exc:
        raise NkiUnavailable(
            f"attention kernel 'nki' needs neuronx-cc's NKI flash attention and torch-neuronx, which cannot be "
            f"imported here ({exc.__class__.__name__}: {exc}). It exists only inside the Neuron compiler, for --target "
            f"neuron, and the compilers of Neuron {NKI_REFUSED_FROM} on refuse it (the supported {NEURON_SDK} too), so "
            f"installing the SDK does not bring it back; use --attention bmm (the default) or sdpa."
        ) from None
    # neuronxcc.__version__ is how optimum-neuron reads the compiler's version too (optimum/neuron/utils/
    # version_utils.py, get_neuronxcc_version). A neuronxcc without one is no wheel AWS published; the imports
    # below then decide, as in the sample.
    compiler = public_version(getattr(neuronxcc, "__version__", None))
    if compiler and _version_key(compiler) >= _version_key(NKI_REFUSING_COMPILER):
        raise NkiUnavailable(
            f"attention kernel 'nki' cannot be compiled with neuronx-cc {compiler} (Neuron SDK "
            f"{sdk_release({'neuronx-cc': compiler})}): the flash attention kernel of AWS's SD2.1 sample lives in the "
            f"neuronxcc.nki.* namespace, which neuronx-cc refuses from Neuron {NKI_REFUSED_FROM} on with a compilation "
            f"error (aws-neuron-sdk release-notes/components/nki.rst, NKI 0.4.0, Breaking Changes), at the end of the "
            f"UNet's compile. Use --attention bmm (the default for --target neuron) instead."
        )
    try:
        try:
            from neuronxcc.nki._private_kernels.attention import attention_isa_kernel  # neuronx-cc: on use
        except ImportError:
            from neuronxcc.nki.kernels.attention import attention_isa_kernel  # the same, older compilers
        from torch_neuronx.xla_impl.ops import nki_jit  # torch-neuronx: only with the Neuron SDK
    except ImportError as exc:
        raise NkiUnavailable(
            f"attention kernel 'nki' needs neuronx-cc's NKI flash attention and torch-neuronx, which cannot be "
            f"imported here ({exc.__class__.__name__}: {exc}); use --attention bmm (the default) or sdpa."
        ) from None
    return nki_jit()(attention_isa_kernel)


def _version_key(version: str) -> tuple[int, ...]:
    """'2.26.6360.0' -> (2, 26, 6360, 0), for ordering neuronx-cc versions (a part's non-digit tail is dropped)."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split("."))


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
