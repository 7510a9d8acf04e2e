"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, arXiv 2406.04093; SPEC section 2).

z = (x - b_dec) W_enc + b_enc; f keeps the k largest entries of z per token, ReLU'd, and zeros
the rest; x_hat = f W_dec + b_dec. AuxK reconstructs the (stop-gradient) residual from the top
k_aux pre-activations of dead latents only, so dead latents get a gradient; that gradient
reaches W_enc and b_enc through z (a known fused-kernel peer drops it; this one does not).

Subclasses change the selection by overriding ``activate`` (inference) and
``training_activation`` (inside ``loss``); see batchtopk.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from . import kernels, mixed
from .base import SAE, InputScaling, LossOutput, SAEConfig, StepContext, reconstruction_error
from .recipes import ADAM_RECIPE, FIXED_LR, TunedSignDescentRecipe
from .registry import register


@dataclass
class TopKSAEConfig(TunedSignDescentRecipe, SAEConfig):
    """TopK SAE. The sparsity is set by k; there is no sparsity coefficient."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("kernel",)
    job_fields: ClassVar[tuple[str, ...]] = SAEConfig.job_fields + ("k",)

    k: int = 32
    """Active latents per token (the L0), in [1, d_sae]."""

    k_aux: int | None = None
    """Dead latents used by the AuxK reconstruction; None means d_in // 2 (the paper's choice).
    Fewer are used when fewer latents are dead."""

    aux_coefficient: float = 1.0 / 32
    """Weight of the AuxK loss (the paper's 1/32); 0 disables it."""

    apply_b_dec_to_input: bool = True
    """Subtract b_dec from x before the encoder (part of the TopK architecture; turn it off
    for a transcoder, whose b_dec lives in output space)."""

    b_dec_init: Literal["zeros", "mean"] = "mean"
    """Initial b_dec: the sample mean of the inputs (the paper uses the geometric median; the
    mean is a close, cheap stand-in). It centres the encoder input, so the top-k choice is not
    dominated by the large mean direction of the residual stream."""

    input_scaling: InputScaling = "sqrt_d_in_norm"
    """How the trainer rescales inputs (see SAEConfig); the paper uses E||x|| = sqrt(d_in)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Adam recipe that was the default before schedule-free sign descent.
        "adam": ADAM_RECIPE,
        # Gao et al. 2024: Adam at 2e-4 / sqrt(d_sae / 2^14), no decay, for billions of tokens.
        "paper": dict(FIXED_LR, optimizer="adam", encoder_init_scale=1.0, lr=2e-4, lr_reference_width=16_384,
                      lr_warmup_steps=0, lr_decay_fraction=0.0, adam_beta1=0.9, adam_beta2=0.999),
    }

    kernel: kernels.Kernel = "auto"
    """Training kernel: 'dense' (the reference path), 'sparse' (decoder and backward over the active
    entries only, plus JumpReLU's threshold-window and TopK's AuxK entries; sae/kernels.py) or 'auto'
    (sparse when at most 10% of the entries are active and d_sae >= 512 on CPU, 16384 on CUDA, 32768
    under CUDA autocast; else dense). JumpReLU's sparse kernel needs sparsity_loss='l0'."""

    nonnegative_fields: ClassVar[tuple[str, ...]] = ("aux_coefficient",)

    def __post_init__(self) -> None:
        super().__post_init__()
        kernels.check_kernel(self.kernel)
        if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or not 1 <= self.k_aux <= self.d_sae):
            raise ValueError(f"k_aux must be None or an integer in [1, d_sae={self.d_sae}], got {self.k_aux!r}")

    @property
    def aux_k(self) -> int:
        """k_aux with its default resolved (at least 1, at most d_sae)."""
        return self.k_aux if self.k_aux is not None else min(self.d_sae, max(1, self.d_in // 2))


@register("topk")
class TopKSAE(SAE):
    config_class = TopKSAEConfig
    cfg: TopKSAEConfig
    supports_skip = True

    def activate(self, pre: Tensor) -> Tensor:
        """Keep the k largest pre-activations of each token, ReLU'd; zeros elsewhere. On the CPU the
        top-k runs on a shortlist (kernels.row_topk: the same set, ties aside; 1.3-1.4x faster than
        torch.topk at 4096 x 2048-8192, one thread)."""
        flat = pre.reshape(-1, pre.shape[-1])
        if flat.device.type == "cpu":
            values, indices = kernels.row_topk(flat, self.cfg.k)
        else:
            values, indices = flat.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(flat).scatter_(-1, indices, torch.relu(values)).reshape(pre.shape)  # in place: no copy

    def training_activation(self, pre: Tensor) -> Tensor:
        """The activation used inside ``loss`` (may update running statistics in subclasses)."""
        return self.activate(pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activation(x))

    def auxk_loss(self, pre: Tensor, error: Tensor, dead_mask: Tensor | None) -> Tensor:
        """||e - e_hat||^2 (summed over features, batch mean); e_hat = top-k_aux dead latents @ W_dec."""
        if dead_mask is None:
            return pre.new_zeros(())
        dead_mask = dead_mask.to(device=pre.device, dtype=torch.bool)
        k_aux = min(self.cfg.aux_k, int(dead_mask.sum()))
        if k_aux == 0:
            return pre.new_zeros(())
        values, indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        aux_acts = torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        return reconstruction_error(error, aux_acts @ self.W_dec)

    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        target, skip = self.split_skip(x, x if target is None else target)
        cfg = self.cfg
        if kernels.sparse_wanted(cfg.kernel, x.device, cfg.d_sae, cfg.k / cfg.d_sae):
            self.check_input(x)
            flat_x = x.reshape(-1, cfg.d_in)
            with torch.no_grad():  # pre_activation's float ops, the bias added in place (no new B x d_sae tensor)
                x_in = flat_x - self.b_dec if cfg.apply_b_dec_to_input else flat_x
                if mixed.wanted(ctx, x.device):
                    z = mixed.BF16Preactivations(x_in, self.W_enc, self.b_enc)
                else:
                    z = (x_in @ self.W_enc).add_(self.b_enc)
            entries = self.sparse_entries(z)
            if entries is not None:
                return self._sparse_loss(x, z, entries, ctx, target).with_skip(skip)
        pre = self.pre_activation(x)
        acts = self.training_activation(pre)
        recon = self.decode(acts)
        terms = {"mse": reconstruction_error(target, recon)}
        if self.cfg.aux_coefficient:
            aux = self.auxk_loss(pre, (target - recon).detach(), ctx.dead_mask)
        else:
            aux = pre.new_zeros(())
        terms["aux"] = self.cfg.aux_coefficient * aux
        return LossOutput(terms["mse"] + terms["aux"], terms, acts, recon).with_skip(skip)

    def sparse_entries(self, z: Tensor | mixed.BF16Preactivations) -> kernels.Entries | None:
        """The active entries of ``training_activation`` on z (B, d_sae), or on the bf16 ones
        with float32 values, for the sparse kernel (None: take the dense path)."""
        if isinstance(z, mixed.BF16Preactivations):
            return mixed.topk_entries(z, self.cfg.k)
        return kernels.topk_entries(z, self.cfg.k)

    def _sparse_loss(self, x: Tensor, z: Tensor | mixed.BF16Preactivations, entries: kernels.Entries,
                     ctx: StepContext, target: Tensor) -> LossOutput:
        """``loss`` through sae/kernels.py (the AuxK decode is sparse too); z (B, d_sae) is the
        detached pre-activation, whose buffer becomes the dense feature_acts (or the bf16 ones, and
        the dense acts get a buffer of their own if something reads them)."""
        cfg = self.cfg
        aux = None
        bf16 = isinstance(z, mixed.BF16Preactivations)
        if cfg.aux_coefficient and ctx.dead_mask is not None:
            dead = ctx.dead_mask.to(device=x.device, dtype=torch.bool)
            k_aux = min(cfg.aux_k, int(dead.sum()))
            if k_aux:
                aux = mixed.auxk_entries(z, dead, k_aux) if bf16 else kernels.auxk_entries(z, dead, k_aux)
        recon, aux_recon, _, acts, _ = kernels.sparse_sae(
            x.reshape(-1, cfg.d_in), self.W_enc, self.b_enc, self.W_dec, self.b_dec, entries, aux=aux,
            buffer=None if bf16 else z, apply_b_dec_to_input=cfg.apply_b_dec_to_input, bf16_products=bf16)
        recon = recon.reshape(*target.shape[:-1], recon.shape[-1])
        terms = {"mse": reconstruction_error(target, recon)}
        if aux is not None:
            error = (target - recon).detach().reshape(aux_recon.shape)
            terms["aux"] = cfg.aux_coefficient * reconstruction_error(error, aux_recon)
        else:
            terms["aux"] = cfg.aux_coefficient * x.new_zeros(())
        acts = acts.reshape(*x.shape[:-1], cfg.d_sae)
        return LossOutput(terms["mse"] + terms["aux"], terms, acts, recon)

