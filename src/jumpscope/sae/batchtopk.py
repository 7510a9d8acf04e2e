"""BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410; SPEC section 2).

In training, keep the k * B largest ReLU'd pre-activations over the whole batch of B tokens
(so L0 is k on average, varying per token), with TopK's AuxK loss. A running average of the
smallest kept positive activation becomes one global threshold, used at inference:
f = z * (z > threshold). ``export`` writes that as a JumpReLU SAE.

Like dropout, ``encode`` depends on the mode: batch top-k in ``train()`` mode, the threshold in
``eval()`` mode (call ``.eval()`` before using a trained SAE for inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from . import kernels, mixed
from .base import StepContext
from .calibrate import l0_factor, mean_l0
from .jumprelu import JumpReLUSAE
from .recipes import ADAM_RECIPE
from .registry import register
from .topk import TopKSAE, TopKSAEConfig


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    """BatchTopK SAE: TopK's fields, k being the mean number of active latents per token."""

    optimizer: Literal["adam", "signsgd_schedulefree"] = "adam"
    """'adam' or 'signsgd_schedulefree' (sign descent with schedule-free averaging, the other
    architectures' default). BatchTopK uses Adam: under averaging its inference threshold,
    estimated at the training point, put the saved SAE's L0 at 17.7 for k 32."""

    lr: float = 2e-3
    """Adam's peak learning rate (2e-3 beat 5e-4 at every L0 in the frontier's learning-rate check)."""

    lr_reference_width: int | None = None
    """lr as given, at any width ..."""

    lr_reference_steps: int | None = None
    """... any run length ..."""

    lr_reference_d_in: int | None = None
    """... and any input width (the sign-descent recipe's rules are not Adam's)."""

    encoder_init_scale: float = 1.0
    """W_enc = W_dec^T at initialisation (the smaller encoder suits sign descent, not Adam)."""

    lr_warmup_steps: float = 0.05
    """Warm-up over the first 5% of the run."""

    lr_decay_fraction: float = 0.2
    """Linear decay to 0 over the last 20% of the run."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Adam recipe that was the default before the recipe check.
        "adam": ADAM_RECIPE,
    }

    threshold_momentum: float = 0.99
    """Momentum of the running average of the smallest kept activation per training batch
    (new = m * old + (1 - m) * batch value); the first batch initialises it."""

    calibrate_l0: bool = True
    """After the last step, set the inference threshold so that the saved SAE's mean L0 on a sample
    of the training rows is k (TrainerConfig.calibration_tokens). False keeps the running average of
    the smallest kept activation (Bussmann et al.'s estimator), whose L0 in short runs lands far
    under k (SmolLM2, 122 steps of 4096: 17.3 for 32, 28.6 for 64)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must lie in [0, 1), got {self.threshold_momentum}")


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKSAEConfig
    cfg: BatchTopKSAEConfig
    input_scaled = ("b_enc", "threshold")

    def __init__(self, cfg: BatchTopKSAEConfig):
        super().__init__(cfg)
        # 0 means "not yet estimated": every update is a positive value, and a 0 threshold
        # makes the inference encoder a plain ReLU until the first training batch.
        self.register_buffer("threshold", torch.zeros(()))

    def batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The top k * B ReLU'd pre-activations over the flattened batch, and the smallest kept
        positive value (+inf when none is positive)."""
        acts = torch.relu(pre)
        flat = acts.reshape(-1)
        keep = self.cfg.k * (flat.numel() // self.cfg.d_sae)
        values, indices = flat.topk(keep, sorted=False)
        kept = torch.zeros_like(flat).scatter_(0, indices, values).reshape(pre.shape)
        detached = values.detach()
        smallest = torch.where(detached > 0, detached, torch.full_like(detached, float("inf"))).min()
        return kept, smallest

    def threshold_activation(self, pre: Tensor) -> Tensor:
        acts = torch.relu(pre)
        return acts * (acts > self.threshold).to(acts.dtype)

    def activate(self, pre: Tensor) -> Tensor:
        return self.batch_topk(pre)[0] if self.training else self.threshold_activation(pre)

    def training_activation(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self.threshold_activation(pre)
        acts, smallest = self.batch_topk(pre)
        self.update_threshold(smallest)
        return acts

    def sparse_entries(self, z: Tensor | mixed.BF16Preactivations) -> kernels.Entries | None:
        if not self.training:
            return None  # the eval-mode threshold activation takes the dense path
        if isinstance(z, mixed.BF16Preactivations):
            entries, smallest = mixed.batch_topk_entries(z, self.cfg.k)
        else:
            entries, smallest = kernels.batch_topk_entries(z, self.cfg.k)
        self.update_threshold(smallest)
        return entries

    @torch.no_grad()
    def update_threshold(self, smallest: Tensor) -> None:
        """Fold one batch's smallest kept positive activation into the running threshold
        (without a host sync; a batch with nothing positive leaves it unchanged)."""
        old = self.threshold
        value = smallest.to(old.dtype)
        m = self.cfg.threshold_momentum
        new = torch.where(old > 0, m * old + (1.0 - m) * value, value)
        self.threshold.copy_(torch.where(torch.isfinite(value), new, old))

    @torch.no_grad()
    def calibrate(self, x: Tensor, ctx: StepContext) -> dict[str, float] | None:
        """The global threshold times one factor so that the eval-mode mean L0 on ``x`` is k."""
        if not self.cfg.calibrate_l0:
            return None
        flat, training = x.reshape(-1, self.cfg.d_in), self.training
        self.eval()
        try:
            base = self.threshold if self.threshold > 0 else torch.ones_like(self.threshold)  # 0: never estimated
            before = mean_l0(self.encode, flat, ctx, self.cfg.d_sae)  # against the threshold in use, 0 included
            factor = l0_factor(self.pre_activation, flat, base.expand(self.cfg.d_sae).clone(), self.cfg.k, ctx)[0]
            self.threshold.copy_(base * factor)
            return {"l0_before": before, "l0_after": mean_l0(self.encode, flat, ctx, self.cfg.d_sae),
                    "threshold_factor": factor}
        finally:
            self.train(training)

    @torch.no_grad()
    def export(self) -> JumpReLUSAE:
        """The inference form: a JumpReLU SAE with the global threshold on every latent.

        The threshold is >= 0, so z * (z > t) = ReLU(z) * (ReLU(z) > t); folding -b_dec @ W_enc
        into b_enc gives the same pre-activation from raw x.
        """
        return self.export_as_jumprelu(self.W_enc, self.b_enc, self.threshold.expand(self.cfg.d_sae).clone())
