"""What a saved TorchScript part holds, read from its zip archive without loading or running it.

Loading a Neuron-compiled part needs torch_neuronx (and lays its NEFF on a NeuronCore); loading a
large CPU part costs its weights in memory. For the walk-through's flat layout, which records
nothing beside the .pt files, the loader only needs to know whether a part is a Neuron graph and
which dtypes it takes, so this module reads the archive's small pickles instead:

- `traced_inputs.pkl`: torch.jit.trace keeps the example inputs it traced with (PyTorch 2.0 and
  later, torch/jit/_trace.py `_store_inputs=True`); torch_neuronx.trace wraps its compiled graph in
  a torch.jit.trace of the same example inputs (torch_neuronx/xla_impl/trace.py,
  `create_neuron_model`), so Neuron parts compiled under torch 2.x have them too. Frozen graphs
  (compile.py --target cpu) and torch 1.13 archives (the 2023 walk-through's torch-neuronx) do not.
- `data.pkl` / `constants.pkl`: the storages of the weights (frozen graphs keep them as constants),
  whose dtype is the part's dtype when it was traced in one dtype throughout.

The pickles are read by a restricted unpickler that builds nothing but tensor descriptions.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

# TorchScript names storages by their legacy typed-storage class.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ArchiveError(ValueError):
    """The file is not a readable TorchScript archive."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as an archive describes it: its dtype, shape and how many elements its storage holds."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int


def is_neuron_archive(path: Path) -> bool:
    """True when a TorchScript file holds a Neuron-compiled graph (its code calls the neuron custom ops)."""
    with _open(path) as archive:
        for name in archive.namelist():
            if "/code/" in name and name.endswith(".py"):
                text = archive.read(name).decode("utf-8", "replace")
                if "ops.neuron." in text or "classes.neuron." in text:
                    return True
    return False


def traced_input_dtypes(path: Path) -> list[torch.dtype] | None:
    """The dtypes of the example inputs the part was traced with, in order; None if not recorded."""
    with _open(path) as archive:
        name = _member(archive, "traced_inputs.pkl")
        if name is None:
            return None
        inputs = _TensorUnpickler(archive, name).load()
    forward = inputs.get("forward") if isinstance(inputs, dict) else None
    if not isinstance(forward, (list, tuple)) or not all(isinstance(x, TensorInfo) for x in forward):
        return None
    return [x.dtype for x in forward]


def weight_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype holding most of the part's weights (parameters or frozen constants); None if none."""
    elements: Counter[torch.dtype] = Counter()
    with _open(path) as archive:
        for pickled in ("data.pkl", "constants.pkl"):
            name = _member(archive, pickled)
            if name is None:
                continue
            unpickler = _TensorUnpickler(archive, name)
            unpickler.load()
            for info in unpickler.storages.values():
                if info.dtype.is_floating_point:
                    elements[info.dtype] += info.numel
    return elements.most_common(1)[0][0] if elements else None


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"{path}: is not a TorchScript file ({exc.__class__.__name__})") from None


def _member(archive: zipfile.ZipFile, suffix: str) -> str | None:
    """The archive's `<top>/<suffix>`: TorchScript puts everything under one top-level folder."""
    for name in archive.namelist():
        if name.count("/") == 1 and name.endswith("/" + suffix):
            return name
    return None


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles TorchScript's data pickles into TensorInfo records; anything else is a placeholder.

    Nothing found in the pickle is imported or called: module classes become _Placeholder, tensors
    TensorInfo, storages are never read (only their dtype and size, from the persistent id).
    """

    def __init__(self, archive: zipfile.ZipFile, name: str):
        super().__init__(io.BytesIO(archive.read(name)))
        self.storages: dict[str, TensorInfo] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _tag: value
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Placeholder

    def persistent_load(self, pid):
        # ('storage', <dtype from find_class>, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        info = TensorInfo(dtype, (), int(numel))
        self.storages[str(key)] = info
        return info

    @staticmethod
    def _rebuild_tensor(storage: TensorInfo, _offset, size, *_args) -> TensorInfo:
        return TensorInfo(storage.dtype, tuple(int(s) for s in size), storage.numel)


class _Placeholder:
    """Stands for any object of the pickle that is not a tensor (modules, custom classes)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass
