"""One factor on every threshold so that an SAE's mean L0 on given rows is a target (the
``calibrate`` hook of JumpReLU under target_l0 and of BatchTopK's inference threshold).

A latent fires at factor e^s when log(z / theta) > s, so a histogram of those log-ratios
(2^16 bins over [-8, 8], summed over processes by the step context's batch mean) gives the mean
L0 at every s in one encoder pass over the rows, without holding their pre-activations; s is the
lowest bin edge where L0 <= target (bins of 0.024%: the L0 reached is at or just under target).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import StepContext

SPAN = 8.0
BINS = 1 << 16
CHUNK_ENTRIES = 1 << 24  # pre-activations held at a time


def l0_factor(pre_activation: Callable[[Tensor], Tensor], x: Tensor, threshold: Tensor, target_l0: float,
              ctx: StepContext) -> tuple[float, float]:
    """``(factor, mean L0 before)``: the smallest factor f (within a bin) for which the mean number of
    entries of ``pre_activation(x)`` above ``f * threshold`` is at most ``target_l0``. ``threshold``:
    positive, one per latent (or broadcastable)."""
    chunks = x.split(max(1, CHUNK_ENTRIES // threshold.numel()))
    histogram = torch.zeros(BINS, dtype=torch.float64, device=x.device)
    before = torch.zeros((), dtype=torch.float64, device=x.device)
    for chunk in chunks:
        log_ratio = (pre_activation(chunk).clamp_min(0) / threshold).log()  # -inf where z <= 0
        before += (log_ratio > 0).sum()
        histogram += torch.histc(log_ratio.clamp(max=SPAN), BINS, -SPAN, SPAN).double()
    mean = ctx.batch_mean if ctx.batch_mean is not None else (lambda value: value)
    above = mean(histogram / x.shape[0]).flip(0).cumsum(0).flip(0)  # mean L0 at each bin's lower edge
    reached = (above <= target_l0).nonzero()
    edge = int(reached[0]) if len(reached) else BINS - 1
    return math.exp(-SPAN + edge * 2 * SPAN / BINS), float(mean(before / x.shape[0]))


def mean_l0(encode: Callable[[Tensor], Tensor], x: Tensor, ctx: StepContext, entries: int) -> float:
    """The mean L0 of ``encode`` over the rows of ``x``, over every process, ``entries`` at a time."""
    active = sum((encode(chunk) > 0).sum(dtype=torch.float64) for chunk in x.split(max(1, CHUNK_ENTRIES // entries)))
    value = torch.as_tensor(active, dtype=torch.float64) / x.shape[0]
    return float(ctx.batch_mean(value) if ctx.batch_mean is not None else value)
