"""cpu_ops: each replacement gives exactly torch's own result."""

import pytest
import torch

from jumpscope.sae.cpu_ops import (column_kth_smallest, column_max, fired_latents, greater, kept_above, nonzero_flat,
                                   row_top_indices, split_flat, stable_order, group_maxima)


def awkward(rows=37, cols=11, dtype=torch.float32):
    values = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
    values[3, 2], values[5, 7], values[6, 1], values[8, 8] = float("nan"), float("inf"), float("-inf"), -0.0
    values[10:14, 4] = 0.25  # ties
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greater_is_torchs_comparison(dtype):
    values = awkward(dtype=dtype)
    bounds = (values[8], torch.tensor(0.25, dtype=dtype), values.flip(0), torch.zeros(11, dtype=dtype))
    for bound in bounds:
        result = greater(values, bound)
        assert result.dtype == torch.bool and torch.equal(result, values > bound)


def test_greater_on_tensors_needing_grad_and_mixed_dtypes():
    values = awkward().requires_grad_()
    assert torch.equal(greater(values, torch.zeros(11)), values > 0)
    assert torch.equal(greater(awkward(), torch.zeros(11, dtype=torch.float64)), awkward() > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_above_is_torchs_masked_product(dtype):
    values = awkward(dtype=dtype)
    for bound in (values[8], torch.tensor(0.25, dtype=dtype), values.flip(0)[0], torch.zeros(11, dtype=dtype)):
        result, expected = kept_above(values, bound), values * (values > bound).to(dtype)
        assert result.dtype == dtype and torch.equal(result.isnan(), expected.isnan())
        assert torch.equal(result.nan_to_num(7.0), expected.nan_to_num(7.0))
    needing_grad = awkward().requires_grad_()
    kept = kept_above(needing_grad, torch.zeros(11))
    assert kept.requires_grad  # torch's own product, so autograd still reaches the values
    with torch.no_grad():  # a parameter as the bound at inference: numpy's product, the same values
        kept = kept_above(awkward(), torch.nn.Parameter(torch.zeros(11)))
    assert not kept.requires_grad and torch.equal(kept.nan_to_num(7.0), (awkward() * (awkward() > 0)).nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_column_max_is_amax(dtype):
    values = awkward(dtype=dtype)
    assert torch.equal(column_max(values).isnan(), values.amax(0).isnan())
    assert torch.equal(column_max(values).nan_to_num(7.0), values.amax(0).nan_to_num(7.0))
    assert column_max(values).isnan()[2]  # NaN propagates, as in amax


def test_column_kth_smallest_is_kthvalue_at_every_rank():
    values = awkward().nan_to_num(0.5)  # kthvalue's NaN order is its own business
    values = torch.cat([values, values[:9]])  # more ties
    for rank in range(1, values.shape[0] + 1):
        assert torch.equal(column_kth_smallest(values, rank), values.kthvalue(rank, dim=0).values), rank
    for rank in (0, values.shape[0] + 1):
        with pytest.raises(ValueError, match="rank must lie in"):
            column_kth_smallest(values, rank)


def test_fired_latents_are_those_with_a_positive_act():
    acts = torch.tensor([[[0.0, -1.0, 2.0]], [[0.0, 0.5, -0.0]]])  # (2, 1, 3): leading dims flatten
    assert fired_latents(acts).tolist() == [False, True, True]
    assert fired_latents(torch.zeros(0, 3)).tolist() == [False, False, False]  # an empty shard of a batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_row_top_indices_pick_torchs_top_k_set(dtype, k):
    # distinct values, with NaN and +-inf (NaN counts as the largest in both)
    values = torch.randn(37, 11, generator=torch.Generator().manual_seed(1)).to(torch.float64)
    values[3, 2], values[5, 7], values[6, 1] = float("nan"), float("inf"), float("-inf")
    values = values.to(dtype)
    picked = row_top_indices(values, k)
    assert picked.shape == (37, k) and picked.dtype == torch.int64
    expected = values.topk(k, dim=-1)
    if dtype != torch.bfloat16:  # bf16 rounding makes ties: there the same values, not the same indices
        assert torch.equal(picked.sort(1).values, expected.indices.sort(1).values)
    torch.testing.assert_close(values.gather(1, picked).float().sort(1).values, expected.values.float().sort(1).values,
                               rtol=0, atol=0, equal_nan=True)


def test_row_top_indices_with_ties_pick_k_of_the_largest():
    values = torch.zeros(4, 9)
    values[:, :5] = 1.0  # five tied maxima, three to pick
    picked = row_top_indices(values, 3)
    assert bool((values.gather(1, picked) == 1.0).all())
    assert all(len(set(row.tolist())) == 3 for row in picked)


def test_row_top_indices_on_tensors_needing_grad_and_edge_k():
    values = torch.randn(5, 6, requires_grad=True)
    assert torch.equal(row_top_indices(values, 2).sort(1).values, values.topk(2).indices.sort(1).values)
    plain = values.detach()
    assert torch.equal(row_top_indices(plain, 6).sort(1).values, torch.arange(6).expand(5, 6))


def test_nonzero_flat_matches_nonzero():
    generator = torch.Generator().manual_seed(0)
    for shape, density in (((512, 1024), 0.01), ((512, 1024), 0.6), ((300, 301), 0.02), ((64, 64), 0.1)):
        mask = torch.rand(shape, generator=generator) < density
        assert torch.equal(nonzero_flat(mask), mask.reshape(-1).nonzero().squeeze(1))
        assert torch.equal(nonzero_flat(mask.T), mask.T.reshape(-1).nonzero().squeeze(1))  # not contiguous


@pytest.mark.parametrize("n", [1, 7, 4096, 3000])
def test_split_flat_is_floor_division_and_remainder(n):
    flat = torch.randint(0, 5000 * n, (1000,), generator=torch.Generator().manual_seed(n))
    flat[:3] = torch.tensor([0, n - 1, n])  # row edges
    rows, cols = split_flat(flat, n)
    assert rows.dtype == cols.dtype == torch.int64
    assert torch.equal(rows, flat // n) and torch.equal(cols, flat % n)


@pytest.mark.parametrize("n_keys", [4, 4096, 1 << 16, (1 << 16) + 1])
def test_stable_order_is_torchs_stable_argsort(n_keys):
    keys = torch.randint(0, n_keys, (5000,), generator=torch.Generator().manual_seed(n_keys))
    keys[:50] = n_keys - 1  # many ties: a stable sort keeps them in their order
    order = stable_order(keys, n_keys)
    assert order.dtype == torch.int64 and torch.equal(order, torch.argsort(keys, stable=True))


@pytest.mark.parametrize("shift", [0.0, -2.5])  # -2.5: most groups all negative, many rows short of k
def test_group_maxima_rank_groups_as_the_maxima_do(shift):
    generator = torch.Generator().manual_seed(9)
    grouped = (torch.randn(300, 8, 64, generator=generator) + shift).bfloat16()
    grouped[0, :, :] = -1.0  # a row with no nonnegative value
    grouped[1, 3, 5], grouped[2, :, 7] = -0.0, 0.0  # signed zeros
    k = 10
    exact = grouped.amax(1)
    maxima = group_maxima(grouped, k)
    for row in range(grouped.shape[0]):  # the same k largest groups (the top-k values agree)
        assert torch.equal(maxima[row].float().topk(k).values, exact[row].float().topk(k).values), row
    nonnegative = exact >= 0
    assert torch.equal(maxima[nonnegative], exact[nonnegative])
    if shift == 0.0:  # nearly every row has k nonnegative groups: the stand-in is taken there
        assert not torch.equal(maxima, exact)
    assert torch.equal(group_maxima(grouped.float(), k), grouped.float().amax(1))
