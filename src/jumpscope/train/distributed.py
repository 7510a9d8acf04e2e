"""The trainer's view of other processes. One process by default; torchrun support plugs in a
class with the same methods (all-reduce of gradients and statistics, one rank writes)."""

from __future__ import annotations

from torch import Tensor, nn


class SingleProcess:
    """No other processes: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over processes in place."""
        return tensor

    def all_reduce_max_(self, tensor: Tensor) -> Tensor:
        """Element-wise max of ``tensor`` over processes in place."""
        return tensor

    def reduce_gradients(self, module: nn.Module) -> None:
        """Average the gradients of ``module`` over processes (data parallelism)."""

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process."""
