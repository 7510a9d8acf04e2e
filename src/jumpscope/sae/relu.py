"""ReLU SAE with a decoder-norm-weighted L1 penalty (SPEC section 2; Anthropic, April 2024).

f = ReLU(x @ W_enc + b_enc); L = ||x - x_hat||^2 + lambda * sum_i f_i * ||W_dec,i||. Weighting
the L1 by the decoder row norms makes the penalty invariant to moving scale between f_i and
W_dec,i, so the decoder needs no unit-norm constraint. It exports exactly to a JumpReLU SAE
with threshold 0 (JumpReLU_0 = ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .base import SAE, InputScaling, LossOutput, SAEConfig, StepContext, reconstruction_error
from .jumprelu import JumpReLUSAE
from .recipes import ADAM_RECIPE, FIXED_LR, SignDescentRecipe
from .registry import register


@dataclass
class ReLUSAEConfig(SignDescentRecipe, SAEConfig):
    """ReLU SAE. The loss follows Anthropic's April 2024 recipe (input scaled to
    E||x|| = sqrt(d_in), where lambda = 5 transfers across widths); it trains with schedule-free
    sign descent by default, and ``preset("anthropic")`` keeps their Adam recipe."""

    l1_coefficient: float = 5.0
    """lambda, the coefficient of the decoder-norm-weighted L1 penalty (on the scaled inputs)."""

    decoder_init_norm: float = 0.1
    """Norm of each decoder row at initialisation (W_enc = W_dec^T is scaled alike), so the
    initial reconstruction is small; Anthropic used 0.05-1. 1.0 keeps the base's unit rows."""

    input_scaling: InputScaling = "sqrt_d_in_norm"
    """How the trainer rescales inputs (see SAEConfig); E||x|| = sqrt(d_in) is the scale on
    which the default l1_coefficient was tuned."""

    normalize_decoder: bool = False
    """Off: the norm-weighted L1 already removes the incentive to shrink f and grow W_dec."""


    sparsity_warmup_steps: float = 0.05
    """lambda rises linearly from 0 over the first 5% of the run (Anthropic's choice), which
    lets latents find directions before the penalty kills them."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Adam recipe that was the default before schedule-free sign descent.
        "adam": dict(ADAM_RECIPE, sparsity_warmup_steps=250),
        # Anthropic "Circuits Updates - April 2024" (set sparsity_warmup_steps to 5% of the run).
        "anthropic": dict(optimizer="adam", **FIXED_LR, lr_warmup_steps=100, lr=5e-5, l1_coefficient=5.0, input_scaling="sqrt_d_in_norm",
                          normalize_decoder=False, lr_decay_fraction=0.2, grad_clip_norm=1.0,
                          decoder_init_norm=0.1),
    }

    positive_fields: ClassVar[tuple[str, ...]] = ("decoder_init_norm",)
    nonnegative_fields: ClassVar[tuple[str, ...]] = ("l1_coefficient",)
    job_fields: ClassVar[tuple[str, ...]] = SAEConfig.job_fields + ("l1_coefficient",)


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUSAEConfig
    cfg: ReLUSAEConfig

    def __init__(self, cfg: ReLUSAEConfig):
        super().__init__(cfg)
        with torch.no_grad():
            self.W_dec.mul_(cfg.decoder_init_norm)
            self.W_enc.mul_(cfg.decoder_init_norm)

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activation(x))

    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        target = x if target is None else target
        acts = self.encode(x)
        recon = self.decode(acts)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        terms = {
            "mse": reconstruction_error(target, recon),
            "sparsity": ctx.sparsity_scale * self.cfg.l1_coefficient * l1,
        }
        return LossOutput(terms["mse"] + terms["sparsity"], terms, acts, recon)

    def sparsity_coefficient(self) -> float | None:
        return self.cfg.l1_coefficient

    @torch.no_grad()
    def export(self) -> JumpReLUSAE:
        """The same SAE as a JumpReLU SAE with threshold 0 (JumpReLU_0(z) = z * (z > 0) = ReLU(z))."""
        return self.export_as_jumprelu(self.W_enc, self.b_enc, torch.zeros_like(self.b_enc))
