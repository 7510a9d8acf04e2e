"""The one-factor threshold calibration shared by JumpReLU (target_l0) and BatchTopK (k)."""

import math

import pytest
import torch

from jumpscope.sae import StepContext
from jumpscope.sae.calibrate import BINS, SPAN, l0_factor, mean_l0


def test_factor_is_where_the_target_count_of_ratios_is_crossed():
    generator = torch.Generator().manual_seed(0)
    pre = torch.rand(500, 40, generator=generator) * 3 - 1  # a third of the entries <= 0: never active
    threshold = torch.rand(40, generator=generator) + 0.2
    factor, before = l0_factor(lambda rows: rows, pre, threshold, 5.0, StepContext())
    assert before == pytest.approx(((pre > threshold).sum(-1).double().mean()).item())
    ratios = (pre / threshold).reshape(-1).sort(descending=True).values
    # L0 <= 5 from the 2500th-largest ratio up: the factor sits in the bin just above it
    assert ratios[5 * 500 - 1] <= factor <= ratios[5 * 500 - 1] * math.exp(2 * SPAN / BINS)
    assert mean_l0(lambda rows: rows * (rows > threshold * factor), pre, StepContext(), 40) <= 5.0


def test_a_factor_far_below_one_is_found_by_the_full_pass():
    # every pre-activation at 1-20% of its threshold: the factor (about 0.1) lies below the first
    # pass's floor e^-1, so the entries under it must be counted too
    generator = torch.Generator().manual_seed(1)
    threshold = torch.rand(40, generator=generator) + 0.2
    pre = threshold * (torch.rand(500, 40, generator=generator) * 0.19 + 0.01)
    factor, before = l0_factor(lambda rows: rows, pre, threshold, 5.0, StepContext())
    assert before == 0.0
    ratios = (pre / threshold).reshape(-1).sort(descending=True).values
    assert ratios[5 * 500 - 1] <= factor <= ratios[5 * 500 - 1] * math.exp(2 * SPAN / BINS)
    assert factor < math.exp(-1)


def test_unreachable_targets_stop_at_the_ends_of_the_range():
    pre, threshold = torch.full((10, 4), 2.0), torch.ones(4)
    assert l0_factor(lambda rows: rows, pre, threshold, 10.0, StepContext())[0] == pytest.approx(math.exp(-SPAN))
    assert l0_factor(lambda rows: rows, pre, threshold, 0.0, StepContext())[0] == pytest.approx(2.0, rel=1e-3)


def test_batch_mean_of_the_step_context_combines_processes():
    # two "processes" with half the rows each: the mean over both is what the factor answers to
    pre = torch.cat([torch.full((100, 4), 3.0), torch.full((100, 4), 1.5)])
    threshold = torch.ones(4)

    def batch_mean(value):  # this process holds the first half (weight 0.5); the other half's share added
        if value.ndim == 0:
            return value * 0.5 + 0.5 * 4.0  # every entry of the other half is active at factor 1
        other = torch.histc(torch.full((400,), math.log(1.5)), BINS, -SPAN, SPAN).double() / 100
        return value * 0.5 + other * 0.5

    factor, before = l0_factor(lambda rows: rows, pre[:100], threshold, 2.0, StepContext(batch_mean=batch_mean))
    assert before == pytest.approx(4.0)
    assert 1.5 <= factor <= 1.5 * math.exp(2 * SPAN / BINS)  # half the entries (the 3.0s) stay active
