"""The process's one torch thread: every in-process backend loads, warms up and generates on it.

A backend that runs several pipelines at once (neuron, --neuron-parallel pipeline) has one DeviceThread of its own
per pipeline instead, each with its share of the CPU's threads. A forked child (ZeroGPU's worker, zerogpu.py) starts
its own thread on first use: the parent's is not in it."""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor


class DeviceThread:
    """One long-lived thread on which an in-process backend does all its torch work.

    PyTorch's CPU kernels use an OpenMP thread team per calling thread. When a second thread
    (Gradio's workers, the endpoint's per-request threads) runs torch after the first, the two
    teams contend for the cores and every generation slows down, on every thread (measured in
    docs/benchmarks.md). Loading, warm-up and every generation therefore go through this one
    thread (`device_thread()`, one per process), whichever thread asks.
    """

    def __init__(self, name: str, torch_threads: int | None = None):
        self._name = name
        self._torch_threads = torch_threads
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._ident = self._pool.submit(threading.get_ident).result()
        if self._torch_threads:
            # OpenMP's team size is per calling thread (omp_set_num_threads sets this thread's nthreads-var),
            # so each of several torch threads gets its own share of the cores and they do not oversubscribe.
            self._pool.submit(_set_torch_threads, self._torch_threads).result()

    def run(self, fn, *args, **kwargs):
        """Call fn on the device thread and return its result (or raise its exception)."""
        if self._pid != os.getpid():
            # A forked child (ZeroGPU's worker, inprocess/zerogpu.py) has only the thread that forked: this
            # thread is not there, and work sent to its pool would wait forever. The child gets its own.
            with _CHILD_LOCK:
                if self._pid != os.getpid():
                    self._start()
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        # The caller's context variables go along (as asyncio.to_thread does): Gradio finds the
        # request's progress bar through them when on_step reports a step from this thread.
        context = contextvars.copy_context()
        return self._pool.submit(context.run, fn, *args, **kwargs).result()


    def close(self) -> None:
        """Let the thread end once its work is done (not for the process's shared thread)."""
        self._pool.shutdown(wait=False)


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


_DEVICE_THREAD: DeviceThread | None = None
_DEVICE_THREAD_LOCK = threading.Lock()
# Locks a forked child starts with unlocked: one held by another thread at the fork would stay held there.
_CHILD_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_CHILD_LOCK._at_fork_reinit)
os.register_at_fork(after_in_child=_DEVICE_THREAD_LOCK._at_fork_reinit)


def device_thread() -> DeviceThread:
    """The process's one torch thread, shared by every in-process backend (and the benchmarks)."""
    global _DEVICE_THREAD
    with _DEVICE_THREAD_LOCK:
        if _DEVICE_THREAD is None:
            _DEVICE_THREAD = DeviceThread("torch")
        return _DEVICE_THREAD
