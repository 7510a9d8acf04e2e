"""The (token, latent) entry list of a sparse training step and its three products (sae/kernels.py):
``gather_rows`` (a CSR x dense product, e.g. the decoder forward), ``gather_cols`` (the transposed
list's, e.g. dL/dW_dec) and ``sddmm`` (a dot product at every entry, e.g. dL/df).

Each product reads rows of a dense table at random, one row per entry. On the CPU the sampled
product goes column block by column block, each block's slice of the right-hand table small
enough to stay in a core's L2 cache (``SDDMM_BLOCK_BYTES``): one thread, 4096 tokens, d 384,
``torch.sparse.sampled_addmm`` over the whole table against the blocks: 4096 latents, 64 per token,
14.8 against 9.3 ms; 8192 / 32: 13.4 against 6.9; 16384 / 64: 33.1 against 14.7; d 576 (SmolLM2),
8192 / 32: 21.5 against 12.2; d 2048, 16384 / 64: 157 against 116. The two ``embedding_bag``
products are not blocked: each block would add a whole (rows, d) output into the result, which
cost more than the cache saved everywhere but 4096 latents at 64 per token (1.5x there, 0.5-0.9x
at 8192 / 32 and 16384 / 64).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_ops import nonzero_flat, split_flat, stable_order, unrecorded

# Dense activations decoded on the CPU outside training (evaluation, calibration, steering) go through
# their nonzero entries when at most this fraction is nonzero and there are at least this many latents:
# 4096 x 8192 at 32 per token, d 384, one thread: 270 ms as a dense product, 20 ms as entries (the
# nonzero mask and its indices 12 ms through numpy, the embedding_bag 5 ms); the check alone costs
# 8 ms where the activations turn out dense.
SPARSE_DECODE_MAX_DENSITY = 0.1
SPARSE_DECODE_MIN_LATENTS = 512
# Largest slice of the sampled product's right-hand table read per block: of 0.4 / 0.8 / 1.5 / 3
# MB slices (L2 is 2 MB per core here), 1.5 MB was fastest or within 5% of it at every shape above.
SDDMM_BLOCK_BYTES = 3 << 19


def block_width(table: Tensor) -> int:
    """Rows of ``table`` (n, d) per block of the sampled product: the largest power of two whose
    rows fit in SDDMM_BLOCK_BYTES (at least 64)."""
    rows = SDDMM_BLOCK_BYTES // max(1, table.shape[1] * table.element_size())
    return 1 << max(6, rows.bit_length() - 1)


def index_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    # 32-bit indices where they fit: embedding_bag runs faster on them, and cuSPARSE takes them.
    return torch.int32 if max(nnz, *shape) < 2**31 - 1 else torch.int64


def offsets(index: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """CSR row pointers (n + 1,) of a list grouped by ``index``."""
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dtype)


@dataclass
class Entries:
    """(row, col) entries of a (n_rows, n_cols) matrix, grouped by row, with the activation value
    at each and its derivative d value / d z (0 or 1). JumpReLU's entries also carry ``window``
    (kernel-window entries), ``pre`` (z at each entry) and ``at_or_above`` (z >= theta)."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    active: Tensor
    shape: tuple[int, int]
    window: Tensor | None = None
    pre: Tensor | None = None
    at_or_above: Tensor | None = None
    _index: tuple[Tensor, Tensor] = field(init=False, repr=False)
    _transpose: tuple[Tensor, Tensor, Tensor] | None = field(init=False, repr=False, default=None)
    _blocks: dict[int, tuple[Tensor, list[tuple[int, int, Tensor, Tensor]]]] = field(
        init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        dtype = self.index_dtype = index_dtype(self.rows.numel(), self.shape)
        self._index = (offsets(self.rows, self.shape[0], dtype), self.cols.to(dtype))

    def flat_index(self) -> Tensor:
        """Each entry's index into the flattened (n_rows * n_cols) matrix."""
        return self.rows * self.shape[1] + self.cols

    def gather_rows(self, table: Tensor, weights: Tensor) -> Tensor:
        """(n_rows, d): for each row, sum over its entries of weight * table[col] (a CSR x dense
        product). A bf16 ``table`` takes the weights in bf16 too (``bag``)."""
        crow, col = self._index
        return bag(col, table, crow, weights)

    def gather_cols(self, table: Tensor, weights: Tensor) -> Tensor:
        """(n_cols, d): for each column, sum over its entries of weight * table[row] (the
        transpose's product; a bf16 ``table`` as in ``gather_rows``)."""
        if self._transpose is None:
            order = stable_order(self.cols, self.shape[1])
            crow = offsets(self.cols, self.shape[1], self.index_dtype)
            self._transpose = (order, crow, self.rows.index_select(0, order).to(self.index_dtype))
        order, crow, row = self._transpose
        return bag(row, table, crow, weights.index_select(0, order))

    def sddmm(self, left: Tensor, right: Tensor) -> Tensor:
        """``left[row] . right[col]`` at every entry (left (n_rows, d), right (n_cols, d))."""
        width = block_width(right)
        if right.device.type != "cpu" or self.shape[1] < 2 * width or not self.rows.numel():
            return _sampled(*self._index, left, right, self.rows, self.cols)
        order, blocks = self._column_blocks(width)
        pieces = [_sampled(crow, col, left, right[start:start + width], rows, col)
                  for start, crow, col, rows in blocks]
        return pieces[0].new_empty(self.rows.numel()).index_copy_(0, order, torch.cat(pieces))

    def _column_blocks(self, width: int) -> tuple[Tensor, list[tuple[int, Tensor, Tensor, Tensor]]]:
        """The entries reordered by column block of ``width`` (a power of two; then by row, as they
        were), and for each block its first column and CSR list (row pointers, columns within it,
        rows). 4 ms for 300k entries in 4 blocks, against 7 saved (4096 tokens, 4096 latents)."""
        if width not in self._blocks:
            n_rows, n_blocks = self.shape[0], -(-self.shape[1] // width)
            cols = self.cols.numpy()
            block = torch.from_numpy(cols >> (width.bit_length() - 1))
            order = stable_order(block, n_blocks)
            per_block = torch.bincount(block * n_rows + self.rows, minlength=n_blocks * n_rows).view(n_blocks, n_rows)
            crows = torch.cat([per_block.new_zeros(n_blocks, 1), per_block.cumsum(1)], 1).to(self.index_dtype)
            within = torch.from_numpy(cols & (width - 1)).index_select(0, order).to(self.index_dtype)
            rows = self.rows.index_select(0, order)
            bounds = [0] + per_block.sum(1).cumsum(0).tolist()
            blocks = [(b * width, crows[b], within[bounds[b]:bounds[b + 1]], rows[bounds[b]:bounds[b + 1]])
                      for b in range(n_blocks) if bounds[b + 1] > bounds[b]]
            self._blocks[width] = (order, blocks)
        return self._blocks[width]

    def scatter_cols(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.shape[1]).index_add_(0, self.cols, values)


def sparse_decode(acts: Tensor, table: Tensor) -> Tensor | None:
    """``acts (..., n) @ table (n, d)`` through the nonzero entries of ``acts`` (an embedding_bag
    per row), or None where that would not pay or cannot be: off the CPU, not float32, autograd
    recording through either, fewer than SPARSE_DECODE_MIN_LATENTS latents or no rows, or more
    than SPARSE_DECODE_MAX_DENSITY of the entries nonzero. Sums in another order than the dense
    product: equal to it within float32 rounding (NaN and inf entries propagate alike)."""
    shape, n = acts.shape, acts.shape[-1] if acts.dim() else 0
    acts, table = unrecorded(acts, table)
    if (acts.device.type != "cpu" or table.device.type != "cpu" or acts.dtype != torch.float32
            or table.dtype != torch.float32 or acts.requires_grad or table.requires_grad
            or n < SPARSE_DECODE_MIN_LATENTS or acts.numel() == 0):
        return None
    flat = acts.reshape(-1, n)
    nonzero = np.not_equal(flat.numpy(), 0)
    if np.count_nonzero(nonzero) > SPARSE_DECODE_MAX_DENSITY * nonzero.size:
        return None
    index = nonzero_flat(torch.from_numpy(nonzero))
    rows, cols = split_flat(index, n)
    values = flat.reshape(-1).index_select(0, index)
    return bag(cols, table, offsets(rows, flat.shape[0], torch.int64), values).reshape(*shape[:-1], table.shape[1])


def bag(index: Tensor, table: Tensor, crow: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of ``table`` rows, one per CSR row of ``crow``: float32 from a float32 table,
    and from a bf16 one the weights rounded to bf16 and the sums (accumulated in float32 by
    fbgemm, rounded to bf16 once) returned as float32."""
    if table.dtype == torch.bfloat16:
        return F.embedding_bag(index, table, crow[:-1], mode="sum", per_sample_weights=weights.to(table.dtype)).float()
    return F.embedding_bag(index, table, crow[:-1], mode="sum", per_sample_weights=weights)


def _sampled(crow: Tensor, col: Tensor, left: Tensor, right: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``left[r] . right[c]`` at the CSR entries (crow, col) of a (len(left), len(right)) matrix;
    ``rows``, ``cols`` the same entries as plain lists (for builds without sampled_addmm)."""
    try:
        with warnings.catch_warnings():  # "CSR support is in beta" (once per process)
            warnings.simplefilter("ignore")
            mask = torch.sparse_csr_tensor(crow, col, left.new_zeros(col.numel()), (left.shape[0], right.shape[0]),
                                           check_invariants=False)
        return torch.sparse.sampled_addmm(mask, left, right.T, beta=0.0).values()
    except (RuntimeError, NotImplementedError):  # no sampled_addmm for this device or build
        pieces = zip(rows.split(1 << 14), cols.split(1 << 14))
        return torch.cat([left.new_zeros(0)] + [(left[r] * right[c.long()]).sum(-1) for r, c in pieces])
