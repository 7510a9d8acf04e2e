"""Optimiser construction and the learning-rate / sparsity-coefficient schedules."""

from __future__ import annotations

import torch

from ..sae.base import SAE


def make_optimizer(sae: SAE) -> torch.optim.Adam:
    """Adam with the hyperparameters the SAE's own config carries (per-architecture defaults)."""
    cfg = sae.cfg
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant, then a linear decay to 0 over
    the last ``decay_fraction`` of the run."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = int(total_steps * decay_fraction)
    if decay_steps > 0:
        factor *= min(1.0, (total_steps - step) / decay_steps)
    return max(factor, 0.0)


def sparsity_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up of the sparsity coefficient; ``warmup_steps < 0`` means over the whole run."""
    if warmup_steps < 0:
        warmup_steps = total_steps
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
