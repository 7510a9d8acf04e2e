"""The Jacobian of a Jacobian-SAE pair restricted to the active latents (SPEC section 5).

The function studied, per token: input latents ``s_x`` -> ``x = in_scale * (s_x @ decoder + b)``
(the SAEs work on scaled activations, the MLP on raw ones) -> ``y = MLP(x)`` -> output
pre-activations ``(y / out_scale) @ encoder + c``. Its Jacobian between the k_in active input and
the k_out active output latents of each token is

    J[n, j, i] = (in_scale / out_scale) * encoder[:, A_y[j]]^T  J_mlp(x_n)  decoder[A_x[i]]^T

(biases do not matter). :func:`jacobian_active` computes it the SPEC's way: the weight products
``decoder @ W_in`` (gated: also ``decoder @ W_up``) and ``W_out @ encoder`` once per call (only
for the latents active somewhere in the batch, or reused from :func:`precompute`), then per token
a gather of k rows, the nonlinearity's derivative as a diagonal and one batched product:

    plain:  J = Q[A_y] diag(act'(u)) P[A_x]^T,   P = decoder @ W_in,  Q = (W_out @ encoder)^T
    gated:  J = Q[A_y] diag(act'(g) * up) PG[A_x]^T + Q[A_y] diag(act(g)) PU[A_x]^T
            (h = act(g) * up, so dh/dx = diag(act'(g) * up) W_gate^T + diag(act(g)) W_up^T)

A post-MLP RMSNorm (Gemma 2/3) is exact too: with z the MLP output, r = rms(z), d = d_model and
g the norm's scale, ``dnorm/dz = (diag(g) - (g*z) z^T / (d r^2)) / r``, so Q uses ``W_out diag(g)``,
the diagonal is divided by r and each token adds the rank-one term ``beta_j w_m`` to the rows of Q
(``w = W_out z``, ``beta_j = -(encoder[:, A_y[j]] . (g*z)) / (d r^2)``).

The batched product runs in chunks of tokens inside an autograd Function that keeps no gathered
``[N, k, d_mlp]`` tensor for its backward (it gathers again), so ``mean |J|`` backpropagates to
decoder and encoder (and to ``x_raw``) at a memory cost independent of k. :func:`jacobian_autograd`
is the same quantity by batched autograd of the composed function, for any MLP callable (the
fallback for MLPs that :func:`~jumpscope.jacobian.mlp_function` refuses, and the tests' reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .mlp import MLPFunction

__all__ = ["JacobianWeights", "precompute", "jacobian_active", "jacobian_autograd", "jacobian_sparsity",
           "latent_response", "classify_response"]

Scale = float | Tensor
# Gathered elements per chunk of tokens (8 MiB in float32): chunks that stay in cache ran the
# gathers and products of a GPT-2-small-sized Jacobian 2.5x faster on CPU than one [N, k, d_mlp] pass.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class JacobianWeights:
    """The weight products of :func:`precompute`, differentiable w.r.t. decoder and encoder.

    ``in_products[t]`` is ``decoder[in_latents] @ W_t`` ``[rows, d_mlp]`` for each derivative
    term (plain: W_in; gated: W_gate, W_up); ``out_product`` is ``(W_out diag(g) @ encoder[:,
    out_latents])^T`` ``[rows, d_mlp]`` (g: the post-norm's scale, or none). ``in_latents`` /
    ``out_latents``: the latents those rows belong to, in order (None: every latent)."""

    in_products: tuple[Tensor, ...]
    out_product: Tensor
    in_latents: Tensor | None
    out_latents: Tensor | None
    d_sae_in: int
    d_sae_out: int

    def rows(self, active: Tensor, side: str) -> Tensor:
        """Row indices of ``active`` latent ids (``side`` "in" or "out"; in range) in the products."""
        latents, d_sae = (self.in_latents, self.d_sae_in) if side == "in" else (self.out_latents, self.d_sae_out)
        if latents is None:
            return active
        table = torch.full((d_sae,), -1, dtype=torch.long, device=active.device)
        table[latents.to(active.device)] = torch.arange(len(latents), device=active.device)
        rows = table[active]
        if active.numel() and int(rows.min()) < 0:
            raise ValueError(f"{side}_active holds latents that these JacobianWeights were not computed for")
        return rows


def precompute(mlp: MLPFunction, decoder: Tensor, encoder: Tensor, *, in_latents: Tensor | None = None,
               out_latents: Tensor | None = None) -> JacobianWeights:
    """The weight products for :func:`jacobian_active` (``weights=``), for reuse across calls while
    decoder, encoder and the MLP do not change. Differentiable: build it inside the step whose loss
    backpropagates. ``in_latents`` / ``out_latents`` (LongTensors) restrict the rows to those latents;
    the full products cost ``d_sae * d_model * d_mlp`` multiply-adds per term."""
    _check_weights(mlp, decoder, encoder)
    mlp = _cast(mlp, decoder)
    dec = decoder if in_latents is None else decoder.index_select(0, in_latents)
    enc = encoder if out_latents is None else encoder.index_select(1, out_latents)
    W_in = [mlp.W_in] if mlp.kind == "plain" else [mlp.W_in, mlp.W_up]
    W_out = mlp.W_out if mlp.norm_weight is None else mlp.W_out * mlp.norm_weight
    # enc^T @ W_out^T rather than (W_out @ enc)^T: rows contiguous, so the per-token gathers are fast
    return JacobianWeights(tuple(dec @ W for W in W_in), enc.T @ W_out.T, in_latents, out_latents,
                           decoder.shape[0], encoder.shape[1])


def jacobian_active(mlp: MLPFunction, decoder: Tensor, x_raw: Tensor, in_active: Tensor, encoder: Tensor,
                    out_active: Tensor, in_scale: Scale = 1.0, out_scale: Scale = 1.0, *,
                    weights: JacobianWeights | None = None, chunk_size: int | None = None) -> Tensor:
    """``J [N, k_out, k_in]``: ``J[n, j, i] = d s_y[out_active[n, j]] / d s_x[in_active[n, i]]``.

    ``mlp``: an :class:`MLPFunction`; ``decoder``: the input SAE's ``W_dec [d_sae_in, d_model]``;
    ``x_raw [N, d_model]``: the MLP input (raw units) at which to linearise; ``in_active [N, k_in]``
    and ``out_active [N, k_out]``: latent ids (LongTensor); ``encoder``: the output SAE's
    ``W_enc [d_model, d_sae_out]``; the SAE input is ``x_raw / in_scale``, the output SAE reads
    ``y / out_scale``. ``weights``: products from :func:`precompute` (default: computed here for the
    latents active in this call). ``chunk_size``: tokens per batched product (default: about 8 MiB
    of gathered rows). Differentiable w.r.t. decoder, encoder and x_raw (once: no double backward).
    """
    _check_weights(mlp, decoder, encoder)
    N, d_model = x_raw.shape if x_raw.dim() == 2 else (None, None)
    if d_model != mlp.d_model:
        raise ValueError(f"x_raw must be [N, d_model={mlp.d_model}], got {tuple(x_raw.shape)}")
    for name, active, d_sae in (("in_active", in_active, decoder.shape[0]), ("out_active", out_active,
                                                                            encoder.shape[1])):
        if active.dim() != 2 or active.shape[0] != N or active.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor [N={N}, k], got {active.dtype} {tuple(active.shape)}")
        if active.numel() and (int(active.min()) < 0 or int(active.max()) >= d_sae):
            raise ValueError(f"{name} holds latent ids outside [0, {d_sae})")
    in_active, out_active = in_active.long(), out_active.long()
    mlp = _cast(mlp, decoder)
    x_raw = x_raw.to(decoder.dtype)
    if weights is None:
        weights = precompute(mlp, decoder, encoder, in_latents=torch.unique(in_active),
                             out_latents=torch.unique(out_active))
    in_rows, out_rows = weights.rows(in_active, "in"), weights.rows(out_active, "out")
    h, terms = mlp.linearise(x_raw)
    coefficients = [a for _, a in terms]
    beta = w = None
    if mlp.norm_weight is not None:  # the post-norm's Jacobian: see the module docstring
        z = mlp.project(h)
        r = mlp.rms(z)
        coefficients = [a / r for a in coefficients]
        w = z @ mlp.W_out.T
        u = torch.einsum("nkd,nd->nk", encoder.T[out_active], mlp.norm_weight * z)
        beta = -u / (mlp.d_model * r * r)
    k = in_active.shape[1] * len(coefficients) + out_active.shape[1]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, k * mlp.d_mlp))
    pairs = [t for pair in zip(weights.in_products, coefficients) for t in pair]
    J = _ActiveProduct.apply(weights.out_product, in_rows, out_rows, beta, w, chunk, *pairs)
    return J * (in_scale / out_scale)


class _ActiveProduct(torch.autograd.Function):
    """``J[n, j, i] = sum_t sum_m L[n, j, m] a_t[n, m] P_t[in_rows[n, i], m]`` with
    ``L[n, j] = Q[out_rows[n, j]] + beta[n, j] * w[n]`` (beta, w optional), in chunks of tokens.
    Saves only its inputs; the backward gathers again chunk by chunk."""

    @staticmethod
    def forward(ctx, Q, in_rows, out_rows, beta, w, chunk, *pairs):
        ctx.save_for_backward(Q, in_rows, out_rows, beta, w, *pairs)
        ctx.chunk = chunk
        N = in_rows.shape[0]
        J = Q.new_empty(N, out_rows.shape[1], in_rows.shape[1])
        for s in range(0, N, chunk):
            left = _left(Q, out_rows, beta, w, slice(s, s + chunk))
            for t in range(0, len(pairs), 2):
                P, a = pairs[t], pairs[t + 1][s:s + chunk]
                right = _rows(P, in_rows[s:s + chunk]).mul_(a[:, None, :])  # a fresh copy: scale in place
                if t == 0:
                    torch.bmm(left, right.transpose(1, 2), out=J[s:s + chunk])
                else:
                    J[s:s + chunk].baddbmm_(left, right.transpose(1, 2))
        return J

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Q, in_rows, out_rows, beta, w, *pairs = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_left = need[0] or (beta is not None and (need[3] or need[4]))
        dQ = torch.zeros_like(Q) if need[0] else None
        dbeta = torch.zeros_like(beta) if beta is not None and need[3] else None
        dw = torch.zeros_like(w) if w is not None and need[4] else None
        dpairs = [torch.zeros_like(p) if need[6 + i] else None for i, p in enumerate(pairs)]
        for s in range(0, in_rows.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            G, left = grad[sl], _left(Q, out_rows, beta, w, sl)
            dleft = torch.zeros_like(left) if need_left else None
            for t in range(0, len(pairs), 2):
                P, a = pairs[t], pairs[t + 1][sl]
                GP = torch.bmm(G, _rows(P, in_rows[sl]))  # [C, k_out, d_mlp]
                if dpairs[t + 1] is not None:
                    dpairs[t + 1][sl] = (left * GP).sum(1)
                if dleft is not None:
                    dleft += a[:, None, :] * GP
                if dpairs[t] is not None:
                    dright = torch.bmm(G.transpose(1, 2), left * a[:, None, :])  # [C, k_in, d_mlp]
                    dpairs[t].index_add_(0, in_rows[sl].reshape(-1), dright.reshape(-1, P.shape[1]))
            if dQ is not None:
                dQ.index_add_(0, out_rows[sl].reshape(-1), dleft.reshape(-1, Q.shape[1]))
            if dbeta is not None:
                dbeta[sl] = (dleft * w[sl, None, :]).sum(-1)
            if dw is not None:
                dw[sl] = (dleft * beta[sl, :, None]).sum(1)
        return (dQ, None, None, dbeta, dw, None, *dpairs)


def _rows(P: Tensor, rows: Tensor) -> Tensor:
    """``P[rows]`` for rows [C, k]: index_select on the flat ids is faster than advanced indexing."""
    return P.index_select(0, rows.reshape(-1)).view(*rows.shape, P.shape[1])


def _left(Q: Tensor, out_rows: Tensor, beta: Tensor | None, w: Tensor | None, sl: slice) -> Tensor:
    left = _rows(Q, out_rows[sl])
    return left if beta is None else left + beta[sl, :, None] * w[sl, None, :]


def jacobian_autograd(mlp: Callable[[Tensor], Tensor], decoder: Tensor, x_raw: Tensor, in_active: Tensor,
                      encoder: Tensor, out_active: Tensor, in_scale: Scale = 1.0, out_scale: Scale = 1.0, *,
                      chunk_size: int | None = None) -> Tensor:
    """The same ``J [N, k_out, k_in]`` as :func:`jacobian_active`, by ``torch.func.vmap(jacrev(...))``
    of the composed function restricted to the active latents. ``mlp`` is any callable
    ``[B, d_model] -> [B, d_model]`` (an :class:`MLPFunction`, or ``mlp_module(model, layer)`` for
    MLPs without a formula). Differentiable w.r.t. decoder and encoder; ``chunk_size``: tokens per
    vmapped chunk (memory)."""
    dec, enc = decoder[in_active], encoder.T[out_active]  # [N, k_in, d_model], [N, k_out, d_model]

    def latents_out(t: Tensor, x: Tensor, dec_n: Tensor, enc_n: Tensor) -> Tensor:
        y = mlp((x + in_scale * (t @ dec_n)).unsqueeze(0)).squeeze(0)
        return (y / out_scale) @ enc_n.T

    t0 = x_raw.new_zeros(in_active.shape, dtype=decoder.dtype)
    return torch.func.vmap(torch.func.jacrev(latents_out), chunk_size=chunk_size)(t0, x_raw.to(decoder.dtype),
                                                                                  dec, enc)


def jacobian_sparsity(J: Tensor, thresholds: Sequence[float] = (0.005, 0.01, 0.02)) -> dict[float, float]:
    """``{threshold: fraction of |J| entries above it}`` over all tokens and k_out x k_in entries."""
    if J.numel() == 0:
        raise ValueError("jacobian_sparsity needs a non-empty Jacobian")
    magnitude = J.detach().abs()
    return {float(t): float((magnitude > t).float().mean()) for t in thresholds}


def latent_response(mlp: Callable[[Tensor], Tensor], decoder: Tensor, encoder: Tensor, x_raw: Tensor,
                    in_latent: int, out_latent: int, values: Tensor, *, base_value: float = 0.0,
                    in_scale: Scale = 1.0, out_scale: Scale = 1.0, out_bias: Tensor | float = 0.0,
                    out_activation: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The scalar function from one input latent to one output latent at one token: ``[S]``.

    ``x_raw [d_model]`` is the token's MLP input (raw units) where ``s_x[in_latent] == base_value``
    (e.g. the input SAE's reconstruction with its own latent values, and base_value that latent's
    value). For each ``v`` in ``values [S]``: ``x = x_raw + in_scale * (v - base_value) *
    decoder[in_latent]``, ``y = mlp(x)``, ``pre = (y / out_scale) @ encoder + out_bias``; returns
    ``pre[out_latent]``, or ``out_activation(pre)[:, out_latent]`` when given (e.g. the output SAE's
    ``activate``, which needs every latent). ``out_bias``: the output SAE's effective encoder bias
    (``b_enc - b_dec @ W_enc`` when it subtracts b_dec from its input), a vector or a scalar."""
    with torch.no_grad():
        steps = (values.to(decoder) - base_value)[:, None]  # the sweep may come from the CPU
        y = mlp(x_raw.to(decoder.dtype)[None, :] + in_scale * steps * decoder[in_latent])
        if out_activation is None:
            bias = out_bias[out_latent] if isinstance(out_bias, Tensor) and out_bias.dim() else out_bias
            return (y / out_scale) @ encoder[:, out_latent] + bias
        return out_activation((y / out_scale) @ encoder + out_bias)[:, out_latent]


def classify_response(values: Tensor, response: Tensor, *, tol: float = 0.05, min_points: int = 3) -> str:
    """"linear", "jumprelu-like" or "other" for a curve from :func:`latent_response`.

    Deviations are measured against ``scale = max |response|`` (1e-12 at least):
    - "linear": the least-squares line through all points misses none by more than ``tol * scale``
      (a constant, zero included, is linear);
    - "jumprelu-like": for some threshold, the points below it (at least ``min_points``) are all
      within ``tol * scale`` of zero, and the points at or above it (at least ``min_points``) are
      linear in the sense above but not all within ``tol * scale`` of zero (a jump at the threshold
      is allowed, as is a ReLU's continuous kink);
    - "other": anything else.
    """
    if values.shape != response.shape or values.dim() != 1:
        raise ValueError("values and response must be 1-D tensors of the same length")
    values, response = values.detach().double().cpu(), response.detach().double().cpu()  # CUDA's lstsq needs full rank
    order = torch.argsort(values)
    v, r = values[order], response[order]
    bound = tol * max(float(r.abs().max()) if len(r) else 0.0, 1e-12)

    def linear(vs: Tensor, rs: Tensor) -> bool:
        if len(vs) < 3:
            return True
        design = torch.stack([vs, torch.ones_like(vs)], 1)
        coef = torch.linalg.lstsq(design, rs[:, None]).solution
        return float((design @ coef - rs[:, None]).abs().max()) <= bound

    if linear(v, r):
        return "linear"
    for split in range(min_points, len(v) - min_points + 1):
        below, above = r[:split], r[split:]
        if float(below.abs().max()) > bound:
            break  # the zero part only grows with split, so no later split can pass
        if float(above.abs().max()) > bound and linear(v[split:], above):
            return "jumprelu-like"
    return "other"


def _check_weights(mlp: MLPFunction, decoder: Tensor, encoder: Tensor) -> None:
    if not isinstance(mlp, MLPFunction):
        raise TypeError(f"mlp must be an MLPFunction (see mlp_function), got {type(mlp).__name__}; "
                        "use jacobian_autograd for any other callable")
    if decoder.dim() != 2 or decoder.shape[1] != mlp.d_model:
        raise ValueError(f"decoder must be W_dec [d_sae_in, d_model={mlp.d_model}], got {tuple(decoder.shape)}")
    if encoder.dim() != 2 or encoder.shape[0] != mlp.d_model:
        raise ValueError(f"encoder must be W_enc [d_model={mlp.d_model}, d_sae_out], got {tuple(encoder.shape)}")


def _cast(mlp: MLPFunction, like: Tensor) -> MLPFunction:
    """The MLP in the SAE weights' dtype and device (a bf16 model with float32 SAEs, say)."""
    same = mlp.W_in.dtype == like.dtype and mlp.W_in.device == like.device
    return mlp if same else mlp.to(device=like.device, dtype=like.dtype)
