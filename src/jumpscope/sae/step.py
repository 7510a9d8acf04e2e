"""What the trainer and an SAE's loss exchange each step: the step's context in, the loss and
what the trainer's metrics read out (re-exported by ``sae.base``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from torch import Tensor

__all__ = ["StepContext", "LossOutput"]


@dataclass
class StepContext:
    """What the trainer tells an SAE's loss about the current step."""

    step: int = 0
    """Optimiser step index (0-based)."""

    sparsity_scale: float = 1.0
    """Warm-up factor in [0, 1] applied to the sparsity coefficient."""

    dead_mask: Tensor | None = None
    """Boolean (d_sae,) mask of latents that have not fired for the dead-token window."""

    input_scale: float = 1.0
    """The factor the trainer divided the inputs by (raw x = input_scale * x seen by the loss);
    a loss that runs part of the model itself (a Jacobian SAE's MLP) needs raw units."""

    output_scale: float = 1.0
    """The same for the targets."""

    batch_mean: Callable[[Tensor], Tensor] | None = None
    """Under data parallelism: the whole batch's mean of a statistic, from this process's slice
    mean, with gradients. A loss that is not linear in a batch mean applies it first to stay
    exact (JumpReLU's target-L0 penalty). None: one process, the slice is the batch."""


@dataclass
class LossOutput:
    """A loss and its named parts, with what the trainer needs for metrics."""

    loss: Tensor
    terms: dict[str, Tensor]
    feature_acts: Tensor
    reconstruction: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def with_skip(self, skip: Tensor | None) -> "LossOutput":
        """The same loss with a skip connection's prediction added to the reconstruction."""
        return self if skip is None else replace(self, reconstruction=self.reconstruction + skip)
