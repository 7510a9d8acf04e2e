"""Reductions that torch's CPU build runs slowly, done another way with identical results.

On the CPU, torch 2.13's float comparisons that write a bool tensor take about 1.7 ns per element
(29 ms for a 4096 x 4096 batch of pre-activations against per-latent thresholds) and ``amax`` over
the rows 11 ms; numpy's SIMD loops take 5 and 4 ms on the same arrays (one thread). Results are
identical (IEEE comparisons and maxima, NaN compares False). Anything numpy cannot take (CUDA,
bfloat16, tensors needing grad) goes through torch. ``column_kth_smallest`` replaces
``kthvalue(dim=0)`` (3.8 s on 16,384 x 4,096, JumpReLU's threshold initialisation) by a top-k along
rows of the transpose (0.48 s), on every device. ``sampled_bound`` estimates a top-k's bound from a
strided sample, for callers that check the candidates it admits. Index arithmetic on entry lists
(``split_flat``, ``stable_order``) goes through numpy too: torch's int64 division takes 1.0 ms for
370k indices against numpy's 0.23, its stable argsort of 370k latent ids 9 ms against numpy's
radix sort on 16-bit keys 1.9.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["greater", "column_max", "column_kth_smallest", "fired_latents", "nonzero_flat", "row_top_indices",
           "sampled_bound", "split_flat", "stable_order", "group_maxima", "kept_above",
           "unrecorded"]

_NUMPY_DTYPES = (torch.float32, torch.float64)


def _numpy_ready(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad for t in tensors)


def unrecorded(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors, detached where autograd is not recording (so that numpy may read them); as
    they are under grad mode, where one that requires grad keeps torch's own path."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


def greater(values: Tensor, bound: Tensor) -> Tensor:
    """``values > bound`` (bound broadcast against values), a bool tensor of values' shape."""
    if not _numpy_ready(values, bound) or values.dtype != bound.dtype:
        return values > bound
    return torch.from_numpy(np.greater(values.numpy(), bound.numpy()))


def kept_above(values: Tensor, bound: Tensor) -> Tensor:
    """``values * (values > bound)``: values above their bound (broadcast), zeros elsewhere (NaN
    stays NaN, as in the product). numpy multiplies by its bool mask in one pass: 4096 x 8192, one
    thread, 29 against 66 ms for torch's comparison, conversion and product."""
    values, bound = unrecorded(values, bound)  # e.g. JumpReLU's threshold parameter at inference
    if not _numpy_ready(values, bound) or values.dtype != bound.dtype:
        return values * (values > bound).to(values.dtype)
    array = values.numpy()
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in torch, without numpy's warning
        return torch.from_numpy(array * np.greater(array, bound.numpy()))


def column_max(matrix: Tensor) -> Tensor:
    """``matrix.amax(0)`` of a 2-D tensor with at least one row."""
    if not _numpy_ready(matrix):
        return matrix.amax(0)
    return torch.from_numpy(np.max(matrix.numpy(), axis=0))


def fired_latents(acts: Tensor) -> Tensor:
    """Per latent (the last dimension of ``acts``), whether any act is > 0: the maximum over the
    rows, one pass (a comparison into booleans and then ``any`` took 6x longer on the CPU)."""
    flat = acts.reshape(-1, acts.shape[-1])
    if not flat.shape[0]:
        return flat.new_zeros(flat.shape[1], dtype=torch.bool)
    return column_max(flat) > 0


def column_kth_smallest(matrix: Tensor, rank: int) -> Tensor:
    """``matrix.kthvalue(rank, dim=0).values`` of a 2-D tensor (rank 1 = the smallest): a top-k of
    whichever side of the rank is shorter, over contiguous rows of the transpose."""
    n = matrix.shape[0]
    if not 1 <= rank <= n:
        raise ValueError(f"rank must lie in [1, {n}], got {rank}")
    rows = matrix.T.contiguous()
    if n - rank + 1 <= rank:  # the (n - rank + 1) largest: their smallest is the rank-th smallest
        return rows.topk(n - rank + 1, dim=1).values[:, -1]
    return rows.topk(rank, dim=1, largest=False).values[:, -1]


def row_top_indices(matrix: Tensor, k: int) -> Tensor:
    """``matrix.topk(k, dim=-1, sorted=False).indices`` of a 2-D tensor: the same set of columns
    per row up to ties, in no particular order (NaN counts as the largest, as in torch)."""
    n = matrix.shape[-1]
    if matrix.dtype in (torch.bfloat16, torch.float16) and matrix.device.type == "cpu" and not matrix.requires_grad:
        matrix = matrix.float()  # exact (every half-precision value is a float32): numpy has no bfloat16
    if not _numpy_ready(matrix) or matrix.dim() != 2 or not 0 < k < n:
        return matrix.topk(k, dim=-1, sorted=False).indices
    picked = np.argpartition(matrix.numpy(), n - k, axis=-1)[:, n - k:]
    return torch.from_numpy(np.ascontiguousarray(picked))


def nonzero_flat(mask: Tensor) -> Tensor:
    """Flat indices (ascending, int64) of the True entries of a bool tensor. On the CPU numpy's
    flatnonzero: 4096 x 4096 at 2% True 7.7 ms against torch's 15 ms (and 13 ms for torch on
    8-byte words first), at 50% 21 against 113 ms."""
    flat = mask.reshape(-1)
    if flat.device.type != "cpu" or flat.requires_grad:
        return flat.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(flat.numpy()))


def sampled_bound(flat: Tensor, keep: int, factor: float) -> Tensor | None:
    """A value about ``factor * keep`` entries from the top of ``flat`` (1-D), from a strided sample
    of 65,536 (half precision read as float32); None when ``flat`` is too small to need one."""
    n = flat.numel()
    if n < 16 * keep or n < 1 << 18:
        return None
    stride = n // (1 << 16)
    while math.gcd(stride, n) != 1 and stride > 1:  # not in step with the rows
        stride -= 1
    sample = flat[::stride]
    sample = sample.float() if sample.dtype in (torch.bfloat16, torch.float16) else sample
    m = sample.numel()
    expected = factor * keep / n * m
    above = min(m - 1, math.ceil(expected + 6 * math.sqrt(expected) + 16))
    return sample.kthvalue(m - above).values


def split_flat(flat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(flat // n, flat % n)`` for non-negative int64 indices into rows of ``n``."""
    if flat.device.type != "cpu" or flat.dtype != torch.int64:
        return flat // n, flat % n
    index = flat.numpy()
    rows = index // n  # numpy divides by a constant with multiplications (libdivide)
    return torch.from_numpy(rows), torch.from_numpy(index - rows * n)


def stable_order(keys: Tensor, n_keys: int) -> Tensor:
    """``torch.argsort(keys, stable=True)`` (int64) for integer ``keys`` in [0, n_keys)."""
    if keys.device.type != "cpu" or n_keys > 1 << 16:
        return torch.argsort(keys, stable=True)
    return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))  # a radix sort


def group_maxima(grouped: Tensor, k: int) -> Tensor:
    """``grouped.amax(1)`` of a (B, S, G) tensor, for choosing each row's k largest groups: on the
    CPU in bfloat16 a stand-in that ranks them the same. A group's largest int16 bit pattern is its
    float maximum wherever that is +0 or more (nonnegative floats order as their patterns, every
    negative one below them); rows with fewer than k such groups take the exact maxima. 4096 x 8 x
    1024: 7-8 against torch's 16.5 ms (numpy's elementwise maximum over the S slices; its reduction
    along axis 1 takes 18)."""
    if grouped.dtype != torch.bfloat16 or grouped.device.type != "cpu" or grouped.requires_grad:
        return grouped.amax(1)
    bits = grouped.view(torch.int16).numpy()
    top = bits[:, 0].copy()
    for s in range(1, bits.shape[1]):
        np.maximum(top, bits[:, s], out=top)
    maxima = torch.from_numpy(top).view(torch.bfloat16)
    short = np.flatnonzero(np.count_nonzero(top >= 0, axis=1) < k)
    if short.size:  # rows mostly negative: the patterns of negative floats order in reverse
        rows = torch.from_numpy(short)
        maxima[rows] = grouped.index_select(0, rows).amax(1)
    return maxima
