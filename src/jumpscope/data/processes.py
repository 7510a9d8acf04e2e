"""What the data path needs of the torchrun processes it shares work with.

The trainer's process group (:mod:`jumpscope.train.distributed`) has all of it, but sits in a later
stage; the activation source, the shared cache writer and the held-out evaluation ask only for
this much, and :class:`OneProcess` stands in where there are no other processes.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Processes", "OneProcess"]


class Processes(Protocol):
    rank: int
    world_size: int

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        ...

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Process ``src``'s ``value`` on every process."""
        ...


class OneProcess:
    """No other processes."""

    rank, world_size = 0, 1

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        return value
