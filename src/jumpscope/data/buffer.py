"""Bounded-memory shuffling of activation chunks, and adapters from chunks to trainer batches.

A *chunk* is a dict ``{site_name: Tensor [n, d_site]}`` (rows aligned across sites: row ``i`` of
every site comes from the same token), a plain tensor ``[n, d]``, or a tuple of tensors with the
same ``n``. ``n`` may differ from chunk to chunk. Every function here gives back items of the same
kind it was given (dicts with the same keys in the same order, tensors, or tuples).

:class:`ShuffleBuffer` holds at most ``capacity_rows - 1 + (largest chunk)`` rows, whatever the
total number of tokens: it fills up to ``capacity_rows``, then emits random batches of
``batch_size`` rows until it is below capacity again, takes in the next chunk, and so on; at the
end it drains what is left (the last batch may be short unless ``drop_last``). The order is a
function of the seed and of the input (its rows *and* its chunk sizes) only, so a resumed run that
replays the same input with the same seed sees the same batches in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

_TENSOR = "\0tensor"  # the key a plain tensor travels under inside the buffer


def _split(chunk: Any) -> tuple[dict[str, Tensor], str]:
    """``chunk`` as a dict of 2-D tensors with equal row counts, and its kind (dict/tensor/tuple)."""
    if torch.is_tensor(chunk):
        parts, kind = {_TENSOR: chunk}, "tensor"
    elif isinstance(chunk, Mapping):
        parts, kind = dict(chunk), "dict"
    elif isinstance(chunk, (tuple, list)):
        parts, kind = {str(i): part for i, part in enumerate(chunk)}, "tuple"
    else:
        raise TypeError(f"activation chunks must be dicts of tensors, tensors or tuples of tensors, "
                        f"got {type(chunk).__name__}")
    if not parts:
        raise ValueError("empty activation chunk: it holds no sites")
    for name, part in parts.items():
        if not torch.is_tensor(part) or part.dim() != 2:
            shown = tuple(part.shape) if torch.is_tensor(part) else type(part).__name__
            raise ValueError(f"activation chunks must hold 2-D tensors [rows, d]; {_label(name)} is {shown}")
    if len({part.shape[0] for part in parts.values()}) != 1:
        shapes = {_label(name): tuple(part.shape) for name, part in parts.items()}
        raise ValueError(f"rows are not aligned across sites (every site needs the same row count): {shapes}")
    return parts, kind


def _label(name: str) -> str:
    return "the tensor" if name == _TENSOR else f"site {name!r}"


def _join(parts: dict[str, Tensor], kind: str) -> Any:
    if kind == "tensor":
        return parts[_TENSOR]
    if kind == "tuple":
        return tuple(parts.values())
    return parts


def _rows(parts: dict[str, Tensor]) -> int:
    return next(iter(parts.values())).shape[0]


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
        store: dict[str, Tensor] = {}
        kind = ""
        held = 0
        for chunk in self.chunks:
            parts, chunk_kind = _split(chunk)
            if not store:
                kind = chunk_kind
                store = {name: part.new_empty((0, part.shape[1])) for name, part in parts.items()}
            else:
                _check_layout(parts, chunk_kind, store, kind)
            rows = _rows(parts)
            if rows == 0:
                continue
            if held + rows > _rows(store):  # grow once to what a full buffer plus this chunk needs
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

    def _emit(self, store: dict[str, Tensor], held: int, take: int, generator: torch.Generator,
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
            yield _join({name: value[index] for name, value in store.items()}, kind)
        holes, movers = holes.to(device), movers.to(device)
        for value in store.values():
            value[holes] = value[movers]
        return keep


def _check_layout(parts: dict[str, Tensor], kind: str, store: dict[str, Tensor], store_kind: str) -> None:
    if kind != store_kind or list(parts) != list(store):
        raise ValueError(f"every chunk must have the same sites; the first had {_describe(store, store_kind)}, "
                         f"this one has {_describe(parts, kind)}")
    for name, part in parts.items():
        if part.shape[1] != store[name].shape[1] or part.dtype != store[name].dtype:
            raise ValueError(f"{_label(name)} changed from width {store[name].shape[1]} ({store[name].dtype}) "
                             f"to width {part.shape[1]} ({part.dtype}) between chunks")


def _describe(parts: dict[str, Tensor], kind: str) -> str:
    return {"tensor": "one plain tensor", "tuple": f"a tuple of {len(parts)} tensors"}.get(kind, f"sites {list(parts)}")


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
                parts, _ = _split(item)
                rows = min(_rows(parts), int(target_rows) - seen)
                seen += rows
                bar.update(rows)
                if seen >= target_rows:
                    bar.close()
            yield item
    finally:
        bar.close()


def skip_rows(stream: Iterable, n: int) -> Iterator[Any]:
    """``stream`` without its first ``n`` rows (how a resumed producer or reader finds its place)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"cannot skip a negative number of rows ({n})")
    for item in stream:
        if n:
            parts, kind = _split(item)
            drop = min(n, _rows(parts))
            n -= drop
            if drop == _rows(parts):
                continue
            item = _join({name: part[drop:] for name, part in parts.items()}, kind)
        yield item


def _site(item: Any, site: str) -> Tensor:
    if torch.is_tensor(item):
        raise TypeError(f"cannot select site {site!r} from a plain tensor; select() and pairs() take dict chunks")
    if not isinstance(item, Mapping):
        raise TypeError(f"select() and pairs() take dict chunks {{site: tensor}}, got {type(item).__name__}")
    if site not in item:
        raise KeyError(f"site {site!r} is not in the activations; they hold {sorted(item)}")
    return item[site]


def select(stream: Iterable[Mapping[str, Tensor]], site: str) -> Iterator[Tensor]:
    """The ``site`` tensor of each dict chunk: batches for an SAE trained on that site."""
    for item in stream:
        yield _site(item, site)


def pairs(stream: Iterable[Mapping[str, Tensor]], input_site: str, target_site: str) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` tuples from each dict chunk: batches for a transcoder."""
    for item in stream:
        yield _site(item, input_site), _site(item, target_site)
