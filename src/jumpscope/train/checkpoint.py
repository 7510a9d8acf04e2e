"""Resumable checkpoints: one safetensors file (tensors) whose header carries JSON state.

Written atomically (temp file in the same folder, fsync, rename), so a run killed mid-write
leaves the previous checkpoint intact. Nothing here unpickles.

The layout: SAE number i (in the order of ``names``) owns the tensors ``sae{i}.model.*`` (its
weights), ``sae{i}.optim.*`` (its optimiser), ``sae{i}.since_fired`` (tokens since each latent
fired) and ``sae{i}.final.*`` (the final-window metric sums); ``trainer.*`` are the trainer's own
tensors (the calibration sample, :mod:`.calibration`); the header's JSON holds the step,
the names, the input/output scales, the optimisers' param groups, the trainer config and what
must match to resume (:func:`resume_configs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


@dataclass
class TrainingState:
    """What one SAE's training needs to resume: weights, optimiser, dead-latent counters, the
    final-window metric sums and its input/output scales."""

    sae: Any
    optimizer: torch.optim.Optimizer | None
    since_fired: Tensor
    final_metrics: Any
    input_scale: float
    output_scale: float

    def portable(self, to_cpu: bool = False) -> tuple[dict[str, Tensor], list, float, float]:
        """(tensors, param groups, input scale, output scale); on the CPU to travel between processes."""
        tensors = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        optim, groups = optimizer_tensors(self.optimizer, "optim")
        tensors.update(optim)
        tensors["since_fired"] = self.since_fired
        tensors.update({f"final.{k}": v for k, v in self.final_metrics.state_dict().items()})
        if to_cpu:
            tensors = {key: value.detach().cpu() for key, value in tensors.items()}
        return tensors, groups, self.input_scale, self.output_scale


@dataclass
class SavedState:
    """One SAE's part of a loaded checkpoint."""

    tensors: dict[str, Tensor]
    param_groups: list

    def restore(self, sae: Any, optimizer: torch.optim.Optimizer, final_metrics: Any | None,
                device: torch.device) -> Tensor:
        """Load weights, optimiser and (where given) the final-window sums; returns since_fired."""
        sae.load_state_dict(_under(self.tensors, "model."))
        restore_optimizer(optimizer, self.tensors, "optim", self.param_groups)
        if final_metrics is not None:
            final_metrics.load_state_dict(_under(self.tensors, "final."))
        return self.tensors["since_fired"].to(device)


def _under(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def resume_configs(saes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What must match for a checkpoint to resume: each SAE's architecture and config, less its
    runtime fields (e.g. the kernel choice), which change how, not what, it computes."""
    return {name: {"architecture": sae.architecture,
                   **{k: v for k, v in sae.cfg.to_dict().items() if k not in sae.cfg.runtime_fields}}
            for name, sae in saes.items()}


def save_training(path: Path, step: int, parts: Mapping[str, tuple], names: list[str], trainer: dict[str, Any],
                  configs: dict[str, dict[str, Any]], trainer_tensors: Mapping[str, Tensor] | None = None) -> None:
    """Write every SAE's :meth:`TrainingState.portable` part (by name), and the trainer's own
    tensors, in one checkpoint."""
    tensors: dict[str, Tensor] = {f"trainer.{key}": value for key, value in (trainer_tensors or {}).items()}
    groups, input_scales, output_scales = {}, {}, {}
    for index, name in enumerate(names):
        sae_tensors, groups[name], input_scales[name], output_scales[name] = parts[name]
        tensors.update({f"sae{index}.{key}": value for key, value in sae_tensors.items()})
    state = {"step": step, "names": names, "input_scales": input_scales, "output_scales": output_scales,
             "param_groups": groups, "trainer": trainer, "configs": configs}
    save_checkpoint(path, tensors, state)


def load_training(path: Path, configs: dict[str, dict[str, Any]], must_match: Mapping[str, Any]
                  ) -> tuple[int, dict[str, SavedState], dict[str, float], dict[str, float], dict[str, Tensor]]:
    """(step, each SAE's saved state by name, input scales, output scales, the trainer's tensors),
    after checking that the SAEs' configs and the trainer fields in ``must_match`` are those the
    checkpoint was written with."""
    tensors, state = load_checkpoint(path)
    try:
        if state["configs"] != configs:
            raise ValueError(f"{path} was written by a run with different SAEs or configs; resume with the same "
                             f"settings or use another output folder.\n saved: {state['configs']}\n now: {configs}")
        for key, value in must_match.items():
            if state["trainer"][key] != value:
                raise ValueError(f"{path} was written with {key}={state['trainer'][key]}, this run has {value}; "
                                 "resume with the same value")
        saved = {name: SavedState(_under(tensors, f"sae{index}."), state["param_groups"][name])
                 for index, name in enumerate(state["names"])}
        return (int(state["step"]), saved, {k: float(v) for k, v in state["input_scales"].items()},
                {k: float(v) for k, v in state["output_scales"].items()}, _under(tensors, "trainer."))
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"checkpoint {path} is missing part of its state ({error!r}); delete it to start over") \
            from None
