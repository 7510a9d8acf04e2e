"""Batch checks of train/batches.py."""

import pytest
import torch

from jumpscope.train.batches import check_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_named_with_its_row(bad):
    batch = torch.zeros(6, 4)
    batch[4, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite activations .* 'input' .* step 7, rows \[4\]"):
        check_finite({"input": batch}, step=7)


def test_finite_values_whose_sum_overflows_pass():
    # the quick screen sums the batch: 3e38 * 4 is inf in float32, yet every value is finite
    batch = torch.full((2, 2), 3e38)
    check_finite({"input": batch, "target": -batch}, step=0)
    batch[1, 1] = float("nan")  # and a NaN among them is still found
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        check_finite({"input": batch}, step=0)
