"""The canonical batch: every kind of item to one dict of aligned 2-D tensors and back, and the
one row skipper (the cache writer, the cache reader and the trainer's resume all use it)."""

from __future__ import annotations

import pytest
import torch

from jumpscope.data.batch import INPUT, TARGET, as_batch, as_item, item_kind, rows_of, skip_rows


def chunks_of(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Dict chunks whose row i carries its id in site a and -id in site b."""
    out, start = [], 0
    for size in sizes:
        ids = torch.arange(start, start + size, dtype=torch.float32)
        out.append({"a": ids[:, None].repeat(1, 3), "b": -ids[:, None].repeat(1, 5)})
        start += size
    return out


def test_every_kind_of_item_has_one_canonical_form_and_comes_back():
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for item, keys in ((x, [INPUT]), ((x, y), [INPUT, TARGET]), ([x, y], [INPUT, TARGET]),
                       ({"s1": x, "s0": y}, ["s1", "s0"])):
        batch = as_batch(item)
        assert list(batch) == keys and rows_of(batch) == 4
        back = as_item(batch, item_kind(item))
        if torch.is_tensor(item):
            assert back is x
        elif isinstance(item, dict):
            assert back == item and back is not item  # a new dict, the same tensors
        else:
            assert isinstance(back, tuple) and back[0] is x and back[1] is y


@pytest.mark.parametrize("item,error,match", [
    (3, TypeError, "dicts of tensors"),
    ((torch.zeros(2, 2),) * 3, TypeError, "pairs"),
    ({}, ValueError, "no entries"),
    ({"a": [1.0]}, TypeError, "not a tensor"),
    (torch.zeros(3), ValueError, "2-D"),
    (torch.zeros(3, 2, dtype=torch.int64), TypeError, "floating point"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, ValueError, "not aligned"),
])
def test_clear_errors(item, error, match):
    with pytest.raises(error, match=match):
        as_batch(item)


def test_skip_rows():
    chunks = chunks_of([5, 0, 7, 3])
    for n in (0, 1, 5, 6, 12, 15, 20):
        tail = list(skip_rows(chunks, n))
        expected = torch.arange(min(n, 15), 15, dtype=torch.float32)
        ids = torch.cat([c["a"][:, 0] for c in tail]) if tail else torch.zeros(0)
        assert torch.equal(ids, expected)
        assert all(list(c) == ["a", "b"] and torch.equal(c["b"][:, 0], -c["a"][:, 0]) for c in tail)
    assert torch.equal(torch.cat(list(skip_rows([c["a"] for c in chunks], 6)))[:, 0],
                       torch.arange(6, 15, dtype=torch.float32))
    pairs = list(skip_rows([(c["a"], c["b"]) for c in chunks], 6))  # each item keeps its kind
    assert all(isinstance(p, tuple) for p in pairs) and torch.equal(pairs[0][1][:, 0], -torch.arange(6, 12.0))
    with pytest.raises(ValueError, match="negative"):
        list(skip_rows(chunks, -1))
