"""After the last step: the decoder that reconstructs the kept training rows best, given the codes.

With the encoder fixed the codes F of the rows are fixed, and the decoder that minimises
``||Y - F W||^2 + s ||W - W_old||^2`` (Y: what the latents must predict, the target less b_dec
and the skip) solves ``(F^T F + s I) W = F^T Y + s W_old``: the decoder step of alternating
minimisation (the "method of optimal directions" of dictionary learning). b_dec stays, so the
codes (and the L0 the run calibrated) do not move. The ridge s, ``ridge`` times the mean diagonal
of F^T F, pulls rarely firing latents toward the rows they had and leaves dead ones where they were.

Why: in a short run the encoder settles before the decoder has caught up with it. MiniLM
``layers.3.resid_post``, width 8192, 122 steps of 4096 (500k tokens), held-out FVU: JumpReLU
(target 32) 0.1653 -> 0.1463, TopK (k 32) 0.1649 -> 0.1460 with every training row kept; 0.1588 /
0.1517 from the first 131k / 262k rows; after 488 steps (2M tokens) JumpReLU 0.1270 -> 0.1185
from 500k rows, 0.1168 from all 2M. A scale per latent alone gained 1.3%, b_dec alone 0.4%; a
decoder step twice or half the encoder's during training lost 1-7% (benchmarks/README.md, "The
decoder's least-squares refit").

F^T F is built from the codes' nonzero entries (a sparse product on the CPU: about 0.13 s per
4096 rows at 8192 latents and 32 per token, against 5.5 s dense) and held densely, so widths
above ``MAX_WIDTH`` are left as trained.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Iterable

import torch
from torch import Tensor

from ..device import available_memory

MAX_WIDTH = 16_384  # the float64 Gram, factored in place: 2 GiB at this width

MIN_ROWS_PER_LATENT = 16  # fewer: a warning (the refit may overfit its rows)

log = logging.getLogger(__name__)


def refit_memory(width: int, d_out: int) -> int:
    """Bytes the refit holds at its peak: the float64 Gram (factored in place), the cross
    products, the old and the new decoder, and a chunk's float64 codes."""
    return 8 * (width * width + 4 * width * d_out + 4096 * width)


def gram_update(gram: Tensor, cross: Tensor, codes: Tensor, target: Tensor) -> None:
    """``gram += codes^T codes`` and ``cross += codes^T target`` (float64 sums); on the CPU
    through the nonzero entries of ``codes``, multiplied in float64."""
    if codes.device.type != "cpu":  # float64 operands: no width^2 temporary beside the sum
        codes = codes.double()
        gram.addmm_(codes.T, codes)
        cross.addmm_(codes.T, target.double())
        return
    rows, cols = codes.nonzero(as_tuple=True)  # row-major: the CSR order
    values = codes[rows, cols].double()
    n_rows, width = codes.shape
    by_row = torch.zeros(n_rows + 1, dtype=torch.long)
    by_row[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    order = torch.argsort(cols, stable=True)
    by_col = torch.zeros(width + 1, dtype=torch.long)
    by_col[1:] = torch.bincount(cols, minlength=width).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two products below are tested
        warnings.simplefilter("ignore", UserWarning)
        codes_csr = torch.sparse_csr_tensor(by_row, cols, values, (n_rows, width), check_invariants=False)
        codes_t = torch.sparse_csr_tensor(by_col, rows[order], values[order], (width, n_rows), check_invariants=False)
        gram.add_(torch.sparse.mm(codes_t, codes_csr))
        cross.add_(torch.sparse.mm(codes_t, target.double()))


def _fits(width: int, d_out: int, device: torch.device, name: str) -> bool:
    """Whether the refit's peak memory is free on ``device``; a warning where it is not."""
    need, free = refit_memory(width, d_out), available_memory(device)
    if free is None or need <= free:
        return True
    log.warning("%s: decoder refit skipped, the trained decoder kept: its float64 systems at width %d need %.1f GiB "
                "and %.1f GiB are free on %s (free memory, or train narrower SAEs, to refit)", name, width,
                need / 2**30, free / 2**30, device)
    return False


@torch.no_grad()
def refit_decoder(sae, chunks: Iterable[tuple[Tensor, Tensor]], ridge: float = 1e-2,
                  name: str = "SAE") -> dict[str, float]:
    """Replace ``sae.W_dec`` by the ridge least-squares decoder on the rows ``chunks`` yields, as
    ``(input, target)`` pairs in the SAE's own (scaled) units. Returns the FVU on those rows
    before and after (computed from the sums, no second pass), or ``{}`` where nothing was done
    (an SAE that does not refit its decoder, a width above MAX_WIDTH, too little free memory for
    its width^2 system, no rows, no active latent). ``name`` names the SAE in warnings."""
    width, d_out, start = sae.cfg.d_sae, sae.cfg.d_output, time.perf_counter()
    if not sae.refits_decoder:
        return {}
    if width > MAX_WIDTH:
        log.warning("%s: decoder refit skipped at width %d (above %d, its float64 system would need %.0f GiB); the "
                    "trained decoder is kept", name, width, MAX_WIDTH, refit_memory(width, d_out) / 2**30)
        return {}
    device = sae.W_dec.device
    count = 0
    training = sae.training
    sae.eval()
    try:
        for x, target in chunks:
            if count == 0:  # the sums, once there are rows (none: no width^2 allocation)
                if not _fits(width, d_out, device, name):
                    return {}
                gram = torch.zeros(width, width, dtype=torch.float64, device=device)
                cross = torch.zeros(width, d_out, dtype=torch.float64, device=device)
                square = torch.zeros((), dtype=torch.float64, device=device)  # sum of |what the latents fit|^2
                before = torch.zeros((), dtype=torch.float64, device=device)  # ... less the trained decoder's
                target_sum = torch.zeros(d_out, dtype=torch.float64, device=device)
                target_square = torch.zeros((), dtype=torch.float64, device=device)
            fit, _ = sae.split_skip(x, target)
            fit = fit - sae.b_dec
            codes = sae.encode(x).float()
            gram_update(gram, cross, codes, fit)
            square += fit.double().pow(2).sum()
            before += (fit - (sae.decode(codes) - sae.b_dec)).double().pow(2).sum()
            target_sum += target.double().sum(0)
            target_square += target.double().pow(2).sum()
            count += x.shape[0]
    finally:
        sae.train(training)
    if count == 0:
        return {}
    if count < MIN_ROWS_PER_LATENT * width:
        log.warning("%s: decoder refit on %d rows for %d latents (%.1f per latent): below about %d per latent it can "
                    "fit these rows and reconstruct new text worse (MiniLM, 3072 latents: held-out FVU 0.157 -> "
                    "0.171 at 5 rows per latent, 0.152 at 11, 0.143 at 21)", name, count, width, count / width,
                    MIN_ROWS_PER_LATENT)
    shrink = ridge * float(gram.diagonal().mean())
    if not shrink > 0:
        return {}
    old = sae.W_dec.detach().double()
    gram.diagonal().add_(shrink)
    info = torch.empty((), dtype=torch.int32, device=device)
    factor, _ = torch.linalg.cholesky_ex(gram, out=(gram, info))  # in place: one width^2 matrix at the peak
    if int(info):
        return {}
    new = torch.cholesky_solve(cross + shrink * old, factor)
    variance = float(target_square - target_sum.pow(2).sum() / count)
    # |Y - F W|^2 = |Y|^2 - 2 <W, F^T Y> + <W, G W>, and at the solution G W = F^T Y + s (W_old - W)
    after = float(square - (new * cross).sum() + shrink * (new * (old - new)).sum())
    before = float(before)
    if not after < before:  # the ridge objective cannot rise; a sum's rounding can
        return {}
    sae.W_dec.copy_(new.to(sae.W_dec.dtype))
    return {"refit_fvu_before": before / max(variance, 1e-30), "refit_fvu_after": after / max(variance, 1e-30),
            "refit_rows": float(count), "refit_seconds": time.perf_counter() - start}
