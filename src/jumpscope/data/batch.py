"""The one canonical form of an activation batch, and the one way to skip rows of a stream.

An *item* is a tensor ``[n, d]``, an ``(input, target)`` pair of tensors (a transcoder's), or a
dict ``{site: tensor [n, d_site]}`` (several sites of one model pass). :func:`as_batch` turns any
of them into a :data:`Batch`: a dict of 2-D floating tensors with aligned rows (row ``i`` of every
entry comes from the same token), keyed by site, or by ``"input"`` (and ``"target"``) for a tensor
or a pair. :func:`as_item` turns a batch back into the kind of item it came as, so stream stages
(the shuffle buffer, :func:`skip_rows`) hand back what they were given.

The shuffle buffer, the cache and the trainer all go through here (data/ is upstream of train/).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

Batch = dict[str, Tensor]
INPUT, TARGET = "input", "target"  # the keys of a plain tensor's and a pair's entries


def item_kind(item: Any) -> str:
    """``"tensor"``, ``"pair"`` or ``"dict"``: how ``item`` maps onto a :data:`Batch`."""
    if torch.is_tensor(item):
        return "tensor"
    if isinstance(item, Mapping):
        return "dict"
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return "pair"
    raise TypeError(f"activation batches must be tensors, (input, target) pairs or dicts of tensors, "
                    f"got {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else ""))


def as_batch(item: Any) -> Batch:
    """``item`` as a dict of 2-D floating tensors with equal row counts (a new dict; the tensors
    themselves are not copied)."""
    kind = item_kind(item)
    if kind == "tensor":
        parts = {INPUT: item}
    elif kind == "pair":
        parts = {INPUT: item[0], TARGET: item[1]}
    else:
        parts = dict(item)
    if not parts:
        raise ValueError("empty activation batch: it holds no entries")
    for key, part in parts.items():
        if not torch.is_tensor(part):
            raise TypeError(f"activation batch entry {key!r} is a {type(part).__name__}, not a tensor")
        if part.dim() != 2:
            raise ValueError(f"activation batch entry {key!r} must be 2-D [rows, d], got shape {tuple(part.shape)}")
        if not part.is_floating_point():
            raise TypeError(f"activation batch entry {key!r} must be floating point, got {part.dtype}")
    if len({part.shape[0] for part in parts.values()}) != 1:
        shapes = {key: tuple(part.shape) for key, part in parts.items()}
        raise ValueError(f"rows are not aligned across the batch's entries (each needs the same row count): {shapes}")
    return parts


def as_item(batch: Batch, kind: str) -> Any:
    """The inverse of :func:`as_batch` for an item of ``kind`` (see :func:`item_kind`)."""
    if kind == "tensor":
        return batch[INPUT]
    if kind == "pair":
        return batch[INPUT], batch[TARGET]
    return batch


def rows_of(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def skip_rows(stream: Iterable, n: int) -> Iterator[Any]:
    """``stream`` without its first ``n`` rows, each item kept as its kind (how a resumed producer,
    reader or trainer finds its place in the same data). Items emptied by the skip are dropped."""
    n = int(n)
    if n < 0:
        raise ValueError(f"cannot skip a negative number of rows ({n})")
    for item in stream:
        if n:
            kind, batch = item_kind(item), as_batch(item)
            drop = min(n, rows_of(batch))
            n -= drop
            if drop == rows_of(batch):
                continue
            item = as_item({key: part[drop:] for key, part in batch.items()}, kind)
        yield item
