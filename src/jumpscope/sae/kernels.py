"""Sparse training kernels: an SAE training step whose cost follows the active set.

Only the encoder forward ``z = x_in @ W_enc + b_enc`` needs a dense matmul (every pre-activation
must be seen to select the active latents). Everything else runs on a list of (token, latent)
entries, held as CSR matrices:

- decoder forward ``x_hat = f @ W_dec + b_dec``: CSR x dense (``torch.sparse.mm``);
- ``dL/dW_dec = f^T @ dL/dx_hat``: the transposed CSR x dense;
- ``dL/df`` at the entries only: a sampled dense-dense product (``torch.sparse.sampled_addmm``);
- ``dL/dz = dL/df * df/dz`` (nonzero at active entries only), so ``dL/dW_enc = x_in^T @ dL/dz``
  and ``dL/db_enc`` (column sums) are sparse too; with ``x_in = x - b_dec``, b_dec gets
  ``-dL/db_enc @ W_enc^T`` on top of its decoder-side gradient;
- JumpReLU's threshold pseudo-gradients (SPEC 1) live on the kernel window
  ``|z - theta| < eps/2``: those entries are kept in the list (with activation 0) so that
  ``dL/df`` is known there, and the L0 step term adds ``-(1/eps) * dL/dl0_b`` per window entry.
- TopK's AuxK decode reads only the dead latents: their k_aux selected activations are held as a
  compact dense (B, n_dead) block, so its four products are dense matmuls of inner width n_dead
  (never more work than the dense path's AuxK, and far less while few latents are dead).

The gradients equal the dense reference path's (tests/test_kernels.py) up to float summation
order. Selection is done by the caller (the architecture's ``loss``) from a detached ``z``; the
dense ``z`` buffer is then reused for the dense ``feature_acts`` output the trainer's metrics read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

Kernel = Literal["auto", "dense", "sparse"]
KERNELS = ("auto", "dense", "sparse")

# "auto" picks the sparse path on CPU when the fraction of (token, latent) entries it works on is
# at most this. benchmarks/kernel_speed.py, d_sae 4096, 2 cores: the full sparse step is 4.5-5.8x
# faster at L0 32 (1/128), 2.4-3.2x at 1/16, 1.5x at 1/8 and 0.6-0.9x at 1/4 (OMP_WAIT_POLICY
# PASSIVE; with OpenMP's default spin-waiting on a loaded machine: 2x, 1.5x, ~1.1x, 0.6x) ...
AUTO_MAX_DENSITY = 0.1
# ... and the dictionary has at least this many latents (below it both paths take milliseconds).
AUTO_MIN_LATENTS = 512


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def use_sparse(kernel: str, z: Tensor, density: float | None) -> bool:
    """Whether a loss should take the sparse path: ``density`` is the expected fraction of
    entries (None when unknown, e.g. JumpReLU before counting its candidates)."""
    if kernel != "auto":
        return kernel == "sparse"
    if z.device.type != "cpu" or z.shape[-1] < AUTO_MIN_LATENTS:
        return False  # dense matmuls are fast on accelerators; tiny SAEs gain nothing
    return density is None or density <= AUTO_MAX_DENSITY


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta" (once per process)
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _index_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    # 32-bit CSR indices where they fit: every cuSPARSE routine takes them.
    return torch.int32 if max(nnz, *shape) < 2**31 - 1 else torch.int64


def _crow(index: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    counts = torch.bincount(index, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dtype)


@dataclass
class Entries:
    """(row, col) entries of a (n_rows, n_cols) matrix, row-major sorted (columns ascending
    within a row), with the activation value at each and its derivative d value / d z (0 or 1).
    ``window`` marks JumpReLU kernel-window entries (None for TopK)."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    active: Tensor
    shape: tuple[int, int]
    window: Tensor | None = None
    _csr_index: tuple[Tensor, Tensor] = field(init=False, repr=False)
    _transpose: tuple[Tensor, Tensor, Tensor] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        dtype = self.index_dtype = _index_dtype(self.rows.numel(), self.shape)
        self._csr_index = (_crow(self.rows, self.shape[0], dtype), self.cols.to(dtype))

    def csr(self, values: Tensor) -> Tensor:
        return _csr(*self._csr_index, values, self.shape)

    def csr_t(self, values: Tensor) -> Tensor:
        """The transpose (n_cols, n_rows) as CSR, carrying ``values`` (given in entry order)."""
        if self._transpose is None:
            order = torch.argsort(self.cols, stable=True)
            crow = _crow(self.cols, self.shape[1], self.index_dtype)
            self._transpose = (order, crow, self.rows[order].to(self.index_dtype))
        order, crow, col = self._transpose
        return _csr(crow, col, values[order], (self.shape[1], self.shape[0]))

    def sddmm(self, left: Tensor, right: Tensor) -> Tensor:
        """``left[row] . right[col]`` at every entry (left (n_rows, d), right (n_cols, d))."""
        try:
            mask = self.csr(left.new_zeros(self.rows.numel()))
            return torch.sparse.sampled_addmm(mask, left, right.T, beta=0.0).values()
        except (RuntimeError, NotImplementedError):  # no sampled_addmm for this device or build
            pieces = zip(self.rows.split(1 << 14), self.cols.split(1 << 14))
            return torch.cat([left.new_zeros(0)] + [(left[r] * right[c]).sum(-1) for r, c in pieces])

    def scatter_cols(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.shape[1]).index_add_(0, self.cols, values)


def _entries(z: Tensor, rows: Tensor, cols: Tensor, active: Tensor, values: Tensor, **kw: Any) -> Entries:
    dtype = torch.float32
    return Entries(rows, cols, values.to(dtype), active.to(dtype), tuple(z.shape), **kw)


@torch.no_grad()
def jumprelu_entries(z: Tensor, threshold: Tensor, bandwidth: float) -> Entries:
    """Active entries (z > theta) and kernel-window entries (|z - theta| < eps/2) of z (B, n),
    with the same float expressions as the dense path (jumprelu.py)."""
    candidates = (z > threshold - bandwidth).nonzero()  # a superset of active | window
    rows, cols = candidates.unbind(1)
    zu, theta = z[rows, cols], threshold[cols]
    active = zu > theta
    u = (zu - theta) / bandwidth
    window = (u > -0.5) & (u < 0.5)
    keep = active | window
    rows, cols, zu, active, window = rows[keep], cols[keep], zu[keep], active[keep], window[keep]
    return _entries(z, rows, cols, active, zu * active.to(zu.dtype), window=window.to(torch.float32))


def _positive(z: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Entries:
    # ReLU'd selections: entries with z <= 0 have value 0 and gradient 0, so they are left out.
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    return _entries(z, rows, cols, torch.ones_like(values), values)


@torch.no_grad()
def topk_entries(z: Tensor, k: int) -> Entries:
    """The k largest entries of each row of z, ReLU'd (entries with z <= 0 left out)."""
    values, cols = z.topk(k, dim=-1, sorted=False)
    cols, order = cols.sort(dim=-1)
    values = values.gather(-1, order)
    rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
    return _positive(z, rows, cols.reshape(-1), values.reshape(-1))


@dataclass
class AuxEntries:
    """AuxK's selection over the dead latents ``columns`` (m,): ``acts`` (B, m) holds the ReLU'd
    top-k_aux pre-activations of each token among them and zeros elsewhere."""

    columns: Tensor
    acts: Tensor


@torch.no_grad()
def auxk_entries(z: Tensor, dead_mask: Tensor, k_aux: int) -> AuxEntries:
    """The top ``k_aux`` pre-activations of each token among the dead latents, as topk.py picks them."""
    columns = dead_mask.nonzero().squeeze(1)
    pool = z.index_select(1, columns)
    values, index = pool.topk(k_aux, dim=-1, sorted=False)
    return AuxEntries(columns, torch.zeros_like(pool).scatter_(-1, index, torch.relu(values)).float())


def _flat_topk_index(flat: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest entries of ``flat``, as ``flat.topk(keep)`` picks them, but
    running the top-k on the entries above a threshold estimated from a strided sample (exact: it
    falls back to the full top-k unless at least ``keep`` entries pass the threshold)."""
    n = flat.numel()
    if n >= 16 * keep and n >= 1 << 18:
        stride = n // (1 << 16)
        while math.gcd(stride, n) != 1 and stride > 1:
            stride -= 1
        sample = flat[::stride]
        m = sample.numel()
        expected = 2.0 * keep / n * m  # aim at twice keep candidates
        above = min(m - 1, math.ceil(expected + 6 * math.sqrt(expected) + 16))
        bound = sample.kthvalue(m - above).values
        candidates = (flat > bound).nonzero().squeeze(1)
        if candidates.numel() >= keep:
            return candidates[flat[candidates].topk(keep, sorted=False).indices]
    return flat.topk(keep, sorted=False).indices


@torch.no_grad()
def batch_topk_entries(z: Tensor, k: int) -> tuple[Entries, Tensor]:
    """BatchTopK: the k * B largest ReLU'd entries of z (B, n) over the whole batch, and the
    smallest kept positive value (+inf when none is positive), as batchtopk.py computes them."""
    B, n = z.shape
    index = _flat_topk_index(z.reshape(-1), k * B).sort().values
    values = z.reshape(-1)[index]
    inf = values.new_tensor(float("inf"))
    smallest = torch.where(values > 0, values, inf).min() if values.numel() else inf
    return _positive(z, index // n, index % n, values), smallest


class _SparseSAE(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec, theta) -> (x_hat, aux e_hat, per-token L0, dense f)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                theta: Tensor | None, main: Entries, aux: AuxEntries | None, buffer: Tensor | None,
                apply_b_dec: bool, bandwidth: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, theta)
        ctx.main, ctx.aux, ctx.apply_b_dec, ctx.bandwidth = main, aux, apply_b_dec, bandwidth
        recon = main.csr(main.values) @ W_dec + b_dec
        if aux is not None:
            ctx.W_dec_dead = W_dec.index_select(0, aux.columns)
        aux_recon = aux.acts @ ctx.W_dec_dead if aux is not None else recon.new_zeros(0)
        l0 = x.new_zeros(main.shape[0]).index_add_(0, main.rows, main.active)
        acts = buffer.detach().zero_() if buffer is not None else x.new_zeros(main.shape)
        acts.index_put_((main.rows, main.cols), main.values)
        return recon, aux_recon, l0, acts

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx: Any, g_recon: Tensor | None, g_aux: Tensor | None, g_l0: Tensor | None,
                 g_acts: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, W_dec, b_dec, theta = ctx.saved_tensors
        main, aux, need = ctx.main, ctx.aux, ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 11
        g = main.sddmm(g_recon, W_dec) if g_recon is not None else None  # dL/df at the entries
        if g_acts is not None:
            picked = g_acts[main.rows, main.cols]
            g = picked if g is None else g + picked
        g_main = None if g is None else g * main.active  # dL/dz at the entries
        g_dead = None  # dL/dz on the dead columns (B, m)
        if aux is not None and g_aux is not None and g_aux.numel():
            g_dead = (g_aux @ ctx.W_dec_dead.T) * (aux.acts > 0)
        if need[3] and g_recon is not None:
            grads[3] = main.csr_t(main.values) @ g_recon
        if need[3] and g_dead is not None:
            dead_grad = aux.acts.T @ g_aux
            grads[3] = (W_dec.new_zeros(W_dec.shape) if grads[3] is None else grads[3]).index_add_(
                0, aux.columns, dead_grad)
        if need[4] and g_recon is not None:
            grads[4] = g_recon.sum(0)
        if g_main is not None or g_dead is not None:
            x_in = x - b_dec if ctx.apply_b_dec else x
            grad_b_enc = main.scatter_cols(g_main) if g_main is not None else b_dec.new_zeros(main.shape[1])
            if g_dead is not None:
                grad_b_enc.index_add_(0, aux.columns, g_dead.sum(0))
            if need[1]:
                grad_W_enc = (main.csr_t(g_main) @ x_in).T if g_main is not None else W_enc.new_zeros(W_enc.shape)
                if g_dead is not None:
                    grad_W_enc = grad_W_enc.index_add(1, aux.columns, x_in.T @ g_dead)
                grads[1] = grad_W_enc
            if need[2]:
                grads[2] = grad_b_enc
            if need[4] and ctx.apply_b_dec:
                enc_side = -(grad_b_enc @ W_enc.T)
                grads[4] = enc_side if grads[4] is None else grads[4] + enc_side
            if need[0]:
                grad_x = main.csr(g_main) @ W_enc.T if g_main is not None else x.new_zeros(x.shape)
                if g_dead is not None:
                    grad_x = grad_x + g_dead @ W_enc.index_select(1, aux.columns).T
                grads[0] = grad_x
        if need[5] and main.window is not None and (g is not None or g_l0 is not None):
            eps, window = ctx.bandwidth, main.window
            g_theta = torch.zeros_like(window)
            if g is not None:  # d JumpReLU / d theta = -(theta/eps) K((z - theta)/eps)
                g_theta = -(theta[main.cols] / eps) * window * g
            if g_l0 is not None:  # d H / d theta = -(1/eps) K((z - theta)/eps)
                g_theta = g_theta - (1.0 / eps) * window * g_l0[main.rows]
            grads[5] = main.scatter_cols(g_theta)
        return tuple(grads)


def sparse_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, main: Entries, *,
               theta: Tensor | None = None, aux: AuxEntries | None = None, buffer: Tensor | None = None,
               apply_b_dec_to_input: bool = False, bandwidth: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reconstruction (B, d_out), AuxK reconstruction (B, d_out; empty without ``aux``), per-token
    L0 (B,) and dense feature acts (B, n, written into ``buffer`` when given, e.g. the detached z)
    from entries selected on z = x_in @ W_enc + b_enc. Differentiable in x, W_enc, b_enc, W_dec,
    b_dec and theta (JumpReLU: pass ``bandwidth`` and entries with a window)."""
    return _SparseSAE.apply(x, W_enc, b_enc, W_dec, b_dec, theta, main, aux, buffer,
                            apply_b_dec_to_input, bandwidth)
