"""After the last step: each SAE's ``calibrate`` hook, on its saved (averaged) weights and the last
training rows.

Why: a target the run was asked to reach (JumpReLU's ``target_l0``) is steered at the training
point, while the saved SAE is the schedule-free average of the iterates, and a controller still
settling at the end of a short run leaves the mean L0 short of the target (28.7 for 32 after 122
steps on SmolLM2; benchmarks/README.md). One adjustment on rows the SAE trained on closes that gap.

The rows are this process's slices of the last batches. A run resumed within those last batches
is handed them again (the trainer replays them without training), so it calibrates on the same
rows as an uninterrupted run and ends with the same weights.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Iterator

import torch
from torch import Tensor

from ..data.batch import Batch
from .optim import ScheduleFreeSignSGD


class RecentRows:
    """This process's slices of the last ``batches`` batches, with their share of each batch."""

    def __init__(self, batches: int):
        self.kept: deque[Batch] = deque(maxlen=max(1, batches))
        self.weight = 1.0

    def add(self, batch: Batch, weight: float) -> None:
        self.kept.append(batch)
        self.weight = weight

    def rows(self, key: str) -> Tensor:
        return torch.cat([batch[key] for batch in self.kept])

    def __len__(self) -> int:
        return len(self.kept)


def calibration_batches(calibration_tokens: int, batch_size: int) -> int:
    """Batches to keep for ``calibration_tokens`` rows (at least one)."""
    return max(1, math.ceil(calibration_tokens / batch_size))


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The averaged weights in the parameters for the block, then the training point back bit for
    bit (a round trip through ``use_average``/``use_training_point`` would round). Parameters the
    optimiser does not average (JumpReLU's steered thresholds) keep what the block wrote."""
    if not isinstance(optimizer, ScheduleFreeSignSGD) or optimizer.averaged:
        yield
        return
    params = [p for group in optimizer.param_groups if group["average"] for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.use_average()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
        optimizer.averaged = False
