"""Training: one loop for every architecture, many SAEs at once, resumable."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..sae.base import SAE, SAEConfig
from ..sae.registry import build
from .config import TrainerConfig
from .trainer import Trainer


def train(saes: SAE | SAEConfig | Sequence[SAE | SAEConfig] | Mapping[str, SAE | SAEConfig], batches: Iterable,
          resume: bool = False, **trainer_fields: Any) -> dict[str, SAE]:
    """Train SAEs (or SAEs built from configs) on ``batches`` (any iterable of [B, d_in] tensors);
    ``trainer_fields`` go to TrainerConfig. Returns the trained SAEs by name."""
    def built(item: SAE | SAEConfig) -> SAE:
        return item if isinstance(item, SAE) else build(item)

    if isinstance(saes, Mapping):
        saes = {name: built(item) for name, item in saes.items()}
    elif isinstance(saes, (SAE, SAEConfig)):
        saes = [built(saes)]
    else:
        saes = [built(item) for item in saes]
    return Trainer(saes, TrainerConfig(**trainer_fields)).fit(batches, resume=resume)


__all__ = ["Trainer", "TrainerConfig", "train"]
