"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014; SPEC section 2).

pi_gate = (x - b_dec) W_gate + b_gate, pi_mag = (x - b_dec) (W_gate * exp(r_mag)) + b_mag,
f = 1[pi_gate > 0] * ReLU(pi_mag). The L1 penalty acts on the gate path only, and an auxiliary
reconstruction from ReLU(pi_gate) through a frozen decoder trains the gate. Parameter names are
SAELens's: ``W_enc`` is W_gate, plus ``b_gate``, ``r_mag``, ``b_mag``, ``W_dec``, ``b_dec``.
A Gated SAE is exactly a JumpReLU SAE; ``export`` returns that form.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .base import SAE, InputScaling, LossOutput, SAEConfig, StepContext, reconstruction_error
from .jumprelu import JumpReLUSAE
from .recipes import ADAM_RECIPE, SignDescentRecipe
from .registry import register


@dataclass
class GatedSAEConfig(SignDescentRecipe, SAEConfig):
    """Gated SAE with a unit-norm decoder."""

    l1_coefficient: float = 5.0
    """lambda, the coefficient of the L1 penalty on ReLU(pi_gate). With unit decoder rows the
    gate path is a ReLU SAE, so this takes the ReLU SAE's scale: 5 on E||x|| = sqrt(d_in)."""

    apply_b_dec_to_input: bool = True
    """Subtract b_dec from x before the encoder (part of the Gated architecture; turn it off
    only for a transcoder, whose b_dec lives in output space)."""

    input_scaling: InputScaling = "sqrt_d_in_norm"
    """How the trainer rescales inputs (see SAEConfig); E||x|| = sqrt(d_in) is the scale on
    which the default l1_coefficient was chosen (it transfers across widths there)."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (the L1 on the gate would otherwise shrink W_enc)."""


    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Adam recipe that was the default before schedule-free sign descent.
        "adam": ADAM_RECIPE,
    }

    fit_encoder_scale: bool = True
    """At initialisation, scale the (transposed-decoder) encoder so that the first reconstruction
    is the least-squares multiple of the input. Without it about half the latents are open and the
    reconstruction is ~d_sae / (2 d_in) times too large (FVU ~9 at 8x width), which a short run
    spends hundreds of steps undoing. Not in the paper; False restores its plain init."""

    nonnegative_fields: ClassVar[tuple[str, ...]] = ("l1_coefficient",)
    job_fields: ClassVar[tuple[str, ...]] = SAEConfig.job_fields + ("l1_coefficient",)


@register("gated")
class GatedSAE(SAE):
    config_class = GatedSAEConfig
    cfg: GatedSAEConfig
    input_scaled = ("b_gate", "b_mag")

    def __init__(self, cfg: GatedSAEConfig):
        super().__init__(cfg)
        del self.b_enc  # the gate and magnitude paths have their own biases
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activations (pi_gate, pi_mag) of the two paths."""
        self.check_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        proj = x @ self.W_enc  # (x - b_dec) W_mag = proj * exp(r_mag), without building W_mag
        return proj + self.b_gate, proj * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        target = x if target is None else target
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        acts = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        recon = self.decode(acts)
        gate = torch.relu(pi_gate)
        frozen_recon = gate @ self.W_dec.detach() + self.b_dec.detach()
        terms = {
            "mse": reconstruction_error(target, recon),
            "sparsity": ctx.sparsity_scale * self.cfg.l1_coefficient * gate.sum(-1).mean(),
            "aux": reconstruction_error(target, frozen_recon),
        }
        return LossOutput(torch.stack(list(terms.values())).sum(), terms, acts, recon)

    def sparsity_coefficient(self) -> float | None:
        return self.cfg.l1_coefficient

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        super().init_from_data(x)
        if not self.cfg.fit_encoder_scale or self.cfg.d_out is not None:  # a transcoder has no input to match
            return
        # With zero gate and magnitude biases, scaling W_enc by s > 0 keeps the open gates and
        # scales every magnitude, so the reconstruction (less b_dec) scales by s exactly.
        x = x.reshape(-1, self.cfg.d_in)
        centred = x - self.b_dec
        recon = self.decode(self.encode(x)) - self.b_dec
        scale = (centred * recon).sum() / recon.pow(2).sum().clamp_min(1e-30)
        if scale > 0 and (self.b_gate == 0).all() and (self.b_mag == 0).all():
            self.W_enc.mul_(scale)

    @torch.no_grad()
    def export(self) -> JumpReLUSAE:
        """The exactly equivalent JumpReLU SAE: pre = pi_mag, theta = b_mag - exp(r_mag) * b_gate.

        pi_gate > 0  <=>  proj > -b_gate  <=>  pi_mag > b_mag - exp(r_mag) * b_gate = theta, so
        f = 1[pi_mag > theta] * ReLU(pi_mag). Clamping theta at 0 is exact: ReLU(pi_mag) is 0
        wherever pi_mag <= 0, so 1[pi_mag > theta] * ReLU(pi_mag) = pi_mag * 1[pi_mag > max(theta, 0)],
        which is the JumpReLU (no ReLU of its own) with threshold max(theta, 0).
        """
        scale = self.r_mag.exp()
        W_enc = self.W_enc * scale
        threshold = (self.b_mag - scale * self.b_gate).clamp_min(0.0)
        return self.export_as_jumprelu(W_enc, self.b_mag, threshold)
