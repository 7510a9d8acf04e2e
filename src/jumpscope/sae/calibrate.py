"""One factor on every threshold so that an SAE's mean L0 on given rows is a target (the
``calibrate`` hook of JumpReLU under target_l0 and of BatchTopK's inference threshold).

A latent fires at factor e^s when log(z / theta) > s, so a histogram of those log-ratios
(2^16 bins over [-8, 8], summed over processes by the step context's batch mean) gives the mean
L0 at every s in one encoder pass over the rows, without holding their pre-activations; s is the
lowest bin edge where L0 <= target (bins of 0.024%: the L0 reached is at or just under target).
The first pass takes only the entries above e^-1 theta (the log of every entry cost 0.6 s per
8,192 rows at 4,096 latents); when the target lies below that, a second pass takes them all.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import StepContext
from .cpu_ops import greater, nonzero_flat

SPAN = 8.0
BINS = 1 << 16
# First pass: only entries above e^-1 theta (factors down to 0.37, where calibrations land in
# practice: 0.96-1.03); a factor below it takes a second pass over the whole span.
NARROW_FLOOR = -1.0
CHUNK_ENTRIES = 1 << 24  # pre-activations held at a time


def l0_factor(pre_activation: Callable[[Tensor], Tensor], x: Tensor, threshold: Tensor, target_l0: float,
              ctx: StepContext) -> tuple[float, float]:
    """``(factor, mean L0 before)``: the smallest factor f (within a bin) for which the mean number of
    entries of ``pre_activation(x)`` above ``f * threshold`` is at most ``target_l0``. ``threshold``:
    positive, one per latent (or broadcastable)."""
    mean = ctx.batch_mean if ctx.batch_mean is not None else (lambda value: value)
    for floor in (NARROW_FLOOR, -SPAN):
        histogram, before = _log_ratio_histogram(pre_activation, x, threshold, floor)
        above = mean(histogram / x.shape[0]).flip(0).cumsum(0).flip(0)  # mean L0 at each bin's lower edge
        reached = (above <= target_l0).nonzero()
        edge = int(reached[0]) if len(reached) else BINS - 1
        if edge > _bin(floor):  # every entry above this edge was counted (the same on every process)
            break
    return math.exp(-SPAN + edge * 2 * SPAN / BINS), float(mean(before / x.shape[0]))


def _bin(log_ratio: float) -> int:
    return int((log_ratio + SPAN) * BINS / (2 * SPAN))


def _log_ratio_histogram(pre_activation: Callable[[Tensor], Tensor], x: Tensor, threshold: Tensor,
                         floor: float) -> tuple[Tensor, Tensor]:
    """The histogram of log(z / theta) over the entries with z > e^floor theta (those below land in
    bins below ``floor``, left empty), and the number of entries with z > theta."""
    threshold = threshold.reshape(-1)
    chunks = x.split(max(1, CHUNK_ENTRIES // threshold.numel()))
    histogram = torch.zeros(BINS, dtype=torch.float64, device=x.device)
    before = torch.zeros((), dtype=torch.float64, device=x.device)
    low = threshold * math.exp(floor)
    for chunk in chunks:
        pre = pre_activation(chunk).reshape(-1, threshold.numel())
        flat = nonzero_flat(greater(pre, low))  # a few % of the entries near an L0 target
        cols = flat % threshold.numel()
        log_ratio = (pre.reshape(-1).index_select(0, flat) / threshold.index_select(0, cols)).log()
        before += (log_ratio > 0).sum()
        histogram += torch.histc(log_ratio.clamp(max=SPAN), BINS, -SPAN, SPAN).double()
    return histogram, before


def mean_l0(encode: Callable[[Tensor], Tensor], x: Tensor, ctx: StepContext, entries: int) -> float:
    """The mean L0 of ``encode`` over the rows of ``x``, over every process, ``entries`` at a time."""
    active = sum((encode(chunk) > 0).sum(dtype=torch.float64) for chunk in x.split(max(1, CHUNK_ENTRIES // entries)))
    value = torch.as_tensor(active, dtype=torch.float64) / x.shape[0]
    return float(ctx.batch_mean(value) if ctx.batch_mean is not None else value)
