"""--lora: a LoRA fused into a loaded pipeline's weights, then its adapter layers removed (plain modules).

Fusing once at load (diffusers' own load_lora_weights + fuse_lora, which need peft) leaves an ordinary
UNet: the --optimize trace, the Neuron compiler (compile.py --lora) and every request see plain weights,
and nothing swaps LoRAs at run time (compiled Neuron graphs cannot).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..core.errors import BackendUnavailable, short_error

ADAPTER_NAME = "fused"


def lora_sha256(source: str) -> str | None:
    """The sha256 of a local LoRA's weights file (a folder's single .safetensors / .bin), else None (a Hub id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(files) != 1:
            return None
        path = files[0]
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fuse_lora(pipe, source: str, flag: str = "--lora") -> None:
    """Load the LoRA at `source` into pipe, fuse it into the weights and drop the adapter layers.

    Every failure is a BackendUnavailable naming the flag: a missing path, a file that is not a LoRA,
    a LoRA made for another model (its layers or shapes do not match the UNet).
    """
    expanded = os.path.expanduser(source)
    looks_local = os.path.isabs(expanded) or source.startswith((".", "~")) or os.path.exists(expanded)
    if looks_local and not os.path.exists(expanded):
        raise BackendUnavailable(f"{flag} {source}: no such file or folder; give a LoRA folder, a .safetensors "
                                 f"file or a Hub id.")
    path = Path(expanded)
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER_NAME)
        else:
            pipe.load_lora_weights(expanded if looks_local else source, adapter_name=ADAPTER_NAME)
    except ImportError as exc:
        raise BackendUnavailable(f"{flag}: loading a LoRA needs peft ({short_error(exc)}); pip install -r "
                                 f"requirements.txt.") from None
    except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/KeyError/RuntimeError/OSError here
        raise BackendUnavailable(f"{flag} {source}: could not be loaded as a LoRA for this model "
                                 f"({short_error(exc)}); check it is a diffusers / kohya LoRA made for this "
                                 f"model's architecture (SD2.1 here).") from None
    if not _has_adapter(pipe):
        raise BackendUnavailable(f"{flag} {source}: holds no LoRA layer that matches this model's UNet or text "
                                 f"encoder; check it was made for this model's architecture (SD2.1 here).")
    pipe.fuse_lora(adapter_names=[ADAPTER_NAME], lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the peft layers go, so the modules are plain again


def _has_adapter(pipe) -> bool:
    """Whether load_lora_weights put any adapter layer in the UNet or the text encoder."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())
