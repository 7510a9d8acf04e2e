"""Random-direction "latents": the control autointerp scores are read against.

A control latent is a random unit direction r of the SAE's input space with a threshold t:
``activation = (x . r) * [x . r > t]``, t set on a sample of the site's activations so the control
fires as often as the SAE's median live latent. Explained and scored exactly like the SAE's
latents, it says what score an explanation earns for a direction with no learned meaning; a score
means something only above it.

:class:`WithControls` puts the controls after the SAE's latents (ids ``d_sae .. d_sae + n - 1``),
so one corpus scan collects examples for both (:func:`jumpscope.analysis.examples.collect_examples`
needs only ``cfg.site`` / ``cfg.d_sae`` / ``cfg.d_in``, ``W_enc`` and ``encode``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..sae.base import SAE

__all__ = ["RandomDirections", "WithControls"]


@dataclass(frozen=True)
class _Config:
    site: str
    d_sae: int
    d_in: int
    target_site: None = None


class RandomDirections(nn.Module):
    """``n`` random unit directions with thresholds calibrated to a firing density."""

    def __init__(self, d_in: int, n: int, site: str, seed: int = 0):
        super().__init__()
        if n < 1:
            raise ValueError(f"the number of random-direction controls must be >= 1, got {n}")
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(d_in, n, generator=generator)
        self.W_enc = nn.Parameter(directions / directions.norm(dim=0, keepdim=True), requires_grad=False)
        self.threshold = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.cfg = _Config(site=site, d_sae=n, d_in=d_in)

    @torch.no_grad()
    def calibrate(self, sample: Tensor, density: float) -> "RandomDirections":
        """Thresholds at the (1 - density) quantile of each direction's projection over ``sample``
        [N, d_in] (never below 0: a control fires only on a positive projection)."""
        if not 0 < density < 1:
            raise ValueError(f"density must be in (0, 1), got {density}")
        projections = sample.to(self.W_enc) @ self.W_enc
        self.threshold.copy_(torch.quantile(projections, 1.0 - density, dim=0).clamp(min=0.0))
        return self

    def encode(self, x: Tensor) -> Tensor:
        projections = x.to(self.W_enc) @ self.W_enc
        return projections * (projections > self.threshold)


class WithControls(nn.Module):
    """An SAE's latents followed by the control latents, for one corpus scan."""

    def __init__(self, sae: SAE, controls: RandomDirections):
        super().__init__()
        if sae.cfg.d_in != controls.cfg.d_in:
            raise ValueError(f"controls read width {controls.cfg.d_in}, the SAE d_in={sae.cfg.d_in}")
        self.sae, self.controls = sae, controls
        self.cfg = _Config(site=sae.cfg.site, d_sae=sae.cfg.d_sae + controls.cfg.d_sae, d_in=sae.cfg.d_in)

    @property
    def W_enc(self) -> Tensor:
        return self.sae.W_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.cat([self.sae.encode(x), self.controls.encode(x).to(self.sae.W_enc.dtype)], dim=-1)
