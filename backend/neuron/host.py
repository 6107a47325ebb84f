"""What this machine has for Neuron: its devices and NeuronCores, the chip's memory, and host memory.

The one place these facts are read (the Neuron runtime's own variables included), for the backend, the
doctor (preflight.py) and compile.py. Light: nothing here imports torch or torch-neuronx.
"""

from __future__ import annotations

import os
from pathlib import Path

# AWS's SD2.1 notebooks ask for inf2.8xlarge or larger (128 GB) to compile, and the UNet compile is
# killed on inf2.xlarge's 16 GB (aws-neuron-samples issue #10). 35 GB is this project's threshold for
# a warning, between the two; AWS publishes no exact figure.
MIN_UNET_MEMORY_GB = 35
# Device memory: each Inferentia2 chip has two NeuronCore-v2 and 32 GiB of HBM "for storing model
# state" (aws-neuron-sdk about-neuron/arch/neuron-hardware/inferentia2.rst); inf2.xlarge and
# inf2.8xlarge have one chip. This backend uses one chip's cores, and counts half of the chip's memory
# for each core (--device-memory-gib sets the chip's memory, for other instance types and for tests).
CORES_PER_CHIP = 2
# The share of a core's memory the parts' files may fill: the rest is left for activations, input and
# output tensors and the runtime's own scratch, which the files do not show. An assumption, not a
# measurement (no inf2 here); docs/neuron.md says so.
DEVICE_MEMORY_HEADROOM = 0.9


def neuron_devices() -> list[Path]:
    """The Neuron devices the driver exposes (/dev/neuron0, ...); empty without a device or driver."""
    return sorted(Path("/dev").glob("neuron*"))


def host_memory_gb() -> float | None:
    """This machine's memory in GB (psutil if present, else /proc/meminfo), None if unknown."""
    try:
        import psutil

        return psutil.virtual_memory().total / 1e9
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


def neuron_core_ids(requested: int | None = None, env: dict[str, str] | None = None) -> list[int]:
    """NeuronCores the backend uses (the UNet data-parallel on them, or with --neuron-parallel pipeline a whole pipeline
    on each): one chip's two, as AWS's sample, or fewer if fewer are visible.

    `requested` (--neuron-cores) overrides the count. NEURON_RT_VISIBLE_CORES ('0-1', '2,3') and
    NEURON_RT_NUM_CORES are the Neuron runtime's own variables, not this project's settings: they limit
    what this process can see, so they are read here, where the cores are counted.
    """
    if requested:
        return list(range(max(1, requested)))
    env = os.environ if env is None else env
    visible = 2
    if env.get("NEURON_RT_NUM_CORES"):
        visible = int(env["NEURON_RT_NUM_CORES"])
    elif env.get("NEURON_RT_VISIBLE_CORES"):
        count = 0
        for item in env["NEURON_RT_VISIBLE_CORES"].split(","):  # int() refuses what the runtime would
            first, _, last = item.strip().partition("-")
            count += (int(last) if last else int(first)) - int(first) + 1
        visible = count
    return list(range(max(1, min(2, visible))))


def seconds_since_process_start() -> float | None:
    """How long this process has been running (from /proc on Linux; None where that cannot be read)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
