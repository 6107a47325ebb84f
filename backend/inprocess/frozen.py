"""CPU: the UNet and the VAE decoder run as frozen TorchScript graphs, one per input shape.

The local backend's `--optimize trace` (what `auto` picks on a CPU). On the first call at a new
input shape a part is traced with `torch.jit.trace` and frozen with `torch.jit.freeze`, which
inlines the weights and lets oneDNN fuse each convolution with the add or activation after it
and pre-pack its weights; later calls at that shape run the frozen graph. The arithmetic is
eager's: on the tiny model the images are bit-identical to eager diffusers in fp32.

The gain is largest where small ops are dominated by per-op costs that the frozen graph fuses away
(the tiny model), a few percent a UNet step at SD2.1-base shapes, for more memory per traced shape;
the figures are in docs/benchmarks.md ("Figures behind choices in the code").

Every graph is only used at the exact shape, dtype and strides it was traced with (TorchScript
would run other shapes, but diffusers' UNet takes shape-dependent branches while tracing, such
as upsampling sizes, that would silently be wrong elsewhere). At most `max_shapes` graphs per
part are kept, least recently used first out. A part whose tracing fails (an unusual model, a
call with arguments the graph does not take: LoRA scales, ControlNet residuals) runs eagerly
instead, with one warning in the log: never a failed request.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from .traced import UNetWrap  # the same (sample, timesteps, text) -> sample graph as compile.py traces

log = logging.getLogger(__name__)

DEFAULT_MAX_SHAPES = 4
_EAGER = object()  # cache entry: tracing this shape failed, run eagerly


def _signature(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.stride(), t.device.type) for t in tensors)


class ShapeCache:
    """Frozen graphs of one part keyed by input signature (shape, dtype, strides), least recently used out."""

    def __init__(self, name: str, build: Callable[..., torch.jit.ScriptModule], max_shapes: int = DEFAULT_MAX_SHAPES):
        if max_shapes < 1:
            raise ValueError("max_shapes must be at least 1")
        self.name = name
        self.build = build
        self.max_shapes = max_shapes
        self.graphs: OrderedDict[tuple, Any] = OrderedDict()
        self.traces = 0  # how many graphs were built (for the log and the tests)

    def get(self, *inputs: torch.Tensor):
        """The frozen graph for these inputs (traced now if new), or None where tracing failed."""
        key = _signature(*inputs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._trace(key, inputs)
            self.graphs[key] = graph
            while len(self.graphs) > self.max_shapes:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return None if graph is _EAGER else graph

    def forget(self, *inputs: torch.Tensor) -> None:
        """Run these inputs eagerly from now on (their graph failed at run time)."""
        self.graphs[_signature(*inputs)] = _EAGER

    def _trace(self, key: tuple, inputs: tuple[torch.Tensor, ...]):
        started = time.perf_counter()
        shapes = ", ".join("x".join(map(str, shape)) for shape, *_ in key)
        try:
            with warnings.catch_warnings():
                # diffusers' shape checks are Python branches: each shape gets its own graph, as intended.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                with torch.inference_mode():
                    traced = torch.jit.trace(self.build().eval(), inputs, check_trace=False)
                    graph = torch.jit.freeze(traced)
        except Exception as exc:  # noqa: BLE001 - any failure: this shape runs eagerly, the request goes on
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            log.warning("%s: could not trace it at %s (%s: %s); running it eagerly at that shape",
                        self.name, shapes, type(exc).__name__, first_line)
            return _EAGER
        self.traces += 1
        log.info("%s: traced and froze a graph for %s in %.1f s", self.name, shapes, time.perf_counter() - started)
        return graph


class _StandIn(nn.Module):
    """A module standing in for `eager` in a pipeline: what it does not define comes from `eager`."""

    def __init__(self, eager: nn.Module):
        super().__init__()
        self.eager = eager

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "eager" not in modules or name.startswith("__"):  # half-built (copy, pickle): no delegation
                raise
            return getattr(modules["eager"], name)

    @property
    def dtype(self) -> torch.dtype:
        return self.eager.dtype

    @property
    def device(self) -> torch.device:
        return self.eager.device


class _DecoderGraph(nn.Module):
    """What is traced of the VAE: latents -> decoded image tensor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


class FrozenUNet(_StandIn):
    """Stands in for UNet2DConditionModel: frozen graphs per shape for plain calls, eager for the rest."""

    def __init__(self, unet: nn.Module, max_shapes: int = DEFAULT_MAX_SHAPES):
        super().__init__(unet)
        self.graphs = ShapeCache(f"UNet ({unet.dtype})", lambda: UNetWrap(self.eager), max_shapes)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, return_dict: bool = True, **kwargs: Any):
        """UNet2DConditionModel's call: the traced graph when only sample, timestep and text embeddings are set."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if args or any(v is not None for v in kwargs.values()) or torch.is_grad_enabled():
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        # The UNet casts timesteps to float32 before its sinusoidal embedding; doing it here gives
        # the graph one input dtype for every scheduler (int64 or float timesteps) and the same result.
        timesteps = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        timesteps = timesteps.expand(sample.shape[0]).contiguous()
        graph = self.graphs.get(sample, timesteps, encoder_hidden_states)
        out = None
        if graph is not None:
            try:
                out = graph(sample, timesteps, encoder_hidden_states)
            except Exception as exc:  # noqa: BLE001 - a graph that fails is not used again
                log.warning("the traced UNet failed (%s); running it eagerly at this shape", type(exc).__name__)
                self.graphs.forget(sample, timesteps, encoder_hidden_states)
        if out is None:
            out = self.eager(sample, timesteps, encoder_hidden_states, return_dict=False)[0]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class FrozenVAE(_StandIn):
    """Stands in for AutoencoderKL: decode() runs a frozen graph per shape; everything else is eager's."""

    def __init__(self, vae: nn.Module, max_shapes: int = DEFAULT_MAX_SHAPES):
        super().__init__(vae)
        self.graphs = ShapeCache(f"VAE decoder ({vae.dtype})", lambda: _DecoderGraph(self.eager), max_shapes)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None):
        """AutoencoderKL.decode (its generator is unused there too)."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        out = None
        if not torch.is_grad_enabled():
            graph = self.graphs.get(z)
            if graph is not None:
                try:
                    out = graph(z)
                except Exception as exc:  # noqa: BLE001
                    log.warning("the traced VAE decoder failed (%s); running it eagerly at this shape",
                                type(exc).__name__)
                    self.graphs.forget(z)
        if out is None:
            out = self.eager.decode(z, return_dict=False)[0]
        return DecoderOutput(sample=out) if return_dict else (out,)

    def forward(self, *args: Any, **kwargs: Any):
        """AutoencoderKL's own forward (encode, sample, decode), eagerly."""
        return self.eager(*args, **kwargs)


def freeze_pipeline(pipe, max_shapes: int = DEFAULT_MAX_SHAPES):
    """Put FrozenUNet and FrozenVAE in the pipeline, in place (their graphs are traced on first use)."""
    if not isinstance(pipe.unet, FrozenUNet):
        pipe.unet = FrozenUNet(pipe.unet, max_shapes)
    if not isinstance(pipe.vae, FrozenVAE):
        pipe.vae = FrozenVAE(pipe.vae, max_shapes)
    return pipe


def eager_module(module: nn.Module) -> nn.Module:
    """The module a stand-in wraps (or the module itself)."""
    return module.eager if isinstance(module, _StandIn) else module
