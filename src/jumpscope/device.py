"""Which torch device a job runs on: the one resolver every stage shares.

Jobs resolve their ``--device`` once and pass the result down (model loading, activation
harvesting, the trainer); resolving an already resolved device gives it back unchanged.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

import torch

__all__ = ["resolve_device", "local_device", "launched_by_torchrun", "reuse_freed_cpu_memory", "MALLOC_REUSE_ENV",
           "available_memory"]

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
_cpu_memory_reused = False
# the same setting for a process started from here (e.g. a peer library in a benchmark)
MALLOC_REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_KEEP_BYTES), "MALLOC_TRIM_THRESHOLD_": str(_KEEP_BYTES)}


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this process's GPU (LOCAL_RANK); else ``device``."""
    if device.type != "cuda" or device.index is not None or not launched_by_torchrun():
        return device
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"torchrun started process {local_rank} on this node but it has {count} GPU(s): "
                         f"use --nproc_per_node {count} or fewer (or --device cpu)")
    return torch.device("cuda", local_rank)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; under torchrun a bare ``cuda`` (or auto's)
    is this process's GPU (:func:`local_device`), so the model and the trainer of one process
    share it; an unknown name, or a CUDA device without CUDA, is a ValueError."""
    if str(device) == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__}); "
                         "use --device cpu")
    return local_device(dev)


def reuse_freed_cpu_memory() -> bool:
    """Let glibc keep freed blocks of up to 1 GiB for reuse instead of unmapping them.

    torch has no caching allocator on the CPU: every (batch, d_sae) tensor of a training step
    (32 MiB at 4096 x 2048) is a fresh mmap whose pages the kernel faults in and zeroes on first
    touch. With blocks served from the heap, the same (4096, 384) @ (384, 2048) product took 38 ms
    instead of 53 (one thread) and a training step about a quarter less (benchmarks/README.md).
    The process keeps up to 1 GiB of freed memory mapped in exchange. The same as starting Python
    with ``MALLOC_REUSE_ENV`` in the environment. Linux with glibc only (elsewhere, or when mallopt refuses, nothing changes); True when set."""
    global _cpu_memory_reused
    if _cpu_memory_reused:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _cpu_memory_reused = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    if not _cpu_memory_reused:
        log.debug("mallopt refused the mmap/trim thresholds; CPU tensors stay freshly mapped")
    return _cpu_memory_reused


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory(device: torch.device | str = "cpu", proc: Path = Path("/proc"),
                     cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes a new allocation can take on ``device`` without swapping or an out-of-memory kill:
    on CUDA the device's free memory and what torch's caching allocator holds unused; on Linux the
    smaller of MemAvailable and what this cgroup (v2) may still take, since a container's limit is
    not in /proc/meminfo. None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    if device.type != "cpu":
        return None
    found = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    limit, used = _read_int(cgroup / "memory.max"), _read_int(cgroup / "memory.current")
    if limit is not None and used is not None:
        found.append(max(limit - used, 0))
    return min(found) if found else None
