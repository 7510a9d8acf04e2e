"""Turn any iterable of activation batches into fixed-size, validated training batches.

An item is a tensor ``[b, d_in]`` or a tuple ``(inputs [b, d_in], targets [b, d_out])``
(transcoders). Items of any ``b`` are re-chunked to exactly ``batch_size`` rows; the first
``skip_rows`` rows are dropped (how a resumed run finds its place in the same data order).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

Batch = tuple[Tensor, ...]


def _as_tuple(item: Tensor | tuple | list) -> Batch:
    parts = (item,) if torch.is_tensor(item) else tuple(item)
    for part in parts:
        if not torch.is_tensor(part):
            raise TypeError(f"activation batches must be tensors or tuples of tensors, got {type(part).__name__}")
        if part.dim() != 2:
            raise ValueError(f"activation batches must be 2-D [batch, d], got shape {tuple(part.shape)}")
        if not part.is_floating_point():
            raise TypeError(f"activation batches must be floating point, got {part.dtype}")
    if len({part.shape[0] for part in parts}) != 1:
        raise ValueError(f"inputs and targets have different batch sizes: {[tuple(p.shape) for p in parts]}")
    return parts


def rebatch(items: Iterable, batch_size: int, widths: tuple[int, ...], skip_rows: int = 0) -> Iterator[Batch]:
    """Yield tuples of ``batch_size``-row tensors whose widths are ``widths``."""
    pending: list[Batch] = []
    pending_rows = 0
    for item in items:
        parts = _as_tuple(item)
        if tuple(p.shape[1] for p in parts) != widths:
            raise ValueError(f"activation batch has widths {[p.shape[1] for p in parts]}, "
                             f"the SAEs expect {list(widths)} (d_in{', d_out' if len(widths) > 1 else ''})")
        if skip_rows:
            drop = min(skip_rows, parts[0].shape[0])
            parts = tuple(p[drop:] for p in parts)
            skip_rows -= drop
            if parts[0].shape[0] == 0:
                continue
        pending.append(parts)
        pending_rows += parts[0].shape[0]
        while pending_rows >= batch_size:
            joined = tuple(torch.cat(column) if len(pending) > 1 else column[0] for column in zip(*pending))
            yield tuple(t[:batch_size] for t in joined)
            rest = tuple(t[batch_size:] for t in joined)
            pending_rows -= batch_size
            pending = [rest] if pending_rows else []


def check_finite(batch: Batch, step: int) -> None:
    for part in batch:
        if not torch.isfinite(part).all():
            bad = (~torch.isfinite(part)).any(-1).nonzero()[:5].flatten().tolist()
            raise ValueError(f"non-finite activations (NaN or inf) in the batch of step {step}, rows {bad}...; "
                             "check the model's dtype (fp16 overflow?) or the cache")
