"""A STAND-IN for the GPU in ZeroGPU's forked worker, for the tests (there is no CUDA here).

Python runs this file at start-up when its folder is on PYTHONPATH (the `site` module's sitecustomize); the ZeroGPU
test starts `python app.py` so. It changes two functions of the real `spaces` package (spaces 0.51.3,
spaces/zero/torch/patching.py), once the package's own module has run, and nothing else:

- `init(nvidia_uuid)`: the real one sets CUDA_VISIBLE_DEVICES and initialises CUDA with `torch.Tensor([0]).cuda()`;
  this one only sets the variable.
- `move(callback)`: the real one copies every tensor recorded for CUDA to the GPU, then synchronises CUDA; this one
  checks that none was recorded (the test's model is on the CPU: SD_DEVICE=cpu) and moves nothing.
- `is_in_bad_fork()`: the real one asks a forked process whether CUDA was initialised before `spaces` was imported
  (through a function the CPU build cannot send to it); there is no CUDA here, so never.

Everything else is the package's: the import-time torch patching, the launch-time startup report, the device API
calls, the fork, the worker's allow and the queues between the processes. (While that module runs, torch reports
CUDA 12.8, as the CUDA build of a ZeroGPU Space does: the package reads the version then, and the CPU build here has
none; and torch._C._cuda_init, a CUDA binding the package keeps to restore later, exists and raises, as it does on a
CUDA build without a GPU.) The model then runs on the CPU inside the
forked worker, which is what the test checks the pixels of.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

TARGET = "spaces.zero.torch"


def _stand_in(module) -> None:
    def init(nvidia_uuid: str) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = nvidia_uuid

    def move(callback=None) -> None:
        assert module.size() == 0, "the stand-in GPU moves nothing: load the test's model on the CPU"

    def is_in_bad_fork() -> bool:
        return False  # CUDA was never initialised: there is none

    module.init = init
    module.move = move
    module.is_in_bad_fork = is_in_bad_fork


def _no_cuda():
    raise RuntimeError("Torch not compiled with CUDA enabled (the ZeroGPU test's stand-in GPU is the CPU)")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds spaces.zero.torch with the other finders, and runs _stand_in once its module has run."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_stand_in(module):
            import torch  # this interpreter's CPU build, which spaces is about to patch

            # A ZeroGPU Space has a CUDA build of torch, whose version spaces reads while its module runs
            # (spaces/zero/torch/static.py); the CPU build here has none. Shown as CUDA 12.8 while it runs.
            cuda = torch.version.cuda
            torch.version.cuda = cuda or "12.8"
            if not hasattr(torch._C, "_cuda_init"):  # a CUDA binding spaces keeps to restore after patching
                torch._C._cuda_init = _no_cuda
            try:
                exec_module(module)
            finally:
                torch.version.cuda = cuda
            _stand_in(module)

        spec.loader.exec_module = exec_then_stand_in
        return spec


sys.meta_path.insert(0, _AfterImport())
