"""What the trainer and an SAE's loss exchange each step: the step's context in, the loss and
what the trainer's metrics read out (re-exported by ``sae.base``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .cpu_ops import fired_latents

__all__ = ["StepContext", "LossOutput", "SparseActs"]


@dataclass
class StepContext:
    """What the trainer tells an SAE's loss about the current step."""

    step: int = 0
    """Optimiser step index (0-based)."""

    sparsity_scale: float = 1.0
    """Warm-up factor in [0, 1] applied to the sparsity coefficient."""

    progress: float = 0.0
    """Fraction of the run done before this step (step / total steps; 0 outside a run), for
    loss terms scheduled over the run (JumpReLU's pre-activation penalty)."""

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

    bf16_selection: bool = False
    """On the CPU, choose the sparse kernels' entries on bfloat16 pre-activations and recompute
    their values in float32 (sae/mixed.py), and gather the decoder forward and the weight
    gradients from bf16 tables (sae/kernels.py ``bf16_products``): the trainer's autocast 'bf16'."""


class SparseActs:
    """A batch's feature activations as the entries a sparse kernel worked on: ``flat`` indices
    into the (rows, d_sae) matrix (or a function giving them, called when first needed), their
    latents ``cols`` and ``values`` (differentiable; entries with value 0 are allowed and count as
    silent). The dense tensor is built only when read
    (``to_dense``, once), so a training step that only counts firings never writes B x d_sae
    floats: at batch 4096 and d_sae 4096 that was 17 ms of a 0.26 s JumpReLU step (one thread)."""

    def __init__(self, flat: Tensor | Callable[[], Tensor], cols: Tensor, values: Tensor, shape: tuple[int, ...],
                 buffer: Tensor | None = None):
        self._flat, self.cols, self.values, self.shape = flat, cols, values, tuple(shape)
        self._buffer = buffer  # storage of rows * d_sae elements the dense tensor may take over
        self._dense: Tensor | None = None
        self._counts: Tensor | None = None  # read twice a step in the final window (dead tracking, metrics)

    @property
    def flat(self) -> Tensor:
        if not isinstance(self._flat, Tensor):
            self._flat = self._flat()
        return self._flat

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    def reshape(self, *shape: int) -> "SparseActs":
        """The same entries over another leading shape (the last dimension stays d_sae)."""
        if shape[-1] != self.shape[-1] or math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot view acts of shape {self.shape} as {tuple(shape)}")
        out = SparseActs(self._flat, self.cols, self.values, tuple(shape), self._buffer)
        self._buffer = None  # one owner: two dense forms must not share storage
        out._dense = None if self._dense is None else self._dense.view(shape)
        out._counts = self._counts
        return out

    def to_dense(self) -> Tensor:
        """The (..., d_sae) tensor, zeros except at the entries (differentiable in ``values``)."""
        if self._dense is None:
            buffer, self._buffer = self._buffer, None
            dense = (buffer.detach().reshape(-1).zero_() if buffer is not None
                     else self.values.new_zeros(self.n_rows * self.shape[-1]))
            self._dense = dense.index_copy_(0, self.flat, self.values.to(dense.dtype)).view(self.shape)
        return self._dense

    def firing_counts(self) -> Tensor:
        """(d_sae,) int64: per latent, the rows where it is > 0."""
        if self._counts is None:
            self._counts = torch.bincount(self.cols[self.values.detach() > 0], minlength=self.shape[-1])
        return self._counts

    def active_total(self) -> Tensor:
        """The number of entries > 0 (0-d float32 tensor): the batch's L0 times its rows."""
        return self.firing_counts().sum().float()


@dataclass
class LossOutput:
    """A loss and its named parts, with what the trainer needs for metrics. ``acts`` is the
    (..., d_sae) feature-activation tensor, or a ``SparseActs`` where a sparse kernel produced
    them; ``feature_acts`` is always the dense tensor."""

    loss: Tensor
    terms: dict[str, Tensor]
    acts: Tensor | SparseActs
    reconstruction: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def feature_acts(self) -> Tensor:
        return self.acts.to_dense() if isinstance(self.acts, SparseActs) else self.acts

    @torch.no_grad()
    def fired_latents(self) -> Tensor:
        """(d_sae,) bool: the latents > 0 on at least one row."""
        if isinstance(self.acts, SparseActs):
            return self.acts.firing_counts() > 0
        return fired_latents(self.acts.detach())

    @torch.no_grad()
    def mean_l0(self) -> Tensor:
        """Mean over rows of the latents > 0 (0-d float32 tensor)."""
        if isinstance(self.acts, SparseActs):
            return self.acts.active_total() / max(1, self.acts.n_rows)
        return (self.acts.detach() > 0).sum(-1).float().mean()

    def with_skip(self, skip: Tensor | None) -> "LossOutput":
        """The same loss with a skip connection's prediction added to the reconstruction."""
        return self if skip is None else replace(self, reconstruction=self.reconstruction + skip)
