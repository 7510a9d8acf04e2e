"""Which torch device a job runs on: the one resolver every stage shares.

Jobs resolve their ``--device`` once and pass the result down (model loading, activation
harvesting, the trainer); resolving an already resolved device gives it back unchanged.
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "local_device", "launched_by_torchrun"]


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
