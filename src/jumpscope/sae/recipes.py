"""Shared training-recipe defaults of the architecture configs (README, "Training recipes").

A config lists a recipe before ``SAEConfig`` among its bases (``class C(SignDescentRecipe,
SAEConfig)``): the recipe only changes the defaults of fields ``SAEConfig`` declares, so the
field order, and every other default, stay ``SAEConfig``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ADAM_RECIPE", "SignDescentRecipe", "TunedSignDescentRecipe"]

# The Adam recipe that was every architecture's default before schedule-free sign descent
# (each architecture's preset('adam') starts from it).
ADAM_RECIPE: dict[str, Any] = dict(optimizer="adam", encoder_init_scale=1.0, lr=5e-4, lr_reference_width=None,
                                   lr_warmup_steps=100, lr_decay_fraction=0.2)


@dataclass
class SignDescentRecipe:
    """Schedule-free sign descent with sparsify's width-scaled step size."""

    optimizer: Literal["adam", "signsgd_schedulefree"] = "signsgd_schedulefree"
    """Sign descent with schedule-free averaging (sparsify's optimiser): at 122 steps of 4096 on
    MiniLM it halved TopK's held-out FVU against Adam at 5e-4 and made ReLU and Gated far sparser
    at the same FVU (benchmarks/README.md, recipe check). preset('adam') restores Adam."""

    lr: float = 5e-3
    """Peak step size at lr_reference_width latents (sparsify's 5e-3 at 2^14)."""

    lr_reference_width: int | None = 16_384
    """lr applies at this width; d_sae latents use lr * sqrt(16384 / d_sae) (sparsify's rule)."""

    lr_warmup_steps: float = 0
    """No warm-up: schedule-free averaging needs none."""

    lr_decay_fraction: float = 0.0
    """No decay: schedule-free averaging replaces it."""


@dataclass
class TunedSignDescentRecipe(SignDescentRecipe):
    """The sign-descent recipe with the two settings the recipe check tuned for TopK and JumpReLU."""

    schedule_free_beta: float = 0.98
    """Gradients at 0.98 x average + 0.02 x latest (sparsify: 0.95); with encoder_init_scale it
    lowered the 122-step FVU by 5% (TopK) and 5.6% (JumpReLU) in the recipe check."""

    encoder_init_scale: float = 0.577
    """About 1/sqrt(3), the encoder row norm of sparsify's initialisation."""
