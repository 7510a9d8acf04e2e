"""Resumable checkpoints: one safetensors file (tensors) whose header carries JSON state.

Written atomically (temp file in the same folder, fsync, rename), so a run killed mid-write
leaves the previous checkpoint intact. Nothing here unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..safeio import read_safetensors, read_safetensors_metadata, write_safetensors

STATE_KEY = "jumpscope_checkpoint"


def save_checkpoint(path: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    write_safetensors(path, tensors, metadata={STATE_KEY: json.dumps(state)})


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        tensors = read_safetensors(path)
        state = json.loads(read_safetensors_metadata(path)[STATE_KEY])
    except (ValueError, KeyError) as error:  # JSONDecodeError is a ValueError
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
