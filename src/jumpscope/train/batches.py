"""Turn any iterable of activation items into fixed-size, validated training batches.

Items (tensors, ``(input, target)`` pairs, ``{site: tensor}`` dicts) become canonical batches
through :func:`jumpscope.data.batch.as_batch`, the same coercion the shuffle buffer and the cache
use; items of any row count are re-chunked to exactly ``batch_size`` rows, after the first
``start_row`` rows are skipped (how a resumed run finds its place in the same data).
:func:`copied_ahead` moves host batches to a CUDA device one batch ahead of the step.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from ..data.batch import Batch, as_batch, rows_of, skip_rows


def check_widths(batch: Batch, widths: Mapping[str, int]) -> None:
    for key, width in widths.items():
        if key not in batch:
            raise ValueError(f"activation batches have no entry {key!r} (they have {sorted(batch)}); "
                             "an SAE reads it (its site, or 'input'/'target')")
        if batch[key].shape[1] != width:
            raise ValueError(f"activation batch entry {key!r} has width {batch[key].shape[1]}, "
                             f"the SAE reading it expects {width}")


def rebatch(items: Iterable, batch_size: int, widths: Mapping[str, int], start_row: int = 0) -> Iterator[Batch]:
    """Yield dicts of ``batch_size``-row tensors holding the keys of ``widths``, from row ``start_row`` on."""
    def selected() -> Iterator[Batch]:  # every item is checked, skipped ones too
        for item in items:
            batch = as_batch(item)
            check_widths(batch, widths)
            yield {key: batch[key] for key in widths}

    pending: list[Batch] = []
    pending_rows = 0
    for batch in skip_rows(selected(), start_row):
        rows = rows_of(batch)
        pending.append(batch)
        pending_rows += rows
        while pending_rows >= batch_size:
            joined = {key: torch.cat([p[key] for p in pending]) if len(pending) > 1 else pending[0][key]
                      for key in widths}
            yield {key: value[:batch_size] for key, value in joined.items()}
            pending_rows -= batch_size
            pending = [{key: value[batch_size:] for key, value in joined.items()}] if pending_rows else []


def copied_ahead(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` on CUDA ``device``, each host batch pinned and copied on a side stream while the
    step before it computes (a pageable copy blocks the host: a quarter of an H200 Trainer run's
    time, benchmarks/README.md "On a GPU"). The copy keeps the host dtype (fp16 caches move half
    the bytes); the step converts. Each batch is drawn a step before it is yielded. Other devices:
    as given."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)

    def start_copy(batch: Batch) -> tuple[Batch, list[str], torch.cuda.Event, bool]:
        moved, copied = dict(batch), [key for key, value in batch.items() if value.device.type == "cpu"]
        borrowed = any(batch[key].is_pinned() for key in copied)  # copied from the caller's own memory
        with torch.cuda.stream(side):
            for key in copied:  # the caching host allocator keeps each pinned block until its copy ends
                value = batch[key]
                moved[key] = (value if value.is_pinned() else value.pin_memory()).to(device, non_blocking=True)
        return moved, copied, side.record_event(), borrowed

    def finish_copy(moved: Batch, copied: list[str], done: torch.cuda.Event) -> Batch:
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        for key in copied:
            moved[key].record_stream(current)  # allocated on the side stream, used and freed on this one
        return moved

    pending = None
    for batch in batches:
        ahead = start_copy(batch)
        if pending is not None:
            yield finish_copy(*pending[:3])
        pending = ahead
        if pending[3]:  # the caller may refill pinned memory it lent once it is asked for more
            pending[2].synchronize()
    if pending is not None:
        yield finish_copy(*pending[:3])


def check_finite(batch: Batch, step: int) -> None:
    for key, part in batch.items():
        if torch.isfinite(part.sum()):  # NaN or inf anywhere makes the sum non-finite: a 20x cheaper screen
            continue
        if not torch.isfinite(part).all():  # the sum overflowed, or a value is not finite
            bad = (~torch.isfinite(part)).any(-1).nonzero()[:5].flatten().tolist()
            raise ValueError(f"non-finite activations (NaN or inf) in {key!r} in the batch of step {step}, "
                             f"rows {bad}...; check the model's dtype (fp16 overflow?) or the cache")


def estimate_scale(sample: Tensor, convention: str) -> float:
    """The scalar s such that sample / s follows the SAE's input-scaling convention (SPEC 1)."""
    norms = sample.double().norm(dim=-1)
    if convention == "unit_mean_sq_norm":
        scale = norms.pow(2).mean().sqrt().item()
    elif convention == "sqrt_d_in_norm":
        scale = norms.mean().item() / math.sqrt(sample.shape[-1])
    else:
        return 1.0
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"cannot estimate the input scale: the sample's mean norm is {scale}")
    return scale
