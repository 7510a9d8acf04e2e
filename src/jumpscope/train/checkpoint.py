"""Resumable checkpoints: one safetensors file (tensors) whose header carries JSON state.

Written atomically (temp file in the same folder, fsync, rename), so a run killed mid-write
leaves the previous checkpoint intact. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_KEY = "jumpscope_checkpoint"

def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(temp_path)`` then move the temp file onto ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise

def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    metadata = {STATE_KEY: json.dumps(state)}
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=metadata))

def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = json.loads(metadata[STATE_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"checkpoint {path} is corrupt or not a jumpscope checkpoint ({error}); "
                         "delete it to start over") from error
    return tensors, state


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], list]:
    """Flatten an optimiser's state into named tensors plus JSON-able param groups."""
    state_dict = optimizer.state_dict()
    tensors = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            tensors[f"{prefix}.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state_dict["param_groups"]

def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str,
                      param_groups: list) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
