"""Sparse training kernels: an SAE training step whose cost follows the active set.

Only the encoder forward ``x_in @ W_enc`` needs a dense matmul (every pre-activation must be seen
to select the active latents). Everything else runs on a list of (token, latent) entries:

- decoder forward ``x_hat = f @ W_dec + b_dec``: a weighted ``embedding_bag`` over each token's entries;
- ``dL/dW_dec = f^T @ dL/dx_hat``: the same over each latent's entries (the transposed list);
- ``dL/df`` at the entries only: a sampled dense-dense product (``torch.sparse.sampled_addmm``);
- ``dL/dz = dL/df * df/dz`` (nonzero at active entries only), so ``dL/dW_enc = x_in^T @ dL/dz``
  and ``dL/db_enc`` (column sums) are sparse too; with ``x_in = x - b_dec``, b_dec gets
  ``-dL/db_enc @ W_enc^T`` on top of its decoder-side gradient;
- JumpReLU's threshold pseudo-gradients (SPEC 1) live on the kernel window
  ``|z - theta| < eps/2``: those entries are kept in the list (with activation 0) so that
  ``dL/df`` is known there, and the L0 step term adds ``-(1/eps) * dL/dl0_b`` per window entry;
  its pre-activation penalty sum_b ReLU(theta_i - z_bi) per latent is "all tokens minus the
  tokens at or above theta": a rank-one term plus entries folded into the products above;
- TopK's AuxK decode reads only the dead latents: while k_aux is at most AUX_MAX_DENSITY of them,
  its k_aux selected activations per token are a second entry list through the same products;
  otherwise a compact dense (B, n_dead) block, whose four products are dense matmuls of inner
  width n_dead (never more work than the dense path's AuxK).

The gradients equal the dense reference path's (tests/sae/test_kernels.py) up to float summation
order (with ``bf16_products``, autocast 'bf16' on the CPU, up to bf16's rounding of the gathered
tables). Selection is done by the caller (the architecture's ``loss``) from a detached ``z`` (for
JumpReLU without b_enc: the bias is folded into the threshold and added at the entries only);
the feature acts come out as a ``SparseActs`` (the entries), whose dense tensor, built only when
something reads it, takes over the detached ``z`` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd

from .cpu_ops import greater, group_maxima, nonzero_flat, row_top_indices, sampled_bound, split_flat
from .entries import Entries
from .step import SparseActs

Kernel = Literal["auto", "dense", "sparse"]
KERNELS = ("auto", "dense", "sparse")

# "auto" picks the sparse path on CPU when the fraction of (token, latent) entries it works on is
# at most this. benchmarks/kernel_speed.py, d_sae 4096, 2 cores: the full sparse step is 4.5-5.8x
# faster at L0 32 (1/128), 2.4-3.2x at 1/16, 1.5x at 1/8 and 0.6-0.9x at 1/4 (OMP_WAIT_POLICY
# PASSIVE; with OpenMP's default spin-waiting on a loaded machine: 2x, 1.5x, ~1.1x, 0.6x) ...
AUTO_MAX_DENSITY = 0.1
# ... and the dictionary has at least this many latents (below it both paths take milliseconds).
AUTO_MIN_LATENTS = 512
# On CUDA from these many latents (float32, autocast). gpu_speed.py, H200, d_in 768, L0 64, Trainer tokens/s
# sparse / dense (JumpReLU, TopK, BatchTopK): float32 16384 1.5-1.8x, 1.7x, 1.5x, 65536 3.1x, 3.0x, 2.6x;
# bf16 16384 0.9x, 0.6-1.0x, 0.7x, 65536 1.9x, 1.3x, 1.4x; one float32 step at 4096: 0.8x, 1.4x, 1.3x.
CUDA_MIN_LATENTS, CUDA_AUTOCAST_MIN_LATENTS = 16384, 32768
# AuxK's selection as entries when k_aux is at most this fraction of the dead latents, else a dense
# block. TopK step, one thread, 4096 tokens, k_aux 192 (block / entries): 0.97x at k_aux / n_dead
# 0.094, 1.23x at 0.047 (8192 latents, half dead), 1.51x at 0.023 (16384, half dead).
AUX_MAX_DENSITY = 0.075
# Up to this fraction of the latents dead, AuxK copies their columns out before comparing (the copy
# costs about 5x a comparison per column: 8192 latents, bf16, half dead: 27 against 7 ms over all).
AUX_GATHER_FRACTION = 0.125


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def sparse_wanted(kernel: str, device: torch.device, n_latents: int, density: float | None) -> bool:
    """Whether a loss should take the sparse path: ``density`` is the expected fraction of
    entries (None when unknown, e.g. JumpReLU before counting its candidates)."""
    if kernel != "auto":
        return kernel == "sparse"
    if device.type == "cuda":
        floor = CUDA_AUTOCAST_MIN_LATENTS if torch.is_autocast_enabled("cuda") else CUDA_MIN_LATENTS
    elif device.type == "cpu":
        floor = AUTO_MIN_LATENTS  # below it both paths take milliseconds
    else:
        return False  # other accelerators: not measured; their dense matmuls are the safe choice
    return n_latents >= floor and (density is None or density <= AUTO_MAX_DENSITY)


def use_sparse(kernel: str, z: Tensor, density: float | None) -> bool:
    """``sparse_wanted`` for pre-activations ``z`` (..., n)."""
    return sparse_wanted(kernel, z.device, z.shape[-1], density)


def _select(keep: Tensor, *tensors: Tensor) -> list[Tensor]:
    index = nonzero_flat(keep)
    return [t.index_select(0, index) for t in tensors]


@torch.no_grad()
def jumprelu_entries(z: Tensor, threshold: Tensor, bandwidth: float, bias: Tensor | None = None) -> Entries:
    """Active entries (z > theta) and kernel-window entries (|z - theta| < eps/2) of z (B, n),
    with the same float expressions as the dense path (jumprelu.py). With ``bias``, ``z`` holds
    x_in @ W_enc only and the pre-activation is ``z + bias`` (added at the candidates only)."""
    n = z.shape[1]
    low = threshold - bandwidth  # candidates z > theta - eps: a superset of active | window
    if bias is not None:  # on z without the bias, with a margin far above the rounding of z + bias
        low = low - bias - 1e-5 * (low.abs() + bias.abs()) - torch.finfo(z.dtype).tiny
    flat = nonzero_flat(greater(z, low))
    rows, cols = split_flat(flat, n)
    zu = z.reshape(-1).index_select(0, flat)
    if bias is not None:
        zu = zu + bias.index_select(0, cols)
    return jumprelu_from_candidates(rows, cols, zu, threshold, bandwidth, tuple(z.shape))


def jumprelu_from_candidates(rows: Tensor, cols: Tensor, zu: Tensor, threshold: Tensor, bandwidth: float,
                             shape: tuple[int, int]) -> Entries:
    """JumpReLU's entries among candidates (rows grouped ascending) with pre-activations zu, a
    superset of the active and kernel-window entries."""
    theta = threshold.index_select(0, cols)
    active = zu > theta
    u = (zu - theta) / bandwidth
    window = (u > -0.5) & (u < 0.5)
    rows, cols, zu, theta, active, window = _select(active | window, rows, cols, zu, theta, active, window)
    f32 = torch.float32
    return Entries(rows, cols, (zu * active.to(zu.dtype)).to(f32), active.to(f32), shape,
                   window=window.to(f32), pre=zu, at_or_above=(zu >= theta).to(f32))


def _positive(z: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Entries:
    # ReLU'd selections: entries with z <= 0 have value 0 and gradient 0, so they are left out.
    keep = values > 0
    if not bool(keep.all()):
        rows, cols, values = _select(keep, rows, cols, values)
    values = values.float()
    return Entries(rows, cols, values, torch.ones_like(values), tuple(z.shape))


def row_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``z.topk(k, dim=-1, sorted=False)`` (values, indices; the same set up to ties) for z (B, n),
    on a shortlist: split each row into G strided groups of S; the k groups with the largest
    maxima hold the row's k largest entries, so one top-k over the G maxima and one over those
    k groups' S * k entries replace the top-k over n (G * S = n). S = 4, 8 or 16 as n / k is at most
    32, under 256, or more: the fastest S or within 5% of it for n 2048-16384, k 32-80, 4096 rows
    (float32 and bf16; sqrt(n / k) rounded down to a power of two: the selection alone 1.2-1.35x
    slower at n/k 51, a whole TopK step 1.00-1.02x)."""
    B, n = z.shape
    S = 2 if n < 16 * k else 4 if n <= 32 * k else 8 if n < 256 * k else 16  # 2: a plain top-k (below)
    G = n // S
    if S < 4 or n % S or G < k or not z.is_contiguous():
        return z.topk(k, dim=-1, sorted=False)
    grouped = z.view(B, S, G)  # group g: columns g, g + G, g + 2G, ...
    groups = row_top_indices(group_maxima(grouped, k), k)  # (B, k)
    shortlist = grouped.gather(2, groups.unsqueeze(1).expand(B, S, k)).reshape(B, S * k)
    position = row_top_indices(shortlist, k)
    return shortlist.gather(1, position), groups.gather(1, position % k) + G * (position // k)


@torch.no_grad()
def topk_entries(z: Tensor, k: int) -> Entries:
    """The k largest entries of each row of z, ReLU'd (entries with z <= 0 left out)."""
    values, cols = row_topk(z, k)
    rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
    return _positive(z, rows, cols.reshape(-1), values.reshape(-1))


@dataclass
class AuxEntries:
    """AuxK's selection over the dead latents ``columns`` (m,): ``acts`` (B, m) holds the ReLU'd
    top-k_aux pre-activations of each token among them and zeros elsewhere."""

    columns: Tensor
    acts: Tensor


@torch.no_grad()
def auxk_entries(z: Tensor, dead_mask: Tensor, k_aux: int,
                 greater_than: Callable[[Tensor, Tensor], Tensor] = greater) -> AuxEntries | Entries:
    """The top ``k_aux`` pre-activations of each token among the dead latents, as topk.py picks them,
    ReLU'd: the positive ones as entries where no token has more than k_aux of them (the usual case,
    ``_positive_dead_entries``), else as entries (the non-positive left out) while k_aux <=
    AUX_MAX_DENSITY * n_dead, else a block. ``greater_than(z, bound)`` is ``z > bound`` with a
    bound per column (mixed.py passes its bf16 comparison)."""
    columns = dead_mask.nonzero().squeeze(1)
    # a few dead latents: their columns copied out first; many: one comparison over the whole z
    pool = z.index_select(1, columns) if columns.numel() <= AUX_GATHER_FRACTION * z.shape[1] else None
    few = _positive_dead_entries(z, dead_mask, columns, pool, k_aux, greater_than)
    if few is not None:
        return few
    pool = z.index_select(1, columns) if pool is None else pool
    if k_aux >= columns.numel():  # every dead latent is picked
        return AuxEntries(columns, torch.relu_(pool).float())
    index = row_top_indices(pool, k_aux)
    values = pool.gather(1, index)
    if k_aux <= AUX_MAX_DENSITY * columns.numel():
        rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k_aux)
        return _positive(z, rows, columns.index_select(0, index.reshape(-1)), values.reshape(-1))
    return AuxEntries(columns, torch.zeros_like(pool).scatter_(-1, index, torch.relu(values)).float())


def _positive_dead_entries(z: Tensor, dead_mask: Tensor, columns: Tensor, pool: Tensor | None, k_aux: int,
                           greater_than: Callable[[Tensor, Tensor], Tensor]) -> Entries | None:
    """AuxK's selection where no token has more than k_aux positive pre-activations among the dead
    latents ``columns`` (``pool``: z's columns there, or None to compare over z): the ReLU'd top k_aux
    are then exactly those, found by one comparison instead of a top-k over each token's dead pool
    (dead latents rarely fire: MiniLM, 8192 latents, ~3,300 dead, TopK k 32: at most 23 per token,
    against k_aux 192; 8 against 70 ms). None where some token has more, or where they fill more
    than AUX_MAX_DENSITY of the (tokens, dead latents) block (its dense products are then cheaper)."""
    B, n = z.shape
    if pool is None:
        source = z
        bound = torch.full((n,), torch.finfo(torch.float32).max, device=z.device)  # live columns: never above
        bound[dead_mask] = 0.0
    else:
        source, bound = pool, torch.zeros(pool.shape[1], device=z.device)
    flat = nonzero_flat(greater_than(source, bound))  # a float32 bound: bf16 and float64 z compare against it too
    rows, cols = split_flat(flat, source.shape[1])
    if rows.numel() > AUX_MAX_DENSITY * B * columns.numel():  # dense enough for the block's matmuls
        return None
    if rows.numel() and int(torch.bincount(rows, minlength=B).max()) > k_aux:
        return None
    values = source.reshape(-1).index_select(0, flat)
    cols = cols if pool is None else columns.index_select(0, cols)
    keep = dead_mask.index_select(0, cols) & (values > 0)  # NaN, or an infinite live value, never counts
    rows, cols, values = _select(keep, rows, cols, values)
    values = values.float()
    return Entries(rows, cols, values, torch.ones_like(values), (B, n))


def _flat_topk_index(flat: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest entries of ``flat``, as ``flat.topk(keep)`` picks them, but
    running the top-k on the entries above a threshold estimated from a strided sample (exact: it
    falls back to the full top-k unless at least ``keep`` entries pass the threshold)."""
    bound = sampled_bound(flat, keep, 2.0)  # aim at twice keep candidates
    if bound is not None:
        candidates = nonzero_flat(greater(flat, bound))
        if candidates.numel() >= keep:
            return candidates.index_select(0, flat.index_select(0, candidates).topk(keep, sorted=False).indices)
    return flat.topk(keep, sorted=False).indices


@torch.no_grad()
def batch_topk_entries(z: Tensor, k: int) -> tuple[Entries, Tensor]:
    """BatchTopK: the k * B largest ReLU'd entries of z (B, n) over the whole batch, and the
    smallest kept positive value (+inf when none is positive), as batchtopk.py computes them."""
    B, n = z.shape
    index = _flat_topk_index(z.reshape(-1), k * B).sort().values
    values = z.reshape(-1).index_select(0, index)
    inf = values.new_tensor(float("inf"))
    smallest = torch.where(values > 0, values, inf).min() if values.numel() else inf
    return _positive(z, *split_flat(index, n), values), smallest


def column_sum(x: Tensor) -> Tensor:
    """``x.sum(0)`` in float64 from float32 sums of 64 rows at a time (4096 x 384, one thread: 0.28
    against 2.3 ms for ``sum(0, dtype=float64)``; each partial sum is as exact as x's float32)."""
    whole = x.shape[0] // 64 * 64
    partial = x[:whole].reshape(-1, 64, x.shape[1]).sum(1).sum(0, dtype=torch.float64)
    return partial + x[whole:].sum(0, dtype=torch.float64)


def _to_bf16(table: Tensor) -> Tensor:
    return table.detach().to(torch.bfloat16)


def _unchanged(table: Tensor) -> Tensor:
    return table


class _SparseSAE(torch.autograd.Function):
    """(x, W_enc, b_enc, W_dec, b_dec, theta) -> (x_hat, aux e_hat, per-token L0, f at the
    entries, gap): gap (n,) is JumpReLU's sum_b ReLU(theta_i - z_bi) when asked for (else empty)."""

    @staticmethod
    @custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                theta: Tensor | None, main: Entries, aux: AuxEntries | Entries | None,
                apply_b_dec: bool, bandwidth: float, gap: bool, bf16_products: bool) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.main, ctx.aux, ctx.apply_b_dec, ctx.bandwidth = main, aux, apply_b_dec, bandwidth
        ctx.table = _to_bf16 if bf16_products else _unchanged  # the tables of the gathered products
        decoder = ctx.table(W_dec)
        recon = main.gather_rows(decoder, main.values) + b_dec
        if isinstance(aux, Entries):
            aux_recon = aux.gather_rows(decoder, aux.values)
        elif aux is not None:
            ctx.W_dec_dead = W_dec.index_select(0, aux.columns)
            aux_recon = aux.acts @ ctx.W_dec_dead
        else:
            aux_recon = recon.new_zeros(0)
        l0 = x.new_zeros(main.shape[0]).index_add_(0, main.rows, main.active)
        values = main.values.clone()  # an output of its own: its gradient is dL/df at the entries
        x_sum = above = None
        if gap:  # all tokens minus those at or above theta, in float64 (the two sums nearly cancel)
            x_sum = column_sum(x) - (x.shape[0] * b_dec.double() if apply_b_dec else 0.0)
            above = main.scatter_cols(main.at_or_above)
            z_all = x_sum @ W_enc.double() + main.shape[0] * b_enc.double()  # sum_b z_bi
            z_above = main.scatter_cols(main.pre.double() * main.at_or_above)
            gap_out = ((main.shape[0] - above).double() * theta.double() - (z_all - z_above)).to(x.dtype)
        else:
            gap_out = x.new_zeros(0)
        ctx.x_sum, ctx.above = x_sum, above
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, theta)
        return recon, aux_recon, l0, values, gap_out

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx: Any, g_recon: Tensor | None, g_aux: Tensor | None, g_l0: Tensor | None,
                 g_values: Tensor | None, g_gap: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, W_dec, b_dec, theta = ctx.saved_tensors
        main, aux, need = ctx.main, ctx.aux, ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 12
        B = main.shape[0]
        g = main.sddmm(g_recon, W_dec) if g_recon is not None else None  # dL/df at the entries
        if g_values is not None:
            g = g_values if g is None else g + g_values
        g_main = None if g is None else g * main.active  # dL/dz at the entries
        if g_gap is not None and ctx.x_sum is not None:
            # d gap_i / d z_bi = -1 below theta: -g_gap everywhere (a rank-one term, below) plus
            # g_gap at the entries at or above theta
            folded = g_gap.index_select(0, main.cols) * main.at_or_above
            g_main = folded if g_main is None else g_main + folded
        else:
            g_gap = None
        g_dead = g_aux_at = None  # dL/dz on the dead columns: a (B, m) block or at AuxK's entries
        if aux is not None and g_aux is not None and g_aux.numel():
            if isinstance(aux, Entries):
                g_aux_at = aux.sddmm(g_aux, W_dec)
            else:
                g_dead = (g_aux @ ctx.W_dec_dead.T) * (aux.acts > 0)
        if need[3] and g_recon is not None:
            grads[3] = main.gather_cols(ctx.table(g_recon), main.values)
        if need[3] and g_dead is not None:
            dead_grad = aux.acts.T @ g_aux
            grads[3] = (W_dec.new_zeros(W_dec.shape) if grads[3] is None else grads[3]).index_add_(
                0, aux.columns, dead_grad)
        if need[3] and g_aux_at is not None:
            aux_grad = aux.gather_cols(ctx.table(g_aux), aux.values)
            grads[3] = aux_grad if grads[3] is None else grads[3].add_(aux_grad)  # a fresh tensor of ours
        if need[4] and g_recon is not None:
            grads[4] = g_recon.sum(0)
        if g_main is not None or g_dead is not None or g_aux_at is not None:
            x_in = x - b_dec if ctx.apply_b_dec else x
            grad_b_enc = main.scatter_cols(g_main) if g_main is not None else b_dec.new_zeros(main.shape[1])
            if g_gap is not None:
                grad_b_enc -= B * g_gap
            if g_dead is not None:
                grad_b_enc.index_add_(0, aux.columns, g_dead.sum(0))
            if g_aux_at is not None:
                grad_b_enc += aux.scatter_cols(g_aux_at)
            if need[1]:  # computed as its transpose (n, d_in)
                inputs = ctx.table(x_in)
                grad_W_enc = main.gather_cols(inputs, g_main) if g_main is not None else W_enc.new_zeros(W_enc.shape).T
                if g_gap is not None:
                    grad_W_enc.addr_(g_gap, ctx.x_sum.to(x.dtype), alpha=-1.0)
                if g_dead is not None:
                    grad_W_enc.index_add_(0, aux.columns, g_dead.T @ x_in)
                if g_aux_at is not None:
                    grad_W_enc += aux.gather_cols(inputs, g_aux_at)
                grads[1] = grad_W_enc.T
            if need[2]:
                grads[2] = grad_b_enc
            if need[4] and ctx.apply_b_dec:
                enc_side = -(grad_b_enc @ W_enc.T)
                grads[4] = enc_side if grads[4] is None else grads[4] + enc_side
            if need[0]:
                W_enc_t = W_enc.T.contiguous()
                grad_x = main.gather_rows(W_enc_t, g_main) if g_main is not None else x.new_zeros(x.shape)
                if g_gap is not None:
                    grad_x -= g_gap @ W_enc_t
                if g_dead is not None:
                    grad_x = grad_x + g_dead @ W_enc_t.index_select(0, aux.columns)
                if g_aux_at is not None:
                    grad_x = grad_x + aux.gather_rows(W_enc_t, g_aux_at)
                grads[0] = grad_x
        if need[5] and main.window is not None and (g is not None or g_l0 is not None or g_gap is not None):
            eps, window = ctx.bandwidth, main.window
            g_theta = torch.zeros_like(window)
            if g is not None:  # d JumpReLU / d theta = -(theta/eps) K((z - theta)/eps)
                g_theta = -(theta.index_select(0, main.cols) / eps) * window * g
            if g_l0 is not None:  # d H / d theta = -(1/eps) K((z - theta)/eps)
                g_theta = g_theta - (1.0 / eps) * window * g_l0.index_select(0, main.rows)
            grads[5] = main.scatter_cols(g_theta)
            if g_gap is not None:  # d gap_i / d theta_i = the number of tokens below theta_i
                grads[5] += g_gap * (B - ctx.above).to(g_gap.dtype)
        return tuple(grads)


def sparse_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, main: Entries, *,
               theta: Tensor | None = None, aux: AuxEntries | Entries | None = None, buffer: Tensor | None = None,
               apply_b_dec_to_input: bool = False, bandwidth: float = 0.0,
               pre_act_gap: bool = False, bf16_products: bool = False) -> tuple[Tensor, Tensor, Tensor, SparseActs, Tensor]:
    """Reconstruction (B, d_out), AuxK reconstruction (B, d_out; empty without ``aux``), per-token
    L0 (B,), the feature acts as ``SparseActs`` (whose dense form takes over ``buffer`` when
    given, e.g. the detached z) and, with ``pre_act_gap`` (JumpReLU), sum_b ReLU(theta_i - z_bi)
    per latent (n,; else empty) from entries selected on z = x_in @ W_enc + b_enc. Differentiable in x, W_enc, b_enc, W_dec,
    b_dec and theta (JumpReLU: pass ``bandwidth`` and entries with a window). ``bf16_products`` (CPU):
    the decoder forward and the two weight gradients gather bf16 copies of their tables (W_dec,
    dL/dx_hat, x_in) with bf16 weights, summed in float32 and rounded to bf16 once, 3x faster than
    float32 (4096 tokens, 64 entries each, d 384: 4.8 against 15.7 ms); dL/df at the entries and
    everything else stay float32."""
    recon, aux_recon, l0, values, gap = _SparseSAE.apply(x, W_enc, b_enc, W_dec, b_dec, theta, main, aux,
                                                         apply_b_dec_to_input, bandwidth, pre_act_gap, bf16_products)
    return recon, aux_recon, l0, SparseActs(main.flat_index, main.cols, values, main.shape, buffer), gap
