"""Shared training-recipe defaults of the architecture configs (README, "Training recipes").

A config lists a recipe before ``SAEConfig`` among its bases (``class C(SignDescentRecipe,
SAEConfig)``): the recipe only changes the defaults of fields ``SAEConfig`` declares, so the
field order, and every other default, stay ``SAEConfig``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ADAM_RECIPE", "FIXED_LR", "SignDescentRecipe", "TunedSignDescentRecipe"]

# lr exactly as given: no width, run-length or input-width rule (every Adam recipe)
FIXED_LR: dict[str, Any] = dict(lr_reference_width=None, lr_reference_steps=None, lr_reference_d_in=None)

# The Adam recipe that was every architecture's default before schedule-free sign descent
# (each architecture's preset('adam') starts from it).
ADAM_RECIPE: dict[str, Any] = dict(optimizer="adam", encoder_init_scale=1.0, lr=5e-4, **FIXED_LR,
                                   lr_warmup_steps=100, lr_decay_fraction=0.2)


@dataclass
class SignDescentRecipe:
    """Schedule-free sign descent with sparsify's width-scaled step size."""

    optimizer: Literal["adam", "signsgd_schedulefree"] = "signsgd_schedulefree"
    """Sign descent with schedule-free averaging (sparsify's optimiser): at 122 steps of 4096 on
    MiniLM it halved TopK's held-out FVU against Adam at 5e-4 and made ReLU and Gated far sparser
    at the same FVU (benchmarks/README.md, recipe check). preset('adam') restores Adam."""

    lr: float = 7e-3
    """Step size of a 500-step run on 384 input features; a run of T steps on d_in features
    takes lr * sqrt(500 / T) * sqrt(384 / d_in) (lr_reference_steps, lr_reference_d_in): 1.4e-2 at
    122 steps, 3.5e-3 at 2,000 (MiniLM d_in 384). Measured on MiniLM at 122 and 488 steps of
    4096 and 488 of 1024, widths 2048 and 8192, where the best step fell as 1/sqrt(T) and did not
    follow sparsify's width rule (benchmarks/README.md, "Step size against run length")."""

    lr_reference_width: int | None = None
    """No width rule: at a fixed run length the best step was the same at 2048 and 8192 latents
    (sparsify's lr * sqrt(16384 / d_sae) gave 0.5x at 8192: FVU 4.5% higher at 122 steps)."""

    lr_reference_steps: int | None = 500
    """lr applies to a 500-step run; T steps use lr * sqrt(500 / T) (T within 125..2,000)."""

    lr_reference_d_in: int | None = 384
    """lr applies at 384 input features; d_in features use lr * sqrt(384 / d_in). On stories260K's
    64 features (1M tokens, JumpReLU and TopK, L0 16, two seeds) the sqrt factor (2.45x) and 2x
    beat 1x and the linear 384 / d_in (6x) this replaced: delta LM loss 0.085-0.088 against
    0.108-0.128 (6x) and 0.098-0.113 (1x); SmolLM2's 576 tied between 1x and 0.67x."""

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
