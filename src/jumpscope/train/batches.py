"""Turn any iterable of activation batches into fixed-size, validated training batches.

An item is a tensor ``[b, d]`` (key "input"), a tuple ``(inputs, targets)`` (keys "input",
"target": transcoders), or a dict ``{site: tensor [b, d_site]}`` with aligned rows (several
sites from one model pass). Items of any ``b`` are re-chunked to exactly ``batch_size`` rows;
the first ``skip_rows`` rows are dropped (how a resumed run finds its place in the same data).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

Batch = dict[str, Tensor]


def as_batch(item: Tensor | tuple | list | Mapping) -> Batch:
    """Normalise one item to a dict of 2-D floating tensors with equal row counts."""
    if torch.is_tensor(item):
        parts = {"input": item}
    elif isinstance(item, Mapping):
        parts = dict(item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        parts = {"input": item[0], "target": item[1]}
    else:
        raise TypeError(f"activation batches must be tensors, (input, target) pairs or dicts of tensors, "
                        f"got {type(item).__name__}")
    for key, part in parts.items():
        if not torch.is_tensor(part):
            raise TypeError(f"activation batch entry {key!r} is a {type(part).__name__}, not a tensor")
        if part.dim() != 2:
            raise ValueError(f"activation batch entry {key!r} must be 2-D [batch, d], got shape {tuple(part.shape)}")
        if not part.is_floating_point():
            raise TypeError(f"activation batch entry {key!r} must be floating point, got {part.dtype}")
    if len({part.shape[0] for part in parts.values()}) != 1:
        raise ValueError(f"batch entries have different row counts: { {k: tuple(v.shape) for k, v in parts.items()} }")
    return parts


def check_widths(batch: Batch, widths: Mapping[str, int]) -> None:
    for key, width in widths.items():
        if key not in batch:
            raise ValueError(f"activation batches have no entry {key!r} (they have {sorted(batch)}); "
                             "an SAE reads it (its site, or 'input'/'target')")
        if batch[key].shape[1] != width:
            raise ValueError(f"activation batch entry {key!r} has width {batch[key].shape[1]}, "
                             f"the SAE reading it expects {width}")


def rebatch(items: Iterable, batch_size: int, widths: Mapping[str, int], skip_rows: int = 0) -> Iterator[Batch]:
    """Yield dicts of ``batch_size``-row tensors holding the keys of ``widths``."""
    pending: list[Batch] = []
    pending_rows = 0
    for item in items:
        batch = as_batch(item)
        check_widths(batch, widths)
        batch = {key: batch[key] for key in widths}
        rows = next(iter(batch.values())).shape[0]
        if skip_rows:
            drop = min(skip_rows, rows)
            batch = {key: value[drop:] for key, value in batch.items()}
            skip_rows -= drop
            rows -= drop
            if rows == 0:
                continue
        pending.append(batch)
        pending_rows += rows
        while pending_rows >= batch_size:
            joined = {key: torch.cat([p[key] for p in pending]) if len(pending) > 1 else pending[0][key]
                      for key in widths}
            yield {key: value[:batch_size] for key, value in joined.items()}
            pending_rows -= batch_size
            pending = [{key: value[batch_size:] for key, value in joined.items()}] if pending_rows else []


def check_finite(batch: Batch, step: int) -> None:
    for key, part in batch.items():
        if not torch.isfinite(part).all():
            bad = (~torch.isfinite(part)).any(-1).nonzero()[:5].flatten().tolist()
            raise ValueError(f"non-finite activations (NaN or inf) in {key!r} in the batch of step {step}, "
                             f"rows {bad}...; check the model's dtype (fp16 overflow?) or the cache")
