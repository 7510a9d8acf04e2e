"""The sparse kernels' entries chosen on bfloat16 pre-activations, their values in float32.

The one dense product of a sparse training step, ``x_in @ W_enc`` (sae/kernels.py), only serves
to choose each token's entries. Where the CPU multiplies bfloat16 natively (AMX, AVX512-BF16),
that product costs a tenth of float32's (4096 x 384 @ 384 x 2048, one thread: 3.7 against 29-44
ms). ``BF16Preactivations`` forms it there, the encoder bias folded in as one more input column,
and every architecture picks a superset of its entries from it: TopK the k + extra largest per
token, BatchTopK everything above (an estimate of) the batch's k * B-th value, JumpReLU everything
above theta - eps, both less a margin for bf16's rounding that scales with each row's norm and each
latent's largest encoder weight (MARGIN_UNITS). Then the float32 pre-activations are recomputed at
those candidates (a sampled product, exactly the float32 expression up to summation order) and the
entries are chosen among them as the float32 path chooses them: the selection and the values at
the entries are float32's, unlike a GPU under autocast, where z itself is bf16. The exceptions are
TopK's AuxK, an auxiliary loss for dead latents, chosen and valued on the bf16 z (``auxk_entries``),
and, as under autocast, the gathered products after the selection: the decoder forward and the
weight gradients read bf16 tables (kernels.sparse_sae's ``bf16_products``, gradients within about
4e-3 of float32's).

What can differ from the float32 path: an entry whose bf16 error moves it across the whole margin
(k + extra ranks for TopK: 10 of 16 million entries over a 122-step SmolLM2 run, 5 swaps; for
BatchTopK and JumpReLU 15 standard deviations of the error), and, as in any other summation order,
entries within float32 rounding of a bound. tests/sae/test_mixed.py checks the selections against
the float32 path's, outlier features and a BOS-like row included.
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .cpu_ops import nonzero_flat, row_top_indices, sampled_bound, split_flat
from .step import StepContext

log = logging.getLogger(__name__)
_HINTED: list[bool] = []  # the hint to use bf16 selection is logged once per process

UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16: 8 significant bits
# BatchTopK's and JumpReLU's candidate margin for z_bj, in units of u * |x_b| * max_i |W_ij|. Rounding
# x and W to bf16 moves each product by about u / sqrt(6) of itself at random (at most u), so the
# error's standard deviation is at most u * sqrt(sum_i x_i^2 W_ij^2 / 6) <= 0.41 units, whether x or
# the column is spread or concentrated on a few dimensions (an LLM's outlier features). Largest seen
# over the 10^9 pre-activations of a 122-step JumpReLU run (beyond bf16's rounding of z itself, which
# the bound's own slack covers): 2.4 units on SmolLM2, 2.6 on MiniLM. 6 units: 15 standard deviations.
MARGIN_UNITS = 6.0
# rows whose norm exceeds this many times the median get a margin of their own (a BOS-like token
# would otherwise widen every row's)
TYPICAL_NORM_FACTOR = 2.0


@functools.cache
def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private probes: absent on other builds
        return False


def bf16_selection_available(requested: bool, device: torch.device) -> bool:
    """Whether a trainer asked for bf16 (autocast 'bf16') on ``device`` chooses entries in bf16: on
    a CPU with native bf16 products only (elsewhere bf16 would be slower; warned once)."""
    if device.type != "cpu":
        return False
    if not requested:
        if fast_bf16_matmul() and not _HINTED:
            _HINTED.append(True)
            log.info("this CPU multiplies bfloat16 natively: autocast 'bf16' (--autocast bf16) trains the sparse "
                     "SAEs 1.3-1.7x faster (entries chosen as in float32, bf16 tables in the gathered products)")
        return False
    if not fast_bf16_matmul():
        log.warning("autocast 'bf16': this CPU has no native bfloat16 products (AMX, AVX512-BF16), "
                    "so the sparse kernels keep choosing their entries in float32")
        return False
    log.info("autocast 'bf16' on the CPU: sparse kernels choose their entries on bf16 pre-activations "
             "(values at the entries float32) and gather the decoder and weight gradients from bf16 tables")
    return True


def wanted(ctx: StepContext, device: torch.device) -> bool:
    """Whether a sparse loss should choose its entries on bf16 pre-activations."""
    return ctx.bf16_selection and device.type == "cpu"


def extra_candidates(k: int) -> int:
    """How many candidates beyond k a per-token selection takes on bf16 values. Rows of 4096 random
    tokens whose float32 top-k fell outside the bf16 top k + extra (extra 4 / 8 / 16): width 2048, k
    32: 4 / 0 / 0; 4096, k 64: 38 / 1 / 0; 16384, k 64: 89 / 0 / 0."""
    return max(8, k // 4)


class BF16Preactivations:
    """bf16 pre-activations ``z`` (B, n) of ``x_in`` (B, d_in, float32) through the encoder, and
    the float32 pre-activation at any entries."""

    def __init__(self, x_in: Tensor, W_enc: Tensor, b_enc: Tensor):
        self.x_in, self.W_enc, self.b_enc = x_in.detach(), W_enc.detach(), b_enc.detach()
        (B, d), n = self.x_in.shape, self.W_enc.shape[1]
        # inner width d + 1 (the bias) padded with zeros to a multiple of 8: (4096, 385) @ (385, 8192)
        # took 21.1 ms, (4096, 392) @ (392, 8192) 17.4
        width = -(-(d + 1) // 8) * 8
        inputs, encoder = _buffer("inputs", B, width), _buffer("encoder", width, n)
        inputs[:, :d].copy_(self.x_in)  # converted in the copy
        inputs[:, d] = 1.0
        inputs[:, d + 1:] = 0.0
        encoder[:d].copy_(self.W_enc)
        encoder[d].copy_(self.b_enc)
        encoder[d + 1:] = 0.0
        self.z = torch.mm(inputs, encoder, out=_buffer("z", B, n))
        self.shape = tuple(self.z.shape)
        self._rows_of_W: Tensor | None = None

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """float32 ``x_in[r] @ W_enc[:, c] + b_enc[c]`` at each (r, c); rows grouped ascending."""
        ones = torch.ones_like(rows, dtype=self.x_in.dtype)
        entries = kernels.Entries(rows, cols, ones, ones, self.shape)
        if self._rows_of_W is None:  # sampled_addmm reads a transposed (n, d_in) copy 15% faster
            self._rows_of_W = self.W_enc.T.contiguous()
        return entries.sddmm(self.x_in, self._rows_of_W) + self.b_enc.index_select(0, cols)

    def candidates_above(self, bound: Tensor) -> Tensor:
        """Flat indices (ascending) of every entry whose bf16 value exceeds ``bound`` (n,) less the
        margin for bf16's error there: a superset of the entries whose float32 value does."""
        column_max = self.W_enc.abs().amax(0)
        slack = UNIT_ROUNDOFF * (self.b_enc.abs() + bound.abs()) + torch.finfo(torch.float32).tiny
        norms = torch.linalg.vector_norm(self.x_in, dim=1)
        typical = norms <= TYPICAL_NORM_FACTOR * norms.median()
        def low(rows_norm: Tensor) -> Tensor:
            return bound - MARGIN_UNITS * UNIT_ROUNDOFF * rows_norm * column_max - slack
        above = bf16_greater(self.z, low(norms[typical].max() if typical.any() else norms.max()))
        if not bool(typical.all()):  # the few wide rows against a wider margin of their own
            wide = nonzero_flat(~typical)
            above[wide] = bf16_greater(self.z.index_select(0, wide), low(norms.max()))
        return nonzero_flat(above)


_BUFFERS = threading.local()
KEPT_SHAPES = 4  # (inputs, encoder, product) buffers kept for this many SAE shapes per thread


def _buffer(name: str, rows: int, cols: int) -> Tensor:
    """A bf16 (rows, cols) CPU tensor kept for the next step, per thread and shape (SAEs of several
    widths in one trainer each keep theirs): a fresh 32 MB product each step cost 20 ms instead of
    8.5 in page faults (4096 x 4096, one thread)."""
    kept = _BUFFERS.__dict__.setdefault("tensors", {})
    key = (name, rows, cols)
    if key not in kept:
        while len(kept) >= 3 * KEPT_SHAPES:  # a notebook training many sizes: the oldest go
            kept.pop(next(iter(kept)))
        kept[key] = torch.empty(rows, cols, dtype=torch.bfloat16)
    return kept[key]


def bf16_greater(values: Tensor, bound: Tensor) -> Tensor:
    """``values > bound`` for bf16 ``values`` (B, n) and float ``bound`` (n,) rounded down to bf16,
    comparing the bit patterns as int16 (5-8x faster than torch's bf16 comparison on the CPU).
    A NaN may come out either way (by its sign bit); recomputed in float32 it is never an entry."""
    low = (bound - UNIT_ROUNDOFF * bound.abs()).to(torch.bfloat16)  # at most bound after rounding
    if values.device.type != "cpu":
        return values > low
    bits, low_bits = values.view(torch.int16).numpy(), low.view(torch.int16).numpy()
    negative = np.signbit(low.float().numpy())
    if not negative.any():  # bounds of +0 or more: the int16 order of the bits is the float order
        return torch.from_numpy(np.greater(bits, low_bits))
    # a negative bound b: v > b for every v >= 0 (sign bit clear), and for negative v of smaller
    # magnitude (a smaller int16: more negative); a bound of -0 or 0 is greater(bits, 0) or the same
    above = np.where(negative, (bits >= 0) | (bits < low_bits), bits > low_bits)
    return torch.from_numpy(above)


@torch.no_grad()
def topk_entries(pre: BF16Preactivations, k: int) -> kernels.Entries:
    """TopK's entries: the k largest float32 pre-activations among each token's k + extra largest bf16 ones."""
    B, n = pre.shape
    width = min(n, k + extra_candidates(k))
    rows = torch.arange(B).repeat_interleave(width)
    candidates = torch.arange(n).expand(B, n) if width == n else kernels.row_topk(pre.z, width)[1]
    exact = pre.at(rows, candidates.reshape(-1)).view(B, width)
    position = row_top_indices(exact, k)
    cols, values = candidates.gather(1, position), exact.gather(1, position)
    return kernels._positive(pre.z, torch.arange(B).repeat_interleave(k), cols.reshape(-1), values.reshape(-1))


@torch.no_grad()
def auxk_entries(pre: BF16Preactivations, dead_mask: Tensor, k_aux: int) -> kernels.AuxEntries | kernels.Entries:
    """``kernels.auxk_entries`` on the bf16 pre-activations themselves: AuxK (an auxiliary loss that
    revives dead latents) is chosen and valued in bf16, relative error 2^-9 in its activations.
    Recomputing its k_aux entries per token in float32 (192 per token against TopK's k) took 100
    ms of a 180 ms step at 8192 latents half dead; the float32 path reads them off the dense z."""
    return kernels.auxk_entries(pre.z, dead_mask, k_aux, bf16_greater)


@torch.no_grad()
def batch_topk_entries(pre: BF16Preactivations, k: int) -> tuple[kernels.Entries, Tensor]:
    """``kernels.batch_topk_entries`` among the float32 pre-activations of every bf16 one above a
    bound less the margin: first a bound estimated from a strided sample (kept when it lies at or
    below the float32 k * B-th value, which makes the candidates a superset), else the batch's k *
    B-th largest bf16 value."""
    B, n = pre.shape
    keep = k * B

    def top_among_candidates(bound: Tensor) -> tuple[Tensor, Tensor] | None:
        index = pre.candidates_above(bound.expand(n))
        if index.numel() < keep:
            return None
        exact = pre.at(*split_flat(index, n))
        chosen = row_top_indices(exact[None], keep)[0].sort().values if index.numel() > keep else torch.arange(keep)
        return index.index_select(0, chosen), exact.index_select(0, chosen)

    sampled = sampled_bound(pre.z.reshape(-1), keep, 1.1)
    found = None if sampled is None else top_among_candidates(sampled)
    if found is None or sampled > found[1].min():  # the estimate was too high: the exact bf16 one
        flat = pre.z.float().reshape(-1)
        found = top_among_candidates(flat.index_select(0, kernels._flat_topk_index(flat, keep)).min())
    index, values = found  # the margin is positive: every bf16 value at or above the bound is a candidate
    inf = values.new_tensor(float("inf"))
    smallest = torch.where(values > 0, values, inf).min() if values.numel() else inf
    return kernels._positive(pre.z, *split_flat(index, n), values), smallest


def jumprelu_selection(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, bandwidth: float,
                       bf16: bool) -> tuple[kernels.Entries, Tensor | None]:
    """JumpReLU's entries, and the float32 ``x_in @ W_enc`` (differentiable) they were chosen on,
    or None when chosen on bf16 pre-activations (b_enc folded into the candidates' threshold)."""
    if bf16:
        return jumprelu_entries(BF16Preactivations(x_in, W_enc, b_enc), threshold, bandwidth), None
    product = x_in @ W_enc
    return kernels.jumprelu_entries(product.detach(), threshold, bandwidth, bias=b_enc.detach()), product


@torch.no_grad()
def jumprelu_entries(pre: BF16Preactivations, threshold: Tensor, bandwidth: float) -> kernels.Entries:
    """JumpReLU's entries (active and kernel-window) among the bf16 candidates above theta - eps - margin."""
    flat = pre.candidates_above(threshold - bandwidth)  # theta - eps: a superset of active | window
    n = pre.shape[1]
    rows, cols = split_flat(flat, n)
    return kernels.jumprelu_from_candidates(rows, cols, pre.at(rows, cols), threshold, bandwidth, pre.shape)
