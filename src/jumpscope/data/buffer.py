"""Bounded-memory shuffling of activation chunks.

A *chunk* is any item :func:`jumpscope.data.batch.as_batch` takes: a dict ``{site_name: Tensor
[n, d_site]}`` (rows aligned across sites), a plain tensor ``[n, d]``, or an ``(input, target)``
pair. ``n`` may differ from chunk to chunk. Batches come back as the kind of chunk that went in
(dicts with the same keys in the same order, tensors, or pairs).

:class:`ShuffleBuffer` holds at most ``capacity_rows - 1 + (largest chunk)`` rows, whatever the
total number of tokens: it fills up to ``capacity_rows``, then emits random batches of
``batch_size`` rows until it is below capacity again, takes in the next chunk, and so on; at the
end it drains what is left (the last batch may be short unless ``drop_last``). The order is a
function of the seed and of the input (its rows *and* its chunk sizes) only, so a resumed run that
replays the same input with the same seed sees the same batches in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .batch import Batch, as_batch, as_item, item_kind, rows_of


class ShuffleBuffer:
    """Iterable of shuffled batches of ``batch_size`` rows drawn from ``chunks`` (see the module).

    Each ``iter()`` starts again from ``seed`` (and from the start of ``chunks`` if that is a
    re-iterable collection). ``max_rows_held`` and ``max_rows_allocated`` record the peak number
    of rows the buffer held and had storage for (they never exceed ``capacity_rows - 1`` plus the
    largest chunk seen).
    """

    def __init__(self, chunks: Iterable, capacity_rows: int, batch_size: int, seed: int = 0,
                 drop_last: bool = False):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if int(capacity_rows) < int(batch_size):
            raise ValueError(f"capacity_rows ({capacity_rows}) must be at least batch_size ({batch_size})")
        self.chunks = chunks
        self.capacity_rows = int(capacity_rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.max_rows_held = 0
        self.max_rows_allocated = 0

    def __iter__(self) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(self.seed)
        store: Batch = {}
        kind = ""
        held = 0
        for chunk in self.chunks:
            parts, chunk_kind = as_batch(chunk), item_kind(chunk)
            if not store:
                kind = chunk_kind
                store = {name: part.new_empty((0, part.shape[1])) for name, part in parts.items()}
            else:
                _check_layout(parts, chunk_kind, store, kind)
            rows = rows_of(parts)
            if rows == 0:
                continue
            if held + rows > rows_of(store):  # grow once to what a full buffer plus this chunk needs
                size = max(held + rows, self.capacity_rows - 1 + rows)
                grown = {name: value.new_empty((size, value.shape[1])) for name, value in store.items()}
                for name, value in grown.items():
                    value[:held] = store[name][:held]
                store = grown
                self.max_rows_allocated = max(self.max_rows_allocated, size)
            for name, value in store.items():
                value[held:held + rows] = parts[name]
            held += rows
            self.max_rows_held = max(self.max_rows_held, held)
            del chunk, parts
            if held >= self.capacity_rows:  # emit until below capacity again
                take = ((held - self.capacity_rows) // self.batch_size + 1) * self.batch_size
                held = yield from self._emit(store, held, take, generator, kind)
        if held:
            take = held - held % self.batch_size if self.drop_last else held
            yield from self._emit(store, held, take, generator, kind)

    def _emit(self, store: Batch, held: int, take: int, generator: torch.Generator,
              kind: str) -> Iterator[Any]:
        """Yield ``take`` random rows of the first ``held`` as batches, then close the gaps they
        leave by moving the surviving rows of the tail into them; returns the rows left."""
        device = next(iter(store.values())).device
        chosen = torch.randperm(held, generator=generator)[:take]
        keep = held - take
        in_tail = chosen[chosen >= keep]
        holes = chosen[chosen < keep]
        survivors = torch.ones(take, dtype=torch.bool)
        survivors[in_tail - keep] = False
        movers = torch.arange(keep, held)[survivors]
        batches = [chosen[start:start + self.batch_size].to(device) for start in range(0, take, self.batch_size)]
        for index in batches:
            yield as_item({name: value[index] for name, value in store.items()}, kind)
        holes, movers = holes.to(device), movers.to(device)
        for value in store.values():
            value[holes] = value[movers]
        return keep


def _check_layout(parts: Batch, kind: str, store: Batch, store_kind: str) -> None:
    if kind != store_kind or list(parts) != list(store):
        raise ValueError(f"every chunk must have the same sites; the first had {_describe(store, store_kind)}, "
                         f"this one has {_describe(parts, kind)}")
    for name, part in parts.items():
        if part.shape[1] != store[name].shape[1] or part.dtype != store[name].dtype:
            raise ValueError(f"entry {name!r} changed from width {store[name].shape[1]} ({store[name].dtype}) "
                             f"to width {part.shape[1]} ({part.dtype}) between chunks")


def _describe(parts: Batch, kind: str) -> str:
    return {"tensor": "one plain tensor", "pair": "an (input, target) pair"}.get(kind, f"sites {list(parts)}")


def shuffled(chunks: Iterable, capacity_rows: int, batch_size: int, seed: int = 0,
             drop_last: bool = False) -> ShuffleBuffer:
    """Shuffled ``batch_size``-row batches of ``chunks`` through a buffer of ``capacity_rows`` rows."""
    return ShuffleBuffer(chunks, capacity_rows, batch_size, seed, drop_last)


def counted(stream: Iterable, target_rows: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """``stream`` unchanged, with a progress bar on stderr (in tokens, i.e. rows) until
    ``target_rows`` rows have gone through, e.g. the harvest that fills a shuffle buffer before the
    first batch can come out. The bar closes at the target; the rest of the stream is not counted."""
    from tqdm.auto import tqdm

    bar = tqdm(total=int(target_rows), unit="tok", unit_scale=True, desc=desc, disable=not enabled,
               dynamic_ncols=True)
    seen = 0
    try:
        for item in stream:
            if seen < target_rows:
                rows = min(rows_of(as_batch(item)), int(target_rows) - seen)
                seen += rows
                bar.update(rows)
                if seen >= target_rows:
                    bar.close()
            yield item
    finally:
        bar.close()

