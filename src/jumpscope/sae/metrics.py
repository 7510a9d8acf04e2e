"""Streaming SAE metrics (SPEC 3), exact over any number of batches.

Accumulators are float64 sums, so the result equals the whole-sample formula up to rounding
whatever the batch split. Definitions:

- L0: mean over tokens of the number of latents with f_i > 0.
- FVU: E||x - x_hat||^2 / E||x - E[x]||^2 (mean-centred); variance explained = 1 - FVU.
- MSE: mean over tokens and features of (x - x_hat)^2.
- cosine: mean over tokens of cos(x, x_hat).
- dead: latents that never fired on the sample; dense: latents firing on > 10% of tokens. The
  dead fraction depends on the sample's size (a rare latent has not fired *yet*), so it is always
  reported with its number of tokens (:func:`dead_label`), and a sample under
  ``MIN_DEAD_SAMPLE_TOKENS`` gets a warning (:func:`dead_sample_warning`).
- density histogram: counts of log10(firing frequency) of live latents in fixed bins.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .step import SparseActs

DENSE_FREQUENCY = 0.1
# A latent of firing density p is expected to fire N * p times in N tokens, so a sample of N tokens
# tells "dead" from "rare" only for p >= 1 / N. Live SAE latents commonly go down to p = 1e-4 (one
# token in ten thousand): on fewer than 1 / 1e-4 = 10,000 tokens such a latent is expected to fire
# less than once, and much of what the sample calls dead is merely rare.
RARE_DENSITY = 1e-4
MIN_DEAD_SAMPLE_TOKENS = round(1 / RARE_DENSITY)
HISTOGRAM_EDGES = [round(-10.0 + 0.25 * i, 2) for i in range(41)]  # log10 frequency, -10 .. 0


class StreamingMetrics:
    """Accumulate reconstruction and sparsity statistics batch by batch."""

    def __init__(self, d_sae: int, d_out: int, device: torch.device | str = "cpu"):
        self.d_sae, self.d_out = d_sae, d_out
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n_tokens = 0
        self.sum_sq_error = torch.zeros((), **f64)
        self.sum_target = torch.zeros(self.d_out, **f64)
        self.sum_sq_target = torch.zeros((), **f64)
        self.sum_l0 = torch.zeros((), **f64)
        self.sum_cosine = torch.zeros((), **f64)
        self.firing_counts = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, target: Tensor, reconstruction: Tensor, feature_acts: Tensor | SparseActs) -> None:
        """Add a batch: ``target`` and ``reconstruction`` (..., d_out), ``feature_acts`` (..., d_sae)
        (only whether each act is > 0 is read)."""
        target = target.reshape(-1, self.d_out).double()
        reconstruction = reconstruction.reshape(-1, self.d_out).double()
        if isinstance(feature_acts, SparseActs):
            counts = feature_acts.firing_counts().double()
        else:
            # 1.0 where an act is > 0, else 0.0, summed in float32 (exact up to 2^24 rows a chunk):
            # several times faster on the CPU than summing a boolean (B, d_sae) mask
            acts = feature_acts.detach().reshape(-1, self.d_sae).float()
            positive = torch.sign(acts).clamp_(min=0).nan_to_num_(0.0)
            counts = sum(chunk.sum(0).double() for chunk in positive.split(1 << 24))
        self.n_tokens += target.shape[0]
        self.sum_sq_error += (target - reconstruction).pow(2).sum()
        self.sum_target += target.sum(0)
        target_sq = target.pow(2).sum(-1)
        self.sum_sq_target += target_sq.sum()
        self.sum_l0 += counts.double().sum()
        # cosine per row, as cosine_similarity(eps=1e-12) computes it but without its float64 overhead
        dot = (target * reconstruction).sum(-1)
        norms = (target_sq * reconstruction.pow(2).sum(-1)).sqrt().clamp_min(1e-12)
        self.sum_cosine += (dot / norms).sum()
        self.firing_counts += counts.round().to(torch.int64)

    def compute(self) -> dict[str, Any]:
        n = self.n_tokens
        if n == 0:
            raise ValueError("no tokens were seen: metrics need at least one batch")
        centred = (self.sum_sq_target - self.sum_target.pow(2).sum() / n).item()
        frequency = self.firing_counts.double() / n
        live = frequency[frequency > 0]
        histogram = torch.histogram(live.log10().cpu().clamp(min=HISTOGRAM_EDGES[0]),
                                    bins=torch.tensor(HISTOGRAM_EDGES, dtype=torch.float64))
        return {
            "n_tokens": n,
            "l0": self.sum_l0.item() / n,
            "fvu": self.sum_sq_error.item() / centred if centred > 0 else math.nan,
            "mse": self.sum_sq_error.item() / (n * self.d_out),
            "cosine": self.sum_cosine.item() / n,
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > DENSE_FREQUENCY).double().mean().item(),
            "density_histogram": {"log10_frequency_edges": HISTOGRAM_EDGES,
                                  "counts": histogram.hist.long().tolist(),
                                  "dead": int((frequency == 0).sum())},
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {"n_tokens": torch.tensor(self.n_tokens, dtype=torch.int64), "sum_sq_error": self.sum_sq_error,
                "sum_target": self.sum_target, "sum_sq_target": self.sum_sq_target, "sum_l0": self.sum_l0,
                "sum_cosine": self.sum_cosine, "firing_counts": self.firing_counts}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.n_tokens = int(state["n_tokens"])
        for name in ("sum_sq_error", "sum_target", "sum_sq_target", "sum_l0", "sum_cosine", "firing_counts"):
            setattr(self, name, state[name].to(self.device).clone())


def dead_label(n_tokens: int) -> str:
    """How a dead fraction is headed wherever it is shown: ``dead on 12,240 tokens``."""
    return f"dead on {int(n_tokens):,} tokens"


def dead_sample_warning(n_tokens: int) -> str | None:
    """A one-line warning when ``n_tokens`` is too few for the dead fraction to mean much (see
    ``MIN_DEAD_SAMPLE_TOKENS``), else None."""
    if n_tokens >= MIN_DEAD_SAMPLE_TOKENS:
        return None
    return (f"the dead fraction is measured on only {int(n_tokens):,} tokens: a latent firing on 1 token in "
            f"{MIN_DEAD_SAMPLE_TOKENS:,} is expected to fire {n_tokens * RARE_DENSITY:.2f} times there, so rare "
            f"latents count as dead; evaluate on at least {MIN_DEAD_SAMPLE_TOKENS:,} tokens (--eval-tokens)")


def batch_fvu(target: Tensor, reconstruction: Tensor) -> float:
    """FVU of one batch (mean-centred over the batch)."""
    centred = (target - target.mean(0)).pow(2).sum()
    return ((target - reconstruction).pow(2).sum() / centred.clamp_min(1e-30)).item()
