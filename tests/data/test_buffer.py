"""Shuffle buffer: a deterministic permutation of its input, rows aligned across sites, bounded
memory whatever the stream length; the progress count of a stream."""

from __future__ import annotations

import pytest
import torch

from jumpscope.data.buffer import ShuffleBuffer, counted, shuffled
from jumpscope.train.batches import rebatch


def chunks_of(sizes: list[int], start: int = 0) -> list[dict[str, torch.Tensor]]:
    """Dict chunks whose row i carries its id in site a (width 3) and -id in site b (width 5)."""
    out = []
    for size in sizes:
        ids = torch.arange(start, start + size, dtype=torch.float32)
        out.append({"a": ids[:, None].repeat(1, 3), "b": -ids[:, None].repeat(1, 5)})
        start += size
    return out


def ids_of(batches) -> torch.Tensor:
    return torch.cat([batch["a"][:, 0] for batch in batches])


def random_sizes(total: int, seed: int, high: int = 40) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(torch.randint(0, high, (), generator=generator)))  # zero-row chunks included
    sizes[-1] -= sum(sizes) - total
    return sizes


SIZES = random_sizes(1000, seed=0)


def test_permutation_of_input_with_rows_aligned():
    batches = list(shuffled(chunks_of(SIZES), capacity_rows=100, batch_size=16, seed=1))
    ids = ids_of(batches)
    assert torch.equal(ids.sort().values, torch.arange(1000, dtype=torch.float32))
    assert not torch.equal(ids, torch.arange(1000, dtype=torch.float32))
    for batch in batches:
        assert list(batch) == ["a", "b"]
        assert torch.equal(batch["a"], batch["a"][:, :1].repeat(1, 3))
        assert torch.equal(batch["b"], -batch["a"][:, :1].repeat(1, 5))
    assert [len(b["a"]) for b in batches] == [16] * 62 + [8]  # the drained remainder comes last


def test_drop_last_drops_only_the_short_final_batch():
    batches = list(shuffled(chunks_of(SIZES), 100, 16, seed=1, drop_last=True))
    assert [len(b["a"]) for b in batches] == [16] * 62
    assert torch.equal(ids_of(batches), ids_of(list(shuffled(chunks_of(SIZES), 100, 16, seed=1))[:62]))


def test_deterministic_for_a_seed_and_different_across_seeds():
    first = ids_of(shuffled(chunks_of(SIZES), 100, 16, seed=7))
    again = ids_of(shuffled(chunks_of(SIZES), 100, 16, seed=7))
    other = ids_of(shuffled(chunks_of(SIZES), 100, 16, seed=8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    buffer = ShuffleBuffer(chunks_of(SIZES), 100, 16, seed=7)  # re-iterating a list replays the order
    assert torch.equal(ids_of(buffer), first) and torch.equal(ids_of(buffer), first)


def test_resume_replays_the_same_order():
    """A resumed trainer replays the stream and skips the rows it already trained on."""
    widths = {"a": 3, "b": 5}
    full = list(rebatch(shuffled(chunks_of(SIZES), 100, 16, seed=3), 32, widths))
    resumed = list(rebatch(shuffled(chunks_of(SIZES), 100, 16, seed=3), 32, widths, start_row=10 * 32))
    assert len(full) == 31 and len(resumed) == 21
    assert all(torch.equal(x[k], y[k]) for x, y in zip(full[10:], resumed) for k in widths)


@pytest.mark.parametrize("capacity,batch_size,high", [(64, 8, 50), (64, 64, 200), (10, 3, 7), (500, 32, 5)])
def test_memory_bounded_by_capacity_plus_one_chunk(capacity, batch_size, high):
    """Instrumented: the rows the buffer holds (and has storage for), and how far it has read
    ahead of what it emitted, stay under capacity + the largest chunk, on a long stream."""
    sizes = random_sizes(6000, seed=capacity, high=high)
    largest = max(sizes)
    state = {"read": 0, "emitted": 0, "ahead": 0}

    def source():
        for chunk in chunks_of(sizes):
            state["read"] += chunk["a"].shape[0]
            state["ahead"] = max(state["ahead"], state["read"] - state["emitted"])
            yield chunk

    buffer = ShuffleBuffer(source(), capacity, batch_size, seed=0)
    seen = 0
    for batch in buffer:
        state["emitted"] += batch["a"].shape[0]
        seen += batch["a"].shape[0]
        assert buffer.max_rows_held <= capacity - 1 + largest
    assert seen == 6000
    assert capacity <= buffer.max_rows_held <= capacity - 1 + largest
    assert buffer.max_rows_allocated <= capacity - 1 + largest
    assert state["ahead"] <= capacity - 1 + largest


def test_emits_before_reading_the_whole_stream():
    consumed = []

    def endless():
        index = 0
        while True:
            consumed.append(index)
            yield chunks_of([10], start=10 * index)[0]
            index += 1

    stream = iter(shuffled(endless(), capacity_rows=50, batch_size=10, seed=0))
    for _ in range(100):
        next(stream)
    assert len(consumed) <= 105  # 100 batches of 10 out of 10-row chunks: bounded read-ahead


def test_plain_tensors_and_tuples_keep_their_kind():
    tensors = [chunk["a"] for chunk in chunks_of(SIZES)]
    out = list(shuffled(tensors, 100, 16, seed=1))
    assert all(torch.is_tensor(t) for t in out)
    assert torch.equal(torch.cat([t[:, 0] for t in out]), ids_of(shuffled(chunks_of(SIZES), 100, 16, seed=1)))
    tuples = [(chunk["a"], chunk["b"]) for chunk in chunks_of(SIZES)]
    out = list(shuffled(tuples, 100, 16, seed=1))
    assert all(isinstance(t, tuple) and len(t) == 2 for t in out)
    assert all(torch.equal(b, -a[:, :1].repeat(1, 5)) for a, b in out)


def test_bf16_chunks_stay_bf16():
    chunks = [{k: v.bfloat16() for k, v in c.items()} for c in chunks_of([30, 30])]
    out = list(shuffled(chunks, 20, 8, seed=0))
    assert all(b["a"].dtype == torch.bfloat16 for b in out)
    assert torch.equal(ids_of(out).float().sort().values, torch.arange(60, dtype=torch.float32))


def test_clear_errors():
    with pytest.raises(ValueError, match="capacity_rows"):
        ShuffleBuffer([], 4, 8)
    with pytest.raises(ValueError, match="not aligned"):
        list(shuffled([{"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}], 8, 2))
    with pytest.raises(ValueError, match="same sites"):
        list(shuffled([{"a": torch.zeros(3, 2)}, {"b": torch.zeros(3, 2)}], 8, 2))
    with pytest.raises(ValueError, match="width"):
        list(shuffled([{"a": torch.zeros(3, 2)}, {"a": torch.zeros(3, 4)}], 8, 2))
    with pytest.raises(ValueError, match="2-D"):
        list(shuffled([torch.zeros(3)], 8, 2))
    with pytest.raises(TypeError, match="dicts of tensors"):
        list(shuffled([3], 8, 2))
    assert list(shuffled([], 8, 2)) == []



def test_counted_passes_the_stream_through_unchanged():
    chunks = chunks_of([5, 0, 7])
    out = list(counted(iter(chunks), target_rows=6, desc="test", enabled=False))
    assert len(out) == 3 and all(a is b for a, b in zip(out, chunks))
