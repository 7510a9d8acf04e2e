"""Training: one loop for every architecture, many SAEs at once, resumable."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..sae.base import SAE
from .config import TrainerConfig
from .trainer import Trainer


def train(saes: SAE | Sequence[SAE] | Mapping[str, SAE], batches: Iterable, resume: bool = False,
          **trainer_fields: Any) -> dict[str, SAE]:
    """Train ``saes`` on ``batches`` (tensors [b, d_in]); ``trainer_fields`` go to TrainerConfig."""
    return Trainer(saes, TrainerConfig(**trainer_fields)).fit(batches, resume=resume)


__all__ = ["Trainer", "TrainerConfig", "train"]
